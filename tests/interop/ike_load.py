"""Many IKE SAs from our own initiator, driven line by line (runs inside a lab namespace).

    python -m tests.interop.ike_load --config client.toml --local 10.99.0.1

reads one command per line on stdin and answers each with one JSON line on stdout:

    establish N CONCURRENCY TIMEOUT   start N new IKE SAs (Child SA in IKE_AUTH), at most
                                      CONCURRENCY in flight; when all ended or TIMEOUT s
                                      passed: {"established", "failed", "seconds", "spis"}
    liveness TIMEOUT                  one empty INFORMATIONAL request on every established
                                      SA, retransmitted by the session's own timers; when
                                      all are answered or gave up, or TIMEOUT s passed:
                                      {"asked", "answered", "failed", "unanswered",
                                       "retransmits", "seconds"}
    quit

Between commands the SAs stay served (datagrams answered, timers run), so they are live
peers, not frozen ones. The sessions are `cluster.ike.session.IkeSession` initiators with
the connection and secret of the config file (one connection, as `conn_pair` builds it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from cluster.config import load_config
from cluster.errors import ParseError
from cluster.ike.constants import ExchangeType
from cluster.ike.events import ExchangeCompleted, IkeSaDeleted, IkeSaFailed
from cluster.ike.message import peek_header_untrusted
from cluster.ike.policy import ConnectionConfig, ResponderPolicy
from cluster.ike.session import IkeSession
from cluster.ike.state import State


class Load:
    def __init__(self, connection: ConnectionConfig, policy: ResponderPolicy,
                 local: tuple[str, int], remote: tuple[str, int]) -> None:
        self.connection = connection
        self.policy = policy
        self.local = local
        self.remote = remote
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(local)
        self.sock.setblocking(False)
        self.sessions: dict[bytes, IkeSession] = {}  # by initiator SPI, until they close
        self.asking: set[bytes] = set()  # SAs whose liveness request is outstanding
        self.answered: set[bytes] = set()

    # -- the sans-IO plumbing ----------------------------------------------------------

    def flush(self, session: IkeSession) -> None:
        for datagram in session.datagrams_to_send():
            with contextlib.suppress(OSError):  # like a lost datagram: it is retransmitted
                self.sock.sendto(datagram.data, datagram.remote)

    def drain_events(self, session: IkeSession) -> None:
        while (event := session.next_event()) is not None:
            if isinstance(event, ExchangeCompleted) and not event.as_responder \
                    and event.exchange == ExchangeType.INFORMATIONAL \
                    and event.result == "ok" and session.spi_i in self.asking:
                self.asking.discard(session.spi_i)
                self.answered.add(session.spi_i)
            elif isinstance(event, IkeSaDeleted | IkeSaFailed):
                self.asking.discard(session.spi_i)

    def step(self, wait: float, extra: list[Any] | None = None) -> list[Any]:
        """Wait up to `wait` s for datagrams (or `extra` readers), serve them and the
        timers; the readable ones of `extra`."""
        readers: list[Any] = [self.sock, *(extra or [])]
        timers = [t for s in self.sessions.values() if (t := s.get_timer()) is not None]
        if timers:
            wait = max(0.0, min(wait, min(timers) - time.monotonic()))
        readable, _, _ = select.select(readers, [], [], wait)
        now = time.monotonic()
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            try:
                spi_i = peek_header_untrusted(data).spi_i
            except ParseError:
                continue
            session = self.sessions.get(spi_i)
            if session is None:
                continue
            session.receive_datagram_untrusted(data, self.local, addr, now)
            self.flush(session)
            self.drain_events(session)
        for session in list(self.sessions.values()):
            timer = session.get_timer()
            if timer is not None and timer <= now:
                session.handle_timer(now)
                self.flush(session)
                self.drain_events(session)
        return [r for r in readable if r is not self.sock]

    def run_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self.step(min(0.05, max(0.0, deadline - time.monotonic())))

    # -- the commands -------------------------------------------------------------------

    def establish(self, total: int, concurrency: int, timeout: float) -> dict[str, Any]:
        begin = time.monotonic()
        deadline = begin + timeout
        started: list[IkeSession] = []
        while time.monotonic() < deadline:
            in_flight = sum(1 for s in started if s.state not in (State.ESTABLISHED,
                                                                   State.CLOSED))
            while in_flight < concurrency and len(started) < total:
                session = IkeSession.initiator(self.connection, self.policy, os.urandom(8),
                                               self.local, self.remote, time.monotonic())
                self.sessions[session.spi_i] = session
                started.append(session)
                in_flight += 1
                self.flush(session)
            if len(started) == total and in_flight == 0:
                break
            self.step(0.05)
        established = [s for s in started if s.state is State.ESTABLISHED]
        return {"established": len(established),
                "failed": sum(1 for s in started if s.closed),
                "seconds": round(time.monotonic() - begin, 3),
                "spis": [[s.spi_i.hex(), s.spi_r.hex()] for s in established]}

    def liveness(self, timeout: float) -> dict[str, Any]:
        begin = time.monotonic()
        self.answered.clear()
        retransmits = sum(s.retransmits_sent for s in self.sessions.values())
        asked = []
        for session in self.sessions.values():
            if session.state is State.ESTABLISHED and session.check_liveness(begin):
                asked.append(session)
                self.asking.add(session.spi_i)
                self.flush(session)
        self.run_until(lambda: not self.asking, timeout)
        failed = [s.spi_i.hex() for s in asked
                  if s.spi_i not in self.answered and s.spi_i not in self.asking]
        return {"asked": len(asked), "answered": len(self.answered), "failed": failed,
                "unanswered": sorted(s.hex() for s in self.asking),
                "retransmits": sum(s.retransmits_sent for s in self.sessions.values())
                - retransmits,
                "seconds": round(time.monotonic() - begin, 3)}

    def forget_closed(self) -> None:
        for spi_i in [k for k, s in self.sessions.items() if s.closed]:
            del self.sessions[spi_i]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="our TOML with one connection")
    parser.add_argument("--local", required=True, help="address to send from")
    parser.add_argument("--port", type=int, default=500)
    args = parser.parse_args()
    config = load_config(args.config)
    connection = config.policy.connections[0]
    remote = (connection.remote_addrs[0], 500)
    load = Load(connection, config.policy, (args.local, args.port), remote)
    stdin = sys.stdin.buffer
    buffered = b""
    while True:
        if load.step(0.2, [stdin]):
            chunk = os.read(stdin.fileno(), 4096)
            if not chunk:
                return 0
            buffered += chunk
        while b"\n" in buffered:
            line, _, buffered = buffered.partition(b"\n")
            words = line.decode().split()
            if not words:
                continue
            if words[0] == "quit":
                return 0
            if words[0] == "establish":
                reply = load.establish(int(words[1]), int(words[2]), float(words[3]))
            elif words[0] == "liveness":
                reply = load.liveness(float(words[1]))
            else:
                reply = {"error": f"unknown command {words[0]!r}"}
            load.forget_closed()
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
