"""Several datagrams per system call: recvmmsg(2), which Python's socket module lacks.

A bulk ESP-in-UDP stream arrives as tens of thousands of datagrams a second, and one
`recvmsg` each costs about 1.8 us, most of it the system call and the objects Python
builds around it. `MessageBatch.receive` takes up to `slots` waiting datagrams in one
call (about 1.1 us each, measured on loopback with 1436-byte datagrams) and builds
nothing but the payloads; a datagram's source and ancillary data are decoded only
when asked for (IKE, rare next to ESP).

The kernel writes into buffers this object owns: one bytearray per kind (headers,
iovecs, payload slots, addresses, control data), exported to ctypes so they cannot be
resized or moved while it lives. Every slot takes a whole datagram (65535 bytes), so
the kernel never truncates; a message flagged MSG_TRUNC all the same is delivered
empty, for the caller to count as malformed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
from typing import Any, Literal

Address = tuple[str, int]
Ancillary = list[tuple[int, int, bytes]]

SLOT_SIZE = 65535
CONTROL_SIZE = 128  # pktinfo (IPv6: 40), a UDP_GRO segment size and the TOS (24 each)
NAME_SIZE = 28  # struct sockaddr_in6
# plain ints: the socket module's are enum members, and their `&` costs microseconds
MSG_TRUNC = int(getattr(socket, "MSG_TRUNC", 0x20))
MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0x40))
# linux/udp.h: a UDP_GRO socket gets coalesced datagrams with their size as an int
SOL_UDP = 17
UDP_GRO = 104
# IP_RECVTOS / IPV6_RECVTCLASS: every datagram brings its TOS (a byte) or traffic class
# (an int) as the last control message, 24 bytes, the value 16 bytes in
IP_RECVTOS = 13
IP_TOS = 1
TOS_SPACE = 24
# where, counted from the end of the control data, the TOS byte lies
_TOS_BYTE = -8 if sys.byteorder == "little" else -5


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


_HEADER = ctypes.sizeof(_Mmsghdr)
_Format = Literal["i", "I", "Q"]
_SIZE_T: _Format = "Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "I"
# what the kernel fills in per message (control length, flags, payload length), each
# read as a strided view over the headers: (format, index in units of its size)
_CONTROL_LENGTH: tuple[_Format, int] = (
    _SIZE_T, _Msghdr.controllen.offset // ctypes.sizeof(ctypes.c_size_t))
_FLAGS: tuple[_Format, int] = ("i", _Msghdr.flags.offset // 4)
_LENGTH: tuple[_Format, int] = ("I", _Mmsghdr.len.offset // 4)
_CMSG = struct.Struct(f"={_SIZE_T}ii")  # struct cmsghdr: length, level, type
_ALIGN = ctypes.sizeof(ctypes.c_size_t)
_SOCKADDR_IN = struct.Struct("!2xH4s")  # family (host order, skipped), port, address
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flow info, address, scope
_FAMILY = struct.Struct("=H")
_INT = struct.Struct("=i")


def _load_recvmmsg() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                         ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


_recvmmsg = _load_recvmmsg()


def available() -> bool:
    """recvmmsg exists here (Linux, any libc that exports it)."""
    return _recvmmsg is not None


def _address_of(buffer: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


class MessageBatch:
    """Receive buffers for up to `slots` datagrams of one non-blocking socket.

    `plain_control` is the ancillary data every datagram brings (a wildcard socket's
    pktinfo, the TOS): a datagram with more may carry a UDP_GRO segment size, and is
    then split into the datagrams it coalesced, as the kernel would have delivered them.
    With `tos` (the socket asked for IP_RECVTOS or IPV6_RECVTCLASS) `outer_tos` names
    the datagrams whose IP header carried a TOS / traffic class other than 0.
    """

    def __init__(self, sock: socket.socket, slots: int = 64, plain_control: int = 0,
                 tos: bool = False) -> None:
        if _recvmmsg is None:
            raise OSError(errno.ENOSYS, "recvmmsg is not available")
        self.sock = sock
        self.slots = slots
        self.plain_control = plain_control
        self._payloads = bytearray(slots * SLOT_SIZE)
        self._view = memoryview(self._payloads)
        self._names = bytearray(slots * NAME_SIZE)
        self._controls = bytearray(slots * CONTROL_SIZE)
        self._iovecs = bytearray(slots * ctypes.sizeof(_Iovec))
        self._headers = bytearray(slots * _HEADER)
        self._template = bytearray(len(self._headers))
        payloads = _address_of(self._payloads)
        names = _address_of(self._names)
        controls = _address_of(self._controls)
        iovecs = (_Iovec * slots).from_buffer(self._iovecs)
        template = (_Mmsghdr * slots).from_buffer(self._template)
        for i in range(slots):
            iovecs[i].base = payloads + i * SLOT_SIZE
            iovecs[i].len = SLOT_SIZE
            hdr = template[i].hdr
            hdr.name = names + i * NAME_SIZE
            hdr.namelen = NAME_SIZE
            hdr.iov = ctypes.addressof(iovecs[i])
            hdr.iovlen = 1
            hdr.control = controls + i * CONTROL_SIZE
            hdr.controllen = CONTROL_SIZE
        self._headers_at = _address_of(self._headers)
        self._control_lengths_view = self._field(_CONTROL_LENGTH)
        self._flags_view = self._field(_FLAGS)
        self._lengths_view = self._field(_LENGTH)
        self._offsets = range(0, slots * SLOT_SIZE, SLOT_SIZE)
        self._fd = sock.fileno()
        self._origin: list[int] | None = None  # message of each datagram, after a split
        self.tos = tos
        self._tos: dict[int, int] | None = None  # message -> its TOS if not 0, last receive
        self.truncated = 0  # datagrams that did not fit a slot (delivered empty)

    def _field(self, field: tuple[_Format, int]) -> memoryview:
        """One field of every header, as a view (index i: the ith message's)."""
        kind, index = field
        view: memoryview = memoryview(self._headers).cast("B").cast(kind)
        step = _HEADER // struct.calcsize(kind)
        return view[index::step]

    def receive(self) -> list[bytes]:
        """The datagrams waiting, up to `slots` messages; [] when none is. OSError for
        a socket error (e.g. ECONNREFUSED queued from an ICMP error for an earlier
        send). A truncated message comes back empty, for the caller to count."""
        headers = self._headers
        headers[:] = self._template  # the kernel overwrote the name and control lengths
        count = _recvmmsg(self._fd, self._headers_at, self.slots, MSG_DONTWAIT, None)
        if count <= 0:
            code = ctypes.get_errno() if count < 0 else 0
            if count == 0 or code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return []
            raise OSError(code, os.strerror(code))
        view = self._view
        self._origin = None
        lengths = self._lengths_view[:count].tolist()
        datagrams = [view[at:at + length].tobytes()
                     for at, length in zip(self._offsets[:count], lengths, strict=True)]
        control_lengths = self._control_lengths_view[:count].tolist()
        if self.tos:
            self._tos = self._tos_marks(control_lengths)
        # more ancillary data than every datagram brings (a GRO segment size), or flags
        if max(control_lengths) > self.plain_control or any(self._flags_view[:count]):
            self._special(datagrams, lengths)
        return datagrams

    def outer_tos(self) -> dict[int, int] | None:
        """The datagrams of the last receive whose IP header carried a TOS / traffic
        class other than 0, by index, with it; None if none did (or the batch was not
        made with `tos`)."""
        marks = self._tos
        if marks is None or self._origin is None:
            return marks
        return {k: marks[i] for k, i in enumerate(self._origin) if i in marks}

    def _tos_marks(self, control_lengths: list[int]) -> dict[int, int] | None:
        controls = self._controls
        count = len(control_lengths)
        first = control_lengths[0]
        if first == self.plain_control >= TOS_SPACE and control_lengths.count(first) == count:
            # the common case, every message with just the control data each brings (the
            # TOS last): one strided slice holds each one's TOS byte
            values = controls[first + _TOS_BYTE:count * CONTROL_SIZE:CONTROL_SIZE]
            if values.count(0) == count:
                return None
            return {i: tos for i, tos in enumerate(values) if tos}
        # (the kernel puts the TOS after a UDP_GRO segment size too, so the same byte
        # finds the candidates; their control data is then read properly)
        candidates = [i for i, length in enumerate(control_lengths) if length >= TOS_SPACE
                      and controls[i * CONTROL_SIZE + length + _TOS_BYTE]]
        marks: dict[int, int] = {}
        for i in candidates:
            for level, kind, payload in self._ancillary(i, control_lengths[i]):
                if (level, kind) in ((socket.IPPROTO_IP, IP_TOS),
                                     (socket.IPPROTO_IPV6, socket.IPV6_TCLASS)) and payload:
                    tos = payload[0 if len(payload) == 1 or sys.byteorder == "little"
                                  else len(payload) - 1]
                    if tos:
                        marks[i] = tos
        return marks or None

    def _special(self, datagrams: list[bytes], lengths: list[int]) -> None:
        """Truncated messages made empty, coalesced ones split."""
        view = self._view
        plain = self.plain_control
        received = list(datagrams)
        datagrams.clear()
        origin: list[int] | None = None
        flags = self._flags_view
        controls = self._control_lengths_view[:len(received)]
        for i, (data, control) in enumerate(zip(received, controls, strict=True)):
            length = lengths[i]
            if flags[i] & MSG_TRUNC:
                self.truncated += 1
                data = b""
            elif control > plain:
                segment = self._gro_segment(i, control)
                if 0 < segment < length:
                    if origin is None:
                        origin = self._origin = list(range(len(datagrams)))
                    at = i * SLOT_SIZE
                    for part in range(at, at + length, segment):
                        datagrams.append(view[part:min(part + segment, at + length)].tobytes())
                        origin.append(i)
                    continue
            datagrams.append(data)
            if origin is not None:
                origin.append(i)

    def _message(self, k: int) -> int:
        return k if self._origin is None else self._origin[k]

    def ancillary(self, k: int) -> Ancillary:
        """The ancillary data of the `k`th datagram of the last receive, decoded."""
        i = self._message(k)
        return self._ancillary(i, self._control_lengths_view[i])

    def _ancillary(self, i: int, length: int) -> Ancillary:
        controls = self._controls
        base = i * CONTROL_SIZE
        found: Ancillary = []
        at = 0
        while at + _CMSG.size <= length:
            size, level, kind = _CMSG.unpack_from(controls, base + at)
            if size < _CMSG.size or at + size > length:
                break
            found.append((level, kind, bytes(controls[base + at + _CMSG.size:base + at + size])))
            at += (size + _ALIGN - 1) & ~(_ALIGN - 1)
        return found

    def _gro_segment(self, i: int, length: int) -> int:
        """The size of each datagram the `i`th message coalesced (0: not coalesced)."""
        for level, kind, payload in self._ancillary(i, length):
            if level == SOL_UDP and kind == UDP_GRO and len(payload) >= _INT.size:
                size: int = _INT.unpack_from(payload)[0]
                return size if size > 0 else 0
        return 0

    def source(self, k: int) -> Address:
        """Where the `k`th datagram of the last receive came from."""
        at = self._message(k) * NAME_SIZE
        family = _FAMILY.unpack_from(self._names, at)[0]
        if family == socket.AF_INET6:
            port, _flow, address, scope = _SOCKADDR_IN6.unpack_from(self._names, at)
            host = socket.inet_ntop(socket.AF_INET6, address)
            if scope:  # a link-local peer: as recvfrom names it, with its interface
                try:
                    host = f"{host}%{socket.if_indextoname(scope)}"
                except OSError:
                    host = f"{host}%{scope}"
            return (host, port)
        port, address = _SOCKADDR_IN.unpack_from(self._names, at)
        return (socket.inet_ntop(socket.AF_INET, address), port)
