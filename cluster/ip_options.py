"""Per-send IP header options, shared by both roles' ESP senders (the responder's NAT-T
socket, the worker's raw ESP sockets), so neither imports the other."""

from __future__ import annotations

import socket
import struct

_INT = struct.Struct("=i")


def tos_ancillary(family: int, tos: int) -> tuple[int, int, bytes]:
    """The sendmsg control message that gives one send's IP header this TOS (IPv4) or
    traffic class (IPv6)."""
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _INT.pack(tos)
    return socket.IPPROTO_IP, socket.IP_TOS, _INT.pack(tos)
