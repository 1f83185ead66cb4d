"""Reading the TOS / traffic class a datagram arrived with (loopback and namespace tests)."""

from __future__ import annotations

import socket


def received_tos(sock: socket.socket) -> int | None:
    """The TOS / traffic class the next datagram arrived with (IP_RECVTOS and
    IPV6_RECVTCLASS must be on), None when it carries neither."""
    _, ancillary, _, _ = sock.recvmsg(4096, 64)
    for level, kind, data in ancillary:
        if (level, kind) == (socket.IPPROTO_IP, socket.IP_TOS):
            return data[0]
        if (level, kind) == (socket.IPPROTO_IPV6, socket.IPV6_TCLASS):
            return int.from_bytes(data[:4], "little")
    return None


def receiving_tos(sock: socket.socket) -> socket.socket:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    return sock

