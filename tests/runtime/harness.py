"""The supervisor driven by calls instead of sockets: datagrams in, replies into a list."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing

from cluster.ike.events import Event, IkeSaEstablished
from cluster.ike.session import Address, Datagram, IkeSession
from cluster.runtime.stats import RuntimeStats
from cluster.runtime.supervisor import Supervisor

from .conftest import Setup

SERVER: Address = ("192.0.2.1", 500)
CLIENT: Address = ("198.51.100.7", 500)


@dataclass
class Harness:
    setup: Setup
    supervisor: Supervisor
    stats: RuntimeStats
    sent: list[Datagram] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def initiator(self, spi_i: bytes = b"\x01" * 8, remote: Address = SERVER) -> IkeSession:
        return IkeSession.initiator(
            self.setup.connection,
            self.setup.initiator_policy,
            spi_i,
            CLIENT,
            remote,
            trio.current_time(),
        )

    def to_responder(self, session: IkeSession) -> int:
        """Route what the initiator wants to send; return how many datagrams."""
        out = session.datagrams_to_send()
        for d in out:
            self.supervisor.route_untrusted(d.data, d.remote, d.local, trio.current_time())
        return len(out)

    def to_initiator(self, session: IkeSession) -> None:
        sent = list(self.sent)
        self.sent.clear()
        for d in sent:
            session.receive_datagram_untrusted(d.data, d.remote, d.local, trio.current_time())

    async def establish(self, session: IkeSession) -> IkeSaEstablished:
        for _ in range(10):
            self.to_responder(session)
            await trio.testing.wait_all_tasks_blocked()
            self.to_initiator(session)
            event = session.next_event()
            while event is not None:
                if isinstance(event, IkeSaEstablished):
                    return event
                event = session.next_event()
        raise AssertionError("IKE SA did not come up")
