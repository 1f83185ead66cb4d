"""The RADIUS round trips of eap-radius connections (the transport of ike/radius.py).

Each request gets its own UDP socket connected to the server, so answers need no
demultiplexing and a late answer to an abandoned request reaches nobody. A request is
sent again, identical (RFC 2865 2.5), after `settings.delay(attempt)` seconds without a
valid answer; datagrams that are not one (another identifier, a wrong authenticator)
are counted and ignored while it waits.

A server that let every try of a request go unanswered is passed over for HOLD_DOWN
seconds (its requests fail at once, so the next server is asked without the wait), then
tried again: a dead primary does not add its whole retransmission schedule to every
login.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass

import trio

from ..ike.radius import RadiusBackend, RadiusServer, RadiusSettings

logger = logging.getLogger(__name__)
MAX_DATAGRAM = 4096  # RFC 2865 3: at most 4096 bytes
HOLD_DOWN = 30.0  # seconds a server that did not answer is passed over


@dataclass
class RadiusStats:
    """Round trips and how they ended, for the metrics."""

    answered: int = 0
    timeouts: int = 0
    retransmits: int = 0
    invalid: int = 0  # datagrams from the server's address that were no valid answer
    skipped: int = 0  # requests not sent: the server did not answer lately

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RadiusClient:
    def __init__(self, stats: RadiusStats | None = None, hold_down: float = HOLD_DOWN) -> None:
        self.stats = stats if stats is not None else RadiusStats()
        self.hold_down = hold_down
        self._down_until: dict[tuple[str, int], float] = {}  # (address, port) -> time

    def install(self, backend: RadiusBackend) -> None:
        backend.transport = self.exchange

    async def exchange(self, server: RadiusServer, request: bytes, settings: RadiusSettings,
                       accept: Callable[[bytes], bool]) -> bytes | None:
        stats = self.stats
        where = (server.address, server.port)
        if self._down_until.get(where, 0.0) > trio.current_time():
            stats.skipped += 1
            return None
        family = socket.AF_INET6 if ":" in server.address else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                await sock.connect(where)
            except OSError as exc:  # no route to it: as if it did not answer
                self._no_answer(server, str(exc))
                return None
            for attempt in range(settings.tries):
                if attempt:
                    stats.retransmits += 1
                try:
                    await sock.send(request)
                except OSError as exc:  # no route: the next try may find one
                    logger.debug("RADIUS %s: %s", server.name, exc)
                with trio.move_on_after(settings.delay(attempt)):
                    while True:
                        try:
                            data = await sock.recv(MAX_DATAGRAM)
                        except OSError:  # ICMP unreachable: nobody listens (yet)
                            await trio.sleep_forever()  # until this try's time is up
                        if accept(data):
                            stats.answered += 1
                            self._down_until.pop(where, None)
                            return data
                        stats.invalid += 1
        self._no_answer(server, f"no answer to {settings.tries} tries")
        return None

    def _no_answer(self, server: RadiusServer, why: str) -> None:
        self.stats.timeouts += 1
        self._down_until[(server.address, server.port)] = trio.current_time() + self.hold_down
        logger.warning("RADIUS server %s (%s port %d): %s; passed over for %.0f s",
                       server.name, server.address, server.port, why, self.hold_down)
