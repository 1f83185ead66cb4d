"""One IKE SA (and its successors after rekeys) as a sans-IO object, in aioquic's shape.

The runtime feeds datagrams and the time in; the session hands back datagrams to send,
a timer, and events. It never touches a socket or a clock; randomness and the wall
clock (for certificate validity) are injected.

An IKE rekey (RFC 7296 2.18) creates a successor SA under new SPIs; the old SA stays
here, answering and retransmitting with its own message IDs, until its Delete exchange
ends. `spi_i`/`spi_r` always name the current SA.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import (
    ChildSaNotFound,
    IkeError,
    InvalidKePayload,
    InvalidSyntax,
    ParseError,
    Redirected,
    TemporaryFailure,
    UnsupportedCriticalPayload,
)
from ..key_exchange import ExponentialPool
from .configuration import release_leases
from .constants import NATT_PORT, ExchangeType, NotifyType, ProtocolId
from .create_child import (
    CreateChild,
    RekeyChild,
    RekeyIke,
    build_create_child,
    build_rekey_child,
    build_rekey_ike,
    process_create_child,
    process_rekey_child,
    process_rekey_ike,
    respond_create_child,
)
from .events import (
    AUTH_EXPIRED,
    MOBIKE_UPDATE,
    PEER_NOT_RESPONDING,
    Address,
    ChildSaDeleted,
    ChildSaFailed,
    Event,
    ExchangeCompleted,
    IkeSaDeleted,
    IkeSaFailed,
    IkeSaMoved,
    IkeSaReauthDue,
    IkeSaRetired,
)
from .fragments import DEFAULT_FRAGMENT_SIZE_V4, Reassembler, ike_message_limit
from .ike_auth import (
    auth_lifetime,
    auth_lifetime_notify,
    build_auth_request,
    process_auth_response,
    respond_auth,
    session_limit,
)
from .ike_init import (
    build_init_request,
    notifies,
    process_init_response,
    redirect_data,
    respond_init,
)
from .informational import (
    delete_all_children,
    delete_children_by_outbound,
    mid_sync_notify,
    parse_mid_sync_untrusted,
    respond_informational,
)
from .lifetimes import INFINITY, deadlines, fraction
from .message import Decoded, Message, decode_untrusted, encode_plain, unknown_critical
from .mobike import MobikeAnswer, answer_mobike
from .payloads import DeletePayload, NotifyPayload, Payload
from .pending import Pending
from .policy import ConnectionConfig, ResponderPolicy
from .sa import ChildSa, IkeSa, Outstanding
from .state import TRANSITIONS, State, Trigger

logger = logging.getLogger(__name__)

Random = Callable[[int], bytes]
WallClock = Callable[[], datetime]

FRAGMENT_SIZE = DEFAULT_FRAGMENT_SIZE_V4  # IP datagram bytes (strongSwan's fragment_size)
REASSEMBLY_TIMEOUT = 30.0  # a partial message older than this is dropped
NAT_KEEPALIVE = b"\xff"
RETIRE_AFTER = 30.0  # a rekeyed-away IKE SA the peer never deletes is dropped after this
RETRY_AFTER = 5.0  # a refused rekey is tried again after about this long


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Datagram:
    data: bytes  # the IKE message, without the non-ESP marker
    local: Address
    remote: Address
    keepalive: bool = False  # a NAT keepalive: the one byte 0xFF, sent as it is (RFC 3948 2.3)


# What an outstanding request of ours is for (see IkeSession._process_response).
@dataclass
class _Init:
    pass


@dataclass
class _Auth:
    pass


@dataclass
class Liveness:
    pass


@dataclass
class DeleteIke:
    reason: str = "deleted by us"  # the IkeSaDeleted event's, once the peer answered


@dataclass
class DeleteChild:
    spi_in: bytes
    # its hard lifetime passed: gone here already (keys and all), the Delete tells the peer
    expired: bool = False


@dataclass
class SyncMessageIds:
    nonce: bytes


@dataclass
class Redirect:
    data: bytes  # the REDIRECT notification's (RFC 5685 9.2), no nonce


@dataclass
class AuthLifetime:
    seconds: float  # what the AUTH_LIFETIME notification tells (RFC 4478 3)


Task = (_Init | _Auth | Liveness | DeleteIke | DeleteChild | RekeyChild | RekeyIke
        | CreateChild | SyncMessageIds | Redirect | AuthLifetime)

_REQUEST_TRIGGERS = {
    ExchangeType.IKE_SA_INIT: Trigger.RECV_INIT_REQUEST,
    ExchangeType.IKE_AUTH: Trigger.RECV_AUTH_REQUEST,
    ExchangeType.INFORMATIONAL: Trigger.RECV_INFORMATIONAL,
    ExchangeType.CREATE_CHILD_SA: Trigger.RECV_CREATE_CHILD,
}
_EXCHANGE_OF = {
    Liveness: ExchangeType.INFORMATIONAL,
    Redirect: ExchangeType.INFORMATIONAL,
    AuthLifetime: ExchangeType.INFORMATIONAL,
    SyncMessageIds: ExchangeType.INFORMATIONAL,
    DeleteIke: ExchangeType.INFORMATIONAL,
    DeleteChild: ExchangeType.INFORMATIONAL,
    RekeyChild: ExchangeType.CREATE_CHILD_SA,
    RekeyIke: ExchangeType.CREATE_CHILD_SA,
    CreateChild: ExchangeType.CREATE_CHILD_SA,
}


class IkeSession:
    def __init__(self, sa: IkeSa, *, rng: Random = os.urandom,
                 wall_clock: WallClock = _utc_now,
                 natt_ports: tuple[int, int] = (NATT_PORT, NATT_PORT),
                 exponentials: ExponentialPool | None = None) -> None:
        self._sa = sa
        self._exponentials = exponentials  # our DH values, shared by recent IKE_SA_INITs
        self._retiring: list[tuple[IkeSa, float]] = []  # (rekeyed-away SA, drop-by time)
        # an exchange waiting for the runtime (an address, a CRL, an OCSP answer): (sa,
        # exchange, message ID, payloads, local, remote, what it waits for)
        self._parked: tuple[IkeSa, int, int, list[Payload], Address, Address,
                            Pending] | None = None
        self._rng = rng
        self._wall_clock = wall_clock
        self._natt_ports = natt_ports
        self._outbox: list[Datagram] = []
        self.drops: dict[str, int] = {}
        self.retransmits_answered = 0
        self.retransmits_sent = 0  # our requests sent again after a timeout (RFC 7296 2.1)
        self.message_id_syncs = 0  # RFC 6311 exchanges completed
        self.last_error = ""

    # --- construction --------------------------------------------------------------

    @classmethod
    def responder(cls, policy: ResponderPolicy, spi_r: bytes, local: Address,
                  remote: Address, **kwargs: object) -> IkeSession:
        sa = IkeSa(policy, False, bytes(8), spi_r, local, remote)
        return cls(sa, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def initiator(cls, connection: ConnectionConfig, policy: ResponderPolicy, spi_i: bytes,
                  local: Address, remote: Address, now: float, *,
                  initial_contact: bool = False, wanted_vips: tuple[str, ...] = (),
                  **kwargs: object) -> IkeSession:
        """`initial_contact`: tell the peer we hold no other SA with it (RFC 7296 2.4);
        `wanted_vips`: the virtual IPs to ask for by name (those a reauthentication's
        old SA has)."""
        sa = IkeSa(policy, True, spi_i, bytes(8), local, remote, original_initiator=True,
                   connection=connection, initial_contact=initial_contact,
                   wanted_vips=wanted_vips)
        session = cls(sa, **kwargs)  # type: ignore[arg-type]
        session._send_init(connection.proposals[0].dh[0], b"", now)
        sa.transition(Trigger.SEND_INIT)
        return session

    # --- the sans-IO surface -----------------------------------------------------------

    @property
    def spi_i(self) -> bytes:
        return self._sa.spi_i

    @property
    def spi_r(self) -> bytes:
        return self._sa.spi_r

    @property
    def state(self) -> State:
        return self._sa.state

    @property
    def creating_children(self) -> bool:
        """Whether a CREATE_CHILD_SA of ours for another child is queued or under way
        (the children to start after IKE_AUTH, RFC 7296 1.3.1)."""
        sa = self._sa
        pending = sa.pending.task if sa.pending is not None else None
        return isinstance(pending, CreateChild) or \
            any(isinstance(task, CreateChild) for task in sa.queue)

    @property
    def closed(self) -> bool:
        return self._sa.state is State.CLOSED

    @property
    def sa(self) -> IkeSa:
        return self._sa

    @property
    def pending(self) -> Pending | None:
        """An exchange waits for the runtime (await its `fetch`, then `resume`)."""
        return self._parked[-1] if self._parked is not None else None

    def resume(self, now: float) -> None:
        """Answer the parked exchange, now that what it waited for was fetched."""
        if self._parked is not None:
            sa, exchange, message_id, payloads, local, remote, _ = self._parked
            self._parked = None
            self._answer(sa, exchange, message_id, payloads, local, remote, now)

    def end_here(self) -> None:
        """The SA ends in this process (deleted, failed, expired, handed over): a DH value
        it shared with other SAs is never handed out again (RFC 7296 2.12), and its
        virtual IPs go back to their pools, also when its actor failed before closing."""
        if self._exponentials is not None:
            for sa in self._all():
                self._exponentials.forget(sa.exponential)
        # a shared pool's address stays held: the SA may go on at another node (handed
        # over, or taken over after a failure); its record's end frees it there
        release_leases(self._sa, shared=self.closed)

    def _all(self) -> list[IkeSa]:
        return [self._sa, *(s for s, _ in self._retiring)]

    @property
    def awaiting_peer_delete(self) -> bool:
        """An IKE SA the peer's rekey replaced waits for the peer's Delete (at most
        RETIRE_AFTER; one we rekeyed we delete ourselves): until then the peer may send
        on its SPIs, a retransmission of its rekey request that only the old SA's
        cached response answers (ours was lost), then the Delete."""
        return any(sa.pending is None for sa, _ in self._retiring)

    def datagrams_to_send(self) -> list[Datagram]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        events = self._sa.events
        return events.popleft() if events else None

    def get_timer(self) -> float | None:
        if self.closed:
            return None
        due = [s.pending.deadline for s in self._all() if s.pending is not None]
        due += [drop_by for _, drop_by in self._retiring]
        sa = self._sa
        if sa.state is State.ESTABLISHED:
            due += [sa.rekey_at, sa.expire_at, sa.reauth_at, sa.reauth_due]
            for child in sa.children.values():
                due += [child.rekey_at, child.expire_at]
            dpd = sa.connection.dpd_delay if sa.connection else 0.0
            if dpd > 0 and sa.pending is None and not sa.queue:
                due.append(sa.last_heard + dpd)
            if sa.behind_nat:
                due.append(sa.keepalive_at)
        first = min(due, default=INFINITY)
        return None if first == INFINITY else first

    def handle_timer(self, now: float) -> None:
        for sa in self._all():
            self._retransmit(sa, now)
        for sa, drop_by in list(self._retiring):
            if now >= drop_by:
                self._retire(sa)
        sa = self._sa
        if sa.state is not State.ESTABLISHED:
            return
        if sa.behind_nat and now >= sa.keepalive_at:  # RFC 3948 4: keep the NAT mapping
            sa.keepalive_at = _next_keepalive(sa, now)
            self._outbox.append(Datagram(NAT_KEEPALIVE, sa.local, sa.remote, keepalive=True))
        if now >= sa.expire_at or now >= sa.reauth_at:
            # not rekeyed in time (strongSwan's life_time), or the peer did not authenticate
            # again within its AUTH_LIFETIME (RFC 4478): delete it
            # its Child SAs go with it: none of the other deadlines matter any more, and
            # the delete may have to wait behind a request of ours, still ESTABLISHED
            reason = AUTH_EXPIRED if now >= sa.reauth_at else "deleted by us"
            sa.expire_at = sa.rekey_at = sa.reauth_at = INFINITY
            for child in sa.children.values():
                child.rekey_at = child.expire_at = INFINITY
            self.delete_ike(now, reason)
            return
        if now >= sa.reauth_due:  # RFC 7296 2.8.3: our initiator makes a new SA first
            sa.reauth_due = INFINITY
            assert sa.connection is not None
            sa.events.append(IkeSaReauthDue(sa.spi_i, sa.spi_r, sa.connection.name))
        if now >= sa.rekey_at:
            sa.rekey_at = INFINITY
            if not sa.rekeying:
                sa.queue.append(RekeyIke())
        for child in list(sa.children.values()):
            if now >= child.expire_at:
                # also when a delete is already under way, or its rekey was due too
                self._expire_child(sa, child)
            elif now >= child.rekey_at:
                child.rekey_at = INFINITY
                if not (child.rekeying or child.deleting or child.replaced_by):
                    child.rekeying = True
                    sa.queue.append(RekeyChild(child.spi_in))
        dpd = sa.connection.dpd_delay if sa.connection else 0.0
        if dpd > 0 and sa.pending is None and not sa.queue and now >= sa.last_heard + dpd:
            sa.queue.append(Liveness())  # RFC 7296 2.4: are you there?
        self._kick(sa, now)

    @staticmethod
    def _expire_child(sa: IkeSa, child: ChildSa) -> None:
        """Its hard lifetime (life_time) passed: the SA ends now, keys and all (RFC 4301
        4.4.2.1), not once the peer answers the Delete that tells it. As strongSwan does,
        one that was not rekeyed is created again with the selectors it had; one being
        rekeyed is followed by that rekey's SA."""
        child.expire_at = child.rekey_at = INFINITY
        del sa.children[child.spi_in]
        sa.events.append(ChildSaDeleted(sa.spi_i, sa.spi_r, child.name, child.spi_in,
                                        child.spi_out, "expired"))
        deletes = [t for t in _tasks(sa) if isinstance(t, DeleteChild) and t.spi_in == child.spi_in]
        for delete in deletes:
            delete.expired = True
        if not deletes:
            sa.queue.append(DeleteChild(child.spi_in, expired=True))
        in_flight = sa.pending.task if sa.pending is not None else None
        rekeying = False
        if isinstance(in_flight, RekeyChild) and in_flight.spi_in == child.spi_in:
            in_flight.name = child.name  # its answer brings a Child SA of its own
            rekeying = True
        if not (child.deleting or child.replaced_by or rekeying or _has_selectors(sa, child)):
            sa.queue.append(CreateChild(child.name, tsi=child.local_ts, tsr=child.remote_ts))

    def receive_datagram_untrusted(self, data: bytes, local: Address, remote: Address,
                                   now: float) -> None:
        """Take one IKE message (non-ESP marker removed); bad input is counted, never raised."""
        if self.closed:
            return
        try:
            decoded = decode_untrusted(data)
            sa = self._find(decoded)
            if sa is None:
                self._drop("spi_mismatch")
            elif decoded.header.is_response:
                self._on_response(sa, decoded, data, local, remote, now)
            else:
                self._on_request(sa, decoded, data, local, remote, now)
        except ParseError as exc:
            self.last_error = str(exc)
            self._drop("malformed")

    def _find(self, decoded: Decoded) -> IkeSa | None:
        header = decoded.header
        if header.exchange == ExchangeType.IKE_SA_INIT:
            sa = self._sa
            if sa.spi_i == header.spi_i or (not sa.is_initiator and sa.spi_i == bytes(8)):
                return sa
            return None
        for sa in self._all():
            if sa.spi_i == header.spi_i and sa.spi_r == header.spi_r:
                return sa
        return None

    # --- requests we make ------------------------------------------------------------

    def delete_ike(self, now: float, reason: str = "deleted by us") -> None:
        """Delete this IKE SA and its Child SAs (RFC 7296 1.4.1); `reason` goes in the
        IkeSaDeleted event."""
        sa = self._sa
        if sa.state is not State.ESTABLISHED:
            return
        sa.queue.clear()
        sa.queue.append(DeleteIke(reason))
        self._kick(sa, now)

    def traffic_seen(self, now: float) -> None:
        """ESP from the peer arrived on a Child SA of this IKE SA (the data plane saw it):
        the peer is alive, so no liveness check is due before dpd_delay from now (RFC
        7296 2.4: only when nothing protected came back recently). A plain update: the
        owner finds the later timer when it next looks."""
        sa = self._sa
        if sa.state is State.ESTABLISHED and now > sa.last_heard:
            sa.last_heard = now

    def delete_child(self, spi_in: bytes, now: float) -> None:
        child = self._sa.children.get(spi_in)
        if child is not None and not child.deleting:
            child.deleting = True
            self._sa.queue.append(DeleteChild(spi_in))
            self._kick(self._sa, now)

    def expire_child(self, spi_in: bytes, now: float) -> None:
        """The data plane's hard limit or exhausted sequence numbers ended the Child SA:
        as at its life_time (`_expire_child`)."""
        child = self._sa.children.get(spi_in)
        if child is not None:
            self._expire_child(self._sa, child)
            self._kick(self._sa, now)

    def rekey_child(self, spi_in: bytes, now: float) -> None:
        child = self._sa.children.get(spi_in)
        if child is not None and not (child.rekeying or child.deleting or child.replaced_by):
            child.rekeying = True
            self._sa.queue.append(RekeyChild(spi_in))
            self._kick(self._sa, now)

    def start_child(self, name: str, now: float) -> bool:
        """Bring up a Child SA of the connection's child `name` with CREATE_CHILD_SA (RFC
        7296 1.3.1), unless one is up or being asked for (a trap's packet found none
        while the IKE SA stands); whether a request was queued."""
        sa = self._sa
        if sa.state is not State.ESTABLISHED or sa.connection is None \
                or sa.connection.child(name) is None or _has_child(sa, name):
            return False
        sa.queue.append(CreateChild(name))
        self._kick(sa, now)
        return True

    def rekey_ike(self, now: float) -> None:
        if self._sa.state is State.ESTABLISHED and not self._sa.rekeying:
            self._sa.queue.append(RekeyIke())
            self._kick(self._sa, now)

    def abandon(self, reason: str) -> None:
        """Forget this IKE SA without telling the peer (RFC 7296 2.4: INITIAL_CONTACT
        from the same identities says the peer has lost it)."""
        if not self.closed:
            self._close(Trigger.FAIL, reason)

    def check_liveness(self, now: float) -> bool:
        """Send an empty INFORMATIONAL request; False when a request is already under way."""
        sa = self._sa
        if sa.state is not State.ESTABLISHED or sa.pending is not None or sa.queue:
            return False
        sa.queue.append(Liveness())
        self._kick(sa, now)
        return True

    def redirect(self, gateway: str, now: float) -> bool:
        """Ask the peer to move to `gateway` (RFC 5685 6: it sets up a new IKE SA there
        and deletes this one); False unless it announced REDIRECT_SUPPORTED."""
        sa = self._sa
        if not sa.redirect_supported or sa.state is not State.ESTABLISHED \
                or sa.original_initiator:
            return False
        sa.queue.append(Redirect(redirect_data(gateway)))
        self._kick(sa, now)
        return True

    def limit_session(self, seconds: int, now: float) -> bool:
        """The service ends `seconds` from now (a RADIUS CoA-Request's Session-Timeout,
        RFC 5176 3.1, applied as strongSwan's eap-radius does): the peer is told to
        authenticate again a tenth before (AUTH_LIFETIME in an INFORMATIONAL exchange,
        RFC 4478 3) and the SA is deleted at it unless it did; at least ten seconds are
        left for that. False unless this is an established SA we responded to."""
        sa = self._sa
        if sa.state is not State.ESTABLISHED or sa.original_initiator:
            return False
        told, deadline = session_limit(seconds)
        sa.reauth_at = now + max(deadline, 10)
        sa.queue.append(AuthLifetime(told))
        self._kick(sa, now)
        return True

    def sync_message_ids(self, now: float) -> bool:
        """RFC 6311 4: agree with the peer on the next request IDs both ways (a cluster
        node that took the SA over sends this); False unless both announced support."""
        sa = self._sa
        if not sa.mid_sync or sa.state is not State.ESTABLISHED:
            return False
        sa.queue.appendleft(SyncMessageIds(self._rng(4)))
        self._kick(sa, now)
        return True

    def _kick(self, sa: IkeSa, now: float) -> None:
        """Send the next queued request of `sa` if none is outstanding (window size 1)."""
        while sa.pending is None and sa.queue and not self.closed:
            if sa.ids_unsure and sa.mid_sync and not isinstance(sa.queue[0], SyncMessageIds):
                return  # our IDs may be ahead of the peer's: the RFC 6311 sync goes first
            task: Task = sa.queue.popleft()  # type: ignore[assignment]
            try:
                payloads = self._build(sa, task)
            except IkeError as exc:  # e.g. its Child SA went away meanwhile
                self.last_error = str(exc)
                continue
            if payloads is None:
                continue
            exchange = _EXCHANGE_OF[type(task)]
            # RFC 6311 4.1: the sync request has message ID zero, outside the window
            message_id = 0 if isinstance(task, SyncMessageIds) else None
            self._send_protected_request(sa, exchange, payloads, task, now, message_id)

    def _build(self, sa: IkeSa, task: Task) -> list[Payload] | None:
        if isinstance(task, Liveness):
            return []
        if isinstance(task, Redirect):
            return [NotifyPayload(NotifyType.REDIRECT, task.data)]
        if isinstance(task, AuthLifetime):
            return [auth_lifetime_notify(task.seconds)]
        if isinstance(task, SyncMessageIds):
            return [mid_sync_notify(task.nonce, sa.our_next_id, sa.peer_next_id)]
        if isinstance(task, DeleteIke):
            if sa.state not in (State.ESTABLISHED, State.REKEYED):
                return None
            sa.transition(Trigger.SEND_DELETE_IKE)
            return [DeletePayload(ProtocolId.IKE)]
        if isinstance(task, DeleteChild):
            if task.spi_in not in sa.children and not task.expired:
                return None
            return [DeletePayload(ProtocolId.ESP, (task.spi_in,))]
        if isinstance(task, RekeyChild):
            if task.spi_in not in sa.children:
                return None
            return build_rekey_child(sa, task, self._rng)
        if isinstance(task, RekeyIke):
            return build_rekey_ike(sa, task, self._rng)
        if isinstance(task, CreateChild):
            return build_create_child(sa, task, self._rng)
        return None

    # --- requests from the peer ---------------------------------------------------

    def _on_request(self, sa: IkeSa, decoded: Decoded, data: bytes, local: Address,
                    remote: Address, now: float) -> None:
        header = decoded.header
        if (header.message_id == 0 and sa.mid_sync and decoded.sk_offset
                and header.exchange == ExchangeType.INFORMATIONAL and sa.sk is not None
                and sa.state is State.ESTABLISHED and not decoded.is_fragment
                and self._on_mid_sync(sa, decoded, data, local, remote, now)):
            return
        if header.message_id == sa.peer_next_id - 1 and sa.last_response is not None:
            # RFC 7296 2.1: a retransmitted request gets the same response, byte for byte;
            # only a copy of that request, or 28 forged bytes would reflect the response.
            # A fragmented one is recognised by its first fragment (RFC 7383 2.6.1).
            if decoded.is_fragment and decoded.fragment_number != 1:
                return
            if _digest(data) == sa.last_request_digest:
                self.retransmits_answered += 1
                self._outbox += [Datagram(d, local, remote) for d in sa.last_response]
            else:
                self._drop("message_id")
            return
        if header.message_id != sa.peer_next_id:
            self._drop("message_id")
            return
        trigger = _REQUEST_TRIGGERS.get(header.exchange)  # type: ignore[call-overload]
        if trigger is None or (sa.state, trigger) not in TRANSITIONS:
            self._drop("unexpected_exchange")
            return
        payloads = decoded.payloads
        digest = _digest(data)
        if decoded.sk_offset:
            if sa.sk is None:
                self._drop("unexpected_exchange")
                return
            if decoded.is_fragment:
                inner = self._reassemble(sa, decoded, data, now)
                if inner is None:
                    return  # more fragments to come (or this one was dropped)
                digest = sa.fragment1_digest
            else:
                inner = sa.sk.unprotect_untrusted(data, decoded)
                if inner is None:  # RFC 7296 2.21.2: drop silently
                    self._drop("integrity")
                    return
            payloads = inner
            self._heard_from(sa, local, remote, now, payloads)
        elif header.exchange != ExchangeType.IKE_SA_INIT:
            self._drop("unprotected")
            return
        if header.exchange == ExchangeType.IKE_SA_INIT:
            sa.spi_i = header.spi_i
            sa.init_request = data
        sa.last_request_digest = digest
        self._answer(sa, header.exchange, header.message_id, payloads, local, remote, now)

    def _on_mid_sync(self, sa: IkeSa, decoded: Decoded, data: bytes, local: Address,
                     remote: Address, now: float) -> bool:
        """RFC 6311 4.2, as the peer of a cluster: a request with message ID zero holding
        only N(IKEV2_MESSAGE_ID_SYNC). False if it is something else (go on as usual)."""
        assert sa.sk is not None
        inner = sa.sk.unprotect_untrusted(data, decoded)
        if inner is None:
            self._drop("integrity")
            return True
        sync = parse_mid_sync_untrusted(inner)
        if sync is None or len(inner) != 1:
            return False
        nonce, send, recv = sync
        if send < sa.peer_next_id:  # 5.1: lower than what we have seen: drop silently
            self._drop("message_id")
            return True
        self._heard_from(sa, local, remote, now)
        sa.peer_next_id = send
        # our request in flight keeps its ID: the peer is told to expect it
        ours = sa.our_next_id - 1 if sa.pending is not None else sa.our_next_id
        sa.our_next_id = max(recv, sa.our_next_id)
        answer = Message(sa.spi_i, sa.spi_r, ExchangeType.INFORMATIONAL, 0, True,
                         sa.is_initiator, [mid_sync_notify(nonce, max(recv, ours),
                                                           sa.peer_next_id)])
        self._outbox += [Datagram(d, local, remote) for d in self._protect(sa, answer)]
        self.message_id_syncs += 1
        sa.events.append(ExchangeCompleted(ExchangeType.INFORMATIONAL, True, "ok"))
        return True

    def _heard_from(self, sa: IkeSa, local: Address, remote: Address, now: float,
                    payloads: list[Payload] | None = None) -> None:
        """An authenticated message: the peer is alive, and we may follow its address."""
        sa.last_heard = now
        if (sa.local, sa.remote) == (local, remote):
            return
        if sa.state is State.HALF_OPEN:  # the move to port 4500 after NAT detection
            sa.local, sa.remote = local, remote
            return
        if not sa.nat_remote:
            return  # RFC 7296 2.23: follow a changing address only for a peer behind a NAT
        if sa.mobike and payloads and notifies(payloads, NotifyType.UPDATE_SA_ADDRESSES):
            return  # the answer moves it, as the peer asked (RFC 4555 3.5)
        # With MOBIKE strongSwan's responder leaves address changes to the initiator; we
        # still follow a NATed peer's new mapping, which a client behind a NAT that
        # rebinds cannot always see (strongSwan 5.9.8 as the client does not)
        self._move(local, remote, "NAT mapping changed")

    def _move(self, local: Address, remote: Address, reason: str) -> None:
        """The IKE SA (and any rekeyed-away one) now lives on these addresses."""
        if (self._sa.local, self._sa.remote) == (local, remote):
            return
        for other in self._all():
            other.local, other.remote = local, remote
        self._sa.events.append(IkeSaMoved(self._sa.spi_i, self._sa.spi_r, local, remote,
                                          reason))

    def _answer(self, sa: IkeSa, exchange: int, message_id: int, payloads: list[Payload],
                local: Address, remote: Address, now: float) -> None:
        fatal: IkeError | None = None
        deleted = False
        successor: IkeSa | None = None
        mobike: MobikeAnswer | None = None
        closed: list[str] = []  # the children whose Child SAs the peer deleted
        authenticated = False
        try:
            critical = unknown_critical(payloads)
            if critical is not None:  # RFC 7296 2.5
                raise UnsupportedCriticalPayload(critical.type_id)
            if exchange == ExchangeType.IKE_SA_INIT:
                response = respond_init(sa, payloads, self._rng, self._exponentials, now)
            elif exchange == ExchangeType.IKE_AUTH:
                response, authenticated = respond_auth(sa, payloads, self._rng,
                                                       self._wall_clock)
            elif exchange == ExchangeType.INFORMATIONAL:
                seen = len(sa.events)
                response, deleted = respond_informational(sa, payloads)
                self._auth_lifetime_told(sa, payloads, now)
                closed = [e.name for e in list(sa.events)[seen:]
                          if isinstance(e, ChildSaDeleted)]
                if sa.mobike and not deleted:
                    mobike = answer_mobike(sa, payloads, local, remote)
                    response += mobike.payloads
            else:
                answer = respond_create_child(sa, payloads, self._rng)
                response, successor = answer.payloads, answer.new_ike
        except Pending as pending:  # the actor fetches, then resumes this exchange
            self._parked = (sa, exchange, message_id, payloads, local, remote, pending)
            return
        except IkeError as exc:
            self.last_error = str(exc)
            response = [_error_notify(exc)]
            if exchange in (ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH):
                fatal = exc
        spi_r = sa.spi_r
        if exchange == ExchangeType.IKE_SA_INIT and fatal is not None:
            spi_r = bytes(8)  # we keep no state for a refused IKE_SA_INIT
        msg = Message(sa.spi_i, spi_r, exchange, message_id, True, sa.is_initiator, response)
        if exchange == ExchangeType.IKE_SA_INIT:
            out = [encode_plain(msg)]
            sa.init_response = out[0]
        else:
            out = self._protect(sa, msg)
        sa.last_response = out
        sa.peer_next_id = message_id + 1
        self._outbox += [Datagram(d, local, remote) for d in out]
        result = "ok" if fatal is None else type(fatal).__name__
        sa.events.append(ExchangeCompleted(exchange, True, result))
        if fatal is not None:
            self._close(Trigger.FAIL, str(fatal), type(fatal).__name__)
        elif deleted:
            if sa is self._sa:
                self._close(Trigger.RECV_DELETE_IKE, "deleted by peer")
            else:
                self._retire(sa)
        elif exchange == ExchangeType.IKE_SA_INIT:
            sa.transition(Trigger.RECV_INIT_REQUEST)
        elif exchange == ExchangeType.IKE_AUTH and authenticated:
            sa.transition(Trigger.RECV_AUTH_REQUEST)
            self._established(sa, now)
        elif mobike is not None and mobike.update:
            if mobike.nat is not None:  # the NAT state seen from the new addresses
                nat_remote, behind_nat = mobike.nat
                for other in self._all():
                    other.nat_remote = other.nat_remote or nat_remote
                    other.behind_nat = behind_nat
                    other.nat_local = other.nat_local or behind_nat
            self._move(local, remote, MOBIKE_UPDATE)
        elif successor is not None:
            self._take_over(sa, successor, now)
        elif closed:
            self._after_close(sa, closed, now)
        elif exchange == ExchangeType.CREATE_CHILD_SA:
            self._schedule_children(sa, now)
            # a Child SA the peer rekeyed needs no rekey of ours any more
            sa.queue = type(sa.queue)(
                t for t in sa.queue
                if not (isinstance(t, RekeyChild) and t.spi_in in sa.children
                        and sa.children[t.spi_in].replaced_by)
            )

    def _after_close(self, sa: IkeSa, names: list[str], now: float) -> None:
        """swanctl's close_action = "start": a child whose Child SA the peer deleted (and
        not for a rekey: none of its name is left) comes back with CREATE_CHILD_SA."""
        assert sa.connection is not None
        for name in dict.fromkeys(names):
            config = sa.connection.child(name)
            if config is not None and config.close_action == "start" \
                    and not _has_child(sa, name):
                sa.queue.append(CreateChild(name))
        self._kick(sa, now)

    def _protect(self, sa: IkeSa, msg: Message) -> list[bytes]:
        assert sa.sk is not None
        if not sa.fragmentation or (sa.connection is not None
                                    and sa.connection.fragmentation == "accept"):
            return [sa.sk.protect(msg)]
        limit = ike_message_limit(FRAGMENT_SIZE, ipv6=":" in sa.remote[0],
                                  non_esp_marker=sa.local[1] == self._natt_ports[0])
        return sa.sk.protect_fragments(msg, limit)  # RFC 7383 2.5: only when too large

    def _reassemble(self, sa: IkeSa, decoded: Decoded, data: bytes,
                    now: float) -> list[Payload] | None:
        """One fragment in; the whole message's payloads once complete (RFC 7383 2.6)."""
        assert sa.sk is not None
        if not sa.fragmentation:
            self._drop("unexpected_fragment")
            return None
        response = decoded.header.is_response
        reassembler = sa.reassembly.get(response)
        if reassembler is None:
            reassembler = sa.reassembly[response] = Reassembler()
        elif reassembler.expired(now, REASSEMBLY_TIMEOUT):
            reassembler.reset()
        if decoded.fragment_number == 1 and not response:
            sa.fragment1_digest = _digest(data)
        payloads = reassembler.add_untrusted(sa.sk, data, decoded, now)
        if payloads is not None:
            reassembler.reset()
        return payloads

    # --- responses to our requests -------------------------------------------------

    def _on_response(self, sa: IkeSa, decoded: Decoded, data: bytes, local: Address,
                     remote: Address, now: float) -> None:
        header, pending = decoded.header, sa.pending
        if pending is None or header.message_id != pending.message_id \
                or header.exchange != pending.exchange:
            self._drop("unexpected_response")
            return
        payloads = decoded.payloads
        if decoded.sk_offset:
            if sa.sk is None:
                self._drop("unexpected_response")
                return
            if decoded.is_fragment:
                inner = self._reassemble(sa, decoded, data, now)
                if inner is None:
                    return
            else:
                inner = sa.sk.unprotect_untrusted(data, decoded)
                if inner is None:
                    self._drop("integrity")
                    return
            payloads = inner
            self._heard_from(sa, local, remote, now, payloads)
        elif header.exchange != ExchangeType.IKE_SA_INIT:
            self._drop("unprotected")
            return
        sa.pending = None
        task = pending.task
        if not isinstance(task, SyncMessageIds):  # (ID 0: proves nothing; its answer does)
            sa.ids_unsure = False  # the peer took our message ID: we are in step
        try:
            self._process_response(sa, task, header.spi_r, payloads, data, now)  # type: ignore[arg-type]
        except IkeError as exc:
            self.last_error = str(exc)
            sa.events.append(ExchangeCompleted(header.exchange, False, type(exc).__name__))
            self._refused(sa, task, exc, now)  # type: ignore[arg-type]
        if not self.closed:
            self._kick(self._sa, now)
            for old, _ in self._retiring:
                self._kick(old, now)

    def _process_response(self, sa: IkeSa, task: Task, spi_r: bytes, payloads: list[Payload],
                          data: bytes, now: float) -> None:
        if isinstance(task, _Init):
            retry = process_init_response(sa, spi_r, payloads)
            if retry is not None:  # RFC 7296 1.2 / 2.6: again, with message ID 0
                sa.transition(Trigger.RECV_INIT_RETRY)
                self._send_init(retry.group, retry.cookie, now)
                return
            sa.init_response = data
            sa.transition(Trigger.RECV_INIT_RESPONSE)
            if sa.nat:  # RFC 7296 2.23: move to port 4500
                sa.local = (sa.local[0], self._natt_ports[0])
                sa.remote = (sa.remote[0], self._natt_ports[1])
            sa.our_next_id = 1
            self._send_protected_request(sa, ExchangeType.IKE_AUTH,
                                         build_auth_request(sa, self._rng), _Auth(), now)
        elif isinstance(task, _Auth):
            process_auth_response(sa, payloads, self._wall_clock)
            sa.transition(Trigger.RECV_AUTH_RESPONSE)
            self._established(sa, now)
            self._auth_lifetime_told(sa, payloads, now)
            assert sa.connection is not None
            if sa.connection.vips and not sa.own_vips:
                self.last_error = "the responder assigned no virtual IP"
                self.delete_ike(now)  # what we asked for is missing, as strongSwan does
            else:
                # IKE_AUTH brought the first child (unless childless, RFC 6023); the
                # connection's other children to start come one CREATE_CHILD_SA each
                # (RFC 7296 1.3.1), as in strongSwan
                first, *others = sa.connection.children
                if sa.connection.childless == "force":
                    sa.queue.append(CreateChild(first.name))
                sa.queue.extend(CreateChild(c.name) for c in others
                                if c.start_action == "start")
        elif isinstance(task, DeleteIke):
            sa.events.append(ExchangeCompleted(ExchangeType.INFORMATIONAL, False, "ok"))
            if sa is self._sa:
                self._close(Trigger.RECV_DELETE_RESPONSE, task.reason)
            else:
                self._retire(sa)
            return
        elif isinstance(task, DeleteChild):
            child = sa.children.pop(task.spi_in, None)
            if child is not None:
                sa.events.append(ChildSaDeleted(sa.spi_i, sa.spi_r, child.name, child.spi_in,
                                                child.spi_out, "deleted by us"))
        elif isinstance(task, RekeyChild):
            self._child_rekeyed(sa, task, payloads, now)
        elif isinstance(task, CreateChild):
            process_create_child(sa, task, payloads)
            self._schedule_children(sa, now)
        elif isinstance(task, SyncMessageIds):
            self._message_ids_synced(sa, task, payloads)
        elif isinstance(task, RekeyIke):
            successor = process_rekey_ike(sa, task, payloads)
            self._take_over(sa, successor, now)
            sa.queue.append(DeleteIke())  # the rekey's initiator deletes the old SA
        sa.events.append(ExchangeCompleted(_exchange_of(task), False, "ok"))

    def _message_ids_synced(self, sa: IkeSa, task: SyncMessageIds,
                            payloads: list[Payload]) -> None:
        """RFC 6311 4.2: the peer's answer; each side continues from the higher values."""
        answer = parse_mid_sync_untrusted(payloads)
        if answer is None or answer[0] != task.nonce:
            raise InvalidSyntax("IKEV2_MESSAGE_ID_SYNC response without our nonce")
        _, peer_send, peer_recv = answer
        sa.our_next_id = max(sa.our_next_id, peer_recv)
        sa.ids_unsure = False
        if peer_send > sa.peer_next_id:
            sa.peer_next_id = peer_send
            sa.last_response = None  # it answered an ID the peer has moved beyond
        self.message_id_syncs += 1

    def _child_rekeyed(self, sa: IkeSa, task: RekeyChild, payloads: list[Payload],
                       now: float) -> None:
        new = process_rekey_child(sa, task, payloads)
        self._schedule_children(sa, now)
        old = sa.children.get(task.spi_in)
        if old is None:  # it reached its hard lifetime during the rekey
            return
        old.rekeying = False
        # both ends rekeyed it (RFC 7296 2.8.1): the exchange with the lowest nonce made
        # the redundant SA, and its initiator deletes it; the other end deletes the old one
        if old.replaced_by in sa.children and old.rekey_nonce < old.replaced_nonce:
            sa.queue.append(DeleteChild(new.spi_in))
            new.deleting = True
            return
        old.deleting = True
        sa.queue.append(DeleteChild(old.spi_in))  # RFC 7296 1.3.3: we delete the old SA

    def _refused(self, sa: IkeSa, task: Task, exc: IkeError, now: float) -> None:
        """The peer refused one of our requests, or its answer did not hold."""
        if isinstance(task, (_Init, _Auth)):
            self._close(Trigger.FAIL, str(exc), type(exc).__name__)
            return
        retry_at = now + RETRY_AFTER * (1 + fraction(self._rng))
        if isinstance(task, RekeyChild):
            child = sa.children.get(task.spi_in)
            if child is None:
                if task.name and not _has_child(sa, task.name):
                    # it expired during this rekey, which brings no successor now
                    sa.queue.append(CreateChild(task.name))
                return
            child.rekeying = False
            if isinstance(exc, ChildSaNotFound):
                # RFC 7296 2.25: delete ours silently and create it again from scratch,
                # unless we are deleting it anyway or it exists still
                del sa.children[task.spi_in]
                sa.events.append(ChildSaDeleted(sa.spi_i, sa.spi_r, child.name, child.spi_in,
                                                child.spi_out, "unknown to the peer"))
                if not child.deleting and not _has_selectors(sa, child):
                    sa.queue.append(CreateChild(child.name, tsi=child.local_ts,
                                                tsr=child.remote_ts))
            elif isinstance(exc, InvalidKePayload):
                child.rekeying = True
                sa.queue.append(RekeyChild(task.spi_in, group=exc.group))
            else:
                child.rekey_at = retry_at  # TEMPORARY_FAILURE and the like: later
        elif isinstance(task, CreateChild):
            if isinstance(exc, InvalidKePayload):  # RFC 7296 1.3: again with that group
                sa.queue.append(CreateChild(task.name, group=exc.group))
            else:
                sa.events.append(ChildSaFailed(sa.spi_i, sa.spi_r, task.name, str(exc)))
        elif isinstance(task, RekeyIke):
            sa.rekeying = False
            if isinstance(exc, InvalidKePayload):
                sa.rekeying = True
                sa.queue.append(RekeyIke(group=exc.group))
            elif isinstance(exc, TemporaryFailure) or sa.rekey_at == INFINITY:
                sa.rekey_at = retry_at

    # --- life of the SA ----------------------------------------------------------------

    def _established(self, sa: IkeSa, now: float) -> None:
        sa.last_heard = now
        sa.keepalive_at = _next_keepalive(sa, now)
        assert sa.connection is not None
        sa.rekey_at, sa.expire_at = deadlines(sa.connection.lifetime, now, self._rng)
        _, deadline = auth_lifetime(sa)  # RFC 4478
        if deadline > 0 and sa.reauth_at == INFINITY:  # (a rekeyed SA keeps its deadline)
            sa.reauth_at = now + deadline
        if not sa.authenticated_at:  # (a rekeyed SA keeps these)
            sa.authenticated_at = self._wall_clock().timestamp()
            reauth = sa.connection.reauth_time
            if sa.original_initiator and reauth > 0:
                # swanctl's reauth_time less up to its default rand_time, a tenth; the
                # SA itself is deleted at reauth_at, a tenth after reauth_time (over_time)
                sa.reauth_due = now + reauth * (1 - 0.1 * fraction(self._rng))
        self._schedule_children(sa, now)

    def _auth_lifetime_told(self, sa: IkeSa, payloads: list[Payload], now: float) -> None:
        """RFC 4478 3: the responder wants us, its initiator, to authenticate again within
        the seconds its AUTH_LIFETIME says; we start at nine tenths of them."""
        if not sa.original_initiator:
            return
        for told in notifies(payloads, NotifyType.AUTH_LIFETIME):
            if len(told.data) == 4:
                seconds = int.from_bytes(told.data, "big")
                sa.reauth_due = min(sa.reauth_due, now + 0.9 * seconds)

    def _schedule_children(self, sa: IkeSa, now: float) -> None:
        assert sa.connection is not None
        for child in sa.children.values():
            if child.scheduled:
                continue
            child.scheduled = True
            config = sa.connection.child(child.name)
            if config is not None:
                child.rekey_at, child.expire_at = deadlines(config.lifetime, now, self._rng)

    def _take_over(self, old: IkeSa, new: IkeSa, now: float) -> None:
        """A rekey made `new` the current IKE SA; `old` waits for its Delete."""
        old.transition(Trigger.REKEYED)
        old.rekeying = False
        new.queue.extend(t for t in old.queue if not isinstance(t, DeleteIke))
        old.queue.clear()
        self._sa = new
        self._retiring.append((old, now + RETIRE_AFTER))
        self._established(new, now)

    def _retire(self, sa: IkeSa) -> None:
        self._retiring = [(s, t) for s, t in self._retiring if s is not sa]
        sa.state = State.CLOSED
        sa.pending = None
        self._sa.events.append(IkeSaRetired(sa.spi_i, sa.spi_r))

    def _retransmit(self, sa: IkeSa, now: float) -> None:
        pending = sa.pending
        if pending is None or now < pending.deadline or self.closed:
            return
        timing = sa.policy.retransmission
        if pending.tries >= timing.tries:  # RFC 7296 2.4: give up, the peer is dead
            sa.pending = None
            if sa is self._sa:
                self._close(Trigger.TIMEOUT, PEER_NOT_RESPONDING)
            else:
                self._retire(sa)
            return
        pending.tries += 1
        self.retransmits_sent += 1
        pending.deadline = now + timing.delay(pending.tries)
        self._outbox += [Datagram(d, sa.local, sa.remote) for d in pending.data]

    # --- plumbing --------------------------------------------------------------------

    def _send_init(self, group: int, cookie: bytes, now: float) -> None:
        sa = self._sa
        payloads = build_init_request(sa, group, self._rng, cookie)
        msg = Message(sa.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, 0, False, True, payloads)
        data = encode_plain(msg)
        sa.init_request = data
        sa.pending = Outstanding(ExchangeType.IKE_SA_INIT, 0, [data],
                                 now + sa.policy.retransmission.delay(0), _Init())
        self._outbox.append(Datagram(data, sa.local, sa.remote))

    def _send_protected_request(self, sa: IkeSa, exchange: int, payloads: list[Payload],
                                task: Task, now: float, message_id: int | None = None) -> None:
        if message_id is None:
            message_id = sa.our_next_id
            sa.our_next_id += 1
        msg = Message(sa.spi_i, sa.spi_r, exchange, message_id, False, sa.is_initiator,
                      payloads)
        data = self._protect(sa, msg)
        sa.pending = Outstanding(exchange, message_id, data,
                                 now + sa.policy.retransmission.delay(0), task)
        self._outbox += [Datagram(d, sa.local, sa.remote) for d in data]

    def _close(self, trigger: Trigger, reason: str, error: str = "") -> None:
        sa = self._sa
        was_established = sa.state in (State.ESTABLISHED, State.DELETING)
        delete_all_children(sa, reason)
        release_leases(sa)
        sa.transition(trigger)
        sa.pending = None
        sa.queue.clear()
        for old, _ in list(self._retiring):
            self._retire(old)
        if was_established:
            sa.events.append(IkeSaDeleted(sa.spi_i, sa.spi_r, reason))
        else:
            sa.events.append(IkeSaFailed(sa.spi_i, sa.spi_r, reason, error))

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


def _tasks(sa: IkeSa) -> list[object]:
    """Our requests on `sa`: those queued and the one sent and not yet answered."""
    return [*sa.queue, *([sa.pending.task] if sa.pending is not None else [])]


def _has_child(sa: IkeSa, name: str) -> bool:
    """A Child SA of `name` is up (and not going) or requested."""
    if any(c.name == name and not c.deleting for c in sa.children.values()):
        return True
    return any(isinstance(t, CreateChild) and t.name == name for t in _tasks(sa))


def _has_selectors(sa: IkeSa, child: ChildSa) -> bool:
    """Another Child SA of that child with the same selectors is up or requested."""
    selectors = (child.local_ts, child.remote_ts)
    if any(c.name == child.name and (c.local_ts, c.remote_ts) == selectors and not c.deleting
           for c in sa.children.values()):
        return True
    return any(isinstance(t, CreateChild) and t.name == child.name
               and (t.tsi, t.tsr) in (selectors, ((), ())) for t in _tasks(sa))


def _delete_under_way(sa: IkeSa, spi_in: bytes) -> bool:
    """A Delete of that Child SA is queued or sent and not yet answered."""
    return any(isinstance(t, DeleteChild) and t.spi_in == spi_in for t in _tasks(sa))


def _next_keepalive(sa: IkeSa, now: float) -> float:
    """When the next NAT keepalive is due (never with [ike] keep_alive = 0)."""
    interval = sa.policy.keep_alive
    return now + interval if interval > 0 else INFINITY


def _exchange_of(task: Task) -> int:
    if isinstance(task, _Init):
        return ExchangeType.IKE_SA_INIT
    if isinstance(task, _Auth):
        return ExchangeType.IKE_AUTH
    return _EXCHANGE_OF[type(task)]


def _error_notify(exc: IkeError) -> NotifyPayload:
    notify = exc.notify or int(NotifyType.INVALID_SYNTAX)
    data = b""
    if isinstance(exc, UnsupportedCriticalPayload):
        data = bytes([exc.payload_type & 0xFF])
    elif notify == NotifyType.INVALID_KE_PAYLOAD:
        data = int(getattr(exc, "group", 0)).to_bytes(2, "big")
    elif isinstance(exc, Redirected):
        data = exc.data
    return NotifyPayload(notify, data)


__all__ = ["Address", "Datagram", "DeleteChild", "DeleteIke", "IkeSession", "Liveness",
           "delete_children_by_outbound"]
