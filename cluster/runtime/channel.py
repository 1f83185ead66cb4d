"""The responders' channel: a store stream every cluster responder follows.

These kinds of message travel on it.

"identity": one peer identity, one IKE SA, across the responders. A road warrior that
comes back with INITIAL_CONTACT (RFC 7296 2.4) usually lands on another responder than
its old SA (rendezvous hashing of a fresh SPI). The responder that establishes the new
SA ends its own other SAs of those identities (the supervisor) and announces the SA
here; every other responder then ends its SAs of them the same way: quietly for
INITIAL_CONTACT, with a Delete for swanctl's `unique = "replace"`. Their Child SAs
leave the workers and their shared addresses are freed as for any ended SA.

For `unique = "keep"` the announcement carries when the SA was established; a responder
that holds an older SA of the identities answers with "refuse" and the new SA's
responder deletes it (if both came up at once, each side orders the two by time, then
SPI, and the later one goes). Without INITIAL_CONTACT, "replace" and "keep" carry the
peer's address and port too: a new SA from where an older one's peer is reauthenticates
it (make-before-break, RFC 7296 2.8.3), wherever rendezvous put it, so that one is
deleted only after a grace ("replace") or left to the peer ("keep").

"redirect": `ike-cluster redirect` with a cluster's configuration: every responder sends
new initiators to the gateway (RFC 5685) and, if asked, its established SAs too. The
gateway is also kept in the store (`store_redirect`), so a responder that starts later
redirects as well (`stored_redirect`).

"rekey": `ike-cluster rekey` asks for an IKE SA or one of its Child SAs to be rekeyed
(swanctl's `--rekey`), by the responder that holds it or loads it, as for "terminate".

"terminate": `ike-cluster terminate` asks for an IKE SA to be deleted (swanctl's
`--terminate`). The responder that holds it deletes it with a Delete to the peer; if
none holds it (its owner died and no datagram brought it back yet), the responder
rendezvous hashing gives it to loads it from the store first. With a number of seconds
it asks instead for the SA's service to end that long from now (a RADIUS CoA-Request's
Session-Timeout).

A message that cannot be published (the store is down) is counted and logged, not
retried: an old SA then ends as it would without one (DPD, its lifetime).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import msgpack
import trio

from ..ike.session import Address
from ..store.interface import Children, PutChild, StateStore, StoreError
from .supervisor import CLUSTER_POLICIES

logger = logging.getLogger(__name__)

# The channel every responder follows (node ids cannot start with "@", so no worker's
# channel has this name).
RESPONDERS_CHANNEL = "@responders"
CLI_ORIGIN = "@cli"  # the origin of `ike-cluster terminate`'s messages
VERSION = 1
QUEUE = 256  # announcements waiting for the store; more are lost (and counted)
RETRY = 1.0  # seconds before following the channel again after a store error

# (identities, policy, the new SA's responder SPI, its peer without INITIAL_CONTACT) ->
# how many SAs that ended here
Replace = Callable[[tuple[str, str], str, bytes, Address | None], int]
class KeepPolicy(Protocol):
    """What `unique = "keep"` needs of the supervisor."""

    def since_of(self, spi_r: bytes) -> float: ...
    def keep_identity(self, key: tuple[str, str], newest: bytes, since: float,
                      peer: Address | None = None) -> bool: ...
    def refuse_identity(self, key: tuple[str, str], spi_r: bytes) -> bool: ...


# (spi_i, spi_r) -> whether this responder deleted it (held, or loaded to delete); it
# may take a while (a dead owner's lease runs out first)
# (spi_i, spi_r, None: delete it, or the seconds its service has left, a Child SA's
# inbound SPI to delete only that one or b"") -> found it
Terminate = Callable[[bytes, bytes, int | None, bytes], Awaitable[bool]]
# (SPIs, a Child SA's inbound SPI or b"" for the IKE SA) -> whether it was asked here
Rekey = Callable[[bytes, bytes, bytes], Awaitable[bool]]


@dataclass(slots=True)
class ChannelStats:
    sent: int = 0  # announcements published
    received: int = 0  # announcements from other responders
    lost: int = 0  # not published: queue full or store error
    malformed: int = 0  # messages on the channel that did not decode
    ended: int = 0  # SAs of ours that other responders' announcements ended
    terminated: int = 0  # IKE SAs this responder deleted for `ike-cluster terminate`
    rekeyed: int = 0  # IKE or Child SAs this responder rekeyed for `ike-cluster rekey`

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _encode(kind: str, origin: str, *fields: object) -> bytes:
    packed: bytes = msgpack.packb([VERSION, kind, origin, *fields], use_bin_type=True)
    return packed


def encode_identity(origin: str, key: tuple[str, str], policy: str, spi_r: bytes,
                    since: float | None = None, peer: Address | None = None) -> bytes:
    """`since`: when it was established (unique = "keep"); `peer`: its peer's address
    and port, for a new SA without INITIAL_CONTACT ("replace", "keep")."""
    fields: list[object] = [key[0], key[1], policy, spi_r]
    if since is not None:
        fields.append(since)
    if peer is not None:
        fields.append([peer[0], peer[1]])
    return _encode("identity", origin, *fields)


def encode_refuse(origin: str, key: tuple[str, str], spi_r: bytes) -> bytes:
    return _encode("refuse", origin, key[0], key[1], spi_r)


def encode_redirect(origin: str, gateway: str, existing: bool) -> bytes:
    return _encode("redirect", origin, gateway, existing)


def encode_terminate(origin: str, spi_i: bytes, spi_r: bytes, limit: int | None = None,
                     child: bytes = b"") -> bytes:
    """`child`: only that Child SA (its inbound SPI), for `terminate --child`; a
    responder of an earlier version drops such a message as malformed."""
    if child:
        return _encode("terminate", origin, spi_i, spi_r, None, child)
    if limit is None:
        return _encode("terminate", origin, spi_i, spi_r)
    return _encode("terminate", origin, spi_i, spi_r, limit)


def encode_rekey(origin: str, spi_i: bytes, spi_r: bytes, child: bytes = b"") -> bytes:
    return _encode("rekey", origin, spi_i, spi_r, child)


@dataclass(frozen=True)
class Rekeying:
    """Rekey the IKE SA, or with `child` (an inbound SPI) that Child SA of it."""

    origin: str
    spi_i: bytes
    spi_r: bytes
    child: bytes = b""


@dataclass(frozen=True)
class Redirection:
    origin: str
    gateway: str  # "" ends the redirection
    existing: bool  # the established SAs are asked to move too


# origin, identities, policy, SPI, the peer ("replace" without INITIAL_CONTACT)
Identity = tuple[str, tuple[str, str], str, bytes, Address | None]


@dataclass(frozen=True)
class Termination:
    """Delete the IKE SA, or with `limit` end its service that many seconds from now, or
    with `child` (an inbound SPI) delete only that Child SA of it."""

    origin: str
    spi_i: bytes
    spi_r: bytes
    limit: int | None = None
    child: bytes = b""


@dataclass(frozen=True)
class Kept:
    """unique = "keep": an SA established at `since` (its responder's wall clock)."""

    origin: str
    key: tuple[str, str]
    spi_r: bytes
    since: float
    peer: Address | None = None  # its peer's, when it came without INITIAL_CONTACT


@dataclass(frozen=True)
class Refusal:
    """unique = "keep": an older SA of `key` lives elsewhere, `spi_r` must go."""

    origin: str
    key: tuple[str, str]
    spi_r: bytes


def decode_untrusted(data: bytes) -> (Identity | Termination | Rekeying | Redirection | Kept
                                      | Refusal | None):
    """An "identity" (origin, identities, policy, SPI; Kept for unique = "keep"), a
    "refuse", a "terminate" (Termination), a "rekey" (Rekeying) or a "redirect" message;
    None when it is none of them."""
    try:
        fields: Any = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(fields, list) or len(fields) < 3 or fields[0] != VERSION \
            or not isinstance(fields[2], str):
        return None
    kind, origin, rest = fields[1], fields[2], fields[3:]
    if kind == "terminate" and len(rest) == 2 and _spis(*rest):
        return Termination(origin, rest[0], rest[1])
    if kind == "terminate" and len(rest) == 3 and _spis(*rest[:2]) \
            and isinstance(rest[2], int) and 0 <= rest[2] < 1 << 32:
        return Termination(origin, rest[0], rest[1], rest[2])
    if kind == "terminate" and len(rest) == 4 and _spis(*rest[:2]) and rest[2] is None \
            and isinstance(rest[3], bytes) and len(rest[3]) == 4:
        return Termination(origin, rest[0], rest[1], None, rest[3])
    if kind == "rekey" and len(rest) == 3 and _spis(*rest[:2]) \
            and isinstance(rest[2], bytes) and len(rest[2]) in (0, 4):
        return Rekeying(origin, rest[0], rest[1], rest[2])
    if kind == "redirect" and len(rest) == 2 and isinstance(rest[0], str) \
            and len(rest[0]) < 256 and isinstance(rest[1], bool):
        return Redirection(origin, rest[0], rest[1])
    if kind == "refuse" and len(rest) == 3 and _names(*rest[:2]) and _spis(rest[2]):
        return Refusal(origin, (rest[0], rest[1]), rest[2])
    if kind != "identity" or len(rest) not in (4, 5, 6):
        return None
    local_id, remote_id, policy, spi_r, *tail = rest
    if not _names(local_id, remote_id) or policy not in CLUSTER_POLICIES or not _spis(spi_r):
        return None
    peer = None
    if policy != "initial_contact" and tail and isinstance(tail[-1], list):
        peer = _peer_untrusted(tail.pop())
        if peer is None:
            return None
    if policy == "keep":
        if len(tail) != 1 or not isinstance(tail[0], float) or not math.isfinite(tail[0]):
            return None
        return Kept(origin, (local_id, remote_id), spi_r, tail[0], peer)
    if tail:
        return None
    return origin, (local_id, remote_id), policy, spi_r, peer


def _peer_untrusted(value: list[Any]) -> Address | None:
    """[host, port] as sent by `encode_identity`; None if it is not that."""
    if len(value) != 2 or not isinstance(value[0], str) or not 0 < len(value[0]) <= 64:
        return None
    port = value[1]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        return None
    return value[0], port


def _names(*values: object) -> bool:
    return all(isinstance(v, str) for v in values)


# the cluster's redirection, kept in the store under the channel's name (a table no
# worker has: node ids cannot start with "@")
REDIRECT_FIELD = b"redirect"


async def store_redirect(store: StateStore, gateway: str) -> None:
    """Keep the cluster's redirection ("" none) for responders that start later."""
    await store.run(PutChild(RESPONDERS_CHANNEL, REDIRECT_FIELD, gateway.encode()))


async def stored_redirect(store: StateStore) -> str:
    """The cluster's redirection ("" none)."""
    table = await store.run(Children(RESPONDERS_CHANNEL))
    return table.get(REDIRECT_FIELD, b"").decode(errors="replace")


def _spis(*values: object) -> bool:
    return all(isinstance(v, bytes) and len(v) == 8 for v in values)


class ResponderChannel:
    """Publishes this responder's announcements and applies what others send (`run`)."""

    def __init__(self, store: StateStore, node_id: str, replace: Replace,
                 terminate: Terminate,
                 redirect: Callable[[str, bool], object] | None = None,
                 keep: KeepPolicy | None = None, rekey: Rekey | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self._replace = replace
        self._terminate = terminate
        self._rekey = rekey  # `ike-cluster rekey`
        self._redirect = redirect  # (gateway, existing): `ike-cluster redirect`
        self._keep = keep  # unique = "keep" (the supervisor)
        self.stats = ChannelStats()
        self._send, self._receive = trio.open_memory_channel[bytes](QUEUE)
        self._nursery: trio.Nursery | None = None  # where terminations run

    def identified(self, key: tuple[str, str], policy: str, spi_r: bytes,
                   peer: Address | None = None) -> None:
        """The supervisor's `on_identified`: queue the announcement (never blocks)."""
        since = None
        if policy == "keep":
            if self._keep is None:
                return
            since = self._keep.since_of(spi_r)
        self._queue(encode_identity(self.node_id, key, policy, spi_r, since, peer), spi_r,
                    policy)

    def _queue(self, message: bytes, spi_r: bytes, what: str) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self.stats.lost += 1
            logger.warning("IKE SA %s: %s not announced to the other responders (queue "
                           "full)", spi_r.hex(), what)

    def apply(self, message: bytes) -> None:
        """One message from the channel (our own announcements are skipped)."""
        decoded = decode_untrusted(message)
        if decoded is None:
            self.stats.malformed += 1
            return
        if isinstance(decoded, Redirection):
            if self._redirect is not None:
                try:
                    self._redirect(decoded.gateway, decoded.existing)
                except ValueError as exc:  # not a gateway we can name in a REDIRECT
                    self.stats.malformed += 1
                    logger.warning("redirect from %s ignored: %s", decoded.origin, exc)
            return
        if isinstance(decoded, Kept | Refusal):
            if decoded.origin != self.node_id and self._keep is not None:
                self._apply_keep(decoded)
            return
        if isinstance(decoded, Termination):
            if self._nursery is not None:
                self._nursery.start_soon(self._terminate_one, decoded)
            return
        if isinstance(decoded, Rekeying):
            if self._nursery is not None and self._rekey is not None:
                self._nursery.start_soon(self._rekey_one, decoded)
            return
        origin, key, policy, spi_r, peer = decoded
        if origin == self.node_id:
            return
        self.stats.received += 1
        ended = self._replace(key, policy, spi_r, peer)
        if ended:
            self.stats.ended += ended
            logger.info("%d IKE SA(s) of %s === %s ended here: responder %s established "
                        "IKE SA %s (%s)", ended, key[0], key[1], origin, spi_r.hex(), policy)

    def _apply_keep(self, message: Kept | Refusal) -> None:
        assert self._keep is not None
        self.stats.received += 1
        key = message.key
        if isinstance(message, Refusal):
            if self._keep.refuse_identity(key, message.spi_r):
                self.stats.ended += 1
                logger.info("IKE SA %s of %s === %s refused: responder %s holds an older one "
                            "(unique = keep)", message.spi_r.hex(), key[0], key[1],
                            message.origin)
        elif self._keep.keep_identity(key, message.spi_r, message.since, message.peer):
            self._queue(encode_refuse(self.node_id, key, message.spi_r), message.spi_r,
                        "refuse (unique = keep)")

    async def _rekey_one(self, asked: Rekeying) -> None:
        assert self._rekey is not None
        if await self._rekey(asked.spi_i, asked.spi_r, asked.child):
            self.stats.rekeyed += 1
            what = f"CHILD SA {asked.child.hex()} (in) of " if asked.child else ""
            logger.info("%sIKE SA %s_i/%s_r: rekey started (asked by %s)", what,
                        asked.spi_i.hex(), asked.spi_r.hex(), asked.origin)

    async def _terminate_one(self, asked: Termination) -> None:
        if await self._terminate(asked.spi_i, asked.spi_r, asked.limit, asked.child):
            self.stats.terminated += 1
            what = (f"Child SA {asked.child.hex()} (in) terminated" if asked.child else
                    "terminated" if asked.limit is None else
                    f"service ends in {asked.limit} s")
            logger.info("IKE SA %s_i/%s_r: %s (asked by %s)", asked.spi_i.hex(),
                        asked.spi_r.hex(), what, asked.origin)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._follow)
            nursery.start_soon(self._publish)
            task_status.started()

    async def _publish(self) -> None:
        async for message in self._receive:
            try:
                await self.store.publish(RESPONDERS_CHANNEL, message)
            except StoreError as exc:
                self.stats.lost += 1
                logger.warning("an IKE SA's identities not announced to the other "
                               "responders: %s", exc)
            else:
                self.stats.sent += 1

    async def _follow(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                      ) -> None:
        started = False
        while True:
            try:
                async with self.store.subscribe(RESPONDERS_CHANNEL) as subscription:
                    if not started:
                        started = True
                        task_status.started()
                    async for message in subscription:
                        if message is not None:  # None: some missed, nothing to re-read
                            self.apply(message)
            except StoreError as exc:
                if not started:
                    started = True
                    task_status.started()
                logger.warning("responder channel: %s; following again in %.0f s", exc, RETRY)
                await trio.sleep(RETRY)
