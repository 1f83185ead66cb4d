"""One IKE SA as a sans-IO object, in aioquic's shape.

The runtime feeds datagrams and the time in; the session hands back datagrams to send,
a timer, and events. It never touches a socket or a clock; randomness and the wall
clock (for certificate validity) are injected.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import (
    IkeError,
    NoAdditionalSas,
    ParseError,
    UnsupportedCriticalPayload,
)
from .constants import NATT_PORT, ExchangeType, NotifyType, ProtocolId
from .events import Address, Event, ExchangeCompleted, IkeSaDeleted, IkeSaFailed
from .ike_auth import build_auth_request, process_auth_response, respond_auth
from .ike_init import build_init_request, process_init_response, respond_init
from .informational import delete_all_children, respond_informational
from .message import Decoded, Message, decode_untrusted, encode_plain, unknown_critical
from .payloads import DeletePayload, NotifyPayload, Payload
from .policy import ConnectionConfig, ResponderPolicy
from .sa import IkeSa
from .state import TRANSITIONS, State, Trigger

logger = logging.getLogger(__name__)

Random = Callable[[int], bytes]
WallClock = Callable[[], datetime]

RETRANSMIT_TIMEOUT = 1.0  # strongSwan's retransmit_timeout is 4 s; tests want short
RETRANSMIT_BASE = 1.8
RETRANSMIT_TRIES = 5


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Datagram:
    data: bytes  # the IKE message, without the non-ESP marker
    local: Address
    remote: Address


@dataclass(slots=True)
class _Outstanding:
    """Our request awaiting its response (RFC 7296 2.1: window size one)."""

    exchange: int
    message_id: int
    data: bytes
    deadline: float
    tries: int = 0
    deletes_ike: bool = False


_REQUEST_TRIGGERS = {
    ExchangeType.IKE_SA_INIT: Trigger.RECV_INIT_REQUEST,
    ExchangeType.IKE_AUTH: Trigger.RECV_AUTH_REQUEST,
    ExchangeType.INFORMATIONAL: Trigger.RECV_INFORMATIONAL,
    ExchangeType.CREATE_CHILD_SA: Trigger.RECV_INFORMATIONAL,  # allowed when established
}


class IkeSession:
    def __init__(self, sa: IkeSa, *, rng: Random = os.urandom,
                 wall_clock: WallClock = _utc_now,
                 natt_ports: tuple[int, int] = (NATT_PORT, NATT_PORT)) -> None:
        self._sa = sa
        self._rng = rng
        self._wall_clock = wall_clock
        self._natt_ports = natt_ports
        self._outbox: list[Datagram] = []
        self._peer_next_id = 0  # the next request id we expect from the peer
        self._last_response: bytes | None = None
        self._last_request_digest = b""
        self._our_next_id = 0
        self._pending: _Outstanding | None = None
        self.drops: dict[str, int] = {}
        self.retransmits_answered = 0
        self.last_error = ""

    # --- construction --------------------------------------------------------------

    @classmethod
    def responder(cls, policy: ResponderPolicy, spi_r: bytes, local: Address,
                  remote: Address, **kwargs: object) -> IkeSession:
        sa = IkeSa(policy, False, bytes(8), spi_r, local, remote)
        return cls(sa, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def initiator(cls, connection: ConnectionConfig, policy: ResponderPolicy, spi_i: bytes,
                  local: Address, remote: Address, now: float, **kwargs: object) -> IkeSession:
        sa = IkeSa(policy, True, spi_i, bytes(8), local, remote, connection=connection)
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
    def closed(self) -> bool:
        return self._sa.state is State.CLOSED

    @property
    def sa(self) -> IkeSa:
        return self._sa

    def datagrams_to_send(self) -> list[Datagram]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        return self._sa.events.popleft() if self._sa.events else None

    def get_timer(self) -> float | None:
        return self._pending.deadline if self._pending else None

    def handle_timer(self, now: float) -> None:
        pending = self._pending
        if pending is None or now < pending.deadline or self.closed:
            return
        if pending.tries >= RETRANSMIT_TRIES:  # RFC 7296 2.4: give up, the SA is dead
            self._pending = None
            self._close(Trigger.TIMEOUT, "peer not responding")
            return
        pending.tries += 1
        pending.deadline = now + RETRANSMIT_TIMEOUT * RETRANSMIT_BASE**pending.tries
        self._outbox.append(Datagram(pending.data, self._sa.local, self._sa.remote))

    def receive_datagram_untrusted(self, data: bytes, local: Address, remote: Address,
                                   now: float) -> None:
        """Take one IKE message (non-ESP marker removed); bad input is counted, never raised."""
        if self.closed:
            return
        try:
            decoded = decode_untrusted(data)
            header = decoded.header
            if header.spi_i != self._sa.spi_i and not (
                self._sa.spi_i == bytes(8) and header.exchange == ExchangeType.IKE_SA_INIT
            ):
                self._drop("spi_mismatch")
            elif header.is_response:
                self._on_response(decoded, data, local, remote, now)
            else:
                self._on_request(decoded, data, local, remote)
        except ParseError as exc:
            self.last_error = str(exc)
            self._drop("malformed")

    # --- our own requests ----------------------------------------------------------

    def delete_ike(self, now: float) -> None:
        """Send a Delete for this IKE SA (RFC 7296 1.4.1)."""
        if self._sa.state is not State.ESTABLISHED or self._pending is not None:
            return
        self._sa.transition(Trigger.SEND_DELETE_IKE)
        self._send_protected_request(ExchangeType.INFORMATIONAL,
                                     [DeletePayload(ProtocolId.IKE)], now, deletes_ike=True)

    def check_liveness(self, now: float) -> bool:
        """Send an empty INFORMATIONAL request; False when one is already outstanding."""
        if self._sa.state is not State.ESTABLISHED or self._pending is not None:
            return False
        self._send_protected_request(ExchangeType.INFORMATIONAL, [], now)
        return True

    # --- requests from the peer ---------------------------------------------------

    def _on_request(self, decoded: Decoded, data: bytes, local: Address,
                    remote: Address) -> None:
        sa, header = self._sa, decoded.header
        if header.exchange != ExchangeType.IKE_SA_INIT and header.spi_r != sa.spi_r:
            self._drop("spi_mismatch")
            return
        if header.message_id == self._peer_next_id - 1 and self._last_response is not None:
            # RFC 7296 2.1: a retransmitted request gets the same response, byte for byte;
            # only a copy of that request, or 28 forged bytes would reflect the response
            if _digest(data) == self._last_request_digest:
                self.retransmits_answered += 1
                self._outbox.append(Datagram(self._last_response, local, remote))
            else:
                self._drop("message_id")
            return
        if header.message_id != self._peer_next_id:
            self._drop("message_id")
            return
        trigger = _REQUEST_TRIGGERS.get(header.exchange)  # type: ignore[call-overload]
        if trigger is None or (sa.state, trigger) not in TRANSITIONS:
            self._drop("unexpected_exchange")
            return
        payloads = decoded.payloads
        if decoded.sk_offset:
            if sa.sk is None:
                self._drop("unexpected_exchange")
                return
            inner = sa.sk.unprotect_untrusted(data, decoded)
            if inner is None:  # RFC 7296 2.21.2: drop silently
                self._drop("integrity")
                return
            payloads = inner
            sa.local, sa.remote = local, remote  # follow the peer (RFC 7296 2.23)
        elif header.exchange != ExchangeType.IKE_SA_INIT:
            self._drop("unprotected")
            return
        if header.exchange == ExchangeType.IKE_SA_INIT:
            sa.spi_i = header.spi_i
            sa.init_request = data
        self._last_request_digest = _digest(data)
        self._answer(header.exchange, header.message_id, payloads, local, remote)

    def _answer(self, exchange: int, message_id: int, payloads: list[Payload], local: Address,
                remote: Address) -> None:
        sa = self._sa
        fatal: IkeError | None = None
        deleted = False
        try:
            critical = unknown_critical(payloads)
            if critical is not None:  # RFC 7296 2.5
                raise UnsupportedCriticalPayload(critical.type_id)
            if exchange == ExchangeType.IKE_SA_INIT:
                response = respond_init(sa, payloads, self._rng)
            elif exchange == ExchangeType.IKE_AUTH:
                response = respond_auth(sa, payloads, self._rng, self._wall_clock)
            elif exchange == ExchangeType.INFORMATIONAL:
                response, deleted = respond_informational(sa, payloads)
            else:
                raise NoAdditionalSas("CREATE_CHILD_SA is not supported yet")
        except IkeError as exc:
            self.last_error = str(exc)
            notify = exc.notify or int(NotifyType.INVALID_SYNTAX)
            data = b""
            if isinstance(exc, UnsupportedCriticalPayload):
                data = bytes([exc.payload_type & 0xFF])
            elif notify == NotifyType.INVALID_KE_PAYLOAD:
                data = int(getattr(exc, "group", 0)).to_bytes(2, "big")
            response = [NotifyPayload(notify, data)]
            if exchange in (ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH):
                fatal = exc
        spi_r = sa.spi_r
        if exchange == ExchangeType.IKE_SA_INIT and fatal is not None:
            spi_r = bytes(8)  # we keep no state for a refused IKE_SA_INIT
        msg = Message(sa.spi_i, spi_r, exchange, message_id, True, sa.is_initiator, response)
        if exchange == ExchangeType.IKE_SA_INIT:
            out = encode_plain(msg)
            sa.init_response = out
        else:
            assert sa.sk is not None
            out = sa.sk.protect(msg)
        self._last_response = out
        self._peer_next_id = message_id + 1
        self._outbox.append(Datagram(out, local, remote))
        result = "ok" if fatal is None else type(fatal).__name__
        sa.events.append(ExchangeCompleted(exchange, True, result))
        if fatal is not None:
            self._close(Trigger.FAIL, str(fatal))
        elif deleted:
            self._close(Trigger.RECV_DELETE_IKE, "deleted by peer")
        elif exchange in (ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH):
            sa.transition(_REQUEST_TRIGGERS[ExchangeType(exchange)])

    # --- responses to our requests -------------------------------------------------

    def _on_response(self, decoded: Decoded, data: bytes, local: Address, remote: Address,
                     now: float) -> None:
        sa, header, pending = self._sa, decoded.header, self._pending
        if pending is None or header.message_id != pending.message_id \
                or header.exchange != pending.exchange:
            self._drop("unexpected_response")
            return
        payloads = decoded.payloads
        if decoded.sk_offset:
            if sa.sk is None:
                self._drop("unexpected_response")
                return
            inner = sa.sk.unprotect_untrusted(data, decoded)
            if inner is None:
                self._drop("integrity")
                return
            payloads = inner
        elif header.exchange != ExchangeType.IKE_SA_INIT:
            self._drop("unprotected")
            return
        self._pending = None
        try:
            self._process_response(header.exchange, header.spi_r, payloads, data, pending, now)
        except IkeError as exc:
            self.last_error = str(exc)
            sa.events.append(ExchangeCompleted(header.exchange, False, type(exc).__name__))
            self._close(Trigger.FAIL, str(exc))

    def _process_response(self, exchange: int, spi_r: bytes, payloads: list[Payload],
                          data: bytes, pending: _Outstanding, now: float) -> None:
        sa = self._sa
        if exchange == ExchangeType.IKE_SA_INIT:
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
            self._our_next_id = 1
            self._send_protected_request(ExchangeType.IKE_AUTH,
                                         build_auth_request(sa, self._rng), now)
        elif exchange == ExchangeType.IKE_AUTH:
            process_auth_response(sa, payloads, self._wall_clock)
            sa.transition(Trigger.RECV_AUTH_RESPONSE)
        elif exchange == ExchangeType.INFORMATIONAL and pending.deletes_ike:
            sa.events.append(ExchangeCompleted(exchange, False, "ok"))
            self._close(Trigger.RECV_DELETE_RESPONSE, "deleted by us")
            return
        sa.events.append(ExchangeCompleted(exchange, False, "ok"))

    # --- plumbing --------------------------------------------------------------------

    def _send_init(self, group: int, cookie: bytes, now: float) -> None:
        sa = self._sa
        payloads = build_init_request(sa, group, self._rng, cookie)
        msg = Message(sa.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, 0, False, True, payloads)
        data = encode_plain(msg)
        sa.init_request = data
        self._pending = _Outstanding(ExchangeType.IKE_SA_INIT, 0, data,
                                     now + RETRANSMIT_TIMEOUT)
        self._outbox.append(Datagram(data, sa.local, sa.remote))

    def _send_protected_request(self, exchange: int, payloads: list[Payload], now: float,
                                deletes_ike: bool = False) -> None:
        sa = self._sa
        assert sa.sk is not None
        message_id = self._our_next_id
        self._our_next_id += 1
        msg = Message(sa.spi_i, sa.spi_r, exchange, message_id, False, sa.is_initiator,
                      payloads)
        data = sa.sk.protect(msg)
        self._pending = _Outstanding(exchange, message_id, data, now + RETRANSMIT_TIMEOUT,
                                     deletes_ike=deletes_ike)
        self._outbox.append(Datagram(data, sa.local, sa.remote))

    def _close(self, trigger: Trigger, reason: str) -> None:
        sa = self._sa
        was_established = sa.state in (State.ESTABLISHED, State.DELETING)
        delete_all_children(sa, reason)
        sa.transition(trigger)
        if was_established:
            sa.events.append(IkeSaDeleted(sa.spi_i, sa.spi_r, reason))
        else:
            sa.events.append(IkeSaFailed(sa.spi_i, sa.spi_r, reason))

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


__all__ = ["Address", "Datagram", "IkeSession"]
