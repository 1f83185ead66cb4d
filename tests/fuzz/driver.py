"""Drive a whole responder node with mutated datagrams, then check it is still sound.

`run_fuzz(options)` starts `run_node` in-process on loopback (random ports, both
families, `block_threshold = 0`), brings up real SAs with our own initiator to hold
keys for, and sends bursts from `strategies.ShotMaker` from several source ports (and
spoofed loopback sources through `Supervisor.route_untrusted`) until a datagram count
or a time is reached. Sending is paced by what the node has read, so the kernel drops
nothing and every datagram is handled. SAs the fuzz ends (deleted, rekeyed away, failed
authentication) are replaced; now and then the node is made to start a request towards
one of them (rekey, delete, liveness check) so that its response handling is fuzzed too.

Afterwards it waits one half-open timeout for the tables to drain, measures RSS, checks
a liveness exchange on an SA that existed throughout (the "witness", which saw only
unauthenticated garbage on its SPIs) and completes fresh handshakes over IPv4 and IPv6.
`FuzzReport.problems()` lists every way the run failed the issue's proof: an exception
in an actor or the router, an error logged, tables not back to their bounds, RSS grown
beyond the limit, or a legitimate exchange that no longer works.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import random
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from cluster.config import DosConfig, NodeConfig
from cluster.ike.constants import NON_ESP_MARKER, ExchangeType, NotifyType, ProtocolId
from cluster.ike.events import Event, ExchangeCompleted
from cluster.ike.message import SkProtection, decode_untrusted
from cluster.ike.payloads import NotifyPayload, encode_payloads, type_of
from cluster.ike.policy import ConnectionConfig, Lifetime, ResponderPolicy, Retransmission
from cluster.ike.proposals import parse_proposal
from cluster.ike.session import IkeSession
from cluster.runtime.node import Node, run_node
from cluster.runtime.supervisor import NOTIFY_BUCKETS_MAX
from tests.ike.sessions import client_for, psk_connection, psk_policy
from tests.ike.test_fuzz import GW_PROPOSALS
from tests.runtime.conftest import free_port_pair
from tests.runtime.initiator_peer import InitiatorPeer

from .mutations import Chain, SaKeys, load_seeds
from .strategies import Cookie, LiveSa, Shot, ShotMaker

# the responder accepts the recordings' proposals and one CBC+HMAC suite of ours
NODE_PROPOSALS = (*GW_PROPOSALS, "aes128-sha256-x25519")
CLIENT_PROPOSALS = ("aes256gcm16-prfsha256-x25519", "aes128-sha256-x25519")
# Our peers' addresses, apart from the fuzz sockets' 127.0.0.1. Several: replacing SAs
# the fuzz ended can need more than notify_rate cookies a second from one address.
LEGIT_HOSTS = tuple(f"127.0.2.{n}" for n in range(1, 17))
RING = 512  # recent datagrams kept to name the input behind a failure


@dataclass(frozen=True)
class FuzzOptions:
    seed: int = 1
    datagrams: int | None = 20_000  # stop after this many; None: after `seconds`
    seconds: float | None = None
    cookie_threshold: int = 1_000_000  # "high": never ask for cookies
    half_open_timeout: float = 2.0
    # The node's own requests (liveness checks, rekeys) put responses on the menu too;
    # SAs nobody answers for are given up after a few short retransmissions, so the SAs
    # the fuzz leaves behind do not pile up in a long run.
    dpd_delay: float = 2.0
    ike_rekey_time: float = 3.0
    child_rekey_time: float = 1.5
    retransmission: Retransmission = field(
        default_factory=lambda: Retransmission(timeout=0.5, base=1.5, tries=3))
    sockets_v4: int = 6
    sockets_v6: int = 2
    live_sas: int = 4  # established SAs we keep keys for (replaced when the fuzz ends one)
    half_open_sas: int = 2  # half-open ones, for IKE_AUTH
    window: int = 128  # datagrams sent but not yet read by the node
    stall_rate: float = 0.0005  # chance per burst of blocking the event loop for a moment
    rss_limit: int = 96 << 20
    progress_every: float = 0.0  # seconds between `progress` calls; 0: never
    progress: Callable[[dict[str, int]], None] | None = None
    weights: dict[str, int] | None = None


@dataclass
class FuzzReport:
    options: FuzzOptions
    datagrams: int = 0  # sent: through sockets and spoofed
    spoofed: int = 0
    seconds: float = 0.0
    strategies: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)  # the node's counters at the end
    events: dict[str, int] = field(default_factory=dict)
    sas_created: int = 0  # every SA our initiator started (witness, live, half-open, final)
    handshake_failures: int = 0  # of the ones started during the run
    handshake_errors: Counter[str] = field(default_factory=Counter)
    provoked: int = 0  # requests we made the node start towards our SAs
    stalls: int = 0  # times we blocked the event loop
    unread: int = 0  # datagrams the node had not read when the pacing gave up waiting
    maxima: dict[str, int] = field(default_factory=dict)  # sampled during the run
    settled: dict[str, int] = field(default_factory=dict)  # after a half-open timeout
    rss_before: int = 0
    rss_after: int = 0
    errors: list[str] = field(default_factory=list)  # logged errors with tracebacks
    suspects: list[str] = field(default_factory=list)  # datagrams to the failing SAs
    witness_alive: bool = False
    final_handshakes: dict[str, str] = field(default_factory=dict)  # host -> "ok" / error

    def problems(self) -> list[str]:
        found: list[str] = []
        stats = self.stats
        if stats.get("actor_failures", 0):
            found.append(f"{stats['actor_failures']} exceptions escaped actors")
        if stats.get("dropped_route_error", 0):
            found.append(f"{stats['dropped_route_error']} exceptions escaped the router")
        if self.errors:
            found.append(f"{len(self.errors)} errors logged, the first:\n{self.errors[0]}")
        if self.maxima.get("notify_buckets", 0) > NOTIFY_BUCKETS_MAX:
            found.append(f"notify buckets reached {self.maxima['notify_buckets']}")
        settled = self.settled
        for name in ("half_open_count", "half_open_hosts", "expiry_queue_length"):
            if settled.get(name, -1) != 0:
                found.append(f"{name} is {settled.get(name)} a half-open timeout later")
        if settled.get("actor_count", 0) > 2 * self.sas_created:  # 2: an SA and its rekey
            found.append(f"{settled['actor_count']} actors for {self.sas_created} SAs")
        if self.rss_after - self.rss_before > self.options.rss_limit:
            found.append(f"RSS grew by {(self.rss_after - self.rss_before) >> 20} MiB")
        if not self.witness_alive:
            found.append("the SA established before the run no longer answers")
        for host, result in self.final_handshakes.items():
            if result != "ok":
                found.append(f"a new handshake from {host} failed: {result}")
        if not self.final_handshakes:
            found.append("no handshake after the run")
        return found

    def summary(self) -> str:
        lines = [f"{self.datagrams} datagrams ({self.spoofed} spoofed) in {self.seconds:.1f} s,"
                 f" seed {self.options.seed}, cookie_threshold {self.options.cookie_threshold}"]
        lines.append("strategies: " + " ".join(f"{k}={v}" for k, v in
                                               sorted(self.strategies.items())))
        lines.append("node: " + " ".join(f"{k}={v}" for k, v in self.stats.items() if v))
        lines.append("events: " + " ".join(f"{k}={v}" for k, v in sorted(self.events.items())))
        lines.append(f"SAs we started: {self.sas_created}, node requests provoked:"
                     f" {self.provoked}, loop stalls: {self.stalls}, failed during the run:"
                     f" {self.handshake_failures} {dict(self.handshake_errors)},"
                     f" unread at pacing timeouts: {self.unread}")
        lines.append("maxima: " + " ".join(f"{k}={v}" for k, v in self.maxima.items()))
        lines.append("settled: " + " ".join(f"{k}={v}" for k, v in self.settled.items()))
        lines.append(f"RSS {self.rss_before >> 20} -> {self.rss_after >> 20} MiB")
        lines.append(f"witness SA alive: {self.witness_alive}; new handshakes: "
                     + " ".join(f"{h}={r}" for h, r in self.final_handshakes.items()))
        return "\n".join(lines)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def node_config(options: FuzzOptions) -> NodeConfig:
    ike_port, natt_port = free_port_pair()
    gateway = psk_connection(proposals=NODE_PROPOSALS)
    gateway = replace(gateway, dpd_delay=options.dpd_delay,
                      lifetime=Lifetime(options.ike_rekey_time),
                      children=tuple(replace(c, lifetime=Lifetime(options.child_rekey_time))
                                     for c in gateway.children))
    policy = replace(psk_policy(gateway), half_open_timeout=options.half_open_timeout,
                     retransmission=options.retransmission)
    return NodeConfig(
        node_id="fuzz", addresses=("127.0.0.1", "::1"), policy=policy, source="tests/fuzz",
        ike_port=ike_port, natt_port=natt_port,
        dos=DosConfig(cookie_threshold=options.cookie_threshold, block_threshold=0),
    )


def client(gateway: ConnectionConfig, client_id: str,
           proposal: str) -> tuple[ConnectionConfig, ResponderPolicy]:
    conn = replace(client_for(gateway, client_id), dpd_delay=0.0, lifetime=Lifetime(0.0),
                   proposals=(parse_proposal(proposal, ProtocolId.IKE, True),))
    conn = replace(conn, children=tuple(replace(c, lifetime=Lifetime(0.0))
                                        for c in conn.children))
    return conn, psk_policy(conn)


class ErrorLog(logging.Handler):
    """Collects what the node logs at ERROR: escaped exceptions, with their tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class EventCounter(Counter[str]):
    """The node's event sink: SA events by type, exchanges we answered by result."""

    def __call__(self, event: Event) -> None:
        name = type(event).__name__
        if isinstance(event, ExchangeCompleted):
            # answered by us, or (":ours") a request of ours that the peer answered
            name = f"{_exchange_name(event.exchange)}:{event.result}"
            if not event.as_responder:
                name += ":ours"
        self[name] += 1


def _exchange_name(exchange: int) -> str:
    try:
        return ExchangeType(exchange).name
    except ValueError:
        return str(exchange)


class Fuzzer:
    def __init__(self, node: Node, config: NodeConfig, options: FuzzOptions,
                 events: EventCounter) -> None:
        self.node = node
        self.config = config
        self.options = options
        self.report = FuzzReport(options)
        self.rng = random.Random(options.seed)
        self.gateway = config.policy.connections[0]
        self.servers = {socket.AF_INET: ("127.0.0.1", config.ike_port),
                        socket.AF_INET6: ("::1", config.ike_port)}
        self.sockets: list[socket.socket] = []
        self.live: list[LiveSa] = []
        self.witness: InitiatorPeer | None = None  # its SA only sees unauthenticated bytes
        self.witnesses: list[LiveSa] = []
        self.cookies: deque[Cookie] = deque(maxlen=64)
        self.requests: dict[bytes, tuple[bytes, int]] = {}  # our floods' SPIs -> request
        self.ring: deque[tuple[int, Shot]] = deque(maxlen=RING)
        self.maker = ShotMaker(self.rng, load_seeds(), options.sockets_v4 + options.sockets_v6,
                               options.weights)
        self.events = events
        self._proposal = 0
        self._legit = 0

    # --- our own peers -------------------------------------------------------------------

    async def open_peer(self, host: str, client_id: str) -> InitiatorPeer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        proposal = CLIENT_PROPOSALS[self._proposal % len(CLIENT_PROPOSALS)]
        # every third peer pretends to be behind a NAT (strongSwan's encap): the node
        # then follows it to whatever address its authenticated messages come from
        encap = self._proposal % 3 == 2 and client_id == "fuzz.example.test"
        self._proposal += 1
        conn, policy = client(self.gateway, client_id, proposal)
        conn = replace(conn, encap=encap)
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        await sock.bind((host, 0))
        name = sock.getsockname()
        session = IkeSession.initiator(conn, policy, secrets.token_bytes(8), (name[0], name[1]),
                                       self.servers[family], trio.current_time(),
                                       natt_ports=(name[1], self.config.natt_port))
        self.report.sas_created += 1
        return InitiatorPeer(sock, session, self.config.natt_port)

    def legit_host(self) -> str:
        self._legit += 1
        return LEGIT_HOSTS[self._legit % len(LEGIT_HOSTS)]

    async def establish(self, host: str, client_id: str) -> tuple[InitiatorPeer, LiveSa]:
        peer = await self.open_peer(host, client_id)
        try:
            await peer.establish(timeout=10)
        except BaseException:
            peer.close()
            raise
        sa = LiveSa(SaKeys.of(peer.session), None, tuple(peer.session.sa.children),
                    established=True)
        return peer, sa

    async def half_open(self, host: str) -> LiveSa:
        """IKE_SA_INIT only; the IKE_AUTH our initiator would send is kept, not sent."""
        peer = await self.open_peer(host, "fuzz.example.test")
        session = peer.session
        try:
            with trio.fail_after(10):
                while True:
                    await peer.flush()  # the request, a COOKIE retry or a retransmission
                    timer = session.get_timer()
                    data: bytes | None = None
                    with trio.move_on_at(math.inf if timer is None else timer):
                        data, addr = await peer.sock.recvfrom(65535)
                    if data is None:
                        session.handle_timer(trio.current_time())
                        continue
                    session.receive_datagram_untrusted(data, peer.local, (addr[0], addr[1]),
                                                       trio.current_time())
                    if session.closed:
                        raise RuntimeError(f"IKE_SA_INIT refused: {session.last_error}")
                    if session.sa.sk is not None:
                        break
        finally:
            peer.close()
        sa = peer.session.sa
        [auth] = peer.session.datagrams_to_send()
        assert sa.keys is not None and sa.chosen is not None
        mirror = SkProtection(sa.chosen.encr, sa.chosen.integ, sa.keys.sk_er, sa.keys.sk_ar,
                              sa.keys.sk_ei, sa.keys.sk_ai)
        payloads = mirror.unprotect_untrusted(auth.data, decode_untrusted(auth.data))
        assert payloads
        chain = Chain(type_of(payloads[0]), encode_payloads(payloads), ExchangeType.IKE_AUTH)
        return LiveSa(SaKeys.of(peer.session), chain, (sa.pending_child_spi,))

    async def replenish(self) -> None:
        """At most one new SA per call: keep `live_sas` established and some half-open."""
        established = sum(sa.established for sa in self.live)
        try:
            if established < self.options.live_sas:
                peer, sa = await self.establish(self.legit_host(), "fuzz.example.test")
                peer.close()
                self.live.append(sa)
            elif len(self.live) - established < self.options.half_open_sas:
                self.live.append(await self.half_open(self.legit_host()))
        except (trio.TooSlowError, RuntimeError, AssertionError) as exc:
            self.report.handshake_failures += 1
            self.report.handshake_errors[f"{type(exc).__name__}: {exc}"[:120]] += 1

    def refresh(self) -> None:
        """What the responder holds for each SA: gone, established, next ID, pending."""
        if self.witness is not None and self.witnesses \
                and self.witnesses[0].keys.spi_r != self.witness.session.spi_r:
            self.witnesses[0] = LiveSa(SaKeys.of(self.witness.session), None)  # rekeyed
        kept = []
        for sa in self.live:
            actor = self.node.supervisor.actor_for(sa.keys.spi_r)
            session = actor.session if actor is not None else None
            if not isinstance(session, IkeSession) or session.closed \
                    or session.sa.spi_i != sa.keys.spi_i or session.sa.spi_r != sa.keys.spi_r:
                continue  # deleted, failed, expired or rekeyed away
            ike = session.sa
            sa.established = actor is not None and actor.established
            sa.next_id = ike.peer_next_id
            sa.pending = (ike.pending.exchange, ike.pending.message_id) if ike.pending else None
            kept.append(sa)
        self.live = kept

    def provoke(self) -> None:
        """Make the node start a request to one of our SAs, so that its response handling
        gets fuzzed: our SAs rarely live to see their lifetimes or a liveness check.

        Child SA rekeys and deletes go through the supervisor's commands (what the data
        plane's lifetimes use); the rest as the same kind of command to the actor."""
        established = [sa for sa in self.live if sa.established and sa.pending is None]
        if not established:
            return
        sa = self.rng.choice(established)
        sup = self.node.supervisor
        actor = sup.actor_for(sa.keys.spi_r)
        if actor is None or not isinstance(actor.session, IkeSession):
            return
        children = list(actor.session.sa.children)
        kind = self.rng.randrange(5)
        if kind == 0 and children:
            sup.rekey_child(self.rng.choice(children))
        elif kind == 1 and children:
            sup.delete_child(self.rng.choice(children))
        elif kind == 2:
            actor.mailbox.put_nowait(lambda session, now: session.rekey_ike(now))
        elif kind == 3:
            actor.mailbox.put_nowait(lambda session, now: session.delete_ike(now))
        else:
            actor.mailbox.put_nowait(lambda session, now: session.check_liveness(now))
        self.report.provoked += 1

    # --- sending -------------------------------------------------------------------------

    def open_sockets(self) -> None:
        for family, host, count in ((socket.AF_INET, "127.0.0.1", self.options.sockets_v4),
                                    (socket.AF_INET6, "::1", self.options.sockets_v6)):
            for _ in range(count):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind((host, 0))
                self.sockets.append(sock)

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    def send(self, shot: Shot) -> None:
        report = self.report
        self.ring.append((report.datagrams, shot))
        report.datagrams += 1
        if shot.spoofed is not None:
            report.spoofed += 1
            self.node.supervisor.route_untrusted(shot.data, self.servers[socket.AF_INET],
                                                 shot.spoofed, trio.current_time())
            return
        sock = self.sockets[shot.source % len(self.sockets)]
        host = self.servers[sock.family][0]
        port = self.config.natt_port if shot.natt else self.config.ike_port
        if shot.strategy == "init_flood" and len(self.requests) < 1024:
            self.requests[shot.data[:8]] = (shot.data, shot.source % len(self.sockets))
        sock.sendto(shot.data, (host, port))

    def read_replies(self) -> None:
        """Drain our sockets; remember the cookies the node asked for (RFC 7296 2.6)."""
        for sock in self.sockets:
            while True:
                try:
                    data = sock.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if data[:4] == NON_ESP_MARKER:
                    data = data[4:]
                request = self.requests.pop(data[:8], None)
                if request is None:
                    continue
                try:
                    payloads = decode_untrusted(data).payloads
                except Exception:
                    continue
                for p in payloads:
                    if isinstance(p, NotifyPayload) and p.notify_type == NotifyType.COOKIE:
                        self.cookies.append(Cookie(request[0], p.data, request[1]))
        if len(self.requests) >= 1024:
            self.requests.clear()

    def sample(self) -> None:
        sup = self.node.supervisor
        now = {"actor_count": sup.actor_count, "half_open_count": sup.half_open_count,
               "expiry_queue_length": sup.expiry_queue_length,
               "notify_buckets": sup.notify_buckets, "rss_mib": rss_bytes() >> 20}
        for name, value in now.items():
            self.report.maxima[name] = max(self.report.maxima.get(name, 0), value)

    async def run(self) -> None:
        options = self.options
        report = self.report
        node = self.node
        read_base = node.stats.datagrams_in
        socket_sent = 0
        start = time.monotonic()
        next_progress = start + options.progress_every
        next_sample = 0
        while True:
            elapsed = time.monotonic() - start
            if options.datagrams is not None and report.datagrams >= options.datagrams:
                break
            if options.seconds is not None and elapsed >= options.seconds:
                break
            self.refresh()
            await self.replenish()
            if self.rng.random() < 0.03:
                self.provoke()
            if self.rng.random() < options.stall_rate:
                # the whole event loop stops, as on a busy host: actors wake up late,
                # after several of their deadlines (two bugs hid there)
                time.sleep(self.rng.uniform(0.02, 0.3))
                report.stalls += 1
            for shot in self.maker.burst(self.live, self.witnesses, list(self.cookies)):
                self.send(shot)
                socket_sent += shot.spoofed is None
            self.read_replies()
            await trio.sleep(0)
            # pacing: the node's reader runs while we wait (its counter includes our
            # peers' datagrams, so this errs on the side of sending more)
            if socket_sent - (node.stats.datagrams_in - read_base) > options.window:
                with trio.move_on_after(1.0):
                    while socket_sent - (node.stats.datagrams_in - read_base) > options.window // 2:
                        await trio.sleep(0)
                lag = socket_sent - (node.stats.datagrams_in - read_base)
                if lag > options.window // 2:
                    report.unread += lag
                    read_base = node.stats.datagrams_in - socket_sent
            if report.datagrams >= next_sample:
                next_sample = report.datagrams + 500
                self.sample()
            if options.progress is not None and options.progress_every and \
                    time.monotonic() >= next_progress:
                next_progress += options.progress_every
                options.progress(self.snapshot(time.monotonic() - start))
        report.seconds = time.monotonic() - start

    def snapshot(self, elapsed: float) -> dict[str, int]:
        sup = self.node.supervisor
        return {"seconds": int(elapsed), "datagrams": self.report.datagrams,
                "actors": sup.actor_count, "half_open": sup.half_open_count,
                "expiry_queue": sup.expiry_queue_length, "notify_buckets": sup.notify_buckets,
                "rss_mib": rss_bytes() >> 20, "cpu_s": int(time.process_time()),
                "actor_failures": self.node.stats.actor_failures,
                "sas_created": self.report.sas_created}

    async def settle(self) -> None:
        """Give every half-open SA time to expire, then read the tables."""
        sup = self.node.supervisor
        with trio.move_on_after(self.options.half_open_timeout + 3.0):
            await trio.sleep(self.options.half_open_timeout)
            while sup.half_open_count or sup.expiry_queue_length:
                await trio.sleep(0.05)
        self.report.settled = {
            "actor_count": sup.actor_count, "half_open_count": sup.half_open_count,
            "half_open_hosts": len(sup.half_open_hosts),
            "expiry_queue_length": sup.expiry_queue_length,
            "notify_buckets": sup.notify_buckets,
        }

    def name_suspects(self, errors: list[logging.LogRecord]) -> None:
        """The recent datagrams that went to an SA whose actor failed."""
        spis = set()
        for record in errors:
            for arg in record.args if isinstance(record.args, tuple) else ():
                if isinstance(arg, str) and arg.endswith("_r") and "_i/" in arg:
                    spis.add(bytes.fromhex(arg.split("_i/")[0]))
        for index, shot in self.ring:
            data = shot.data[4:] if shot.data[:4] == NON_ESP_MARKER else shot.data
            if data[:8] in spis:
                self.report.suspects.append(f"#{index} {shot.strategy} natt={shot.natt}"
                                            f" {shot.data.hex()}")


async def check_handshake(fuzzer: Fuzzer, host: str) -> str:
    try:
        peer, _ = await fuzzer.establish(host, "final.example.test")
    except (trio.TooSlowError, AssertionError) as exc:
        return f"not established ({type(exc).__name__})"
    try:
        await peer.check_liveness(timeout=10)
    except (trio.TooSlowError, AssertionError) as exc:
        return f"no liveness answer ({type(exc).__name__})"
    finally:
        peer.close()
    return "ok"


async def run_fuzz(options: FuzzOptions) -> FuzzReport:
    """One whole run: node up, fuzz, settle, check, node down."""
    config = node_config(options)
    errors = ErrorLog()
    cluster_logger = logging.getLogger("cluster")
    cluster_logger.addHandler(errors)
    fuzzer: Fuzzer | None = None
    try:
        async with trio.open_nursery() as nursery:
            events = EventCounter()
            node: Node = await nursery.start(functools.partial(
                run_node, config, handle_signals=False, event_sink=events))
            fuzzer = Fuzzer(node, config, options, events)
            report = fuzzer.report
            witness, witness_sa = await fuzzer.establish(LEGIT_HOSTS[0], "witness.example.test")
            fuzzer.witness = witness
            fuzzer.witnesses.append(witness_sa)
            fuzzer.open_sockets()
            # the witness answers the node's liveness checks while the fuzz runs
            keeper, kept = trio.CancelScope(), trio.Event()
            nursery.start_soon(_keep, witness, keeper, kept)
            try:
                gc.collect()
                report.rss_before = rss_bytes()
                await fuzzer.run()
                await fuzzer.settle()
                gc.collect()
                report.rss_after = rss_bytes()
                keeper.cancel()
                await kept.wait()
                try:
                    await witness.check_liveness(timeout=10)
                    report.witness_alive = True
                except (trio.TooSlowError, AssertionError):
                    report.witness_alive = False
                for host in ("127.0.0.1", "::1"):
                    report.final_handshakes[host] = await check_handshake(fuzzer, host)
            finally:
                keeper.cancel()
                with trio.CancelScope(shield=True):
                    await kept.wait()
                witness.close()
                fuzzer.close_sockets()
            report.strategies = dict(fuzzer.maker.counts)
            report.events = dict(events)
            report.stats = node.stats.as_dict()
            node.shutdown()
    finally:
        cluster_logger.removeHandler(errors)
    assert fuzzer is not None
    report.errors = [errors.format(r) for r in errors.records]
    fuzzer.name_suspects(errors.records)
    return report


async def _keep(peer: InitiatorPeer, scope: trio.CancelScope, done: trio.Event) -> None:
    try:
        with scope:
            await peer.run_until(lambda _: False, timeout=math.inf)
    finally:
        done.set()
