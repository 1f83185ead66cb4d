"""A byte cursor for network codecs, in aioquic's pull/push shape.

Every `pull_*` raises `ParseError` (never `IndexError` or `struct.error`) when the
buffer is short, so callers that handle untrusted bytes need catch only one type.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ParseError


@functools.lru_cache(maxsize=4096)
def packed_address(text: str) -> bytes:
    """An IPv4 or IPv6 address in network byte order (4 or 16 bytes), parsed once per
    distinct text: peers and gateways recur on every SA. ValueError if not an address."""
    return ipaddress.ip_address(text).packed


_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class Buffer:
    """A read cursor over immutable bytes, or an append-only write buffer."""

    __slots__ = ("_data", "_end", "_out", "_pos")

    def __init__(self, data: bytes = b"", start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end
        self._out = bytearray()

    def sub(self, length: int) -> Buffer:
        """A cursor over the next `length` bytes, which this cursor skips."""
        pos = self._pos
        if length < 0 or pos + length > self._end:
            raise ParseError(f"block of {length} bytes overruns buffer")
        self._pos = pos + length
        return Buffer(self._data, pos, pos + length)

    # --- reading -----------------------------------------------------------
    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def eof(self) -> bool:
        return self._pos >= self._end

    def pull_bytes(self, n: int) -> bytes:
        if n < 0 or self._pos + n > self._end:
            raise ParseError(f"need {n} bytes, {self._end - self._pos} left")
        start = self._pos
        self._pos += n
        return self._data[start : self._pos]

    def pull_rest(self) -> bytes:
        return self.pull_bytes(self._end - self._pos)

    def pull_uint8(self) -> int:
        pos = self._pos
        if pos >= self._end:
            raise ParseError("need 1 byte, 0 left")
        self._pos = pos + 1
        return self._data[pos]

    def pull_uint16(self) -> int:
        pos = self._pos
        if pos + 2 > self._end:
            raise ParseError(f"need 2 bytes, {self._end - pos} left")
        self._pos = pos + 2
        data = self._data
        return (data[pos] << 8) | data[pos + 1]

    def pull_uint32(self) -> int:
        pos = self._pos
        if pos + 4 > self._end:
            raise ParseError(f"need 4 bytes, {self._end - pos} left")
        self._pos = pos + 4
        return int(_U32.unpack_from(self._data, pos)[0])

    def pull_uint64(self) -> int:
        pos = self._pos
        if pos + 8 > self._end:
            raise ParseError(f"need 8 bytes, {self._end - pos} left")
        self._pos = pos + 8
        return int(_U64.unpack_from(self._data, pos)[0])

    def pull_header(self, fmt: struct.Struct) -> tuple[int, ...]:
        """Several fixed-size fields at once."""
        pos = self._pos
        if pos + fmt.size > self._end:
            raise ParseError(f"need {fmt.size} bytes, {self._end - pos} left")
        self._pos = pos + fmt.size
        return fmt.unpack_from(self._data, pos)

    def pull_payload(self, fmt: struct.Struct, length_index: int) -> tuple[tuple[int, ...], Buffer]:
        """A header in `fmt` whose field `length_index` counts the header too, and a
        cursor over the rest of that block (which this cursor skips): a payload or
        substructure in one call."""
        pos = self._pos
        size = fmt.size
        if pos + size > self._end:
            raise ParseError(f"need {size} bytes, {self._end - pos} left")
        fields = fmt.unpack_from(self._data, pos)
        length = fields[length_index]
        if length < size or pos + length > self._end:
            raise ParseError(f"block of {length} bytes overruns buffer or its header")
        self._pos = pos + length
        return fields, Buffer(self._data, pos + size, pos + length)

    @contextmanager
    def pull_block(self, length: int) -> Iterator[None]:
        """Restrict reads to the next `length` bytes; all of them must be consumed."""
        if length < 0 or self._pos + length > self._end:
            raise ParseError(f"block of {length} bytes overruns buffer")
        saved_end = self._end
        self._end = self._pos + length
        try:
            yield
            if self._pos != self._end:
                raise ParseError(f"{self._end - self._pos} trailing bytes in block")
        finally:
            self._end = saved_end

    # --- writing -----------------------------------------------------------
    def push_bytes(self, v: bytes) -> None:
        self._out += v

    def push_uint8(self, v: int) -> None:
        self._out.append(v)

    def push_uint16(self, v: int) -> None:
        self._out += _U16.pack(v)

    def push_uint32(self, v: int) -> None:
        self._out += _U32.pack(v)

    def push_uint64(self, v: int) -> None:
        self._out += _U64.pack(v)

    def written(self) -> int:
        return len(self._out)

    def patch_uint16(self, offset: int, v: int) -> None:
        self._out[offset : offset + 2] = _U16.pack(v)

    def data(self) -> bytes:
        return bytes(self._out)
