"""The RADIUS round trips of eap-radius connections (the transport of ike/radius.py).

Each request gets its own UDP socket connected to the server, so answers need no
demultiplexing and a late answer to an abandoned request reaches nobody. A request is
sent again, identical (RFC 2865 2.5), after `settings.delay(attempt)` seconds without a
valid answer; datagrams that are not one (another identifier, a wrong authenticator)
are counted and ignored while it waits.
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


@dataclass
class RadiusStats:
    """Round trips and how they ended, for the metrics."""

    answered: int = 0
    timeouts: int = 0
    retransmits: int = 0
    invalid: int = 0  # datagrams from the server's address that were no valid answer

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RadiusClient:
    def __init__(self, stats: RadiusStats | None = None) -> None:
        self.stats = stats if stats is not None else RadiusStats()

    def install(self, backend: RadiusBackend) -> None:
        backend.transport = self.exchange

    async def exchange(self, server: RadiusServer, request: bytes, settings: RadiusSettings,
                       accept: Callable[[bytes], bool]) -> bytes | None:
        stats = self.stats
        family = socket.AF_INET6 if ":" in server.address else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                await sock.connect((server.address, server.port))
            except OSError as exc:  # no route to it: as if it did not answer
                stats.timeouts += 1
                logger.warning("RADIUS server %s (%s port %d): %s", server.name,
                               server.address, server.port, exc)
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
                            return data
                        stats.invalid += 1
        stats.timeouts += 1
        logger.warning("RADIUS server %s (%s port %d) did not answer %d tries", server.name,
                       server.address, server.port, settings.tries)
        return None
