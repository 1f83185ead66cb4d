"""The worker's cluster side: IKE relayed to responders, Child SA keys from the store.

Relay. Every IKE datagram a peer sends goes, sealed, to the responder that rendezvous
hashing of its IKE initiator SPI picks among the live responders (the same choice on
every worker, so a peer behind any worker reaches the owner of its SA); the answers come
back from that responder and leave from the address the peer talked to.

Keys. The responders keep this worker's Child SAs in a durable per-worker table in the
store and announce each change on the worker's notification stream. The worker
subscribes first, then reads the table, so nothing falls between the two; when the
stream reports a gap it reads the table again and reconciles.

Sequence numbers. Outbound ESP sequence numbers are not stored per packet. Once a second
the worker stores a checkpoint (every SA's current number and the time); a worker that
starts from the table begins each SA at its checkpoint plus `SEQ_MARGIN` plus
`SEQ_RATE_BOUND` per second since the checkpoint, more than the SA can have sent
meanwhile, so no (SPI, sequence number) pair is ever sent twice (RFC 4303 3.3.3). A
32-bit SA pushed near its end by this asks for a rekey like any other.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgpack
import trio

from ..errors import ParseError
from ..esp import SaHardExpired, SaIdle, SaSequenceExhausted, SaSoftExpired
from ..ike.events import ChildSaEstablished
from ..ike.message import Header
from ..ike.session import Address, Datagram
from ..ike.snapshot import child_event
from ..relay import (
    ACTIVE_MAX,
    LIMIT_EXPIRED,
    LIMIT_HARD,
    LIMIT_SOFT,
    Envelope,
    Kind,
    child_active,
    child_limit,
    child_traffic,
)
from ..relay_socket import RelaySocket, parse_address
from ..rendezvous import choose
from ..store import ClusterKey, PutChild, StateStore, StoreError, open_sealed
from ..store.membership import Membership
from ..store.sealing import child_aad
from .dataplane import DataPlane
from .keys import Limits, params_from_event

logger = logging.getLogger(__name__)

CHECKPOINT_FIELD = b"seq"  # in the per-worker table; Child SA fields are 4-byte SPIs
INCARNATION_FIELD = b"inc"  # written once per worker start: its absence means a lost table
CHECKPOINT_INTERVAL = 1.0
SEQ_MARGIN = 1 << 20
SEQ_RATE_BOUND = 1 << 20  # packets per second one SA can be sent at, generously


class WorkerRelay:
    """The dispatcher's router on a worker: IKE goes to a responder, answers come back."""

    def __init__(self, relay: RelaySocket, membership: Membership,
                 send_to_peer: Callable[[Datagram], None]) -> None:
        self.relay = relay
        self.membership = membership
        self.send_to_peer = send_to_peer
        self._responders: list[str] = []
        self._addresses: dict[str, Address] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the live responders from membership (call on every change)."""
        responders = self.membership.of_role("responder")
        addresses = {}
        for member in responders:
            relay = member.info.get("relay")
            if isinstance(relay, str):
                try:
                    addresses[member.node] = parse_address(relay)
                except ValueError:
                    continue
        self._addresses = addresses
        self._responders = sorted(addresses)

    def route(self, header: Header, data: bytes, local: Address, remote: Address,
              now: float) -> None:
        if not self._responders:
            self.relay.drop("no_responder")
            return
        responder = choose(header.spi_i, self._responders)
        envelope = self.relay.codec.encode(Kind.IKE_FROM_PEER, responder, data=data,
                                           local=local, remote=remote)
        self.relay.send(envelope, self._addresses[responder])

    def request(self, spi_i: bytes, kind: Kind, data: bytes) -> None:
        """A message about an IKE SA to the responder that owns it (by rendezvous)."""
        responder = self.responder_for(spi_i)
        if responder is not None:
            self.send_to(responder, kind, data)

    def responder_for(self, spi_i: bytes) -> str | None:
        """The responder that owns IKE SAs with this initiator SPI (None, counted, when
        no responder is live)."""
        if not self._responders:
            self.relay.drop("no_responder")
            return None
        return choose(spi_i, self._responders)

    def send_to(self, responder: str, kind: Kind, data: bytes) -> None:
        self.relay.send(self.relay.codec.encode(kind, responder, data=data),
                        self._addresses[responder])

    def handle(self, envelope: Envelope, source: Address) -> None:
        if envelope.kind is not Kind.IKE_TO_PEER:
            self.relay.drop("unexpected_kind")
            return
        self.send_to_peer(Datagram(envelope.data, envelope.local, envelope.remote,
                                   keepalive=envelope.keepalive))


class ChildLimits:
    """The data plane's lifetimes drive the responders, as in a single node (RFC 4301
    4.4.2.1): a soft limit asks the responder of the Child SA's IKE SA to rekey it,
    inactivity to delete it, a hard limit or exhausted sequence numbers (the SA is gone
    here already) to expire it. The responder is the one rendezvous hashing picks for the
    IKE initiator SPI; the request is repeated a few times while the SA is still here
    (an expired one: while its IKE SA is known here), since that responder may be
    loading the SA just then (a repeat is a no-op there)."""

    RESEND_INTERVAL = 3.0
    TRIES = 4

    def __init__(self, relay: WorkerRelay, plane: DataPlane) -> None:
        self.relay = relay
        self.plane = plane
        self.sent = 0
        self._pending: dict[bytes, tuple[int, int]] = {}  # spi_in -> (limit, tries left)

    def on_esp_event(self, event: object) -> None:
        if isinstance(event, SaSoftExpired):
            limit, kind, action = LIMIT_SOFT, "soft", "rekey"
        elif isinstance(event, SaHardExpired | SaSequenceExhausted):
            # gone from the SAD already: its responder ends it too and creates it again
            limit, kind, action = LIMIT_EXPIRED, "hard", "expire"
        elif isinstance(event, SaIdle):
            limit, kind, action = LIMIT_HARD, "hard", "delete"
        else:
            return
        spi_in = event.spi_in
        reason = f"inactivity, {event.seconds:.0f} s" if isinstance(event, SaIdle) else \
            getattr(event, "reason", "sequence")
        logger.info("Child SA %s reached its %s limit (%s); asking its responder to %s it",
                    spi_in.hex(), kind, reason, action)
        self._pending[spi_in] = (limit, self.TRIES)
        self._send(spi_in)

    def _send(self, spi_in: bytes) -> None:
        limit, tries = self._pending[spi_in]
        ike = self.plane.ike_sa_of(spi_in)
        # (an expired SA is gone here already; the others go when their responder acts)
        gone = limit != LIMIT_EXPIRED and self.plane.sad.get(spi_in) is None
        if ike is None or tries <= 0 or gone:
            del self._pending[spi_in]
            return
        self._pending[spi_in] = (limit, tries - 1)
        self.relay.request(ike[0], Kind.CHILD_LIMIT, child_limit(ike[0], ike[1], spi_in, limit))
        self.sent += 1

    async def run(self) -> None:
        while True:
            await trio.sleep(self.RESEND_INTERVAL)
            for spi_in in list(self._pending):
                self._send(spi_in)


class ActivityReports:
    """The Child SAs that received ESP lately (the data plane's `on_activity`, every
    ACTIVITY_CHECK seconds), told to the responders of their IKE SAs, which put their
    liveness checks off while ESP shows the peer alive (RFC 7296 2.4), as a single node
    does: one CHILD_ACTIVE envelope per responder and ACTIVE_MAX Child SAs."""

    def __init__(self, relay: WorkerRelay, plane: DataPlane) -> None:
        self.relay = relay
        self.plane = plane
        self.sent = 0

    def active(self, spis_in: list[bytes]) -> None:
        by_responder: dict[str, list[bytes]] = {}
        for spi_in in spis_in:
            ike = self.plane.ike_sa_of(spi_in)
            responder = self.relay.responder_for(ike[0]) if ike is not None else None
            if responder is not None:
                by_responder.setdefault(responder, []).append(spi_in)
        for responder, spis in by_responder.items():
            for at in range(0, len(spis), ACTIVE_MAX):
                self.relay.send_to(responder, Kind.CHILD_ACTIVE,
                                   child_active(spis[at:at + ACTIVE_MAX]))
                self.sent += 1


def _message_untrusted(data: bytes) -> list[Any]:
    try:
        message = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ParseError("undecodable key message") from None
    if not (isinstance(message, list) and len(message) >= 2 and isinstance(message[0], str)
            and isinstance(message[1], bytes)):
        raise ParseError("key message is not [kind, spi, ...]")
    return message


class TrafficReports:
    """What each Child SA carried when it left the SAD for good (a delete, the end of a
    rekeyed SA's linger, its hard lifetime), told to the responder of its IKE SA (the
    one rendezvous hashing picks for the IKE initiator SPI) for its RADIUS accounting:
    one datagram per Child SA, `removed` being the data plane's `on_removed`. `run`
    tells what the Child SAs still here carried so far, every USAGE_INTERVAL for those
    whose counts changed, for the responders' Interim-Updates."""

    USAGE_INTERVAL = 30.0

    def __init__(self, relay: WorkerRelay, plane: DataPlane) -> None:
        self.relay = relay
        self.plane = plane
        self.sent = 0
        self._told: dict[bytes, tuple[int, int, int, int]] = {}  # spi_in -> last usage

    def removed(self, spi_in: bytes, ike: tuple[bytes, bytes] | None,
                traffic: tuple[int, int, int, int]) -> None:
        self._told.pop(spi_in, None)
        if ike is None:
            return
        self.relay.request(ike[0], Kind.CHILD_TRAFFIC, child_traffic(ike[0], ike[1], spi_in,
                                                                     traffic))
        self.sent += 1

    def usage(self) -> None:
        """CHILD_USAGE for each Child SA whose counts changed since it was last told."""
        told: dict[bytes, tuple[int, int, int, int]] = {}
        for child in self.plane.sad:
            spi_in = child.params.spi_in
            ike = self.plane.ike_sa_of(spi_in)
            if ike is None:
                continue
            traffic = child.counters.traffic()
            told[spi_in] = traffic
            if traffic != self._told.get(spi_in, (0, 0, 0, 0)):
                self.relay.request(ike[0], Kind.CHILD_USAGE,
                                   child_traffic(ike[0], ike[1], spi_in, traffic))
                self.sent += 1
        self._told = told

    async def run(self) -> None:
        while True:
            await trio.sleep(self.USAGE_INTERVAL)
            self.usage()


class KeySubscriber:
    """Keeps the data plane's SAD equal to this worker's table in the store."""

    def __init__(self, store: StateStore, worker: str, key: ClusterKey, plane: DataPlane,
                 limits: Limits, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.worker = worker
        self.key = key
        self.plane = plane
        self.limits = limits
        self._wall_clock = wall_clock
        self.installed = 0
        self.removed = 0
        self.resyncs = 0
        self.errors = 0  # records or messages that did not open
        self.restored = 0  # SAs installed from the table at start, with a sequence jump
        self.tables_lost = 0  # resyncs that found the store had forgotten our table
        self._incarnation = os.urandom(8)
        # told of each Child SA installed (from a message or the table at a resync), of
        # an IKE SA rekey (the Child SA's inbound SPI, the new spi_i + spi_r) and of a
        # move (its inbound SPI, the peer's new address): a child's updown
        self.on_install: Callable[[ChildSaEstablished], None] | None = None
        self.on_ike: Callable[[bytes, bytes], None] | None = None
        self.on_move: Callable[[bytes, tuple[str, int]], None] | None = None

    def _open(self, spi_in: bytes, sealed: bytes) -> Any:
        plain = open_sealed(self.key, sealed, child_aad(self.worker, spi_in))
        return child_event(msgpack.unpackb(plain, raw=False))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Subscribe, load the table (restoring with jumped sequence numbers), follow."""
        first = True
        while True:
            try:
                async with self.store.subscribe(self.worker) as subscription:
                    await self.resync(restoring=first)
                    if first:
                        first = False
                        task_status.started()
                    async for message in subscription:
                        if message is None:
                            await self.resync()
                        else:
                            self.apply(message)
            except StoreError as exc:
                if first:
                    first = False
                    task_status.started()
                logger.warning("key subscription: %s; retrying", exc)
                await trio.sleep(1.0)

    async def resync(self, *, restoring: bool = False) -> None:
        """Make the SAD match the table. A table without our incarnation mark after we
        wrote it was lost by the store (a Redis restart without its data): then nothing
        is removed, since the responders store their SAs again (and the marks anew)."""
        self.resyncs += 1
        table = await self.store.children(self.worker)
        checkpoint = _checkpoint(table.pop(CHECKPOINT_FIELD, None))
        lost = not restoring and table.pop(INCARNATION_FIELD, None) != self._incarnation
        table.pop(INCARNATION_FIELD, None)
        if restoring or lost:
            await self.store.run(PutChild(self.worker, INCARNATION_FIELD, self._incarnation))
        if lost:
            self.tables_lost += 1
            logger.warning("the store lost this worker's Child SA table; keeping the %d "
                           "installed SAs until the responders store them again",
                           len(self.plane.sad))
        sad = self.plane.sad
        for spi_in in [s for s in self._installed_spis() if s not in table and not lost]:
            self.plane.remove(spi_in)
            self.removed += 1
        for spi_in, sealed in table.items():
            if sad.get(spi_in) is not None:
                continue
            try:
                event = self._open(spi_in, sealed)
            except (StoreError, ParseError, ValueError) as exc:
                self.errors += 1
                logger.warning("Child SA %s in the store does not open: %s", spi_in.hex(), exc)
                continue
            params = params_from_event(event, self.limits)
            if restoring:
                params = replace(params, initial_seq=self._resume_seq(spi_in, checkpoint))
                self.restored += 1
            try:
                self.plane.install(params, (event.ike_spi_i, event.ike_spi_r),
                                   event.inactivity)
            except (ValueError, OSError) as exc:
                self.errors += 1
                logger.error("installing Child SA %s failed: %s", spi_in.hex(), exc)
                continue
            self.installed += 1
            if self.on_install is not None:
                self.on_install(event)
        if restoring and table:
            logger.info("restored %d Child SAs from the store (sequence numbers jumped)",
                        self.restored)

    def _installed_spis(self) -> list[bytes]:
        """What the table should hold: not the deleted SAs still lingering."""
        lingering = self.plane.lingering
        return [child.params.spi_in for child in self.plane.sad
                if child.params.spi_in not in lingering]

    def _resume_seq(self, spi_in: bytes, checkpoint: tuple[float, dict[bytes, int]] | None
                    ) -> int:
        if checkpoint is None:  # never checkpointed: all we know is that time passed
            return 1 << 31
        at, seqs = checkpoint
        elapsed = max(0.0, self._wall_clock() - at)
        return seqs.get(spi_in, 0) + SEQ_MARGIN + int(SEQ_RATE_BOUND * elapsed)

    def apply(self, data: bytes) -> None:
        try:
            message = _message_untrusted(data)
            kind, spi_in = message[0], message[1]
            if kind == "install" and len(message) == 3 and isinstance(message[2], bytes):
                if self.plane.sad.get(spi_in) is not None:
                    return  # stored again after a store restart: keep its counters
                event = self._open(spi_in, message[2])
                self.plane.on_ike_event(event)
                self.installed += 1
                if self.on_install is not None and self.plane.sad.get(spi_in) is not None:
                    self.on_install(event)
            elif kind == "remove":
                if self.plane.sad.get(spi_in) is not None and spi_in not in self.plane.lingering:
                    self.plane.delete(spi_in)  # a rekeyed-away SA lingers a few seconds
                    self.removed += 1
            elif kind == "ike" and len(message) == 4:  # its IKE SA was rekeyed
                spi_i, spi_r = message[2], message[3]
                if not (isinstance(spi_i, bytes) and isinstance(spi_r, bytes)):
                    raise ParseError("key message 'ike' without SPIs")
                self.plane.set_ike_sa(spi_in, (spi_i, spi_r))
                if self.on_ike is not None:
                    self.on_ike(spi_in, spi_i + spi_r)
            elif kind == "move" and len(message) == 3:
                host, port = message[2]
                self.plane.move(spi_in, (str(host), int(port)))
                if self.on_move is not None:
                    self.on_move(spi_in, (str(host), int(port)))
            else:
                raise ParseError(f"key message kind {kind!r}")
        except (StoreError, ParseError, ValueError, TypeError) as exc:
            self.errors += 1
            logger.warning("key message dropped: %s", exc)

    async def checkpoint(self) -> None:
        """Store every outbound sequence number with the time (see the module docstring)."""
        seqs = {child.params.spi_in: child.outbound.seq for child in self.plane.sad
                if child.outbound is not None}
        packed = msgpack.packb([self._wall_clock(), seqs], use_bin_type=True)
        await self.store.run(PutChild(self.worker, CHECKPOINT_FIELD, packed))

    async def checkpoints(self) -> None:
        while True:
            try:
                await self.checkpoint()
            except StoreError as exc:
                self.errors += 1
                logger.debug("sequence checkpoint not stored: %s", exc)
            await trio.sleep(CHECKPOINT_INTERVAL)


def _checkpoint(packed: bytes | None) -> tuple[float, dict[bytes, int]] | None:
    if packed is None:
        return None
    try:
        at, seqs = msgpack.unpackb(packed, raw=False, strict_map_key=False)
        return float(at), {bytes(k): int(v) for k, v in seqs.items()}
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError):
        return None
