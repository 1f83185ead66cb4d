"""Network namespaces and the processes started in them, for interop tests.

Every process is started through ``ip netns exec`` and tracked, so a test that fails
half-way still leaves no daemon and no namespace behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

IP = "/usr/sbin/ip"


class LabError(RuntimeError):
    """The lab could not be set up or a lab command failed."""


def run_host(argv: Sequence[str], *, timeout: float = 10.0) -> str:
    """Run a command in the host namespace, raising LabError with its output on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


class Netns:
    """One named network namespace; it owns the processes started in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[bytes]] = []

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in the namespace; output is captured as text."""
        proc = subprocess.run(
            self.exec_argv(argv), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"[{self.name}] {' '.join(argv)} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def ip(self, *args: str) -> str:
        return self.run([IP, *args]).stdout

    def spawn(
        self,
        argv: Sequence[str],
        *,
        output: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process with stdout and stderr going to ``output``."""
        with output.open("ab") as out:
            proc = subprocess.Popen(
                self.exec_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # a Ctrl-C in pytest must not hit it first
            )
        self.procs.append(proc)
        return proc

    def udp_ports_bound(self) -> set[int]:
        """Local UDP ports with a bound socket in this namespace (from ``ss``)."""
        out = self.run(["ss", "-H", "-u", "-l", "-n"]).stdout
        ports: set[int] = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                # Local address is "addr:port", "[v6]:port" or "*:port".
                with contextlib.suppress(ValueError):
                    ports.add(int(fields[3].rsplit(":", 1)[1]))
        return ports

    def pids(self) -> list[int]:
        out = subprocess.run(
            [IP, "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    return proc.returncode


def create_netns(name: str) -> Netns:
    run_host([IP, "netns", "add", name])
    ns = Netns(name)
    ns.ip("link", "set", "lo", "up")
    return ns


def destroy_netns(ns: Netns) -> None:
    """Stop what we started in ``ns``, kill anything left in it, delete it."""
    for proc in ns.procs:
        stop_process(proc)
    # Anything still inside is a child of ours (the namespace name is unique to this
    # lab), e.g. a swanctl that timed out.
    deadline = time.monotonic() + 5.0
    while (pids := ns.pids()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    subprocess.run([IP, "netns", "del", ns.name], capture_output=True, check=False)
