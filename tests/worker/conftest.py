"""Fixtures for the worker's I/O tests: fresh network namespaces, always removed."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from .namespaces import Pair, netns, netns_pair, require_netns


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh network namespace (root only; fails under CI=true without root)."""
    require_netns()
    with netns() as name:
        yield name


@pytest.fixture
def pair() -> Iterator[Pair]:
    """Two namespaces joined by a veth pair, IPv4 and IPv6 on both ends."""
    require_netns()
    with netns_pair() as the_pair:
        yield the_pair


@pytest.fixture
def tun_pair() -> Iterator[tuple[int, int]]:
    """A message-preserving pair: what the data plane writes to the TUN, read back."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    b.setblocking(False)
    with a, b:
        yield a.fileno(), b.fileno()
