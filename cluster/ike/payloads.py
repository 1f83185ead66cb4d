"""IKEv2 payload codecs (RFC 7296 section 3), one pull/push pair per payload type.

The SK payload is framed here but protected in `message.py`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..errors import ParseError
from ..wire import Buffer
from .constants import PayloadType, TransformType, TsType
from .proposals import Proposal, Transform
from .traffic_selectors import TrafficSelector

_GENERIC = struct.Struct("!BBH")  # next payload, critical bit, length
_KE_HEAD = struct.Struct("!Hxx")
_TRANSFORM_HEAD = struct.Struct("!BxHBxH")  # last, length, type, id (RFC 7296 3.3.2)
_KEY_LENGTH = struct.Struct("!HH")  # a TV attribute: AF bit | type 14, value
# last, length, number, protocol, SPI size, transform count (RFC 7296 3.3.1)
_PROPOSAL_HEAD = struct.Struct("!BxHBBBB")
_TS_COUNT = struct.Struct("!B3x")
_SELECTOR_HEAD = struct.Struct("!BBHHH")
_TYPED_HEAD = struct.Struct("!Bxxx")
_NOTIFY_HEAD = struct.Struct("!BBH")
_DELETE_HEAD = struct.Struct("!BBH")
MAX_PROPOSALS = 64
MAX_TRANSFORMS = 64


class Payload:
    payload_type: ClassVar[int]


@dataclass(slots=True)
class SaPayload(Payload):
    payload_type = PayloadType.SA
    proposals: tuple[Proposal, ...]


@dataclass(slots=True)
class KePayload(Payload):
    payload_type = PayloadType.KE
    group: int
    data: bytes


@dataclass(slots=True)
class NoncePayload(Payload):
    payload_type = PayloadType.NONCE
    data: bytes


@dataclass(slots=True)
class IdiPayload(Payload):
    payload_type = PayloadType.IDI
    id_type: int
    data: bytes

    def body(self) -> bytes:
        """RestOfIDPayload, the input of the AUTH computation (RFC 7296 2.15)."""
        return bytes([self.id_type, 0, 0, 0]) + self.data


@dataclass(slots=True)
class IdrPayload(Payload):
    payload_type = PayloadType.IDR
    id_type: int
    data: bytes

    def body(self) -> bytes:
        return bytes([self.id_type, 0, 0, 0]) + self.data


@dataclass(slots=True)
class CertPayload(Payload):
    payload_type = PayloadType.CERT
    encoding: int
    data: bytes


@dataclass(slots=True)
class CertreqPayload(Payload):
    payload_type = PayloadType.CERTREQ
    encoding: int
    data: bytes


@dataclass(slots=True)
class AuthPayload(Payload):
    payload_type = PayloadType.AUTH
    method: int
    data: bytes


@dataclass(slots=True)
class NotifyPayload(Payload):
    payload_type = PayloadType.NOTIFY
    notify_type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""


@dataclass(slots=True)
class DeletePayload(Payload):
    payload_type = PayloadType.DELETE
    protocol: int
    spis: tuple[bytes, ...] = ()


@dataclass(slots=True)
class VendorPayload(Payload):
    payload_type = PayloadType.VENDOR
    data: bytes


@dataclass(slots=True)
class TsiPayload(Payload):
    payload_type = PayloadType.TSI
    selectors: tuple[TrafficSelector, ...]


@dataclass(slots=True)
class TsrPayload(Payload):
    payload_type = PayloadType.TSR
    selectors: tuple[TrafficSelector, ...]


@dataclass(slots=True)
class CpPayload(Payload):
    """Configuration payload: kept raw; we do not assign addresses yet."""

    payload_type = PayloadType.CP
    cfg_type: int
    attributes: bytes


@dataclass(slots=True)
class EapPayload(Payload):
    """An EAP packet (RFC 7296 3.16), kept whole."""

    payload_type = PayloadType.EAP
    data: bytes


@dataclass(slots=True)
class UnknownPayload(Payload):
    payload_type = 0
    type_id: int
    critical: bool
    data: bytes


# --- SA ---------------------------------------------------------------------------


def _pull_transform(buf: Buffer) -> tuple[bool, Transform]:
    (last, length, t_type, t_id), attrs = buf.pull_payload(_TRANSFORM_HEAD, 1)
    key_bits: int | None = None
    if length > 8:
        while not attrs.eof():
            attr_type = attrs.pull_uint16()
            if attr_type & 0x8000:  # TV format
                value = attrs.pull_uint16()
                if attr_type & 0x7FFF == 14:
                    key_bits = value
            else:  # TLV: no such attribute is defined for IKEv2; skip it
                attrs.pull_bytes(attrs.pull_uint16())
    if last not in (0, 3):
        raise ParseError("bad transform last-substructure value")
    return last == 0, Transform(t_type, t_id, key_bits)


def _transform_bytes(t: Transform, last: bool) -> bytes:
    if t.key_bits is None:
        return _TRANSFORM_HEAD.pack(0 if last else 3, 8, t.type, t.id)
    # TV attribute: AF bit | Key Length (14)
    head = _TRANSFORM_HEAD.pack(0 if last else 3, 12, t.type, t.id)
    return head + _KEY_LENGTH.pack(0x800E, t.key_bits)


def _pull_sa(buf: Buffer) -> SaPayload:
    proposals: list[Proposal] = []
    while True:
        (last, _, number, protocol, spi_size, count), body = buf.pull_payload(_PROPOSAL_HEAD, 1)
        spi = body.pull_bytes(spi_size)
        transforms: list[Transform] = []
        for i in range(count):
            is_last, t = _pull_transform(body)
            transforms.append(t)
            if is_last != (i == count - 1):
                raise ParseError("transform count does not match last-substructure")
        if not body.eof():
            raise ParseError("data after the last transform")
        proposals.append(Proposal(number, protocol, spi, tuple(transforms)))
        if len(proposals) > MAX_PROPOSALS:
            raise ParseError("too many proposals")
        if last == 0:
            break
        if last != 2:
            raise ParseError("bad proposal last-substructure value")
    if not buf.eof():
        raise ParseError("data after the last proposal")
    return SaPayload(tuple(proposals))


def _encode_sa(p: SaPayload) -> bytes:
    out = []
    count = len(p.proposals)
    for i, prop in enumerate(p.proposals):
        n = len(prop.transforms)
        body = b"".join([_transform_bytes(t, j == n - 1) for j, t in enumerate(prop.transforms)])
        out.append(_PROPOSAL_HEAD.pack(0 if i == count - 1 else 2, 8 + len(prop.spi) + len(body),
                                      prop.number, prop.protocol, len(prop.spi), n))
        out.append(prop.spi)
        out.append(body)
    return b"".join(out)


# --- traffic selectors -----------------------------------------------------------------


def _pull_selectors(buf: Buffer) -> tuple[TrafficSelector, ...]:
    count = buf.pull_uint8()
    buf.pull_bytes(3)
    out = []
    for _ in range(count):
        ts_type = buf.pull_uint8()
        protocol = buf.pull_uint8()
        length = buf.pull_uint16()
        if ts_type == TsType.IPV4_ADDR_RANGE:
            size = 4
        elif ts_type == TsType.IPV6_ADDR_RANGE:
            size = 16
        else:
            raise ParseError(f"unsupported traffic selector type {ts_type}")
        if length != 8 + 2 * size:
            raise ParseError("traffic selector length mismatch")
        start_port = buf.pull_uint16()
        end_port = buf.pull_uint16()
        start = buf.pull_bytes(size)
        end = buf.pull_bytes(size)
        out.append(TrafficSelector(TsType(ts_type), protocol, start_port, end_port, start, end))
    if count == 0 or not buf.eof():
        raise ParseError("traffic selector count mismatch")
    return tuple(out)


def _encode_selectors(p: TsiPayload | TsrPayload) -> bytes:
    out = [_TS_COUNT.pack(len(p.selectors))]
    for ts in p.selectors:
        out.append(_SELECTOR_HEAD.pack(ts.ts_type, ts.protocol, 8 + 2 * len(ts.start_addr),
                                       ts.start_port, ts.end_port))
        out.append(ts.start_addr)
        out.append(ts.end_addr)
    return b"".join(out)


# --- the rest ----------------------------------------------------------------------


def _pull_typed_body(buf: Buffer) -> tuple[int, bytes]:
    (kind,) = buf.pull_header(_TYPED_HEAD)
    return kind, buf.pull_rest()


def _pull_notify(buf: Buffer) -> NotifyPayload:
    protocol, spi_size, notify_type = buf.pull_header(_NOTIFY_HEAD)
    spi = buf.pull_bytes(spi_size)
    return NotifyPayload(notify_type, buf.pull_rest(), protocol, spi)


def _pull_delete(buf: Buffer) -> DeletePayload:
    protocol = buf.pull_uint8()
    spi_size = buf.pull_uint8()
    count = buf.pull_uint16()
    if protocol == 1 and (spi_size != 0 or count != 0):
        raise ParseError("IKE SA delete carries no SPIs")
    if protocol != 1 and spi_size != 4:
        raise ParseError("child SA delete needs 4-byte SPIs")
    spis = tuple(buf.pull_bytes(spi_size) for _ in range(count))
    if not buf.eof():
        raise ParseError("delete SPI count mismatch")
    return DeletePayload(protocol, spis)


def _pull_nonce(buf: Buffer) -> NoncePayload:
    data = buf.pull_rest()
    if not 16 <= len(data) <= 256:  # RFC 7296 3.9
        raise ParseError(f"nonce of {len(data)} bytes")
    return NoncePayload(data)


def _pull_ke(buf: Buffer) -> KePayload:
    group = buf.pull_uint16()
    buf.pull_uint16()
    return KePayload(group, buf.pull_rest())


def _pull_cert_like(buf: Buffer) -> tuple[int, bytes]:
    return buf.pull_uint8(), buf.pull_rest()


_PULL: dict[int, Callable[[Buffer], Payload]] = {
    PayloadType.SA: _pull_sa,
    PayloadType.KE: _pull_ke,
    PayloadType.NONCE: _pull_nonce,
    PayloadType.IDI: lambda b: IdiPayload(*_pull_typed_body(b)),
    PayloadType.IDR: lambda b: IdrPayload(*_pull_typed_body(b)),
    PayloadType.CERT: lambda b: CertPayload(*_pull_cert_like(b)),
    PayloadType.CERTREQ: lambda b: CertreqPayload(*_pull_cert_like(b)),
    PayloadType.AUTH: lambda b: AuthPayload(*_pull_typed_body(b)),
    PayloadType.NOTIFY: _pull_notify,
    PayloadType.DELETE: _pull_delete,
    PayloadType.VENDOR: lambda b: VendorPayload(b.pull_rest()),
    PayloadType.TSI: lambda b: TsiPayload(_pull_selectors(b)),
    PayloadType.TSR: lambda b: TsrPayload(_pull_selectors(b)),
    PayloadType.CP: lambda b: CpPayload(*_pull_typed_body(b)),
    PayloadType.EAP: lambda b: EapPayload(b.pull_rest()),
}


def _encode_delete(p: DeletePayload) -> bytes:
    spi_size = 0 if p.protocol == 1 else 4  # RFC 7296 3.11: IKE SA 0, ESP/AH 4
    return _DELETE_HEAD.pack(p.protocol, spi_size, len(p.spis)) + b"".join(p.spis)


# dict dispatch: payload class -> body encoder
_ENCODE: dict[type, Callable[[Any], bytes]] = {
    SaPayload: _encode_sa,
    KePayload: lambda p: _KE_HEAD.pack(p.group) + p.data,
    NoncePayload: lambda p: p.data,
    VendorPayload: lambda p: p.data,
    EapPayload: lambda p: p.data,
    UnknownPayload: lambda p: p.data,
    IdiPayload: lambda p: p.body(),
    IdrPayload: lambda p: p.body(),
    CertPayload: lambda p: bytes((p.encoding,)) + p.data,
    CertreqPayload: lambda p: bytes((p.encoding,)) + p.data,
    AuthPayload: lambda p: bytes((p.method, 0, 0, 0)) + p.data,
    CpPayload: lambda p: bytes((p.cfg_type, 0, 0, 0)) + p.attributes,
    NotifyPayload: lambda p: _NOTIFY_HEAD.pack(p.protocol, len(p.spi), p.notify_type)
    + p.spi + p.data,
    DeletePayload: _encode_delete,
    TsiPayload: _encode_selectors,
    TsrPayload: _encode_selectors,
}


P = TypeVar("P", bound=Payload)


def first_of(payloads: list[Payload], kind: type[P]) -> P | None:
    """The first payload of a type. (A loop: a generator left unfinished costs a
    GeneratorExit each, a dozen times per SA on the setup path.)"""
    for p in payloads:
        if isinstance(p, kind):
            return p
    return None


def type_of(p: Payload) -> int:
    return p.type_id if isinstance(p, UnknownPayload) else p.payload_type


def encode_chain(payloads: list[Payload], trailing_type: int = 0) -> bytes:
    """Encode a payload chain; the last one's next-payload is `trailing_type`."""
    out = []
    last = len(payloads) - 1
    for i, p in enumerate(payloads):
        data = _ENCODE[type(p)](p)
        following = type_of(payloads[i + 1]) if i < last else trailing_type
        critical = 0x80 if isinstance(p, UnknownPayload) and p.critical else 0
        out.append(_GENERIC.pack(following, critical, 4 + len(data)))
        out.append(data)
    return b"".join(out)


def push_payloads(buf: Buffer, payloads: list[Payload], trailing_type: int = 0) -> None:
    buf.push_bytes(encode_chain(payloads, trailing_type))


def encode_payloads(payloads: list[Payload]) -> bytes:
    return encode_chain(payloads)


def pull_payloads_untrusted(buf: Buffer, first: int) -> tuple[list[Payload], int]:
    """Decode a chain starting with type `first` until the buffer or an SK payload ends it.

    Returns the payloads and, when an SK/SKF payload was reached, its type (the cursor
    is then left at its generic header); otherwise 0.
    """
    payloads: list[Payload] = []
    next_type = first
    while next_type != PayloadType.NONE:
        if next_type in (PayloadType.SK, PayloadType.SKF):
            return payloads, next_type
        if len(payloads) >= 128:
            raise ParseError("too many payloads")
        (following, flags, _), body = buf.pull_payload(_GENERIC, 2)
        critical = bool(flags & 0x80)
        pull = _PULL.get(next_type)
        if pull is None:
            payloads.append(UnknownPayload(next_type, critical, body.pull_rest()))
        else:
            payloads.append(pull(body))
            if not body.eof():
                raise ParseError(f"{body.remaining} trailing bytes in payload {next_type}")
        next_type = following
    if not buf.eof():
        raise ParseError("data after the last payload")
    return payloads, 0


__all__ = [
    "AuthPayload", "CertPayload", "CertreqPayload", "CpPayload", "DeletePayload", "EapPayload",
    "IdiPayload",
    "IdrPayload", "KePayload", "NoncePayload", "NotifyPayload", "Payload", "SaPayload",
    "TransformType", "TsiPayload", "TsrPayload", "UnknownPayload", "VendorPayload",
    "encode_payloads", "pull_payloads_untrusted", "push_payloads",
]
