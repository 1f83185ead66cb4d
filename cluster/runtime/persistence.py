"""The responder's side of failover (DESIGN.md, "Failover model") and key distribution.

Persist. After every step that produced a datagram or an event, an established SA's
snapshot (message IDs, the cached last response, keys sealed under the cluster key) is
written under the SA's lease, together with the Child SA changes for its worker, and
only then does the response leave. A write refused for a stale fence means another
responder took the SA over: the actor ends without a word (`Relinquished`). A store that
cannot be reached withholds the response (fail closed); the peer retransmits and the
write is tried again, so nothing is lost, only delayed.

Take over. A datagram for an SPI this node does not hold is looked up in the store; if
the lease can be had (its owner died and the lease ran out, or it handed the SA over),
the session is restored and continues with the right message IDs; a retransmitted
request is answered from the restored cached response, byte for byte. Loads are
de-duplicated per SA and bounded in number; SPIs the store does not know are
remembered for a moment so a flood of made-up SPIs costs one lookup each at most.

Leases are renewed in one round trip for all SAs every third of their TTL. SAs that
rendezvous hashing (on the initiator SPI, as the workers route) now gives to another
responder, after a membership change or an IKE rekey, are handed over: their lease is
released once their last state is stored, and the new owner loads them.

Key distribution. Child SA install/remove requests go to the worker that relayed the
SA: a per-worker durable SAD (sealed records, AAD bound to worker and SPI) plus a
notification, both queued before the response, so a Child SA is on the worker by the
time the peer can use it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import msgpack
import trio

from ..errors import ParseError
from ..ike.child_sa import child_established
from ..ike.events import ChildSaDeleted, ChildSaEstablished, Event, IkeSaDeleted, IkeSaMoved
from ..ike.message import Header
from ..ike.policy import ResponderPolicy
from ..ike.session import Address, IkeSession
from ..ike.snapshot import SECRET_FIELDS, child_record, restore, snapshot_of
from ..ike.state import State
from ..rendezvous import choose
from ..store import (
    ClusterKey,
    DeleteChild,
    DeleteSa,
    HoldAddress,
    LeaseLost,
    Op,
    Publish,
    PutChild,
    PutSa,
    Release,
    Renew,
    StoreError,
    StoreWriter,
    pack_snapshot,
    seal,
    unpack_snapshot,
)
from ..store.sealing import child_aad
from .actor import Relinquished, SaActor
from .supervisor import Supervisor

logger = logging.getLogger(__name__)

MAX_LOADS = 256  # takeovers in flight
QUEUED_PER_LOAD = 4  # datagrams kept while their SA loads (the peer retransmits anyway)
MISSING_FOR = 2.0  # seconds an SPI the store does not know is not looked up again
MISSING_MAX = 8192
# After the live responders change, the stored SAs rendezvous hashing now gives to this
# node are looked for this many lease TTLs long (a dead owner's leases run out within
# one; an owner handing over lets go within one round), once each renewal round.
ADOPT_FOR = 2.0
ADOPT_PAUSE = 0.01  # seconds between looks for room among the loads in flight
RECORD_GRACE = 60.0  # a stored SA outlives its hard lifetime by this much
ADDRESS_HOLD_WITHOUT_EXPIRY = 86400.0  # an SA that never expires holds its address this long


def sa_key(spi_i: bytes, spi_r: bytes) -> bytes:
    return spi_i + spi_r


def seal_child(key: ClusterKey, worker: str, event: ChildSaEstablished) -> bytes:
    packed = msgpack.packb(child_record(event), use_bin_type=True)
    return seal(key, packed, child_aad(worker, event.spi_in))


@dataclass(slots=True)
class FailoverStats:
    takeovers: int = 0  # SAs loaded from the store and continued here
    takeover_failures: int = 0  # records that did not open or restore, store errors
    not_found: int = 0  # datagrams for SPIs the store does not know
    lease_held: int = 0  # datagrams dropped while another node holds the SA's lease
    loads_limited: int = 0  # datagrams dropped because MAX_LOADS loads were in flight
    persist_failures: int = 0  # steps whose datagrams were withheld: the store failed
    lease_lost: int = 0  # SAs another node took over while we still held them
    handovers: int = 0  # SAs released because rendezvous gives them to another node
    renew_failures: int = 0
    reclaimed: int = 0  # SAs stored again after the store lost them
    message_id_syncs: int = 0  # RFC 6311 exchanges started after a takeover

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True, eq=False)
class _Held:
    key: bytes
    fence: int
    worker: str
    written: tuple[Any, ...] | None = None  # what the stored record says, in short
    children: dict[bytes, ChildSaEstablished | None] = field(default_factory=dict)
    pending: list[Op[Any]] = field(default_factory=list)  # distribution not yet stored
    handing_over: bool = False
    stay_until: float = 0.0  # (a takeover) not handed over before this


_Waiting = tuple[Header, bytes, Address, Address, float] | Callable[[], None]


def _summary(record: dict[str, Any]) -> tuple[Any, ...]:
    """What must be stored again when it changes (times are relative and always move).
    Whether a request of ours is in flight is: a node taking the SA over with one in
    flight it cannot send again asks the peer for an RFC 6311 sync, which strongSwan with
    an AEAD IKE cipher cannot answer once it has answered a request of ours (its IVs
    count message IDs, and ID 0's is used): it drops the IKE SA instead."""
    return (record["spi_i"], record["spi_r"], record["peer_next_id"], record["our_next_id"],
            record.get("in_flight", False), record["last_request_digest"],
            tuple(record["local"]), tuple(record["remote"]),
            tuple(c["spi_in"] for c in record["children"]), record["worker"])


class SaPersistence:
    def __init__(
        self,
        writer: StoreWriter,
        cluster_key: ClusterKey,
        node: str,
        policy: ResponderPolicy,
        supervisor: Supervisor,
        *,
        lease_ttl: float,
        worker_of: Callable[[Address], str | None],
        learn_worker: Callable[[Address, str], None] = lambda remote, worker: None,
        sa_arrived: Callable[[IkeSession], None] = lambda session: None,
        sa_left: Callable[[bytes, bytes], None] = lambda spi_i, spi_r: None,
    ) -> None:
        self._writer = writer
        self._key = cluster_key
        self.node = node
        self.policy = policy  # replaced by a configuration reload
        self._supervisor = supervisor
        self.lease_ttl = lease_ttl
        self._worker_of = worker_of
        self._learn_worker = learn_worker
        self._sa_arrived = sa_arrived  # the metrics' gauges follow SAs between nodes
        self._sa_left = sa_left
        self.stats = FailoverStats()
        self._held: dict[SaActor, _Held] = {}
        # SAs being loaded -> what waits for them: datagrams to route, or commands
        self._loading: dict[bytes, list[_Waiting]] = {}
        # loads a worker's routing asked for (a datagram, a Child SA limit)
        self._routed: set[bytes] = set()
        self._missing: dict[bytes, float] = {}
        self._nursery: trio.Nursery | None = None
        self._responders: Sequence[str] = ()
        self._responders_changed = False
        self._adopt_until = 0.0
        self._adopting = False
        self._adoptions: set[bytes] = set()  # loads `adopt` started
        supervisor.persist = self.persist
        supervisor.on_unknown_sa = self.on_unknown_sa
        supervisor.on_actor_retired = self._retired

    @property
    def held_count(self) -> int:
        return len(self._held)

    @property
    def responders(self) -> Sequence[str]:
        """The live responders, from membership."""
        return self._responders

    @responders.setter
    def responders(self, responders: Sequence[str]) -> None:
        if set(responders) != set(self._responders):
            self._responders_changed = True
        self._responders = responders

    # -- persisting ------------------------------------------------------------------

    async def persist(self, actor: SaActor, events: list[Event]) -> bool:
        session = actor.session
        assert isinstance(session, IkeSession)
        held = self._held.get(actor)
        if held is None:
            if session.closed or session.state is not State.ESTABLISHED:
                return True  # half-open or failed: nothing another node could continue
            key = sa_key(session.spi_i, session.spi_r)
            fence = await self._acquire_new(key)
            if fence is None:
                return False
            held = _Held(key, fence, self._worker_of(session.sa.remote) or "")
            self._held[actor] = held
        held.pending.extend(self._distribution(held, events))
        ops: list[Op[Any]] = list(held.pending)
        summary: tuple[Any, ...] | None = None
        retired: tuple[bytes, int] | None = None
        if session.closed:
            ops += [DeleteSa(held.key, held.fence), Release(held.key, self.node, held.fence)]
        elif session.state in (State.ESTABLISHED, State.DELETING):  # (DELETING: its Delete)
            now = trio.current_time()
            key = sa_key(session.spi_i, session.spi_r)
            if key != held.key:  # an IKE rekey (RFC 7296 2.18): the SA lives on under new SPIs
                fence = await self._acquire_new(key)
                if fence is None:
                    return False
                retired = (held.key, held.fence)
                held.key, held.fence, held.written = key, fence, None
                held.stay_until = 0.0  # (the new SPIs' owner by rendezvous may take it)
                ops += self._children_moved(held, session)
            record = snapshot_of(session, now)
            record["worker"] = held.worker
            summary = _summary(record)
            if summary != held.written:
                ops += self._put(held, record)
            if retired is not None:
                ops += [DeleteSa(*retired), Release(retired[0], self.node, retired[1])]
        if not ops:
            return True
        if not await self._write(actor, ops):
            if retired is not None:  # try the whole move again next time
                held.key, held.fence = retired
            return False
        held.pending.clear()
        if summary is not None:
            held.written = summary
        if session.closed:
            self._held.pop(actor, None)
        return True

    def _children_moved(self, held: _Held, session: IkeSession) -> list[Op[Any]]:
        """After an IKE rekey the Child SAs belong to the new IKE SA: the worker's table
        and its view say so, so its lifetime limits reach the new SA's owner."""
        if not held.worker:
            return []
        ops: list[Op[Any]] = []
        for child in session.sa.children.values():
            put, _ = self._record_child(held, child_established(session.sa, child))
            ops += [put, Publish(held.worker, _message("ike", child.spi_in, session.spi_i,
                                                       session.spi_r))]
        return ops

    def _record_child(self, held: _Held, event: ChildSaEstablished) -> tuple[PutChild, bytes]:
        """Remember `event` as one of the SA's Child SAs; its sealed record for the
        worker's table, and the sealed bytes (for an install notification)."""
        held.children[event.spi_in] = event
        sealed = seal_child(self._key, held.worker, event)
        return PutChild(held.worker, event.spi_in, sealed), sealed

    def _put(self, held: _Held, record: dict[str, Any]) -> list[Op[Any]]:
        """The snapshot, sealed, under our fence; kept a while past the SA's hard lifetime.
        Its virtual IPs stay held in the store as long as it (a dead owner's go with its
        records)."""
        expire_in = record["expire_in"]
        ttl = None if expire_in is None else max(expire_in, 0.0) + RECORD_GRACE
        blob = pack_snapshot(record, SECRET_FIELDS, self._key, held.key)
        hold = ttl if ttl is not None else ADDRESS_HOLD_WITHOUT_EXPIRY
        return [PutSa(held.key, blob, self.node, held.fence, ttl),
                *(HoldAddress(str(pool), int(offset), bytes(holder), hold)
                  for pool, offset, holder, *_ in record.get("leases", []))]

    async def _acquire_new(self, key: bytes) -> int | None:
        try:
            fence = await self._writer.acquire(key, self.node, self.lease_ttl)
        except StoreError as exc:
            self._store_failed(exc)
            return None
        if fence is None:  # an SPI pair someone else holds: not ours to answer for
            self.stats.lease_held += 1
            raise Relinquished(key.hex())
        return fence

    async def _write(self, actor: SaActor, ops: list[Op[Any]]) -> bool:
        try:
            results = await self._writer.submit_all(ops)
        except StoreError as exc:
            self._store_failed(exc)
            return False
        for result in results:
            if isinstance(result, LeaseLost):
                held = self._held.get(actor)
                if held is not None and await self._reclaim(actor, held):
                    return False  # stored anew; the retransmission goes out with it
                self.stats.lease_lost += 1
                self._held.pop(actor, None)
                raise Relinquished(actor.label)
            if isinstance(result, StoreError):
                self._store_failed(result)
                return False
        return True

    def _store_failed(self, exc: StoreError) -> None:
        self.stats.persist_failures += 1
        if self.stats.persist_failures == 1 or self.stats.persist_failures % 100 == 0:
            logger.warning("store write failed (%s): responses wait for the store "
                           "(%d so far)", exc, self.stats.persist_failures)

    def _distribution(self, held: _Held, events: list[Event]) -> list[Op[Any]]:
        """The worker's share of this step: Child SAs to install, move or remove."""
        worker = held.worker
        if not worker:
            return []
        ops: list[Op[Any]] = []
        for event in events:
            if isinstance(event, ChildSaEstablished):
                put, sealed = self._record_child(held, event)
                ops += [put, Publish(worker, _message("install", event.spi_in, sealed))]
            elif isinstance(event, ChildSaDeleted):
                held.children.pop(event.spi_in, None)
                ops += _removal(worker, event.spi_in)
            elif isinstance(event, IkeSaDeleted):
                for spi_in in held.children:
                    ops += _removal(worker, spi_in)
                held.children.clear()
            elif isinstance(event, IkeSaMoved):  # NAT rebinding: ESP follows the peer
                for spi_in, child in list(held.children.items()):
                    if child is not None:
                        ops.append(self._record_child(held, _moved(child, event))[0])
                    ops.append(Publish(worker, _message("move", spi_in, list(event.remote))))
        return ops

    # -- taking over -------------------------------------------------------------------

    def on_unknown_sa(self, header: Header, data: bytes, local: Address, remote: Address,
                      now: float) -> None:
        """The supervisor's hook for a datagram whose SPI routes nowhere here."""
        stats = self._supervisor.stats
        if self._nursery is None:
            stats.dropped_no_sa += 1
            return
        # (a peer's message, or its answer on an SA whose IKE rekey a responder started:
        # the store keys both by the SPIs in the header)
        key = sa_key(header.spi_i, header.spi_r)
        queued = self._loading.get(key)
        if queued is not None:
            if len(queued) < QUEUED_PER_LOAD:
                queued.append((header, data, local, remote, now))
                self._routed.add(key)
            return
        until = self._missing.get(key)
        if until is not None and until > now:
            self.stats.not_found += 1
            stats.dropped_no_sa += 1
            return
        if len(self._loading) >= MAX_LOADS:
            self.stats.loads_limited += 1
            return
        self._loading[key] = [(header, data, local, remote, now)]
        self._routed.add(key)
        self._nursery.start_soon(self._load, key, name=f"load {key.hex()}")

    def load_then(self, key: bytes, then: Callable[[], None], *, routed: bool = False
                  ) -> None:
        """Load the SA `key` if the store has it and its lease is free, then call `then`
        (a command for its actor, e.g. a rekey the worker asked for). `routed`: a worker
        sent the command here by its view of the responders, as it does datagrams."""
        queued = self._loading.get(key)
        if queued is not None:
            if len(queued) < QUEUED_PER_LOAD:
                queued.append(then)
                if routed:
                    self._routed.add(key)
            return
        if self._nursery is None or len(self._loading) >= MAX_LOADS:
            return
        self._loading[key] = [then]
        if routed:
            self._routed.add(key)
        self._nursery.start_soon(self._load, key, name=f"load {key.hex()}")

    async def _load(self, key: bytes) -> None:
        try:
            await self._take_over(key)
        finally:
            self._loading.pop(key, None)
            self._routed.discard(key)
            self._adoptions.discard(key)

    async def _take_over(self, key: bytes) -> None:
        fence: int | None = None
        try:
            # (a load `adopt` started alone drops nothing when it finds nothing to take)
            counted = key not in self._adoptions or len(self._loading.get(key, ())) > 1
            stored = await self._writer.get_sa(key)
            if stored is None:
                if counted:
                    self.stats.not_found += 1
                    self._supervisor.stats.dropped_no_sa += 1
                    self._remember_missing(key)
                return
            fence = await self._writer.acquire(key, self.node, self.lease_ttl)
            if fence is None:
                if counted:
                    self.stats.lease_held += 1
                return
            record = unpack_snapshot(stored.snapshot, self._key, key)
            now = trio.current_time()
            session = restore(record, self.policy, now)
        except (StoreError, ParseError) as exc:
            self.stats.takeover_failures += 1
            logger.warning("taking over IKE SA %s failed: %s", key.hex(), exc)
            if fence is not None:
                await self._release(key, fence)
            return
        pending = session.sa.pending
        delay = 0.0
        if key not in self._routed and stored.owner not in self.responders:
            # The owner died, and we load its SA for a command (a terminate, a disconnect)
            # rather than for what a worker routed here: the workers' view of the
            # responders may list the dead owner a while longer (each refreshes every
            # third of a TTL, as ours), and the peer's answer to a request of ours would
            # be relayed there and lost. Our requests wait until they see it gone.
            delay = self.lease_ttl / 2
            if pending is not None:
                pending.deadline = now + delay
        actor = self._supervisor.adopt(session, now)
        if actor is None:
            await self._release(key, fence)
            return
        worker = str(record.get("worker") or "")
        # the worker routed it here by its view of the responders; ours may still list the
        # dead owner for a heartbeat round: handing it back would bounce it
        held = _Held(key, fence, worker, written=_summary(record),
                     stay_until=now + self.lease_ttl)
        held.children = {c["spi_in"]: None for c in record["children"]}
        self._held[actor] = held
        if worker:
            self._learn_worker(session.sa.remote, worker)
        self._sa_arrived(session)
        self.stats.takeovers += 1
        logger.info("took over IKE SA %s (owner was %s, fence %d): next message ID %d%s%s",
                    actor.label, stored.owner, fence, record["peer_next_id"],
                    f"; our request {pending.message_id} in flight goes again"
                    if pending is not None else "",
                    f"; loaded for a command, our requests wait {delay:g} s" if delay else "")
        later: list[Callable[[], object]] = []
        for waiting in self._loading.get(key, []):
            if callable(waiting):
                later.append(waiting)
            else:
                self._supervisor.route(*waiting)
        if session.sa.ids_unsure and session.sa.mid_sync:
            # The old owner's own request, which the snapshot does not hold (an earlier
            # version's, or a sync of its own), may never have reached the peer, so our
            # next request ID may be ahead of what it expects: RFC 6311 settles it (our
            # requests wait for it). After the peer's queued requests, so that it has
            # none in flight when the sync arrives.
            later.append(lambda: actor.mailbox.put_nowait(lambda s, t: s.sync_message_ids(t)))
            self.stats.message_id_syncs += 1
        if delay and later and self._nursery is not None:
            self._nursery.start_soon(_call_later, delay, later)
        else:
            for call in later:
                call()

    def _remember_missing(self, key: bytes) -> None:
        now = trio.current_time()
        if len(self._missing) >= MISSING_MAX:
            self._missing = {k: t for k, t in self._missing.items() if t > now}
            if len(self._missing) >= MISSING_MAX:
                self._missing.clear()
        self._missing[key] = now + MISSING_FOR

    async def _release(self, key: bytes, fence: int) -> None:
        with contextlib.suppress(StoreError):  # the lease runs out by itself
            await self._writer.release(key, self.node, fence)

    # -- leases and hand-over --------------------------------------------------------

    def _retired(self, actor: SaActor) -> None:
        if not actor.session.closed and actor.established:
            self._sa_left(actor.session.spi_i, actor.session.spi_r)  # relinquished
        held = self._held.pop(actor, None)
        if held is not None and held.handing_over and self._nursery is not None:
            self.stats.handovers += 1
            self._nursery.start_soon(self._release, held.key, held.fence)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Loads run here; leases are renewed and SAs handed over until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.lease_ttl / 3)
                    await self.renew()
                    self.hand_over()
                    now = trio.current_time()
                    if self._responders_changed:
                        self._responders_changed = False
                        self._adopt_until = now + ADOPT_FOR * self.lease_ttl
                    if now < self._adopt_until and not self._adopting:
                        nursery.start_soon(self.adopt)
            finally:
                self._nursery = None

    async def renew(self) -> None:
        held = list(self._held.items())
        if not held:
            return
        ops = [Renew(h.key, self.node, h.fence, self.lease_ttl) for _, h in held]
        try:
            results = await self._writer.submit_all(ops)
        except StoreError:
            self.stats.renew_failures += 1
            return
        for (actor, h), result in zip(held, results, strict=True):
            if result is False and self._held.get(actor) is h:
                if await self._reclaim(actor, h):
                    continue
                if self._held.get(actor) is h:
                    self.stats.lease_lost += 1
                    del self._held[actor]
                    self._supervisor.relinquish(actor)
            elif isinstance(result, StoreError):
                self.stats.renew_failures += 1

    async def _reclaim(self, actor: SaActor, held: _Held) -> bool:
        """Our lease is gone. If another node owns the SA now, or deleted it (its fence
        counter is still there), it is not ours. If the store forgot it (a Redis restart
        without its data) or the lease ran out during an outage with the record still
        ours, take the lease again and store the SA and its Child SAs anew."""
        session = actor.session
        assert isinstance(session, IkeSession)
        try:
            stored = await self._writer.get_sa(held.key)
            if stored is not None and stored.owner != self.node:
                return False
            fence = await self._writer.acquire(held.key, self.node, self.lease_ttl)
            if fence is None:
                return False
            if stored is None and fence != 1:  # a tombstone: someone deleted the SA
                await self._release(held.key, fence)
                return False
        except StoreError:
            self.stats.renew_failures += 1
            return True  # keep it; try again next round
        held.fence, held.written = fence, None
        ops: list[Op[Any]] = []
        if held.worker and not session.closed:
            for child in session.sa.children.values():
                put, sealed = self._record_child(held, child_established(session.sa, child))
                ops += [put, Publish(held.worker, _message("install", child.spi_in, sealed))]
        if session.state in (State.ESTABLISHED, State.DELETING):
            record = snapshot_of(session, trio.current_time())
            record["worker"] = held.worker
            ops += self._put(held, record)
            summary: tuple[Any, ...] | None = _summary(record)
        else:
            summary = None
        try:
            results = await self._writer.submit_all(ops)
        except StoreError:
            return True
        if not any(isinstance(r, StoreError) for r in results):
            held.written = summary
        self.stats.reclaimed += 1
        logger.warning("IKE SA %s: the store had lost it; stored again (fence %d)",
                       actor.label, fence)
        return True

    async def adopt(self) -> int:
        """Load the stored SAs that rendezvous hashing gives to this node and no actor
        here holds: a dead responder's, or those another handed over. Loaded now, not at
        the peer's next datagram, their timers run on (rekeys, lifetimes, liveness
        checks) however quiet the peer is. One whose lease is still held is tried again
        next round. At most half of MAX_LOADS at a time, so that datagrams still find
        room. How many loads were started."""
        responders = self._responders
        if self.node not in responders or self._nursery is None:
            return 0
        self._adopting = True
        try:
            held = {h.key for h in self._held.values()}
            keys = []
            async for key, _owner in self._writer.store.scan_owners():
                if key not in held and choose(key[:8], responders) == self.node:
                    keys.append(key)
            for key in keys:
                while len(self._loading) >= MAX_LOADS // 2:
                    await trio.sleep(ADOPT_PAUSE)
                if key not in self._loading:
                    self.load_then(key, _nothing)
                    if key in self._loading:
                        self._adoptions.add(key)
            return len(keys)
        except StoreError as exc:
            logger.warning("looking for the SAs this node should hold failed: %s", exc)
            return 0
        finally:
            self._adopting = False

    def ours_by_rendezvous(self, spi_i: bytes) -> bool:
        """Whether rendezvous hashing gives an SA with this initiator SPI to this node."""
        return self.node in self.responders and choose(spi_i, self.responders) == self.node

    def hand_over(self) -> None:
        """Release the SAs rendezvous hashing now gives to another live responder."""
        responders = self.responders
        if self.node not in responders:
            return  # our own view is incomplete (store trouble): move nothing
        now = trio.current_time()
        for actor, held in self._held.items():
            if held.handing_over or held.pending or now < held.stay_until:
                continue
            session = actor.session
            if choose(session.spi_i, responders) == self.node:
                continue
            assert isinstance(session, IkeSession)
            if session.sa.pending is None and session.sa.queue:
                continue  # a request of ours about to leave: it goes with the snapshot
            if session.awaiting_peer_delete:
                # the SA the peer's rekey replaced is only here (snapshots hold the
                # current one), and its SPIs lead here: the peer's retransmission of its
                # rekey request when our answer was lost must find it. (One we rekeyed
                # goes at once: the peer's answer to our Delete of the old SA is all
                # that is lost.)
                continue
            # (a request in flight goes too: its answer is routed to the new owner, which
            # sends it again from the snapshot; waiting for it here would wait for good)
            held.handing_over = True
            self._supervisor.relinquish(actor)


def _nothing() -> None:
    pass


async def _call_later(delay: float, calls: list[Callable[[], object]]) -> None:
    await trio.sleep(delay)
    for call in calls:
        call()


def _message(kind: str, spi_in: bytes, *rest: Any) -> bytes:
    packed: bytes = msgpack.packb([kind, spi_in, *rest], use_bin_type=True)
    return packed


def _removal(worker: str, spi_in: bytes) -> list[Op[Any]]:
    return [DeleteChild(worker, spi_in), Publish(worker, _message("remove", spi_in))]


def _moved(child: ChildSaEstablished, event: IkeSaMoved) -> ChildSaEstablished:
    return replace(child, local=event.local, remote=event.remote)

