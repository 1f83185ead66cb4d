"""Seeds and mutation operators of the node fuzzer, all driven by one `random.Random`.

Seeds: the strongSwan recordings in tests/vectors/exchanges (whole datagrams, and the
decrypted SK bodies labelled with their exchange), the strongSwan IKE_AUTH fragments
embedded in tests/ike/test_fragments.py (as they crossed the wire, and their decrypted
chunks), and what our own initiator sends (through `tests.ike.test_fuzz.corpus`).

A seed fixes the sequence of choices. The bytes that depend on a live SA (its SPIs, keys,
IVs) differ between runs, so a failure is reproduced from the datagrams the driver
records, not from the seed alone.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

from cluster.ike.constants import HEADER_SIZE, IKEV2_VERSION, ExchangeType, Flag, PayloadType
from cluster.ike.message import Message, SkProtection, decode_untrusted
from cluster.ike.session import IkeSession
from cluster.transforms import EncrAlgorithm, IntegAlgorithm, SymmetricKey
from tests.ike.test_fragments import STRONGSWAN, strongswan_case
from tests.ike.test_fuzz import EXCHANGES, corpus

_HEADER = struct.Struct("!8s8sBBBBII")
_GENERIC = struct.Struct("!BBH")  # next payload, flags (critical bit), length

INTERESTING_U8 = (0, 1, 0x7F, 0x80, 0xFF)
INTERESTING_U16 = (0, 1, 2, 3, 4, 5, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF)
INTERESTING_U32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
# payload types a spliced or retyped payload may take: known ones, NONE, SK/SKF and unknown
PAYLOAD_TYPES = (0, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 53, 99, 200)


@dataclass(frozen=True, slots=True)
class Chain:
    """An inner payload chain (the plaintext of an SK payload) and its first payload type."""

    first: int
    data: bytes
    exchange: int = 0  # the exchange it was recorded in; 0 when made up
    response: bool = False


@dataclass(frozen=True, slots=True)
class Seeds:
    datagrams: tuple[bytes, ...]  # whole IKE messages, ours and strongSwan's
    init_requests: tuple[bytes, ...]  # IKE_SA_INIT requests; ours (x25519) first
    chains: tuple[Chain, ...]  # decrypted SK bodies
    fragments: tuple[bytes, ...]  # strongSwan's SKF messages as they crossed the wire
    fragment_chunks: tuple[tuple[Chain, ...], ...]  # per recorded split: its chunks in order

    def chains_of(self, exchange: int, response: bool = False) -> tuple[Chain, ...]:
        return tuple(c for c in self.chains if c.exchange == exchange
                     and c.response == response)


@cache
def load_seeds() -> Seeds:
    ours = corpus()
    chains = [Chain(ours.chains[0][0], ours.chains[0][1], ExchangeType.IKE_AUTH)]
    for entry in json.loads((EXCHANGES / "index.json").read_text()):
        if "decrypted" in entry:
            chains.append(Chain(entry["decrypted_first_payload"],
                                (EXCHANGES / entry["decrypted"]).read_bytes(),
                                ExchangeType[entry["exchange"]], entry["response"]))
    fragments: list[bytes] = []
    splits: list[tuple[Chain, ...]] = []
    for name in STRONGSWAN:
        as_responder, as_initiator, recorded = strongswan_case(name)
        fragments += recorded
        # fragments 1-3 are the IKE_AUTH request, 4-5 the response (see test_fragments)
        for part, sk, response in ((recorded[:3], as_responder, False),
                                   (recorded[3:], as_initiator, True)):
            chunks = []
            for data in part:
                decoded = decode_untrusted(data)
                chunk = sk.unprotect_fragment_untrusted(data, decoded)
                assert chunk is not None, "recorded fragment does not open with its keys"
                chunks.append(Chain(decoded.sk_first, chunk, ExchangeType.IKE_AUTH, response))
            splits.append(tuple(chunks))
    return Seeds(ours.datagrams, ours.init_requests, tuple(chains), tuple(fragments),
                 tuple(splits))


# --- generic payloads ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """One generic payload: its type, its flags byte and its body."""

    type: int
    flags: int
    body: bytes


def split_chain(first: int, data: bytes) -> list[Segment]:
    """The payloads of a chain as far as their generic headers hold together."""
    segments: list[Segment] = []
    kind, pos = first, 0
    while kind and pos + 4 <= len(data):
        following, flags, length = _GENERIC.unpack_from(data, pos)
        if length < 4 or pos + length > len(data):
            break
        segments.append(Segment(kind, flags, data[pos + 4 : pos + length]))
        kind, pos = following, pos + length
    return segments


def join_chain(segments: Sequence[Segment]) -> Chain:
    """Segments chained with consistent next-payload and length fields."""
    parts = []
    for n, seg in enumerate(segments):
        following = segments[n + 1].type if n + 1 < len(segments) else 0
        parts.append(_GENERIC.pack(following, seg.flags, 4 + len(seg.body)) + seg.body)
    return Chain(segments[0].type if segments else 0, b"".join(parts))


def payload_offsets(first: int, data: bytes, start: int) -> list[int]:
    """Where the generic payload headers of the chain beginning at `start` are."""
    offsets, kind, pos = [], first, start
    while kind and pos + 4 <= len(data):
        following, _, length = _GENERIC.unpack_from(data, pos)
        offsets.append(pos)
        if length < 4:
            break
        kind, pos = following, pos + length
    return offsets


def message_chain(data: bytes) -> Chain:
    """The unencrypted payloads of a whole message (whatever follows the header)."""
    return Chain(data[16] if len(data) >= HEADER_SIZE else 0, data[HEADER_SIZE:])


def build_message(spi_i: bytes, spi_r: bytes, exchange: int, flags: int, message_id: int,
                  chain: Chain) -> bytes:
    return _HEADER.pack(spi_i, spi_r, chain.first, IKEV2_VERSION, exchange, flags, message_id,
                        HEADER_SIZE + len(chain.data)) + chain.data


def rewrite_header(data: bytes, *, spi_i: bytes | None = None, spi_r: bytes | None = None,
                   exchange: int | None = None, flags: int | None = None,
                   message_id: int | None = None) -> bytes:
    if len(data) < HEADER_SIZE:
        return data
    out = bytearray(data)
    if spi_i is not None:
        out[0:8] = spi_i
    if spi_r is not None:
        out[8:16] = spi_r
    if exchange is not None:
        out[18] = exchange
    if flags is not None:
        out[19] = flags
    if message_id is not None:
        out[20:24] = message_id.to_bytes(4, "big")
    return bytes(out)


def fix_length(data: bytes) -> bytes:
    """The header's length field made to match the datagram, so it gets past the peek."""
    if len(data) < HEADER_SIZE:
        return data
    return data[:24] + len(data).to_bytes(4, "big") + data[28:]


# --- byte-level mutation ---------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes, edits: int = 0) -> bytes:
    """1-4 edits (or `edits`): bit flips, interesting bytes and fields, cuts, inserts."""
    out = bytearray(data)
    for _ in range(edits or rng.randint(1, 4)):
        op = rng.choice(("flip", "byte", "u16", "u32", "insert", "delete", "dup", "cut"))
        pos = rng.randrange(len(out)) if out else 0
        if op == "flip" and out:
            out[pos] ^= 1 << rng.randrange(8)
        elif op == "byte" and out:
            out[pos] = rng.choice(INTERESTING_U8) if rng.random() < 0.5 else rng.randrange(256)
        elif op == "u16" and len(out) >= 2:
            pos = min(pos, len(out) - 2)
            out[pos : pos + 2] = rng.choice(INTERESTING_U16).to_bytes(2, "big")
        elif op == "u32" and len(out) >= 4:
            pos = min(pos, len(out) - 4)
            out[pos : pos + 4] = rng.choice(INTERESTING_U32).to_bytes(4, "big")
        elif op == "insert":
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del out[pos : pos + rng.randint(1, 16)]
        elif op == "dup":
            out[pos:pos] = out[pos : pos + rng.randint(1, 32)]
        elif op == "cut" and rng.random() < 0.5:  # cutting ends most mutants: rarer
            del out[pos:]
    return bytes(out)


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    if rng.random() < 0.3:  # around the header and the first generic header
        return data[: rng.randint(0, min(len(data), HEADER_SIZE + 8))]
    return data[: rng.randint(0, max(len(data) - 1, 0))]


def corrupt_length(rng: random.Random, first: int, data: bytes, start: int) -> bytes:
    """One length field of the payload chain at `start` set to a wrong value."""
    offsets = payload_offsets(first, data, start)
    if not offsets:
        return mutate_bytes(rng, data, 1)
    pos = rng.choice(offsets) + 2
    current = int.from_bytes(data[pos : pos + 2], "big")
    value = rng.choice((*INTERESTING_U16, current - 1, current + 1, current + 4,
                        current * 2, len(data) - pos + 2, rng.randrange(0x10000)))
    return data[:pos] + (value & 0xFFFF).to_bytes(2, "big") + data[pos + 2 :]


def corrupt_message_length(rng: random.Random, data: bytes) -> bytes:
    """The IKE header's or a payload's length field, the datagram made to agree or not."""
    if len(data) < HEADER_SIZE:
        return mutate_bytes(rng, data, 1)
    if rng.random() < 0.4:
        value = rng.choice((*INTERESTING_U32, len(data) - 1, len(data) + 1, HEADER_SIZE,
                            HEADER_SIZE - 1, rng.randrange(HEADER_SIZE, 2 * len(data) + 2)))
        out = data[:24] + value.to_bytes(4, "big") + data[28:]
        if rng.random() < 0.5 and value <= 65535:  # the datagram follows the header
            out = (out + rng.randbytes(max(0, value - len(out))))[:value]
        return out
    return corrupt_length(rng, data[16], data, HEADER_SIZE)


# --- payload chains --------------------------------------------------------------------


def mutate_segments(rng: random.Random, segments: list[Segment],
                    donors: Sequence[Chain]) -> list[Segment]:
    """Payload-level edits: drop, duplicate, swap, transplant, retype, flip critical."""
    out = list(segments)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("drop", "dup", "swap", "transplant", "transplant", "retype",
                         "critical", "body"))
        n = rng.randrange(len(out)) if out else 0
        if op == "drop" and out:
            del out[n]
        elif op == "dup" and out:
            out[n:n] = [out[n]] * rng.choice((1, 1, 2, 30))
        elif op == "swap" and len(out) > 1:
            m = rng.randrange(len(out))
            out[n], out[m] = out[m], out[n]
        elif op == "transplant" and donors:
            donor = split_chain(*_pair(rng.choice(donors)))
            if donor:
                out.insert(n, rng.choice(donor))
        elif op == "retype" and out:
            seg = out[n]
            out[n] = Segment(rng.choice(PAYLOAD_TYPES), seg.flags, seg.body)
        elif op == "critical" and out:
            seg = out[n]
            out[n] = Segment(seg.type, seg.flags ^ 0x80, seg.body)
        elif op == "body" and out:
            seg = out[n]
            out[n] = Segment(seg.type, seg.flags, mutate_bytes(rng, seg.body))
    return out


def _pair(chain: Chain) -> tuple[int, bytes]:
    return chain.first, chain.data


def splice(rng: random.Random, chains: Sequence[Chain]) -> Chain:
    """Payloads taken from two or three chains, in a consistent chain."""
    picked = [split_chain(*_pair(rng.choice(chains))) for _ in range(rng.randint(2, 3))]
    segments: list[Segment] = []
    for part in picked:
        if part:
            a = rng.randrange(len(part))
            segments += part[a : a + rng.randint(1, len(part))]
    if rng.random() < 0.3:
        rng.shuffle(segments)
    return join_chain(segments)


def mutate_chain(rng: random.Random, chain: Chain, donors: Sequence[Chain]) -> Chain:
    """A chain mutated at the payload level, the byte level or both."""
    kind = rng.random()
    if kind < 0.35:
        segments = split_chain(chain.first, chain.data)
        return join_chain(mutate_segments(rng, segments, donors))
    if kind < 0.55:
        return Chain(chain.first, corrupt_length(rng, chain.first, chain.data, 0))
    if kind < 0.65:
        return Chain(rng.choice(PAYLOAD_TYPES), chain.data)
    return Chain(chain.first, mutate_bytes(rng, chain.data))


# --- sealing with a live SA's keys -------------------------------------------------------


@dataclass(frozen=True)
class SaKeys:
    """What an initiator holding a live IKE SA needs to send the responder anything."""

    spi_i: bytes
    spi_r: bytes
    encr: EncrAlgorithm
    integ: IntegAlgorithm | None
    sk_a: bytes = field(repr=False)  # SK_ai
    cipher: SymmetricKey = field(repr=False)  # under SK_ei
    protection: SkProtection = field(repr=False)  # the initiator's: SKF fragments

    @classmethod
    def of(cls, session: IkeSession) -> SaKeys:
        sa = session.sa
        keys, chosen, sk = sa.keys, sa.chosen, sa.sk
        if keys is None or chosen is None or sk is None:
            raise ValueError("the initiator has no keys yet")
        return cls(sa.spi_i, sa.spi_r, chosen.encr, chosen.integ, keys.sk_ai,
                   SymmetricKey(chosen.encr, keys.sk_ei), sk)


def seal(keys: SaKeys, exchange: int, message_id: int, chain: Chain, *,
         response: bool = False, pad_length: int | None = None) -> bytes:
    """An SK-protected message from the initiator with any plaintext (RFC 7296 3.14).

    `pad_length` overrides the Pad Length byte (the padding itself stays right), so a
    message can authenticate and still carry a lie.
    """
    encr = keys.encr
    block = 1 if encr.aead else encr.block_size
    pad = (-(len(chain.data) + 1)) % block
    plain = chain.data + bytes(pad) + bytes([pad if pad_length is None else pad_length])
    icv_size = encr.icv_size if encr.aead or keys.integ is None else keys.integ.icv_size
    sk_length = 4 + encr.iv_size + len(plain) + icv_size
    flags = Flag.INITIATOR | (Flag.RESPONSE if response else 0)
    head = _HEADER.pack(keys.spi_i, keys.spi_r, PayloadType.SK, IKEV2_VERSION, exchange, flags,
                        message_id, HEADER_SIZE + sk_length) + _GENERIC.pack(chain.first, 0,
                                                                            sk_length)
    iv = os.urandom(encr.iv_size)
    if encr.aead:
        return head + iv + keys.cipher.seal(iv, plain, head)
    assert keys.integ is not None
    signed = head + iv + keys.cipher.cbc_encrypt(iv, plain)
    return signed + keys.integ.compute(keys.sk_a, signed)


def seal_fragment(keys: SaKeys, exchange: int, message_id: int, chunk: bytes, number: int,
                  total: int, first: int, *, response: bool = False) -> bytes:
    """One SKF message (RFC 7383 2.5) with any Fragment Number and Total Fragments."""
    msg = Message(keys.spi_i, keys.spi_r, exchange, message_id, response, True)
    return keys.protection.protect_fragment(msg, chunk, number & 0xFFFF, total & 0xFFFF,
                                            first)
