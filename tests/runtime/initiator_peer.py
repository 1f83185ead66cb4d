"""The test side of the wire: our own `IkeSession.initiator` on a UDP socket.

A tiny loop in the aioquic shape: send what the session produced, wait for a
datagram until its timer, feed it in, look at its events.
"""

from __future__ import annotations

import math
import secrets
import socket
from collections.abc import Callable

import trio

from cluster.ike.constants import NON_ESP_MARKER, ExchangeType
from cluster.ike.events import Event, ExchangeCompleted, IkeSaDeleted, IkeSaEstablished
from cluster.ike.policy import ConnectionConfig, ResponderPolicy
from cluster.ike.session import Address, IkeSession


class InitiatorPeer:
    def __init__(self, sock: trio.socket.SocketType, session: IkeSession, natt_port: int) -> None:
        self.sock = sock
        self.session = session
        self.natt_port = natt_port
        self.events: list[Event] = []

    @classmethod
    async def open(
        cls,
        server: Address,
        natt_port: int,
        connection: ConnectionConfig,
        policy: ResponderPolicy,
        *,
        initial_contact: bool = False,
    ) -> InitiatorPeer:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        await sock.bind((server[0], 0))
        name = sock.getsockname()
        session = IkeSession.initiator(
            connection,
            policy,
            secrets.token_bytes(8),
            (name[0], name[1]),
            server,
            trio.current_time(),
            initial_contact=initial_contact,
        )
        return cls(sock, session, natt_port)

    def close(self) -> None:
        self.sock.close()

    @property
    def local(self) -> Address:
        name = self.sock.getsockname()
        return (name[0], name[1])

    async def flush(self) -> None:
        for datagram in self.session.datagrams_to_send():
            data = datagram.data
            if datagram.remote[1] == self.natt_port:
                data = NON_ESP_MARKER + data  # RFC 3948 2.2
            await self.sock.sendto(data, datagram.remote)

    async def run_until(self, done: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        """Drive the session until an event satisfies `done`; fail after `timeout`."""
        with trio.fail_after(timeout):
            while True:
                await self.flush()
                event = self.session.next_event()
                while event is not None:
                    self.events.append(event)
                    if done(event):
                        return event
                    event = self.session.next_event()
                timer = self.session.get_timer()
                data: bytes | None = None
                with trio.move_on_at(math.inf if timer is None else timer):
                    data, addr = await self.sock.recvfrom(65535)
                now = trio.current_time()
                if data is None:
                    self.session.handle_timer(now)
                    continue
                if addr[1] == self.natt_port:
                    if data[:4] != NON_ESP_MARKER:
                        continue
                    data = data[4:]
                self.session.receive_datagram_untrusted(data, self.local, (addr[0], addr[1]), now)

    async def establish(self, timeout: float = 10.0) -> IkeSaEstablished:
        event = await self.run_until(lambda e: isinstance(e, IkeSaEstablished), timeout)
        assert isinstance(event, IkeSaEstablished)
        return event

    def start_liveness_check(self) -> None:
        """Queue an empty INFORMATIONAL request (RFC 7296 1.4); `flush` sends it."""
        assert self.session.check_liveness(trio.current_time())

    async def check_liveness(self, timeout: float = 10.0) -> None:
        """A liveness check that the responder answers."""
        self.start_liveness_check()
        event = await self.run_until(_informational_completed, timeout)
        assert isinstance(event, ExchangeCompleted) and event.result == "ok"

    async def delete(self, timeout: float = 10.0) -> None:
        """Delete the IKE SA (RFC 7296 1.4.1) and wait for the answer."""
        self.session.delete_ike(trio.current_time())
        await self.run_until(
            lambda e: isinstance(e, IkeSaDeleted) or _informational_completed(e), timeout
        )


def _informational_completed(event: Event) -> bool:
    return (
        isinstance(event, ExchangeCompleted)
        and event.exchange == ExchangeType.INFORMATIONAL
        and not event.as_responder
    )
