"""Routes each datagram to the actor of its IKE SA; starts, retires and isolates actors.

Routing. Our SPI is the one we chose: the responder SPI of an SA a peer
initiated, the initiator SPI of one we initiated, whichever side sent the
message (RFC 7296 2.6). The header's Initiator flag says which (RFC 7296 3.1):
- a message with the flag clear comes from the original responder, so the SA
  is one we initiated: it goes by initiator SPI to the SAs we initiated;
- an IKE_SA_INIT request with a zero responder SPI goes to the half-open actor
  of (initiator SPI, peer address), so a retransmission reaches the actor that
  answered the first copy; if there is none, a new actor with a fresh SPI;
- everything else goes by responder SPI.

Each actor has a bounded mailbox fed with `send_nowait`: a full mailbox drops
the datagram (the peer retransmits) instead of blocking the socket reader.
An exception escaping an actor is logged and counted, and only that SA is torn
down; the other actors and the node keep running.

An SA we initiate (`run_initiated`) runs in the caller's task, which decides
what to do when it ends; it is subject to the same half-open deadline.

Admission of a new IKE_SA_INIT (the checks and defaults of strongSwan's
receiver, in its order):
- `cookie_threshold`: from that many half-open SAs on, a request must carry a
  valid COOKIE notify as its first payload (RFC 7296 2.6); without one it gets
  a stateless HDR + N(COOKIE) reply and no actor. A cookie we did not make is
  dropped; one whose secret expired gets a fresh cookie.
- `block_threshold`: a peer address holding that many half-open SAs is ignored.
- `init_limit_half_open`: a hard cap on half-open SAs; beyond it, ignored.
Cookie replies and the sessions' refusals of IKE_SA_INIT (INVALID_KE_PAYLOAD,
NO_PROPOSAL_CHOSEN, ...) go to peers nobody has authenticated, so they pass a
token bucket per peer address (`notify_rate` per second). Per address, not one
for all: a spoofed flood must not use up the cookies legitimate peers need,
while a victim whose address is spoofed still gets a bounded trickle.

Memory under a flood stays bounded: past the cookie threshold only peers that
receive at their address can create state, each at most `block_threshold` SAs;
the per-address counters follow the half-open table exactly; the expiry queue
is compacted when retired actors dominate it; the token buckets live in a
table of fixed size.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import trio

from ..errors import ParseError
from ..ike.constants import HEADER_SIZE, ExchangeType, Flag, NotifyType
from ..ike.cookies import CookieSecrets
from ..ike.events import (
    KEPT,
    REPLACED,
    TERMINATED,
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaAdopted,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaMoved,
    IkeSaRekeyed,
    IkeSaRetired,
)
from ..ike.message import Header, Message, decode_untrusted, encode_plain, peek_header_untrusted
from ..ike.payloads import NoncePayload, NotifyPayload
from ..ike.session import Address, Datagram, IkeSession
from .actor import Command, Persist, Relinquished, SaActor, Session
from .stats import RuntimeStats

logger = logging.getLogger(__name__)

ZERO_SPI = bytes(8)
DEFAULT_MAILBOX_SIZE = 32
# strongSwan's charon defaults (strongswan.conf(5)); cluster.config uses the same
DEFAULT_COOKIE_THRESHOLD = 30
DEFAULT_BLOCK_THRESHOLD = 5
DEFAULT_NOTIFY_RATE = 50.0
# peer addresses with a token bucket; past this, idle buckets and then the oldest go
NOTIFY_BUCKETS_MAX = 4096
# the expiry queue is compacted when longer than twice the live SAs plus this
EXPIRY_QUEUE_SLACK = 64
# What an established SA does to the other SAs of its identities, on every responder:
# INITIAL_CONTACT (RFC 7296 2.4) drops them quietly, swanctl's unique = "replace"
# deletes them, "keep" deletes the new SA instead.
INITIAL_CONTACT = "initial_contact"
# announced to the other responders: they end their SAs of the identities (the first
# two), or, for "keep", say whether theirs are older (the new SA is then refused)
CLUSTER_POLICIES = (INITIAL_CONTACT, "replace", "keep")
# A new SA without INITIAL_CONTACT from the very address and port of an older SA of its
# identities is taken for a make-before-break reauthentication (RFC 7296 2.8.3), as
# strongSwan's uniqueness check does: "keep" lets it stay (the peer deletes the old
# one), "replace" deletes the old one this many seconds later, not at once.
REAUTH_GRACE = 10.0

# (our responder SPI, local address, remote address) -> a new responder session
SessionFactory = Callable[[bytes, Address, Address], Session]
# (our initiator SPI, now) -> a new initiator session, its IKE_SA_INIT request queued
InitiatorFactory = Callable[[bytes, float], Session]
EventSink = Callable[[Event], None]
# (seconds from the first IKE_SA_INIT to the SA's establishment, whether we initiated it)
HandshakeObserver = Callable[[float, bool], None]
# (header, data, local, remote, now) of a datagram for an SA this node does not hold
UnknownSaHandler = Callable[[Header, bytes, "Address", "Address", float], None]
NO_PEER: Address = ("", 0)


@dataclass(frozen=True, slots=True)
class InitiatedOutcome:
    """How an SA we initiated ended."""

    spi_i: bytes
    established: bool  # it came up before it ended
    reason: str


class NotifyLimiter:
    """Token buckets keyed by peer address: `rate` per second, bursts of `rate`.

    A bucket that has refilled completely is the same as none, so when the
    table is full those are forgotten first; if every bucket is busy, the oldest
    quarter goes (amortised O(1) per call even when every packet brings a new
    address). `rate` 0 (or infinite) lets everything through.
    """

    __slots__ = ("_buckets", "burst", "max_entries", "rate", "unlimited")

    def __init__(self, rate: float, max_entries: int = NOTIFY_BUCKETS_MAX) -> None:
        self.rate = rate
        self.unlimited = rate <= 0 or math.isinf(rate)
        self.burst = max(1.0, rate)
        self.max_entries = max_entries
        self._buckets: dict[str, list[float]] = {}  # address -> [tokens, last refill]

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str, now: float) -> bool:
        if self.unlimited:
            return True
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self.max_entries:
                self._prune(now)
            self._buckets[host] = [self.burst - 1.0, now]
            return True
        # callers' clocks may differ by a batch; time never runs backwards here
        elapsed = now - bucket[1]
        if elapsed > 0:
            bucket[1] = now
        tokens = min(self.burst, bucket[0] + max(elapsed, 0.0) * self.rate)
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _prune(self, now: float) -> None:
        buckets, rate, burst = self._buckets, self.rate, self.burst
        for host in [h for h, (t, last) in buckets.items() if t + (now - last) * rate >= burst]:
            del buckets[host]
        keep = self.max_entries * 3 // 4
        if len(buckets) > keep:
            for host in list(itertools.islice(buckets, len(buckets) - keep)):
                del buckets[host]


def _refuses_ike_sa_init(data: bytes) -> bool:
    """An IKE_SA_INIT response with a zero responder SPI: a stateless refusal."""
    return (
        len(data) >= HEADER_SIZE
        and data[18] == ExchangeType.IKE_SA_INIT
        and bool(data[19] & Flag.RESPONSE)
        and data[8:16] == ZERO_SPI
    )


def peer_key(local_id: str, remote_id: str, eap_identity: str) -> tuple[str, str]:
    """Whose SA it is, for INITIAL_CONTACT and `unique`: the identities, the peer's being
    its EAP identity when it logged in with EAP, as strongSwan keys them (its
    get_other_eap_id). Windows sends its own IP address as IKE identity, so users behind
    different NATs may share one; each is still told apart by who logged in."""
    return local_id, eap_identity or remote_id


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
        cookie_threshold: int = DEFAULT_COOKIE_THRESHOLD,  # 0: never ask for cookies
        block_threshold: int = DEFAULT_BLOCK_THRESHOLD,  # 0: no limit per peer address
        init_limit_half_open: int = 0,  # 0: no limit
        notify_rate: float = DEFAULT_NOTIFY_RATE,  # per peer address and second; 0: no limit
        cookies: CookieSecrets | None = None,
        new_spi: Callable[[], bytes] = lambda: secrets.token_bytes(8),
        persist: Persist | None = None,
        uniqueness: Mapping[str, str] | None = None,  # connection -> swanctl's `unique`
    ) -> None:
        self._session_factory = session_factory
        self._uniqueness = dict(uniqueness or {})
        self._send = send
        self._event_sink = event_sink
        self.stats = stats
        self.half_open_timeout = half_open_timeout
        self.mailbox_size = mailbox_size
        self.cookie_threshold = cookie_threshold
        self.block_threshold = block_threshold
        self.init_limit_half_open = init_limit_half_open
        self._notify_limiter = NotifyLimiter(notify_rate)
        self._cookies = cookies if cookies is not None else CookieSecrets()
        self._new_spi = new_spi
        self._actors: dict[bytes, SaActor] = {}  # our SPI -> actor
        self._half_open: dict[tuple[bytes, Address], SaActor] = {}  # (spi_i, peer) -> actor
        # peer host -> its entries in _half_open; updated wherever _half_open is
        self._half_open_per_host: dict[str, int] = {}
        self._initiated: dict[bytes, SaActor] = {}  # our initiator SPI -> actor
        # after IKE rekeys an actor answers to more SPIs: (table, our SPI) per actor
        self._extra_routes: dict[SaActor, list[tuple[str, bytes]]] = {}
        self._spi_i_of: dict[bytes, bytes] = {}  # rekeyed responder routes: spi_r -> spi_i
        self._child_owner: dict[bytes, SaActor] = {}  # Child SA spi_in -> its IKE SA's actor
        self._by_identity: dict[tuple[str, str], set[SaActor]] = {}  # established SAs
        # the reverse maps, so retiring one actor costs O(its own entries), not O(all SAs)
        self._children_of: dict[SaActor, set[bytes]] = {}
        self._identity_of: dict[SaActor, tuple[str, str]] = {}
        self._since: dict[SaActor, float] = {}  # wall-clock time it was identified here
        self._peer_of: dict[SaActor, Address] = {}  # its peer's address (reauthentication)
        # established SAs by (connection, peer host): is a connection we start already up?
        self._up: dict[tuple[str, str], set[SaActor]] = {}
        self._up_key: dict[SaActor, tuple[str, str]] = {}
        self.wall_clock: Callable[[], float] = time.time  # (compared across responders)
        # actors in spawn order; their half-open deadlines are therefore in order too
        self._expiry_queue: deque[SaActor] = deque()
        self._nursery: trio.Nursery | None = None
        self._retired_counts: dict[str, int] = {}  # session_counters() of retired actors
        self.handshake_observer: HandshakeObserver | None = None  # the metrics' histogram
        # the cluster: state is stored before responses leave; unknown SPIs may be loaded
        self.persist = persist
        self.on_unknown_sa: UnknownSaHandler | None = None
        self.on_actor_retired: Callable[[SaActor], None] | None = None
        # the cluster: tells the other responders of an SA that ends their SAs of its
        # identities (key, policy, its responder SPI); they call `replace_identity`
        self.on_identified: Callable[[tuple[str, str], str, bytes, Address | None], None] \
            | None = None

    def set_uniqueness(self, uniqueness: Mapping[str, str]) -> None:
        """swanctl's `unique` per connection, for SAs established from now on (a reload)."""
        self._uniqueness = dict(uniqueness)

    # -- inspection (tests, metrics) ---------------------------------------------

    @property
    def actor_count(self) -> int:
        return len(self._actors)

    @property
    def half_open_count(self) -> int:
        return len(self._half_open)

    @property
    def initiated_count(self) -> int:
        return len(self._initiated)

    @property
    def expiry_queue_length(self) -> int:
        return len(self._expiry_queue)

    @property
    def half_open_hosts(self) -> dict[str, int]:
        """Peer host -> half-open SAs it holds (a copy)."""
        return dict(self._half_open_per_host)

    @property
    def notify_buckets(self) -> int:
        return len(self._notify_limiter)

    def session_counters(self) -> dict[str, int]:
        """What the sessions count themselves, summed over every SA this supervisor ran.

        `retransmits_sent` (our requests sent again), `retransmits_answered` (the peer's,
        answered from the cached response) and `dropped_<reason>` (messages a session
        dropped). Costs O(live SAs): for a periodic metrics publish, not per packet.
        """
        totals = dict(self._retired_counts)
        for actor in {*self._actors.values(), *self._initiated.values()}:
            _add_session_counts(totals, actor.session)
        return totals

    def actor_for(self, spi_r: bytes) -> SaActor | None:
        return self._actors.get(spi_r)

    def initiated_actor_for(self, spi_i: bytes) -> SaActor | None:
        return self._initiated.get(spi_i)

    def established_for(self, connection: str, host: str) -> SaActor | None:
        """An established IKE SA of `connection` with the peer at `host`, whoever
        initiated it (one the peer brought up, say after its own reauthentication)."""
        return next(iter(self._up.get((connection, host), ())), None)

    def holds(self, actor: SaActor) -> bool:
        """Whether `actor`'s IKE SA is still here (established, not yet retired)."""
        return actor in self._up_key

    def is_routed(self, spi_i: bytes, spi_r: bytes) -> bool:
        """Whether any routing table still leads to the SA (spi_i, spi_r)."""
        actor = self._actors.get(spi_r)
        if actor is not None and actor.spi_i == spi_i:
            return True
        if spi_i in self._initiated:
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
                # a closed mailbox: the actor is retired (or expiring) already
                if not actor.established and not actor.mailbox.closed:
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
        if not header.is_initiator:
            # From the original responder: an SA we initiated (or rekeyed: RFC 7296 2.18
            # makes the rekey's initiator the new SA's), our SPI is spi_i.
            actor = self._initiated.get(header.spi_i)
            if actor is None:
                if self.on_unknown_sa is not None:
                    self.on_unknown_sa(header, data, local, remote, now)  # another node's SA?
                    return
                self.stats.dropped_no_sa += 1
                return
        elif (
            header.spi_r == ZERO_SPI
            and header.exchange == ExchangeType.IKE_SA_INIT
            and not header.is_response
        ):
            actor = self._half_open.get((header.spi_i, remote))
            if actor is None:
                if not self._admit(header, data, local, remote, now):
                    return
                actor = self._spawn(header.spi_i, local, remote, now)
                if actor is None:
                    return
        else:
            actor = self._actors.get(header.spi_r)
            if actor is None or self._spi_i_of.get(header.spi_r, actor.spi_i) != header.spi_i:
                if actor is None and self.on_unknown_sa is not None:
                    self.on_unknown_sa(header, data, local, remote, now)  # another node's SA?
                    return
                # RFC 7296 2.21.4 allows an unprotected INVALID_IKE_SPI answer; we drop and
                # count instead: the answer would be unauthenticated traffic towards any
                # source address, and a peer cannot trust it enough to act on it.
                self.stats.dropped_no_sa += 1
                return
        if not actor.mailbox.put_nowait((data, local, remote, now)):
            if actor.mailbox.closed:
                self.stats.dropped_no_sa += 1  # retiring right now
            else:
                self.stats.dropped_mailbox_full += 1

    def _admit(
        self, header: Header, data: bytes, local: Address, remote: Address, now: float
    ) -> bool:
        """Whether a new IKE_SA_INIT request may have an actor (see the module docstring)."""
        half_open = len(self._half_open)
        cookies_on = bool(self.cookie_threshold) and half_open >= self.cookie_threshold
        if cookies_on and not self._check_cookie(header, data, local, remote, now):
            return False
        host = remote[0]
        if self.block_threshold and self._half_open_per_host.get(host, 0) >= self.block_threshold:
            self.stats.dropped_block_threshold += 1
            return False
        if self.init_limit_half_open and half_open >= self.init_limit_half_open:
            self.stats.dropped_half_open_limit += 1
            return False
        return True

    def _check_cookie(
        self, header: Header, data: bytes, local: Address, remote: Address, now: float
    ) -> bool:
        """True for a request with our valid cookie; otherwise answer or drop it here."""
        try:
            payloads = decode_untrusted(data).payloads
        except ParseError:
            self.stats.dropped_malformed += 1
            return False
        nonce = next((p for p in payloads if isinstance(p, NoncePayload)), None)
        if nonce is None:
            self.stats.dropped_malformed += 1  # the responder would refuse it anyway
            return False
        first = payloads[0]
        if isinstance(first, NotifyPayload) and first.notify_type == NotifyType.COOKIE:
            # RFC 7296 2.6: the cookie comes first; elsewhere it is no cookie
            cookie = first.data
            if self._cookies.check_cookie(cookie, header.spi_i, nonce.data, remote[0], now):
                self.stats.cookies_accepted += 1
                return True
            if self._cookies.version_known(cookie, now):
                self.stats.dropped_bad_cookie += 1  # made for another request, or forged
                return False
            self.stats.cookies_expired += 1  # 2.6: a fresh cookie for a retired secret
        if not self._notify_limiter.allow(remote[0], now):
            self.stats.notifies_suppressed += 1
            return False
        cookie = self._cookies.make_cookie(header.spi_i, nonce.data, remote[0], now)
        reply = Message(
            header.spi_i, ZERO_SPI, ExchangeType.IKE_SA_INIT, 0, is_response=True,
            is_initiator=False, payloads=[NotifyPayload(NotifyType.COOKIE, cookie)],
        )  # fmt: skip
        self._send(Datagram(encode_plain(reply), local, remote))
        self.stats.cookies_sent += 1
        return False

    def _send_from_actor(self, datagram: Datagram) -> None:
        # A session's refusal of IKE_SA_INIT goes to an unauthenticated peer.
        if _refuses_ike_sa_init(datagram.data) and not self._notify_limiter.allow(
            datagram.remote[0], trio.current_time()
        ):
            self.stats.notifies_suppressed += 1
            return
        self._send(datagram)

    def _spawn(self, spi_i: bytes, local: Address, remote: Address, now: float) -> SaActor | None:
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("supervisor is not running")
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
        host = remote[0]
        self._half_open_per_host[host] = self._half_open_per_host.get(host, 0) + 1
        self._queue_for_expiry(actor)
        self.stats.actors_started += 1
        nursery.start_soon(self._run_actor, actor, name=f"ike-sa {actor.label}")
        return actor

    def _queue_for_expiry(self, actor: SaActor) -> None:
        queue = self._expiry_queue
        queue.append(actor)
        # Actors that fail fast (a refused IKE_SA_INIT) would otherwise wait here
        # for a whole half-open timeout each; drop the retired ones, keep the order.
        if len(queue) > 2 * (len(self._half_open) + len(self._initiated)) + EXPIRY_QUEUE_SLACK:
            live = [a for a in queue if not a.established and not a.mailbox.closed]
            queue.clear()
            queue.extend(live)

    def _leave_half_open(self, actor: SaActor) -> None:
        """Forget the actor as half-open: established, expired, failed or retired."""
        key = actor.half_open_key
        if self._half_open.get(key) is not actor:
            return
        del self._half_open[key]
        host = key[1][0]
        left = self._half_open_per_host.get(host, 0) - 1
        if left > 0:
            self._half_open_per_host[host] = left
        else:
            self._half_open_per_host.pop(host, None)

    async def run_initiated(
        self, new_session: InitiatorFactory,
        watch: Callable[[SaActor, Event], None] | None = None,
    ) -> InitiatedOutcome:
        """Create an initiator session with a fresh SPI and step it until it ends.

        Runs in the caller's task; the peer's messages reach the session by our
        initiator SPI meanwhile. An SA not established within the half-open
        timeout is given up, like a responder's. Failures are logged and
        counted, never raised; cancellation is. `watch` sees each of its events
        after the supervisor (the SA's initiator acts on some).
        """
        if self._nursery is None:
            raise RuntimeError("supervisor is not running")
        spi_i = self._new_spi()
        while spi_i == ZERO_SPI or spi_i in self._initiated:
            spi_i = self._new_spi()
        now = trio.current_time()
        try:
            session = new_session(spi_i, now)
        except Exception:
            self.stats.actor_failures += 1
            logger.exception("creating an initiator session failed")
            return InitiatedOutcome(spi_i, False, "session creation failed")
        actor = SaActor(
            session, spi_i, ZERO_SPI, (spi_i, NO_PEER), now + self.half_open_timeout,
            self.mailbox_size,
        )
        self._initiated[spi_i] = actor
        self._queue_for_expiry(actor)
        self.stats.actors_started += 1
        reason = "ended"

        def on_event(actor: SaActor, event: Event) -> None:
            nonlocal reason
            if isinstance(event, IkeSaFailed | IkeSaDeleted):
                reason = event.reason
            self._on_event(actor, event)
            if watch is not None:
                watch(actor, event)

        try:
            for datagram in session.datagrams_to_send():  # the IKE_SA_INIT request
                self._send(datagram)
            if not await actor.run(self._send_from_actor, on_event):
                self.stats.half_open_expired += 1
                reason = f"not established within {self.half_open_timeout:g} s"
        except Exception:
            self.stats.actor_failures += 1
            reason = "actor failed"
            logger.exception("IKE SA %s_i (initiated) failed; tearing it down", spi_i.hex())
            if actor.established:
                try:
                    self._deliver(IkeSaDeleted(spi_i, session.spi_r, reason=reason))
                except Exception:
                    logger.exception("event sink failed for IKE SA %s_i", spi_i.hex())
        finally:
            if self._initiated.get(spi_i) is actor:
                del self._initiated[spi_i]
            self._forget(actor)
            actor.close_mailbox()
            _add_session_counts(self._retired_counts, session)
            self.stats.actors_retired += 1
        return InitiatedOutcome(spi_i, actor.established, reason)

    def adopt(self, session: Session, now: float) -> SaActor | None:
        """Run an established SA loaded from the store (a takeover); None if it is routed
        here already (a racing load) or the supervisor is not running."""
        nursery = self._nursery
        spi_i, spi_r = session.spi_i, session.spi_r
        sa = getattr(session, "sa", None)  # an IkeSession; test doubles may have none
        # an SA whose IKE rekey we started has us as its initiator (RFC 7296 2.18): the
        # peer's messages then carry the responder flag and find it by our SPI, spi_i
        ours = sa is not None and sa.is_initiator
        if nursery is None or (spi_i in self._initiated if ours else spi_r in self._actors):
            return None
        remote: Address = sa.remote if sa is not None else NO_PEER
        actor = SaActor(session, spi_i, spi_r, (spi_i, remote), now, self.mailbox_size)
        actor.established = True
        if ours:
            self._initiated[spi_i] = actor
            self._extra_routes.setdefault(actor, []).append(("i", spi_i))
        else:
            self._actors[spi_r] = actor
        for spi_in in sa.children if sa is not None else ():
            self._child_owner[spi_in] = actor
            self._children_of.setdefault(actor, set()).add(spi_in)
        if sa is not None and sa.local_id is not None and sa.remote_id is not None:
            # so that INITIAL_CONTACT or `unique` on another SA of its peer reaches it
            # (and `keep` orders it by when its peer authenticated, not by the takeover)
            self._register_identity(
                actor, peer_key(str(sa.local_id), str(sa.remote_id), sa.eap_identity),
                sa.authenticated_at)
        if sa is not None and sa.connection is not None:
            self._deliver(IkeSaAdopted(
                spi_i, spi_r, sa.connection.name, sa.local, sa.remote,
                tuple(str(lease.address) for lease in sa.leases), sa.eap_identity,
                sa.radius_classes, sa.radius_interim, sa.authenticated_at,
                tuple(sa.children)))
        self.stats.actors_started += 1
        nursery.start_soon(self._run_actor, actor, name=f"ike-sa {actor.label} (taken over)")
        return actor

    def established_actors(self) -> list[SaActor]:
        """The established SAs peers initiated (a copy; for hand-over and lease renewal)."""
        return [a for a in {*self._actors.values()} if a.established]

    def established_sessions(self) -> list[Session]:
        """Every established IKE SA here, peers' and ours (a copy; for listing them)."""
        actors = {*self._actors.values(), *self._initiated.values()}
        return [a.session for a in actors if a.established and not a.session.closed]

    def relinquish(self, actor: SaActor) -> bool:
        """End the actor quietly between two steps: another node acts for its SA now."""
        def stop(session: object, now: float) -> None:
            raise Relinquished(actor.label)

        return actor.mailbox.put_nowait(stop)

    async def _run_actor(self, actor: SaActor) -> None:
        # Nothing but Cancelled may leave this function: the nursery is shared.
        try:
            completed = await actor.run(self._send_from_actor, self._on_event, self.persist)
            if not completed:
                self.stats.half_open_expired += 1
                logger.info(
                    "IKE SA %s from %s expired half-open after %.0f s",
                    actor.label,
                    actor.half_open_key[1],
                    self.half_open_timeout,
                )
        except Relinquished:
            self.stats.actors_relinquished += 1
            logger.info("IKE SA %s: another node acts for it now", actor.label)
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
        # a DH value this SA shared must not outlive it here (RFC 7296 2.12)
        actor.session.end_here()
        if self._actors.get(actor.spi_r) is actor:
            del self._actors[actor.spi_r]
        if self.on_actor_retired is not None:
            self.on_actor_retired(actor)
        self._forget(actor)
        self._leave_half_open(actor)
        actor.close_mailbox()
        _add_session_counts(self._retired_counts, actor.session)
        self.stats.actors_retired += 1

    def _on_event(self, actor: SaActor, event: Event) -> None:
        if isinstance(event, IkeSaEstablished) and not actor.established:
            actor.established = True
            key = (event.connection, event.remote[0])
            self._up.setdefault(key, set()).add(actor)
            self._up_key[actor] = key
            # From now on a retransmitted IKE_SA_INIT is stale; only the SPI routes.
            self._leave_half_open(actor)
            self._identified(actor, event)
            if self.handshake_observer is not None:
                # the actor was made for the first IKE_SA_INIT, its deadline counted from then
                started = actor.half_open_deadline - self.half_open_timeout
                self.handshake_observer(
                    trio.current_time() - started, actor.half_open_key[1] == NO_PEER
                )
        elif isinstance(event, ChildSaEstablished):
            self._child_owner[event.spi_in] = actor
            self._children_of.setdefault(actor, set()).add(event.spi_in)
        elif isinstance(event, ChildSaDeleted):
            if self._child_owner.get(event.spi_in) is actor:
                del self._child_owner[event.spi_in]
                self._children_of.get(actor, set()).discard(event.spi_in)
        elif isinstance(event, IkeSaRekeyed):
            self._route_successor(actor, event)
        elif isinstance(event, IkeSaRetired):
            self._unroute(actor, event.spi_i, event.spi_r)
        elif isinstance(event, IkeSaMoved) and actor in self._peer_of:
            self._peer_of[actor] = event.remote
        self._deliver(event)

    # -- routes that change during an SA's life ----------------------------------------

    def _route_successor(self, actor: SaActor, event: IkeSaRekeyed) -> None:
        """After an IKE rekey (RFC 7296 2.18) the same actor answers to the new SPIs.

        Its initiator is whoever started the rekey: our SPI is spi_i if that was us."""
        if event.we_initiated:
            self._initiated[event.spi_i] = actor
            route = ("i", event.spi_i)
        else:
            self._actors[event.spi_r] = actor
            self._spi_i_of[event.spi_r] = event.spi_i
            route = ("r", event.spi_r)
        self._extra_routes.setdefault(actor, []).append(route)

    def _unroute(self, actor: SaActor, spi_i: bytes, spi_r: bytes) -> None:
        """A rekeyed-away SA is gone: its SPIs lead nowhere now."""
        if self._actors.get(spi_r) is actor and self._spi_i_of.get(spi_r, actor.spi_i) == spi_i:
            del self._actors[spi_r]
            self._spi_i_of.pop(spi_r, None)
        if self._initiated.get(spi_i) is actor:
            del self._initiated[spi_i]

    def _forget(self, actor: SaActor) -> None:
        for table, spi in self._extra_routes.pop(actor, []):
            routes = self._actors if table == "r" else self._initiated
            if routes.get(spi) is actor:
                del routes[spi]
                self._spi_i_of.pop(spi, None)
        for spi_in in self._children_of.pop(actor, set()):
            if self._child_owner.get(spi_in) is actor:
                del self._child_owner[spi_in]
        key = self._identity_of.pop(actor, None)
        self._since.pop(actor, None)
        self._peer_of.pop(actor, None)
        up = self._up_key.pop(actor, None)
        if up is not None:
            held = self._up[up]
            held.discard(actor)
            if not held:
                del self._up[up]
        if key is not None:
            actors = self._by_identity.get(key, set())
            actors.discard(actor)
            if not actors:
                self._by_identity.pop(key, None)

    def _identified(self, actor: SaActor, event: IkeSaEstablished) -> None:
        key = peer_key(event.local_id, event.remote_id, event.eap_identity)
        unique = self._uniqueness.get(event.connection, "no")  # swanctl's `unique`
        # RFC 7296 2.4: with INITIAL_CONTACT the peer says it holds no other SA with us
        policy = INITIAL_CONTACT if event.initial_contact and unique != "never" else unique
        others = self._by_identity.get(key, set())
        peer = None if event.initial_contact else event.remote
        reauthenticated = self._same_peer(others, peer)
        if policy == "keep" and others - reauthenticated:
            actor.mailbox.put_nowait(_delete(KEPT))  # the older SA stays, the new one goes
            return
        if reauthenticated and policy == "keep":  # ("replace": replace_identity says)
            logger.info("IKE SA %s_r of %s === %s: suspected reauthentication (same peer "
                        "address), the peer deletes the older", actor.spi_r.hex(), key[0],
                        key[1])
        self.replace_identity(key, policy, actor.spi_r, peer)
        self._register_identity(actor, key)
        self._peer_of[actor] = event.remote
        if policy in CLUSTER_POLICIES and self.on_identified is not None:
            self.on_identified(key, policy, actor.spi_r, peer)

    def _same_peer(self, actors: Collection[SaActor], peer: Address | None) -> set[SaActor]:
        """Those of `actors` whose peer is at `peer` (address and port): an SA from there
        without INITIAL_CONTACT reauthenticates them (see REAUTH_GRACE)."""
        if peer is None:
            return set()
        return {actor for actor in actors if self._peer_of.get(actor) == peer}

    def replace_identity(self, key: tuple[str, str], policy: str, newest: bytes,
                         peer: Address | None = None) -> int:
        """An SA with the identities `key` was established (SPI `newest`, here or on
        another responder, from `peer` when it came without INITIAL_CONTACT) under
        `policy`: INITIAL_CONTACT drops our other SAs of it quietly, "replace" deletes
        them with a Delete each, REAUTH_GRACE later those from `peer`. How many it
        ended."""
        if policy not in (INITIAL_CONTACT, "replace"):
            return 0
        ended = 0
        others = list(self._by_identity.get(key, ()))
        later = self._same_peer(others, peer)
        for other in others:
            if other.spi_r == newest:
                continue
            if other in later:
                logger.info("IKE SA %s_r of %s === %s: suspected reauthentication (same "
                            "peer address), %s_r deleted in %g s", newest.hex(), key[0],
                            key[1], other.spi_r.hex(), REAUTH_GRACE)
                self._delete_later(other, REPLACED)
                ended += 1
                continue
            if policy == INITIAL_CONTACT:
                put = other.mailbox.put_nowait(lambda session, now: session.abandon(
                    "replaced (INITIAL_CONTACT)"))
            else:  # the older SAs go, with a Delete each
                put = other.mailbox.put_nowait(_delete(REPLACED))
            ended += put
        return ended

    def _delete_later(self, actor: SaActor, reason: str) -> None:
        """Delete `actor`'s SA (with a Delete) REAUTH_GRACE seconds from now, unless it
        ended by then."""
        async def later() -> None:
            await trio.sleep(REAUTH_GRACE)
            actor.mailbox.put_nowait(_delete(reason))  # (closed once it ended: ignored)
        if self._nursery is None:
            actor.mailbox.put_nowait(_delete(reason))
        else:
            self._nursery.start_soon(later)

    def keep_identity(self, key: tuple[str, str], newest: bytes, since: float,
                      peer: Address | None = None) -> bool:
        """Another responder established `newest` with the identities `key` at `since`
        (its wall clock) under `unique = "keep"`, from `peer` when without INITIAL_CONTACT.
        True when an older SA of them is here: `newest` must go (its responder is told).
        If ours came up later (both at once, neither knowing the other), ours goes
        instead; both responders order the two SAs the same way, by time, then SPI. Ours
        from `peer` do not count: `newest` reauthenticates them (see REAUTH_GRACE)."""
        held = self._by_identity.get(key, set())
        reauthenticated = self._same_peer(held, peer)
        if reauthenticated:
            logger.info("IKE SA %s_r of %s === %s on another responder: suspected "
                        "reauthentication (same peer address), the peer deletes ours",
                        newest.hex(), key[0], key[1])
        mine = [a for a in held if a.spi_r != newest and a not in reauthenticated]
        if not mine:
            return False
        oldest = min(mine, key=lambda a: (self._since.get(a, 0.0), a.spi_r))
        if (self._since.get(oldest, 0.0), oldest.spi_r) < (since, newest):
            return True
        for actor in mine:
            actor.mailbox.put_nowait(_delete(KEPT))
        return False

    def since_of(self, spi_r: bytes) -> float:
        """When the SA with responder SPI `spi_r` was identified here (0: unknown)."""
        actor = self._actors.get(spi_r)
        return self._since.get(actor, 0.0) if actor is not None else 0.0

    def refuse_identity(self, key: tuple[str, str], spi_r: bytes) -> bool:
        """Another responder holds an older SA of `key`: delete ours with SPI `spi_r`
        (`unique = "keep"`). False when it is not here."""
        for actor in self._by_identity.get(key, ()):
            if actor.spi_r == spi_r:
                return actor.mailbox.put_nowait(_delete(KEPT))
        return False

    def _register_identity(self, actor: SaActor, key: tuple[str, str],
                           since: float = 0.0) -> None:
        self._by_identity.setdefault(key, set()).add(actor)
        self._identity_of[actor] = key
        self._since[actor] = since or self.wall_clock()

    # -- commands to actors ---------------------------------------------------------------

    def send_command(self, spi_i: bytes, spi_r: bytes, command: Command) -> bool:
        """Run `command(session, now)` in the actor of that IKE SA, between its steps."""
        actor = self.holder_of(spi_i, spi_r)
        return actor is not None and actor.mailbox.put_nowait(command)

    def delete_ike(self, spi_i: bytes, spi_r: bytes) -> bool:
        """Delete the IKE SA with these SPIs (a peer's or one we initiated), with a Delete
        to the peer (an operator's terminate); False when it is not here."""
        return self.send_command(spi_i, spi_r, _delete(TERMINATED))

    def limit_session(self, spi_i: bytes, spi_r: bytes, seconds: int) -> bool:
        """End the service of that IKE SA `seconds` from now (IkeSession.limit_session: a
        RADIUS CoA's Session-Timeout); False when it is not here."""
        def limit(session: Session, now: float) -> None:
            if isinstance(session, IkeSession):
                session.limit_session(seconds, now)
        return self.send_command(spi_i, spi_r, limit)

    def rekey(self, spi_i: bytes, spi_r: bytes, child: bytes = b"") -> bool:
        """Rekey that IKE SA, or with `child` (an inbound SPI) that Child SA of it (an
        operator's rekey); False when the IKE SA is not here."""
        def rekey(session: Session, now: float) -> None:
            if isinstance(session, IkeSession):
                if child:
                    session.rekey_child(child, now)
                else:
                    session.rekey_ike(now)
        return self.send_command(spi_i, spi_r, rekey)

    def delete_child_of(self, spi_i: bytes, spi_r: bytes, spi_in: bytes) -> bool:
        """Delete that Child SA (its inbound SPI) of that IKE SA, which stays (an
        operator's terminate); False when the IKE SA is not here."""
        def delete(session: Session, now: float) -> None:
            if isinstance(session, IkeSession):
                session.delete_child(spi_in, now)
        return self.send_command(spi_i, spi_r, delete)

    def holder_of(self, spi_i: bytes, spi_r: bytes) -> SaActor | None:
        """The actor of the IKE SA with exactly these SPIs now, if it runs here."""
        for actor in (self._actors.get(spi_r), self._initiated.get(spi_i)):
            if actor is not None and actor.session.spi_i == spi_i \
                    and actor.session.spi_r == spi_r:
                return actor
        return None

    def rekey_child(self, spi_in: bytes) -> bool:
        """Ask the IKE SA owning this Child SA to rekey it (the data plane's soft limit)."""
        return self._tell_child_owner(spi_in, lambda session, now: session.rekey_child(spi_in,
                                                                                      now))

    def traffic_seen(self, spis_in: Collection[bytes]) -> int:
        """ESP arrived on these Child SAs (the data plane's activity sweep): their IKE SAs
        put off their liveness checks (IkeSession.traffic_seen). How many IKE SAs."""
        now = trio.current_time()
        owners = {self._child_owner[s] for s in spis_in if s in self._child_owner}
        for actor in owners:
            if isinstance(actor.session, IkeSession):
                actor.session.traffic_seen(now)
        return len(owners)

    def delete_child(self, spi_in: bytes) -> bool:
        """Ask the IKE SA owning this Child SA to delete it (the data plane's inactivity
        timeout)."""
        return self._tell_child_owner(spi_in, lambda session, now: session.delete_child(spi_in,
                                                                                       now))

    def expire_child(self, spi_in: bytes) -> bool:
        """Tell the IKE SA owning this Child SA that it expired (the data plane's hard
        byte/packet limit or exhausted sequence numbers removed it)."""
        return self._tell_child_owner(spi_in, lambda session, now: session.expire_child(spi_in,
                                                                                       now))

    def _tell_child_owner(self, spi_in: bytes, command: Command) -> bool:
        """Queue `command` for the actor of the IKE SA that owns this Child SA; whether
        one runs here and took it."""
        actor = self._child_owner.get(spi_in)
        return actor is not None and actor.mailbox.put_nowait(command)

    def _deliver(self, event: Event) -> None:
        if isinstance(event, IkeSaEstablished):
            self.stats.ike_sas_established += 1
        elif isinstance(event, IkeSaDeleted):
            self.stats.ike_sas_deleted += 1
        self._event_sink(event)


def _delete(reason: str) -> Command:
    """The command that deletes an SA with a Delete to its peer, for `reason`."""
    def delete(session: Session, now: float) -> None:
        if isinstance(session, IkeSession):
            session.delete_ike(now, reason)
    return delete


def _add_session_counts(totals: dict[str, int], session: Session) -> None:
    # getattr: the Session protocol does not promise counters (test doubles have none)
    for name in ("retransmits_sent", "retransmits_answered"):
        totals[name] = totals.get(name, 0) + getattr(session, name, 0)
    drops: dict[str, int] = getattr(session, "drops", {})
    for reason, count in drops.items():
        key = "dropped_" + reason
        totals[key] = totals.get(key, 0) + count
