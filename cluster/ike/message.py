"""IKE message framing and SK payload protection (RFC 7296 3.1, 3.14; RFC 5282)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ..errors import ParseError
from ..transforms import EncrAlgorithm, IntegAlgorithm, SymmetricKey
from ..wire import Buffer
from .constants import HEADER_SIZE, IKEV2_VERSION, Flag, PayloadType
from .payloads import Payload, UnknownPayload, pull_payloads_untrusted, push_payloads, type_of

_HEADER = struct.Struct("!8s8sBBBBII")
MAX_MESSAGE_SIZE = 65535


@dataclass(frozen=True, slots=True)
class Header:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    version: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & Flag.RESPONSE)

    @property
    def is_initiator(self) -> bool:
        return bool(self.flags & Flag.INITIATOR)


def peek_header_untrusted(data: bytes) -> Header:
    """The fixed header, checked only for size and major version."""
    if len(data) < HEADER_SIZE:
        raise ParseError(f"datagram of {len(data)} bytes is shorter than an IKE header")
    header = Header(*_HEADER.unpack_from(data))
    if header.length != len(data):
        raise ParseError(f"header says {header.length} bytes, datagram has {len(data)}")
    return header


@dataclass(slots=True)
class Message:
    """A message as the session builds or reads it."""

    spi_i: bytes
    spi_r: bytes
    exchange: int
    message_id: int
    is_response: bool
    is_initiator: bool
    payloads: list[Payload] = field(default_factory=list)

    @property
    def flags(self) -> int:
        return (Flag.RESPONSE if self.is_response else 0) | (
            Flag.INITIATOR if self.is_initiator else 0
        )


def _push_header(buf: Buffer, msg: Message, first: int, length: int) -> None:
    buf.push_bytes(_HEADER.pack(msg.spi_i, msg.spi_r, first, IKEV2_VERSION, msg.exchange,
                                msg.flags, msg.message_id, length))


def encode_plain(msg: Message) -> bytes:
    body = Buffer()
    push_payloads(body, msg.payloads)
    data = body.data()
    first = type_of(msg.payloads[0]) if msg.payloads else 0
    buf = Buffer()
    _push_header(buf, msg, first, HEADER_SIZE + len(data))
    buf.push_bytes(data)
    return buf.data()


@dataclass(frozen=True, slots=True)
class Decoded:
    header: Header
    payloads: list[Payload]  # the unencrypted ones
    sk_offset: int  # where the SK payload's generic header starts; 0 if none
    sk_first: int  # next-payload field of the SK payload: the first inner payload type


def decode_untrusted(data: bytes) -> Decoded:
    header = peek_header_untrusted(data)
    if header.version >> 4 != 2:
        raise ParseError(f"IKE major version {header.version >> 4}")
    buf = Buffer(data)
    buf.pull_bytes(HEADER_SIZE)
    payloads, sk_type = pull_payloads_untrusted(buf, header.next_payload)
    if sk_type == PayloadType.SKF:
        raise ParseError("IKE fragments are not supported yet")
    if sk_type:
        offset = buf.position
        sk_first = buf.pull_uint8()
        buf.pull_uint8()
        sk_length = buf.pull_uint16()
        if offset + sk_length != len(data):
            raise ParseError("SK payload must be the last payload")
        return Decoded(header, payloads, offset, sk_first)
    return Decoded(header, payloads, 0, 0)


class SkProtection:
    """The SK payload in one direction pair of an IKE SA (RFC 7296 3.14, RFC 5282)."""

    def __init__(self, encr: EncrAlgorithm, integ: IntegAlgorithm | None,
                 sk_e_out: bytes, sk_a_out: bytes, sk_e_in: bytes, sk_a_in: bytes) -> None:
        self.encr = encr
        self.integ = integ
        self._out = SymmetricKey(encr, sk_e_out)
        self._in = SymmetricKey(encr, sk_e_in)
        self._a_out = sk_a_out
        self._a_in = sk_a_in
        self._icv_size = encr.icv_size if encr.aead else (integ.icv_size if integ else 0)

    def overhead(self) -> int:
        return 4 + self.encr.iv_size + self._icv_size + self.encr.block_size

    def protect(self, msg: Message) -> bytes:
        inner = Buffer()
        push_payloads(inner, msg.payloads)
        plain = inner.data()
        first = type_of(msg.payloads[0]) if msg.payloads else 0
        block = 1 if self.encr.aead else self.encr.block_size
        pad_len = (-(len(plain) + 1)) % block
        plain += bytes(pad_len) + bytes([pad_len])
        iv = os.urandom(self.encr.iv_size)
        sk_len = 4 + len(iv) + len(plain) + self._icv_size
        head = Buffer()
        _push_header(head, msg, PayloadType.SK, HEADER_SIZE + sk_len)
        head.push_uint8(first)
        head.push_uint8(0)
        head.push_uint16(sk_len)
        aad = head.data()
        if self.encr.aead:
            return aad + iv + self._out.seal(iv, plain, aad)
        assert self.integ is not None
        signed = aad + iv + self._out.cbc_encrypt(iv, plain)
        return signed + self.integ.compute(self._a_out, signed)

    def unprotect_untrusted(self, data: bytes, decoded: Decoded) -> list[Payload] | None:
        """The inner payloads, or None when the integrity check fails (drop silently)."""
        start = decoded.sk_offset + 4
        iv_size = self.encr.iv_size
        if len(data) - start < iv_size + self._icv_size + 1:
            raise ParseError("SK payload too short")
        iv = data[start : start + iv_size]
        if self.encr.aead:
            plain = self._in.open_untrusted(iv, data[start + iv_size :], data[:start])
            if plain is None:
                return None
        else:
            assert self.integ is not None
            end = len(data) - self._icv_size
            if not self.integ.verify(self._a_in, data[:end], data[end:]):
                return None
            plain = self._in.cbc_decrypt_untrusted(iv, data[start + iv_size : end])
        if not plain:
            raise ParseError("empty SK plaintext")
        pad_len = plain[-1]
        if pad_len + 1 > len(plain):
            raise ParseError("SK pad length exceeds plaintext")
        inner = Buffer(plain[: len(plain) - pad_len - 1])
        payloads, nested = pull_payloads_untrusted(inner, decoded.sk_first)
        if nested:
            raise ParseError("SK payload inside SK payload")
        return payloads


def unknown_critical(payloads: list[Payload]) -> UnknownPayload | None:
    return next((p for p in payloads if isinstance(p, UnknownPayload) and p.critical), None)
