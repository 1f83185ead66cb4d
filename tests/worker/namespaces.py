"""Network namespaces for the worker tests, and running a test body inside one.

The pytest process never changes its own namespace: `run_in_netns` forks a child,
which enters the namespace (`setns`) and runs the body; the body's return value
(or its traceback) comes back through a pipe. A body may enter a second namespace
itself: sockets stay in the namespace they were created in, so a capture socket
opened in the peer namespace keeps listening there after the switch.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import secrets
import shutil
import subprocess
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

IP = shutil.which("ip") or "/usr/sbin/ip"
T = TypeVar("T")


def require_netns() -> None:
    """Skip without root (fail instead when CI=true, so a broken CI cannot pass)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if not os.path.exists(IP):
        problems.append("iproute2 `ip` not found")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun missing")
    if problems:
        message = "worker tests need network namespaces: " + "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def unique_name() -> str:
    return f"ikw-{os.getpid()}-{secrets.token_hex(3)}"


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `ip` (in `netns` if given, else in the caller's namespace) and return stdout."""
    argv = [IP, *(("-n", netns) if netns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def ip_json(*args: str) -> Any:
    """`ip -j ...` in the caller's namespace, parsed ([] for empty output)."""
    out = ip("-j", *args)
    return json.loads(out) if out.strip() else []


@contextlib.contextmanager
def netns() -> Iterator[str]:
    """A fresh namespace with `lo` up, deleted afterwards whatever happens."""
    name = unique_name()
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", netns=name)
        yield name
    finally:
        ip("netns", "del", name, check=False)


@dataclass(frozen=True)
class Pair:
    """Two namespaces joined by a veth: `a` has .1 addresses, `b` has .2."""

    a: str
    b: str
    a_v4: str = "192.0.2.1"
    b_v4: str = "192.0.2.2"
    a_v6: str = "2001:db8:1::1"
    b_v6: str = "2001:db8:1::2"


@contextlib.contextmanager
def netns_pair() -> Iterator[Pair]:
    with netns() as a, netns() as b:
        pair = Pair(a, b)
        # Created inside `a` with the peer moved to `b`: no names in the host namespace.
        ip("link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b, netns=a)
        for ns, dev, v4, v6 in ((a, "va", pair.a_v4, pair.a_v6), (b, "vb", pair.b_v4, pair.b_v6)):
            ip("addr", "add", f"{v4}/24", "dev", dev, netns=ns)
            ip("addr", "add", f"{v6}/64", "dev", dev, "nodad", netns=ns)
            ip("link", "set", dev, "up", netns=ns)
        yield pair


def enter_netns(name: str) -> None:
    """Move the calling process into `name`. Only ever call this in a `run_in_netns` body."""
    from pyroute2.netns import setns

    setns(name, flags=0)


def run_in_netns(name: str, body: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
    """Run `body(*args)` in a forked child inside namespace `name`; return its result.

    An exception in the body is re-raised here as an AssertionError carrying the
    child's traceback, so failures read like ordinary test failures.
    """
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            enter_netns(name)
            outcome: tuple[str, Any] = ("ok", body(*args))
        except BaseException:
            outcome = ("error", traceback.format_exc())
        sender.send(outcome)

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"body {body.__name__} did not finish in {timeout} s")
        status, value = receiver.recv()
    finally:
        if proc.is_alive():
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join()
        receiver.close()
    if status == "error":
        raise AssertionError(f"in netns {name}:\n{value}")
    result: T = value
    return result
