"""Reassembly of IKE fragments (RFC 7383 2.6) and the size we fragment to (2.5.1).

Sending is `SkProtection.protect_fragments` in `message.py`; this module holds the
receiving side, one `Reassembler` per message being collected, and the size limits.
The session decides which message IDs it accepts and when to give up (it passes `now`
and asks `expired`); the Reassembler only ever holds fragments that authenticated.
"""

from __future__ import annotations

from ..errors import ParseError
from ..wire import Buffer
from .message import Decoded, SkProtection
from .payloads import Payload, pull_payloads_untrusted

# Sizes of the whole IP datagram a fragment travels in. RFC 7383 2.5.1 names 1280 (the
# IPv6 minimum MTU) and 576 (the IPv4 datagram every host must accept) as safe values when
# the path MTU is unknown; strongSwan's charon.fragment_size defaults to 1280 for both
# families (576 for IPv4 only when it is set to 0). We match strongSwan, so both ends of
# an interop test fragment alike and no 1280-byte path needs IP fragmentation.
DEFAULT_FRAGMENT_SIZE_V4 = 1280
DEFAULT_FRAGMENT_SIZE_V6 = 1280
MIN_FRAGMENT_SIZE_V4 = 576  # RFC 791: the smallest datagram an IPv4 host must take

_UDP_HEADER = 8
_NON_ESP_MARKER = 4  # RFC 3948 2.2: IKE on port 4500 starts with four zero bytes


def ike_message_limit(datagram_size: int, *, ipv6: bool, non_esp_marker: bool) -> int:
    """The IKE message bytes that fit in an IP datagram of `datagram_size` bytes.

    Assumes no IP options or extension headers, as strongSwan does.
    """
    overhead = (40 if ipv6 else 20) + _UDP_HEADER + (_NON_ESP_MARKER if non_esp_marker else 0)
    return datagram_size - overhead


class Reassembler:
    """Collects the fragments of one message (one message ID, one direction).

    `add_untrusted` checks a fragment's ICV before it changes anything, so a forged fragment
    leaves no trace here (it is counted in `integrity_failures`). Authentic fragments
    that are not kept (duplicates, or a stale Total Fragments) are counted in `discarded`.
    Memory is bounded by `max_fragments` and `max_bytes` of plaintext.
    """

    def __init__(self, *, max_fragments: int = 64, max_bytes: int = 64 * 1024) -> None:
        self.max_fragments = max_fragments
        self.max_bytes = max_bytes
        self.message_id: int | None = None
        self.started_at: float | None = None
        self.integrity_failures = 0
        self.discarded = 0
        self._key: tuple[int, int, int] | None = None  # message ID, exchange, flags
        self._total = 0
        self._chunks: dict[int, bytes] = {}
        self._bytes = 0
        self._first_type = 0

    @property
    def collecting(self) -> bool:
        """Whether fragments of an incomplete message are held."""
        return self._key is not None

    @property
    def received(self) -> int:
        return len(self._chunks)

    @property
    def held_bytes(self) -> int:
        """Plaintext bytes held for the message being collected."""
        return self._bytes

    @property
    def total(self) -> int:
        """Total Fragments of the message being collected; 0 when idle."""
        return self._total

    def reset(self) -> None:
        """Forget the message being collected (the counters stay)."""
        self.message_id = None
        self.started_at = None
        self._key = None
        self._total = 0
        self._chunks = {}
        self._bytes = 0
        self._first_type = 0

    def expired(self, now: float, timeout: float) -> bool:
        """Whether the message being collected has waited `timeout` seconds or more."""
        return self.started_at is not None and now - self.started_at >= timeout

    def add_untrusted(self, sk: SkProtection, data: bytes, decoded: Decoded,
                      now: float | None = None) -> list[Payload] | None:
        """Take one fragment message; the inner payloads once the last one arrived.

        None means "not complete yet", including when this fragment was dropped: a bad
        ICV (RFC 7383 2.6: drop silently), a duplicate, or a fragment of an older split.
        A fragment of another message (message ID, exchange or flags differ) or with a
        larger Total Fragments (the sender re-fragmented smaller, RFC 7383 2.5.2) starts
        the collection again; `now`, if given, becomes `started_at` then. Exceeding a
        bound or a malformed result raises ParseError.
        """
        number, total = decoded.fragment_number, decoded.total_fragments
        if not 1 <= number <= total:
            raise ParseError(f"fragment number {number} of {total}")
        if total > self.max_fragments:  # before any work, and no state changes
            raise ParseError(f"{total} fragments exceed the limit of {self.max_fragments}")
        chunk = sk.unprotect_fragment_untrusted(data, decoded)
        if chunk is None:
            self.integrity_failures += 1
            return None
        header = decoded.header
        key = (header.message_id, header.exchange, header.flags)
        if key != self._key or total > self._total:
            self.reset()
            self._key, self._total = key, total
            self.message_id = header.message_id
            self.started_at = now
        elif total < self._total:  # RFC 7383 2.6: a fragment of the older, coarser split
            self.discarded += 1
            return None
        if number in self._chunks:
            self.discarded += 1
            return None
        if self._bytes + len(chunk) > self.max_bytes:
            self.reset()
            raise ParseError(f"fragmented message exceeds {self.max_bytes} bytes")
        self._chunks[number] = chunk
        self._bytes += len(chunk)
        if number == 1:  # RFC 7383 2.5: only fragment 1 names the first inner payload
            self._first_type = decoded.sk_first
        if len(self._chunks) < self._total:
            return None
        plain = b"".join(self._chunks[n] for n in range(1, self._total + 1))
        first = self._first_type
        self.reset()
        payloads, nested = pull_payloads_untrusted(Buffer(plain), first)
        if nested:
            raise ParseError("SK payload inside a fragmented message")
        return payloads

