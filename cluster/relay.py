"""The authenticated worker <-> responder datagram envelope.

Workers own the public addresses and relay each IKE message to a responder
(`IKE_FROM_PEER`); the responder's answers go back through the same worker
(`IKE_TO_PEER`). `PING`/`PONG` let a node check the relay path to another.
Both roles import this module, never each other.

Wire format, version 1 (integers big-endian)::

    offset  size  field
    0       1     version (1)
    1       1     kind (Kind)
    2       1     flags (bit 0: NAT keepalive, IKE_TO_PEER only; other bits zero)
    3       1     sender id length S (1..64)
    4       1     recipient id length R (1..64)
    5       8     sequence number (per sender, strictly increasing, see below)
    13      S     sender id (UTF-8)
    13+S    R     recipient id (UTF-8)
    then by kind:
      IKE_FROM_PEER, IKE_TO_PEER:
            7|19  local address: the worker's (family 4|6, 4|16 address bytes, port)
            7|19  remote address: the peer's (same shape)
            rest  the IKE message, without the non-ESP marker (or 0xFF for a keepalive)
      PING: nothing
      PONG: 8     the sequence number of the PING answered
      CHILD_LIMIT: 8 IKE initiator SPI, 8 IKE responder SPI, 4 Child SA inbound SPI,
            1 limit (1 soft: rekey it; 2 delete it (inactivity); 3 its hard lifetime or
            sequence numbers ended it here: expire it)
      CHILD_TRAFFIC: 8 IKE initiator SPI, 8 IKE responder SPI, 4 Child SA inbound SPI,
            4 x 8 bytes in, bytes out, packets in, packets out (when the worker removes
            it: for RADIUS accounting)
      CHILD_USAGE: as CHILD_TRAFFIC, what a Child SA still up carried so far (every
            half minute while its counts change: for RADIUS Interim-Updates)
      CHILD_ACTIVE: 4 x N  Child SA inbound SPIs (1 <= N <= ACTIVE_MAX) that received
            ESP since the worker last told (so their IKE SAs put liveness checks off)
    last    16    tag: HMAC-SHA256 over every byte before it, truncated to 128 bits

Overhead on an IKE message: 13 + S + R + 14 (IPv4) or 38 (IPv6) + 16 bytes; with
ids "worker-1" and "responder-2" that is 62 bytes over IPv4, 86 over IPv6.

Authentication: the relay key is HKDF-SHA256(cluster key, info "ike-cluster relay
v1"), so it is never the key that seals snapshots. Given a key ring (the store's
`ClusterKey`, anything with `derive_each`), the first key seals and every key opens,
so a key rotation does not cut the relay. HMAC rather than GMAC: GMAC is
about 0.7 us cheaper per datagram here but fails catastrophically (the hash key
leaks, every envelope becomes forgeable) if a nonce ever repeats, and two
processes configured with the same node id would repeat them; HMAC has no nonce.
Every node holds the one cluster key, so the MAC proves "a cluster member", and
the sender id is trusted as far as the members are.

Anti-replay: both a sequence window and a timestamp window, because each alone
has a hole. The sequence number is the sender's wall clock in nanoseconds, bumped
to last + 1 when the clock has not moved, so it is strictly increasing per sender
and also survives a sender restart without saved state. A receiver accepts it only
- once: a per-sender set of the last `window` numbers seen, plus a floor below
  which everything is refused (bounded memory per sender; reordering is tolerated
  inside the window, which IKE needs little of);
- if it lies within `max_skew` of its own clock and is not older than the receiver
  itself. This is what lets the receiver forget a sender silent for `max_skew`
  (its old envelopes are stale anyway), so the sender table is bounded too without
  evicting anyone whose replays could still be accepted; and a restarted receiver
  refuses everything sealed before it started instead of accepting it once more.
The recipient id is authenticated too, so an envelope cannot be replayed to
another node (nor reflected back to its sender). Nodes' clocks must agree within
`max_skew` (30 s by default; NTP does far better).
"""

from __future__ import annotations

import hmac
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ParseError
from .wire import Buffer

Address = tuple[str, int]
NO_ADDRESS: Address = ("", 0)

VERSION = 1
KEY_SIZE = 32  # the cluster key
MAC_SIZE = 16
MAX_ID = 64
# The largest UDP payload over IPv4; the relay runs over UDP.
MAX_ENVELOPE = 65507
RELAY_KEY_INFO = b"ike-cluster relay v1"

DEFAULT_MAX_SKEW_NS = 30_000_000_000
DEFAULT_WINDOW = 256  # sequence numbers remembered per sender
DEFAULT_MAX_SENDERS = 1024

FLAG_KEEPALIVE = 0x01
CHILD_LIMIT_SIZE = 21
CHILD_TRAFFIC_SIZE = 52
_TRAFFIC = struct.Struct("!8s8s4sQQQQ")
LIMIT_SOFT = 1  # rekey the Child SA
LIMIT_HARD = 2  # delete it
LIMIT_EXPIRED = 3  # the worker removed it (hard lifetime, sequence numbers): expire it
_LIMITS = (LIMIT_SOFT, LIMIT_HARD, LIMIT_EXPIRED)
ACTIVE_MAX = 256  # Child SAs per CHILD_ACTIVE envelope

_HEADER = struct.Struct("!BBBBBQ")
_ADDR4 = struct.Struct("!B4sH")
_ADDR6 = struct.Struct("!B16sH")
_U64 = struct.Struct("!Q")
MIN_ENVELOPE = _HEADER.size + 2 + MAC_SIZE  # one-byte ids, a PING


class Kind(IntEnum):
    IKE_FROM_PEER = 1  # worker -> responder
    IKE_TO_PEER = 2  # responder -> worker
    PING = 3
    PONG = 4
    CHILD_LIMIT = 5  # worker -> responder: a Child SA reached a byte/packet/sequence limit
    CHILD_TRAFFIC = 6  # worker -> responder: what a Child SA carried, as it is removed
    CHILD_USAGE = 7  # worker -> responder: what a Child SA still up carried so far
    CHILD_ACTIVE = 8  # worker -> responder: Child SAs that received ESP lately


class KeyRing(Protocol):
    """A cluster key with retired ones (cluster.store.sealing.ClusterKey fits)."""

    def derive_each(self, label: bytes, length: int = 32) -> tuple[bytes, ...]: ...


_IKE_KINDS = (Kind.IKE_FROM_PEER, Kind.IKE_TO_PEER)
# kinds whose data has one size and no addresses
_FIXED_SIZES = {Kind.CHILD_LIMIT: CHILD_LIMIT_SIZE, Kind.CHILD_TRAFFIC: CHILD_TRAFFIC_SIZE,
                Kind.CHILD_USAGE: CHILD_TRAFFIC_SIZE}
_KINDS = {int(k): k for k in Kind}


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: Kind
    sender: str  # for IKE_FROM_PEER, the worker id; for IKE_TO_PEER, the responder id
    recipient: str
    seq: int
    data: bytes = b""  # the IKE message (IKE kinds); CHILD_LIMIT: see `child_limit`
    local: Address = NO_ADDRESS  # the worker's address the peer talks to (IKE kinds)
    remote: Address = NO_ADDRESS  # the peer's address (IKE kinds)
    keepalive: bool = False  # IKE_TO_PEER: send `data` as a NAT keepalive, no marker
    echo: int = 0  # PONG: the seq of the PING it answers


@dataclass(slots=True)
class RelayDrops:
    """Envelopes refused by `decode_untrusted`, by reason; plain ints for the hot path."""

    truncated: int = 0
    bad_version: int = 0
    bad_mac: int = 0
    unknown_kind: int = 0
    malformed: int = 0
    wrong_recipient: int = 0
    stale: int = 0  # outside the clock window, or sealed before this receiver started
    replayed: int = 0  # seen before, or below the sender's window
    too_many_senders: int = 0

    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def derive_relay_key(cluster_key: bytes) -> bytes:
    """The relay's MAC key, separate from the key that seals snapshots."""
    if len(cluster_key) != KEY_SIZE:
        raise ValueError(f"the cluster key must be {KEY_SIZE} bytes, got {len(cluster_key)}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=RELAY_KEY_INFO)
    return hkdf.derive(cluster_key)


class _SenderWindow:
    """What one sender has used: everything <= floor, and the numbers in `seen`."""

    __slots__ = ("floor", "highest", "seen")

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.highest = floor
        self.seen: set[int] = set()

    def check(self, seq: int) -> bool:
        return seq > self.floor and seq not in self.seen

    def add(self, seq: int, window: int) -> None:
        self.seen.add(seq)
        if seq > self.highest:
            self.highest = seq
        if len(self.seen) > window:
            # Forget the older half at once so the sort is paid every window/2 envelopes.
            ordered = sorted(self.seen)
            keep = window // 2
            self.floor = ordered[-keep - 1]
            self.seen = set(ordered[-keep:])


class RelayCodec:
    """Seals envelopes from `sender` and opens those addressed to it.

    One codec per process and node id: the sequence numbers it seals and the
    replay state it keeps belong to that id.
    """

    def __init__(
        self,
        key: bytes | KeyRing,
        sender: str,
        *,
        clock: Callable[[], int] = time.time_ns,
        max_skew_ns: int = DEFAULT_MAX_SKEW_NS,
        window: int = DEFAULT_WINDOW,
        max_senders: int = DEFAULT_MAX_SENDERS,
    ) -> None:
        if window < 2 or max_senders < 1 or max_skew_ns <= 0:
            raise ValueError("window >= 2, max_senders >= 1 and max_skew_ns > 0 are required")
        self.sender = sender
        self._sender_raw = _encode_id(sender)
        if isinstance(key, bytes):
            relay_keys: tuple[bytes, ...] = (derive_relay_key(key),)
        else:
            relay_keys = key.derive_each(RELAY_KEY_INFO, 32)
        if not relay_keys:
            raise ValueError("no relay key")
        self._macs = [hmac.new(k, digestmod="sha256") for k in relay_keys]
        self._clock = clock
        self._max_skew = max_skew_ns
        self._window = window
        self._max_senders = max_senders
        self._seq = 0
        self._born = clock()
        self._senders: dict[str, _SenderWindow] = {}
        self.drops = RelayDrops()
        self.accepted = 0

    # --- sealing ----------------------------------------------------------------------

    def encode(
        self,
        kind: Kind,
        recipient: str,
        *,
        data: bytes = b"",
        local: Address | None = None,
        remote: Address | None = None,
        keepalive: bool = False,
        echo: int = 0,
    ) -> bytes:
        """One sealed envelope; ValueError for arguments that do not fit `kind`."""
        kind = Kind(kind)
        recipient_raw = _encode_id(recipient)
        if keepalive and kind is not Kind.IKE_TO_PEER:
            raise ValueError("only IKE_TO_PEER carries a keepalive")
        seq = self._seq = max(self._seq + 1, self._clock())
        buf = Buffer()
        buf.push_bytes(
            _HEADER.pack(
                VERSION, kind, FLAG_KEEPALIVE if keepalive else 0,
                len(self._sender_raw), len(recipient_raw), seq,
            )
        )
        buf.push_bytes(self._sender_raw)
        buf.push_bytes(recipient_raw)
        if kind in _IKE_KINDS:
            if local is None or remote is None or not data:
                raise ValueError(f"{kind.name} needs data, local and remote")
            _push_address(buf, local)
            _push_address(buf, remote)
            buf.push_bytes(data)
        elif kind in _FIXED_SIZES:
            size = _FIXED_SIZES[kind]
            if len(data) != size or local is not None or remote is not None:
                raise ValueError(f"{kind.name} carries {size} bytes, no addresses")
            buf.push_bytes(data)
        elif kind is Kind.CHILD_ACTIVE:
            if not _active_size_ok(len(data)) or local is not None or remote is not None:
                raise ValueError(f"CHILD_ACTIVE carries 1 to {ACTIVE_MAX} SPIs, no addresses")
            buf.push_bytes(data)
        elif data or local is not None or remote is not None:
            raise ValueError(f"{kind.name} carries no datagram")
        elif kind is Kind.PONG:
            buf.push_uint64(echo)
        body = buf.data()
        if len(body) + MAC_SIZE > MAX_ENVELOPE:
            raise ValueError(f"envelope of {len(body) + MAC_SIZE} bytes exceeds {MAX_ENVELOPE}")
        return body + self._tag(body)

    def _tag(self, body: bytes, index: int = 0) -> bytes:
        mac = self._macs[index].copy()
        mac.update(body)
        return mac.digest()[:MAC_SIZE]

    def _authentic(self, body: bytes, tag: bytes) -> bool:
        # Retired keys are tried only after the current one failed: forgeries pay, not traffic.
        return any(
            hmac.compare_digest(self._tag(body, i), tag) for i in range(len(self._macs))
        )

    # --- opening ----------------------------------------------------------------------

    def decode_untrusted(self, data: bytes) -> Envelope:
        """The envelope in `data`, addressed to us, authentic and new; else ParseError."""
        drops = self.drops
        if data[:1] and data[0] != VERSION:
            drops.bad_version += 1
            raise ParseError(f"relay version {data[0]}")
        if len(data) < MIN_ENVELOPE:
            drops.truncated += 1
            raise ParseError(f"relay envelope of {len(data)} bytes")
        body = data[:-MAC_SIZE]
        if not self._authentic(body, data[-MAC_SIZE:]):
            drops.bad_mac += 1
            raise ParseError("relay envelope failed authentication")
        # Authentic from here on: what fails now is a member's bug or a newer version.
        buf = Buffer(body)
        _, kind_raw, flags, sender_len, recipient_len, seq = buf.pull_header(_HEADER)
        kind = _KINDS.get(kind_raw)
        if kind is None:
            drops.unknown_kind += 1
            raise ParseError(f"relay kind {kind_raw}")
        try:
            envelope = _pull_body(buf, kind, flags, sender_len, recipient_len, seq)
        except ParseError:
            drops.malformed += 1
            raise
        if envelope.recipient != self.sender:
            drops.wrong_recipient += 1
            raise ParseError(f"relay envelope for {envelope.recipient!r}")
        self._check_replay(envelope.sender, seq)
        self.accepted += 1
        return envelope

    def _check_replay(self, sender: str, seq: int) -> None:
        now = self._clock()
        oldest = max(self._born, now - self._max_skew)
        if seq < oldest or seq > now + self._max_skew:
            self.drops.stale += 1
            raise ParseError(f"relay envelope from {sender!r} outside the clock window")
        senders = self._senders
        win = senders.get(sender)
        if win is None:
            if len(senders) >= self._max_senders:
                self._forget_silent_senders(now)
                if len(senders) >= self._max_senders:
                    self.drops.too_many_senders += 1
                    raise ParseError(f"relay sender {sender!r} over the sender limit")
            win = senders[sender] = _SenderWindow(oldest - 1)
        if not win.check(seq):
            self.drops.replayed += 1
            raise ParseError(f"relay envelope {seq} from {sender!r} replayed")
        win.add(seq, self._window)

    def _forget_silent_senders(self, now: int) -> None:
        # Whatever they sent is below now - max_skew, refused as stale without them.
        cutoff = now - self._max_skew
        for sender in [s for s, w in self._senders.items() if w.highest < cutoff]:
            del self._senders[sender]

    @property
    def senders_tracked(self) -> int:
        return len(self._senders)


def child_limit(spi_i: bytes, spi_r: bytes, spi_in: bytes, limit: int) -> bytes:
    """The body of a CHILD_LIMIT envelope (`limit`: LIMIT_SOFT, _HARD or _EXPIRED)."""
    if limit not in _LIMITS:
        raise ValueError(f"no such Child SA limit: {limit}")
    return spi_i + spi_r + spi_in + bytes([limit])


def parse_child_limit(data: bytes) -> tuple[bytes, bytes, bytes, int]:
    """(spi_i, spi_r, spi_in, limit) of a CHILD_LIMIT envelope's data."""
    return data[:8], data[8:16], data[16:20], data[20]


Traffic = tuple[int, int, int, int]  # bytes in, bytes out, packets in, packets out


def child_traffic(spi_i: bytes, spi_r: bytes, spi_in: bytes, traffic: Traffic) -> bytes:
    """The body of a CHILD_TRAFFIC or CHILD_USAGE envelope (for the IKE SA's RADIUS
    accounting)."""
    return _TRAFFIC.pack(spi_i, spi_r, spi_in, *traffic)


def parse_child_traffic(data: bytes) -> tuple[bytes, bytes, bytes, Traffic]:
    """(spi_i, spi_r, spi_in, traffic) of a CHILD_TRAFFIC or CHILD_USAGE envelope's data."""
    spi_i, spi_r, spi_in, *counts = _TRAFFIC.unpack(data)
    return spi_i, spi_r, spi_in, (counts[0], counts[1], counts[2], counts[3])


def child_active(spis_in: Sequence[bytes]) -> bytes:
    """The body of a CHILD_ACTIVE envelope (at most ACTIVE_MAX SPIs)."""
    return b"".join(spis_in)


def parse_child_active(data: bytes) -> list[bytes]:
    """The inbound SPIs of a CHILD_ACTIVE envelope's data."""
    return [data[at:at + 4] for at in range(0, len(data), 4)]


def _active_size_ok(size: int) -> bool:
    return 0 < size <= 4 * ACTIVE_MAX and size % 4 == 0


def overhead(sender: str, recipient: str, ipv6: bool = False) -> int:
    """Bytes an IKE_* envelope adds to the IKE message it carries."""
    address = _ADDR6.size if ipv6 else _ADDR4.size
    return _HEADER.size + len(sender.encode()) + len(recipient.encode()) + 2 * address + MAC_SIZE


def _encode_id(node_id: str) -> bytes:
    raw = node_id.encode()
    if not 1 <= len(raw) <= MAX_ID:
        raise ValueError(f"node id must be 1..{MAX_ID} bytes of UTF-8: {node_id!r}")
    return raw


def _push_address(buf: Buffer, address: Address) -> None:
    host, port = address
    try:
        if ":" in host:
            buf.push_bytes(_ADDR6.pack(6, socket.inet_pton(socket.AF_INET6, host), port))
        else:
            buf.push_bytes(_ADDR4.pack(4, socket.inet_pton(socket.AF_INET, host), port))
    except (OSError, struct.error) as exc:
        raise ValueError(f"not an IP address and port: {address!r}") from exc


def _pull_address(buf: Buffer) -> Address:
    family = buf.pull_uint8()
    if family == 4:
        raw = buf.pull_bytes(4)
        return socket.inet_ntop(socket.AF_INET, raw), buf.pull_uint16()
    if family == 6:
        raw = buf.pull_bytes(16)
        return socket.inet_ntop(socket.AF_INET6, raw), buf.pull_uint16()
    raise ParseError(f"address family {family}")


def _pull_id(buf: Buffer, length: int) -> str:
    if not 1 <= length <= MAX_ID:
        raise ParseError(f"node id of {length} bytes")
    try:
        return buf.pull_bytes(length).decode()
    except UnicodeDecodeError as exc:
        raise ParseError("node id is not UTF-8") from exc


def _pull_body(
    buf: Buffer, kind: Kind, flags: int, sender_len: int, recipient_len: int, seq: int
) -> Envelope:
    if flags & ~FLAG_KEEPALIVE or (flags and kind is not Kind.IKE_TO_PEER):
        raise ParseError(f"relay flags {flags:#x} on {kind.name}")
    sender = _pull_id(buf, sender_len)
    recipient = _pull_id(buf, recipient_len)
    if kind in _IKE_KINDS:
        local = _pull_address(buf)
        remote = _pull_address(buf)
        data = buf.pull_rest()
        if not data:
            raise ParseError(f"{kind.name} without a datagram")
        return Envelope(kind, sender, recipient, seq, data, local, remote,
                        keepalive=bool(flags & FLAG_KEEPALIVE))
    if kind in _FIXED_SIZES:
        data = buf.pull_bytes(_FIXED_SIZES[kind])
        if not buf.eof() or (kind is Kind.CHILD_LIMIT and data[-1] not in _LIMITS):
            raise ParseError(f"malformed {kind.name}")
        return Envelope(kind, sender, recipient, seq, data)
    if kind is Kind.CHILD_ACTIVE:
        data = buf.pull_rest()
        if not _active_size_ok(len(data)):
            raise ParseError("malformed CHILD_ACTIVE")
        return Envelope(kind, sender, recipient, seq, data)
    echo = buf.pull_uint64() if kind is Kind.PONG else 0
    if not buf.eof():
        raise ParseError(f"{buf.remaining} trailing bytes in {kind.name}")
    return Envelope(kind, sender, recipient, seq, echo=echo)
