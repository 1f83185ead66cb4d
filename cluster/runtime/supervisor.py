"""Routes each datagram to the actor of its IKE SA; starts, retires and isolates actors.

Routing (we are always the original responder, so our SPI is the responder SPI
of every message of the SA, whichever side sent it, RFC 7296 2.6):
- an IKE_SA_INIT request with a zero responder SPI goes to the half-open actor
  of (initiator SPI, peer address), so a retransmission reaches the actor that
  answered the first copy; if there is none, a new actor with a fresh SPI;
- everything else goes by responder SPI.

Each actor has a bounded mailbox fed with `send_nowait`: a full mailbox drops
the datagram (the peer retransmits) instead of blocking the socket reader.
An exception escaping an actor is logged and counted, and only that SA is torn
down; the other actors and the node keep running.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable

import trio

from ..errors import ParseError
from ..ike.constants import ExchangeType
from ..ike.events import Event, IkeSaDeleted, IkeSaEstablished
from ..ike.message import Header, peek_header_untrusted
from ..ike.session import Address, Datagram
from .actor import SaActor, Session
from .stats import RuntimeStats

logger = logging.getLogger(__name__)

ZERO_SPI = bytes(8)
DEFAULT_MAILBOX_SIZE = 32

# (our responder SPI, local address, remote address) -> a new responder session
SessionFactory = Callable[[bytes, Address, Address], Session]
EventSink = Callable[[Event], None]


class Supervisor:
    def __init__(
        self,
        *,
        session_factory: SessionFactory,
        send: Callable[[Datagram], None],
        event_sink: EventSink,
        stats: RuntimeStats,
        half_open_timeout: float,
        mailbox_size: int = DEFAULT_MAILBOX_SIZE,
        max_half_open: int | None = None,
        new_spi: Callable[[], bytes] = lambda: secrets.token_bytes(8),
    ) -> None:
        self._session_factory = session_factory
        self._send = send
        self._event_sink = event_sink
        self.stats = stats
        self.half_open_timeout = half_open_timeout
        self.mailbox_size = mailbox_size
        self.max_half_open = max_half_open
        self._new_spi = new_spi
        self._actors: dict[bytes, SaActor] = {}  # our SPI -> actor
        self._half_open: dict[tuple[bytes, Address], SaActor] = {}  # (spi_i, peer) -> actor
        # actors in spawn order; their half-open deadlines are therefore in order too
        self._expiry_queue: deque[SaActor] = deque()
        self._nursery: trio.Nursery | None = None

    # -- inspection (tests, metrics) ---------------------------------------------

    @property
    def actor_count(self) -> int:
        return len(self._actors)

    @property
    def half_open_count(self) -> int:
        return len(self._half_open)

    def actor_for(self, spi_r: bytes) -> SaActor | None:
        return self._actors.get(spi_r)

    def is_routed(self, spi_i: bytes, spi_r: bytes) -> bool:
        """Whether any routing table still leads to the SA (spi_i, spi_r)."""
        actor = self._actors.get(spi_r)
        if actor is not None and actor.spi_i == spi_i:
            return True
        return any(a.spi_r == spi_r for a in self._half_open.values())

    # -- lifetime ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the actors until cancelled; cancelling this cancels every actor."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._expire_half_open()
            finally:
                self._nursery = None

    async def _expire_half_open(self) -> None:
        """One task retires every SA still half-open at its deadline (no timer per actor)."""
        queue = self._expiry_queue
        while True:
            now = trio.current_time()
            while queue and queue[0].half_open_deadline <= now:
                actor = queue.popleft()
                if not actor.established and self._actors.get(actor.spi_r) is actor:
                    actor.expire()
            # anything spawned while we sleep has a deadline after our wake-up
            await trio.sleep_until(
                queue[0].half_open_deadline if queue else now + self.half_open_timeout
            )

    # -- routing -------------------------------------------------------------------

    def route_untrusted(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        """Peek the header and route: the memory-only path (no dispatcher)."""
        try:
            header = peek_header_untrusted(data)
        except ParseError:
            self.stats.dropped_malformed += 1
            return
        self.route(header, data, local, remote, now)

    def route(
        self, header: Header, data: bytes, local: Address, remote: Address, now: float
    ) -> None:
        if (
            header.spi_r == ZERO_SPI
            and header.exchange == ExchangeType.IKE_SA_INIT
            and not header.is_response
        ):
            actor = self._half_open.get((header.spi_i, remote))
            if actor is None:
                actor = self._spawn(header.spi_i, local, remote, now)
                if actor is None:
                    return
        else:
            actor = self._actors.get(header.spi_r)
            if actor is None or actor.spi_i != header.spi_i:
                # RFC 7296 2.21.4: we MAY answer with INVALID_IKE_SPI, unprotected and
                # rate-limited. TODO: add that once a rate limiter exists; count for now.
                self.stats.dropped_no_sa += 1
                return
        if not actor.mailbox.put_nowait((data, local, remote, now)):
            if actor.mailbox.closed:
                self.stats.dropped_no_sa += 1  # retiring right now
            else:
                self.stats.dropped_mailbox_full += 1

    def _spawn(self, spi_i: bytes, local: Address, remote: Address, now: float) -> SaActor | None:
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("supervisor is not running")
        if self.max_half_open is not None and len(self._half_open) >= self.max_half_open:
            # TODO: RFC 7296 2.6 cookies instead of dropping, past a lower threshold.
            self.stats.dropped_half_open_limit += 1
            return None
        spi_r = self._new_spi()
        while spi_r == ZERO_SPI or spi_r in self._actors:
            spi_r = self._new_spi()
        try:
            session = self._session_factory(spi_r, local, remote)
        except Exception:
            self.stats.actor_failures += 1
            logger.exception("creating a session for %s failed", remote)
            return None
        actor = SaActor(
            session,
            spi_i,
            spi_r,
            (spi_i, remote),
            now + self.half_open_timeout,
            self.mailbox_size,
        )
        self._actors[spi_r] = actor
        self._half_open[actor.half_open_key] = actor
        self._expiry_queue.append(actor)
        self.stats.actors_started += 1
        nursery.start_soon(self._run_actor, actor, name=f"ike-sa {actor.label}")
        return actor

    async def _run_actor(self, actor: SaActor) -> None:
        # Nothing but Cancelled may leave this function: the nursery is shared.
        try:
            completed = await actor.run(self._send, self._on_event)
            if not completed:
                self.stats.half_open_expired += 1
                logger.info(
                    "IKE SA %s from %s expired half-open after %.0f s",
                    actor.label,
                    actor.half_open_key[1],
                    self.half_open_timeout,
                )
        except Exception:
            self.stats.actor_failures += 1
            # The traceback names code, not values: no key material reaches the log.
            logger.exception("IKE SA %s failed; tearing it down", actor.label)
            if actor.established:
                # The data plane must forget this SA's Child SAs too.
                try:
                    self._deliver(IkeSaDeleted(actor.spi_i, actor.spi_r, reason="actor failed"))
                except Exception:
                    logger.exception("event sink failed for IKE SA %s", actor.label)
        finally:
            self._retire(actor)

    def _retire(self, actor: SaActor) -> None:
        if self._actors.get(actor.spi_r) is actor:
            del self._actors[actor.spi_r]
        if self._half_open.get(actor.half_open_key) is actor:
            del self._half_open[actor.half_open_key]
        actor.close_mailbox()
        self.stats.actors_retired += 1

    def _on_event(self, actor: SaActor, event: Event) -> None:
        if isinstance(event, IkeSaEstablished) and not actor.established:
            actor.established = True
            # From now on a retransmitted IKE_SA_INIT is stale; only the SPI routes.
            if self._half_open.get(actor.half_open_key) is actor:
                del self._half_open[actor.half_open_key]
        self._deliver(event)

    def _deliver(self, event: Event) -> None:
        if isinstance(event, IkeSaEstablished):
            self.stats.ike_sas_established += 1
        elif isinstance(event, IkeSaDeleted):
            self.stats.ike_sas_deleted += 1
        self._event_sink(event)
