"""IKE message framing and SK payload protection (RFC 7296 3.1, 3.14; RFC 5282).

Also the sending half of IKE fragmentation (RFC 7383): `SkProtection.protect_fragments`
splits a message into Encrypted Fragment (SKF) messages, and `unprotect_fragment_untrusted`
opens one of them; `fragments.Reassembler` puts received ones back together.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ..errors import ParseError
from ..transforms import EncrAlgorithm, IntegAlgorithm, SymmetricKey
from ..wire import Buffer
from .constants import HEADER_SIZE, IKEV2_VERSION, Flag, PayloadType
from .payloads import (
    Payload,
    UnknownPayload,
    encode_chain,
    pull_payloads_untrusted,
    push_payloads,
    type_of,
)

_HEADER = struct.Struct("!8s8sBBBBII")
# Encrypted Fragment payload header: next payload, reserved, length, Fragment Number,
# Total Fragments (RFC 7383 2.5); all of it is authenticated with the fragment.
_SKF_HEADER = struct.Struct("!BBHHH")
SKF_HEADER_SIZE = _SKF_HEADER.size
MAX_MESSAGE_SIZE = 65535
MAX_TOTAL_FRAGMENTS = 0xFFFF  # a 16-bit field


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
    sk_offset: int  # where the SK (or SKF) payload's generic header starts; 0 if none
    sk_first: int  # next-payload field of the SK payload: the first inner payload type
    # RFC 7383 2.5: set in an Encrypted Fragment (SKF) message, 1 <= number <= total;
    # both 0 for anything else. In an SKF message `sk_first` is meaningful in fragment 1 only.
    fragment_number: int = 0
    total_fragments: int = 0

    @property
    def is_fragment(self) -> bool:
        return self.total_fragments != 0


def decode_untrusted(data: bytes) -> Decoded:
    header = peek_header_untrusted(data)
    if header.version >> 4 != 2:
        raise ParseError(f"IKE major version {header.version >> 4}")
    buf = Buffer(data)
    buf.pull_bytes(HEADER_SIZE)
    payloads, sk_type = pull_payloads_untrusted(buf, header.next_payload)
    if sk_type == PayloadType.SKF:
        offset = buf.position
        sk_first, _, sk_length, number, total = buf.pull_header(_SKF_HEADER)
        if offset + sk_length != len(data):
            raise ParseError("SKF payload must be the last payload")
        if sk_length <= SKF_HEADER_SIZE:
            raise ParseError("SKF payload without encrypted content")
        if not 1 <= number <= total:  # RFC 7383 2.5: neither may be 0, number <= total
            raise ParseError(f"fragment number {number} of {total}")
        return Decoded(header, payloads, offset, sk_first, number, total)
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
        plain, first = _inner(msg)
        return self._protect_encoded(msg, plain, first)

    def _protect_encoded(self, msg: Message, plain: bytes, first: int) -> bytes:
        sk_len = 4 + self._sealed_size(len(plain))
        head = Buffer()
        _push_header(head, msg, PayloadType.SK, HEADER_SIZE + sk_len)
        head.push_uint8(first)
        head.push_uint8(0)
        head.push_uint16(sk_len)
        return self._seal(head.data(), plain)

    def protect_fragments(self, msg: Message, max_message: int) -> list[bytes]:
        """`msg` protected as one message if it fits in `max_message` bytes, else as fragments.

        `max_message` counts IKE bytes only (no IP or UDP header, no non-ESP marker; see
        `fragments.ike_message_limit`). RFC 7383 2.5: the inner payload chain is cut into
        chunks, each sent in its own message (same header, same message ID) with one SKF
        payload, padded, encrypted and authenticated on its own with a fresh IV.
        """
        plain, first = _inner(msg)
        if HEADER_SIZE + 4 + self._sealed_size(len(plain)) <= max_message:
            return [self._protect_encoded(msg, plain, first)]
        capacity = self.fragment_capacity(max_message)
        if capacity < 1:
            raise ValueError(f"no fragment fits in {max_message} bytes")
        total = -(-len(plain) // capacity)
        if total > MAX_TOTAL_FRAGMENTS:
            raise ValueError(f"{len(plain)} bytes need {total} fragments")
        return [
            self.protect_fragment(msg, plain[(n - 1) * capacity : n * capacity], n, total, first)
            for n in range(1, total + 1)
        ]

    def fragment_capacity(self, max_message: int) -> int:
        """Plaintext bytes one fragment message of at most `max_message` bytes carries."""
        room = max_message - HEADER_SIZE - SKF_HEADER_SIZE - self.encr.iv_size - self._icv_size
        block = 1 if self.encr.aead else self.encr.block_size
        return (room // block) * block - 1  # the pad length byte is always there

    def protect_fragment(self, msg: Message, chunk: bytes, number: int, total: int,
                         first: int) -> bytes:
        """Fragment `number` of `total` carrying `chunk` of the encoded inner payloads.

        RFC 7383 2.5: the SKF payload's next-payload field is the first inner payload's
        type in fragment 1 and 0 in the others. The whole SKF header, Fragment Number and
        Total Fragments included, is covered by the ICV (the AEAD associated data).
        """
        skf_len = SKF_HEADER_SIZE + self._sealed_size(len(chunk))
        head = Buffer()
        _push_header(head, msg, PayloadType.SKF, HEADER_SIZE + skf_len)
        head.push_bytes(_SKF_HEADER.pack(first if number == 1 else 0, 0, skf_len, number, total))
        return self._seal(head.data(), chunk)

    def unprotect_untrusted(self, data: bytes, decoded: Decoded) -> list[Payload] | None:
        """The inner payloads, or None when the integrity check fails (drop silently)."""
        if decoded.is_fragment:
            raise ParseError("an IKE fragment goes to a Reassembler")
        plain = self._open_untrusted(data, decoded.sk_offset + 4)
        if plain is None:
            return None
        payloads, nested = pull_payloads_untrusted(Buffer(plain), decoded.sk_first)
        if nested:
            raise ParseError("SK payload inside SK payload")
        return payloads

    def unprotect_fragment_untrusted(self, data: bytes, decoded: Decoded) -> bytes | None:
        """One fragment's chunk of the inner payloads, or None when its ICV fails."""
        if not decoded.is_fragment:
            raise ParseError("not an IKE fragment")
        return self._open_untrusted(data, decoded.sk_offset + SKF_HEADER_SIZE)

    # --- the shared part of SK and SKF ---------------------------------------------

    def _sealed_size(self, plain_len: int) -> int:
        """IV, padded ciphertext and ICV for `plain_len` bytes of plaintext."""
        block = 1 if self.encr.aead else self.encr.block_size
        padded = plain_len + 1 + (-(plain_len + 1)) % block
        return self.encr.iv_size + padded + self._icv_size

    def _seal(self, head: bytes, plain: bytes) -> bytes:
        """`head` (IKE header through the SK/SKF header) followed by IV, ciphertext, ICV."""
        block = 1 if self.encr.aead else self.encr.block_size
        pad_len = (-(len(plain) + 1)) % block
        plain += bytes(pad_len) + bytes([pad_len])
        iv = os.urandom(self.encr.iv_size)
        if self.encr.aead:
            return head + iv + self._out.seal(iv, plain, head)
        assert self.integ is not None
        signed = head + iv + self._out.cbc_encrypt(iv, plain)
        return signed + self.integ.compute(self._a_out, signed)

    def _open_untrusted(self, data: bytes, start: int) -> bytes | None:
        """The plaintext without padding after the SK/SKF header ending at `start`."""
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
        return plain[: len(plain) - pad_len - 1]


def _inner(msg: Message) -> tuple[bytes, int]:
    """The encoded inner payload chain and the type of its first payload."""
    return encode_chain(msg.payloads), type_of(msg.payloads[0]) if msg.payloads else 0


def unknown_critical(payloads: list[Payload]) -> UnknownPayload | None:
    for p in payloads:
        if isinstance(p, UnknownPayload) and p.critical:
            return p
    return None
