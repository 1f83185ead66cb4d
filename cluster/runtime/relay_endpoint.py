"""The responder's end of the relay: IKE datagrams from workers in, answers back out.

Each peer address is answered through the worker that last relayed a datagram from it
(the peer must always see one address); an SA taken over from another responder brings
the worker's id in its snapshot. Worker relay addresses come from membership.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import trio

from ..errors import ParseError
from ..ike.message import peek_header_untrusted
from ..ike.session import Address, Datagram
from ..relay import (
    Envelope,
    Kind,
    Traffic,
    parse_child_active,
    parse_child_limit,
    parse_child_traffic,
)
from ..relay_socket import RelaySocket, parse_address
from ..store.membership import Membership
from .dispatcher import Router

logger = logging.getLogger(__name__)

PEERS_MAX = 1 << 17  # peer address -> worker entries kept; the oldest quarter goes beyond


class ResponderRelay:
    def __init__(self, relay: RelaySocket, membership: Membership) -> None:
        self.relay = relay
        self.membership = membership
        self._worker_of: dict[Address, str] = {}
        # (spi_i, spi_r, spi_in, limit): a worker's Child SA reached a lifetime limit
        self.on_child_limit: Callable[[bytes, bytes, bytes, int], None] | None = None
        # (spi_i, spi_r, spi_in, traffic) of a Child SA a worker removed
        self.on_child_traffic: Callable[[bytes, bytes, bytes, Traffic], None] | None = None
        # the same of a Child SA still up: what it carried so far
        self.on_child_usage: Callable[[bytes, bytes, bytes, Traffic], None] | None = None
        # Child SAs (inbound SPIs) that received ESP lately
        self.on_child_active: Callable[[list[bytes]], object] | None = None

    def worker_of(self, remote: Address) -> str | None:
        return self._worker_of.get(remote)

    def learn_worker(self, remote: Address, worker: str) -> None:
        workers = self._worker_of
        if remote not in workers and len(workers) >= PEERS_MAX:
            for old in list(itertools.islice(workers, PEERS_MAX // 4)):
                del workers[old]
        workers[remote] = worker

    async def serve(self, router: Router, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        def handle(envelope: Envelope, source: Address) -> None:
            if envelope.kind is Kind.CHILD_LIMIT and self.on_child_limit is not None:
                self.on_child_limit(*parse_child_limit(envelope.data))
                return
            if envelope.kind is Kind.CHILD_TRAFFIC and self.on_child_traffic is not None:
                self.on_child_traffic(*parse_child_traffic(envelope.data))
                return
            if envelope.kind is Kind.CHILD_USAGE and self.on_child_usage is not None:
                self.on_child_usage(*parse_child_traffic(envelope.data))
                return
            if envelope.kind is Kind.CHILD_ACTIVE and self.on_child_active is not None:
                self.on_child_active(parse_child_active(envelope.data))
                return
            if envelope.kind is not Kind.IKE_FROM_PEER:
                self.relay.drop("unexpected_kind")
                return
            try:
                header = peek_header_untrusted(envelope.data)
            except ParseError:
                self.relay.drop("malformed_ike")
                return
            if self._worker_of.get(envelope.remote) != envelope.sender:
                self.learn_worker(envelope.remote, envelope.sender)
            router.route(header, envelope.data, envelope.local, envelope.remote,
                         trio.current_time())

        task_status.started()
        await self.relay.serve(handle)

    def send(self, datagram: Datagram) -> None:
        """The supervisor's `send`: back out through the peer's worker."""
        worker = self._worker_of.get(datagram.remote)
        if worker is None:
            self.relay.drop("no_worker")
            return
        member = self.membership.find(worker)
        address = member.info.get("relay") if member is not None else None
        if not isinstance(address, str):
            self.relay.drop("no_worker")
            logger.debug("worker %s is not a live member; datagram to %s dropped", worker,
                         datagram.remote)
            return
        envelope = self.relay.codec.encode(
            Kind.IKE_TO_PEER, worker, data=datagram.data, local=datagram.local,
            remote=datagram.remote, keepalive=datagram.keepalive)
        self.relay.send(envelope, parse_address(address))
