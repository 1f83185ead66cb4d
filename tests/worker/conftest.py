"""Fixtures for the worker's I/O tests: fresh network namespaces, always removed."""

from __future__ import annotations

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
