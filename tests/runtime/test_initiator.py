"""start_action = "start": a node initiates, retries with back-off and re-initiates.

Two nodes run in this Trio process on loopback: A (127.0.0.1) initiates a
transport-mode connection to B (127.0.0.2), which only responds. The routing
tests at the end run the supervisor alone under `autojump_clock`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import itertools
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from cluster.config import NodeConfig, load_config
from cluster.ike.events import (
    AUTH_EXPIRED,
    PEER_NOT_RESPONDING,
    REAUTHENTICATED,
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
)
from cluster.ike.message import Header
from cluster.ike.policy import Retransmission
from cluster.ike.session import Datagram, IkeSession
from cluster.runtime.node import (
    CHILD_REQUEST_INTERVAL,
    INITIATE_BACKOFF_MAX,
    Initiator,
    Node,
    run_node,
)
from cluster.runtime.stats import RuntimeStats
from cluster.runtime.supervisor import Supervisor

from .conftest import PSK

A_HOST = "127.0.0.1"
B_HOST = "127.0.0.2"


def free_ports(host: str) -> tuple[int, int]:
    """Two distinct UDP ports free on `host` right now."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for sock in socks:
            sock.close()


def node_config(
    directory: Path,
    name: str,
    address: str,
    ports: tuple[int, int],
    peer: str,
    peer_port: int,
    *,
    start: bool,
    half_open_timeout: float = 30.0,
    encap: bool = False,
) -> NodeConfig:
    me, other = ("a", "b") if name == "a" else ("b", "a")
    start_line = 'start_action = "start"' if start else ""
    path = directory / f"{name}.toml"
    path.write_text(
        f"""
[node]
id = "{name}"
[ike]
addresses = ["{address}"]
port = {ports[0]}
port_nat_t = {ports[1]}
half_open_timeout = {half_open_timeout}
[connections.link]
proposals = ["aes256gcm16-prfsha256-x25519"]
remote_addrs = ["{peer}"]
remote_port = {peer_port}
encap = {"true" if encap else "false"}
local = {{ auth = "psk", id = "{me}.example.test" }}
remote = {{ auth = "psk", id = "{other}.example.test" }}
[connections.link.children.host]
mode = "transport"
esp_proposals = ["aes256gcm16"]
{start_line}
[secrets.link]
ids = ["a.example.test", "b.example.test"]
secret = "{PSK}"
"""
    )
    return load_config(path)


@dataclass
class Pair:
    a: NodeConfig
    b: NodeConfig
    a_events: list[Event] = field(default_factory=list)
    b_events: list[Event] = field(default_factory=list)

    async def start_a(self, nursery: trio.Nursery) -> Node:
        return await _start(nursery, self.a, self.a_events)

    async def start_b(self, nursery: trio.Nursery) -> Node:
        return await _start(nursery, self.b, self.b_events)


async def _start(nursery: trio.Nursery, config: NodeConfig, events: list[Event]) -> Node:
    node: Node = await nursery.start(
        functools.partial(run_node, config, event_sink=events.append, handle_signals=False)
    )
    return node


def make_pair(
    directory: Path,
    a_half_open_timeout: float = 30.0,
    *,
    encap: bool = False,
    b_natt_port: int | None = None,
) -> Pair:
    a_ports, b_ports = free_ports(A_HOST), free_ports(B_HOST)
    if b_natt_port is not None:
        b_ports = (b_ports[0], b_natt_port)
    a = node_config(directory, "a", A_HOST, a_ports, B_HOST, b_ports[0], start=True,
                    half_open_timeout=a_half_open_timeout, encap=encap)
    b = node_config(directory, "b", B_HOST, b_ports, A_HOST, a_ports[0], start=False)
    return Pair(a, b)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


def established(events: list[Event]) -> list[IkeSaEstablished]:
    return [e for e in events if isinstance(e, IkeSaEstablished)]


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def ip(selector_addr: bytes) -> str:
    return str(ipaddress.ip_address(selector_addr))


async def test_start_connection_comes_up_without_an_external_initiator(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        await wait_for(lambda: any(isinstance(e, ChildSaEstablished) for e in pair.a_events))
        await wait_for(lambda: any(isinstance(e, ChildSaEstablished) for e in pair.b_events))

        (a_sa,) = established(pair.a_events)
        (b_sa,) = established(pair.b_events)
        assert (a_sa.spi_i, a_sa.spi_r) == (b_sa.spi_i, b_sa.spi_r)
        assert a_sa.connection == b_sa.connection == "link"
        assert (a_sa.local_id, a_sa.remote_id) == ("a.example.test", "b.example.test")
        assert a_sa.remote == (B_HOST, pair.b.ike_port)
        assert b_sa.remote == (A_HOST, pair.a.ike_port)
        assert not a_sa.nat

        # A holds it as an SA it initiated, routed by its initiator SPI; B as a responder.
        actor = a.supervisor.initiated_actor_for(a_sa.spi_i)
        assert actor is not None and actor.established
        assert a.supervisor.actor_count == 0 and a.supervisor.initiated_count == 1
        assert b.supervisor.actor_for(b_sa.spi_r) is not None
        assert b.supervisor.initiated_count == 0

        # The Child SA is the transport-mode one with "dynamic" selectors, both ends agree.
        (a_child,) = [e for e in pair.a_events if isinstance(e, ChildSaEstablished)]
        (b_child,) = [e for e in pair.b_events if isinstance(e, ChildSaEstablished)]
        assert a_child.mode == b_child.mode == "transport"
        assert (a_child.spi_in, a_child.spi_out) == (b_child.spi_out, b_child.spi_in)
        assert a_child.encr_key_in == b_child.encr_key_out
        assert [ip(ts.start_addr) for ts in a_child.local_ts] == [A_HOST]
        assert [ip(ts.start_addr) for ts in a_child.remote_ts] == [B_HOST]

        (initiator,) = a.initiators
        assert (initiator.attempts, initiator.failures, initiator.established) == (1, 0, 0)
        assert a.stats.ike_sas_established == b.stats.ike_sas_established == 1
        a.shutdown()
        b.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert any("connection link: initiating IKE SA" in m and "(attempt 1)" in m
               for m in messages)


async def test_forced_encapsulation_moves_both_to_the_nat_t_ports(tmp_path: Path) -> None:
    # The initiator moves to the peer's port 4500 (RFC 7296 2.23), so B must own it.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((B_HOST, 4500))
    except OSError as exc:
        if os.environ.get("CI") == "true":  # CI must run it: a taken port is a failure there
            pytest.fail(f"UDP {B_HOST}:4500 is taken: {exc}")
        pytest.skip(f"UDP {B_HOST}:4500 is taken here: {exc}")
    pair = make_pair(tmp_path, encap=True, b_natt_port=4500)
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        await wait_for(lambda: any(isinstance(e, ChildSaEstablished) for e in pair.b_events))
        (a_sa,) = established(pair.a_events)
        (b_sa,) = established(pair.b_events)
        assert a_sa.nat and b_sa.nat
        assert a_sa.local == (A_HOST, pair.a.natt_port)
        assert a_sa.remote == (B_HOST, 4500)
        assert b_sa.remote == (A_HOST, pair.a.natt_port)
        (b_child,) = [e for e in pair.b_events if isinstance(e, ChildSaEstablished)]
        assert b_child.encap and b_child.mode == "transport"
        a.shutdown()
        b.shutdown()


async def test_initiator_retries_until_the_peer_is_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pair = make_pair(tmp_path, a_half_open_timeout=1.0)
    async with trio.open_nursery() as nursery:
        a = await pair.start_a(nursery)
        (initiator,) = a.initiators
        # B is not running: the first attempt goes unanswered and is given up.
        await wait_for(lambda: initiator.failures >= 1)
        assert a.stats.half_open_expired >= 1
        assert established(pair.a_events) == []
        failed_attempts = initiator.attempts

        b = await pair.start_b(nursery)
        await wait_for(lambda: len(established(pair.a_events)) == 1)
        await wait_for(lambda: len(established(pair.b_events)) == 1)
        assert established(pair.a_events)[0].spi_i == established(pair.b_events)[0].spi_i
        assert initiator.attempts > failed_attempts  # it came up on a later attempt
        a.shutdown()
        b.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert any("connection link: attempt 1 failed (not established within 1 s)" in m
               for m in messages)
    assert any("(attempt 2)" in m for m in messages)


async def test_keyingtries_gives_up_after_that_many_failed_attempts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """swanctl's keyingtries = 2: the peer never answers, so after two attempts the
    connection is given up (logged), and no third attempt follows."""
    caplog.set_level(logging.INFO)
    pair = make_pair(tmp_path, a_half_open_timeout=1.0)
    initiation = pair.a.initiations[0]
    pair.a = dataclasses.replace(pair.a, initiations=(dataclasses.replace(
        initiation, connection=dataclasses.replace(initiation.connection, keyingtries=2)),))
    async with trio.open_nursery() as nursery:
        a = await pair.start_a(nursery)
        (initiator,) = a.initiators
        await wait_for(lambda: initiator.failures == 2, timeout=100)
        await trio.sleep(INITIATE_BACKOFF_MAX * 2)
        assert initiator.attempts == 2 and initiator.gave_up
        a.reconfigure(pair.a)  # a reload tries again, with a fresh count
        (again,) = a.initiators
        assert again is not initiator
        await wait_for(lambda: again.failures == 2, timeout=100)
        assert again.attempts == 2 and initiator.attempts == 2
        a.shutdown()
    assert any("connection link: attempt 2 failed (not established within 1 s); giving up "
               "(keyingtries = 2)" in r.getMessage() for r in caplog.records)


async def test_initiator_initiates_again_when_the_peer_deletes_the_sa(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        await wait_for(lambda: len(established(pair.b_events)) == 1)
        first = established(pair.b_events)[0]

        # B deletes the SA (RFC 7296 1.4.1).
        _delete_from_b(b, first.spi_r)

        await wait_for(lambda: len(established(pair.a_events)) == 2)
        await wait_for(lambda: len(established(pair.b_events)) == 2)
        second = established(pair.a_events)[1]
        assert second.spi_i != first.spi_i
        assert any(isinstance(e, IkeSaDeleted) and e.spi_i == first.spi_i
                   for e in pair.a_events)
        assert any(isinstance(e, IkeSaDeleted) and e.spi_i == first.spi_i
                   for e in pair.b_events)
        assert a.supervisor.initiated_actor_for(first.spi_i) is None
        assert a.supervisor.initiated_actor_for(second.spi_i) is not None
        (initiator,) = a.initiators
        assert (initiator.attempts, initiator.established) == (2, 1)
        a.shutdown()
        b.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"IKE SA {first.spi_i.hex()}_i ended (deleted by peer); initiating again" in m
               for m in messages)


async def test_an_on_demand_initiator_waits_for_a_packet_each_time(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """start_action = "trap": nothing until the data plane's acquire; after the peer
    deletes the SA, nothing again until the next one (strongSwan's trap policies)."""
    caplog.set_level(logging.INFO)
    pair.a = dataclasses.replace(
        pair.a, initiations=(dataclasses.replace(pair.a.initiations[0], on_demand=True),))
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        (initiator,) = a.initiators
        await trio.sleep(1.0)
        assert initiator.attempts == 0 and established(pair.b_events) == []
        a.acquire("other")  # another connection's trap: not this one
        a.acquire("link")
        a.acquire("link")  # more packets before the SA is up: one attempt
        await wait_for(lambda: len(established(pair.b_events)) == 1)
        first = established(pair.b_events)[0]
        _delete_from_b(b, first.spi_r)
        await wait_for(lambda: any(isinstance(e, IkeSaDeleted) for e in pair.a_events))
        await trio.sleep(2.0)  # past the re-arm delay (1 s after a deleted SA)
        assert initiator.attempts == 1 and len(established(pair.b_events)) == 1
        a.acquire("link")
        await wait_for(lambda: len(established(pair.b_events)) == 2)
        assert initiator.attempts == 2
        a.shutdown()
        b.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"IKE SA {first.spi_i.hex()}_i ended (deleted by peer); trap armed again" in m
               for m in messages)


def _delete_child_from_b(b: Node) -> None:
    (actor,) = b.supervisor.established_actors()
    session = actor.session
    assert isinstance(session, IkeSession)
    (spi_in,) = session.sa.children
    session.delete_child(spi_in, trio.current_time())
    for datagram in session.datagrams_to_send():
        b.dispatcher.send(datagram)


async def test_a_trapped_child_the_peer_deleted_comes_back_on_the_same_ike_sa(
        pair: Pair) -> None:
    """The peer deletes only the Child SA: the next packets' acquires ask the IKE SA we
    hold for a new one (CREATE_CHILD_SA), once however many packets ask, and not again
    within CHILD_REQUEST_INTERVAL; no new IKE SA."""
    pair.a = dataclasses.replace(
        pair.a, initiations=(dataclasses.replace(pair.a.initiations[0], on_demand=True),))

    def children() -> list[ChildSaEstablished]:
        return [e for e in pair.a_events if isinstance(e, ChildSaEstablished)]

    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        (initiator,) = a.initiators
        a.acquire("link")
        await wait_for(lambda: len(children()) == 1)
        _delete_child_from_b(b)
        await wait_for(lambda: any(isinstance(e, ChildSaDeleted) for e in pair.a_events))
        asked = trio.current_time()
        for _ in range(5):
            a.acquire("link")
        await wait_for(lambda: len(children()) == 2)
        _delete_child_from_b(b)
        await wait_for(lambda: sum(isinstance(e, ChildSaDeleted) for e in pair.a_events) == 2)
        a.acquire("link")  # within the interval of the last request: not asked
        await trio.sleep(max(0.0, asked + CHILD_REQUEST_INTERVAL - trio.current_time() - 0.3))
        assert len(children()) == 2
        await trio.sleep(0.5)
        a.acquire("link")
        await wait_for(lambda: len(children()) == 3)
        assert initiator.attempts == 1 and len(established(pair.a_events)) == 1
        assert len({e.ike_spi_i for e in children()}) == 1
        a.shutdown()
        b.shutdown()


@pytest.mark.parametrize("action", ["restart", "clear"])
async def test_dpd_action_restart_initiates_an_on_demand_connection_again_at_once(
    pair: Pair, action: str
) -> None:
    """The peer goes silent: our liveness check times out (RFC 7296 2.4). With
    dpd_action = "restart" the on-demand connection is initiated again without waiting
    for a packet; with "clear" it waits."""
    initiation = pair.a.initiations[0]
    connection = dataclasses.replace(initiation.connection, dpd_delay=0.5, dpd_action=action)
    policy = dataclasses.replace(pair.a.policy, retransmission=Retransmission(0.3, 1.0, 1))
    pair.a = dataclasses.replace(pair.a, policy=policy, initiations=(dataclasses.replace(
        initiation, on_demand=True, connection=connection),))
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        (initiator,) = a.initiators
        a.acquire("link")
        await wait_for(lambda: len(established(pair.a_events)) == 1)
        b.shutdown()  # silent from now on: no Delete
        await wait_for(lambda: any(isinstance(e, IkeSaDeleted) for e in pair.a_events))
        (deleted,) = [e for e in pair.a_events if isinstance(e, IkeSaDeleted)]
        assert deleted.reason == PEER_NOT_RESPONDING
        if action == "restart":
            await wait_for(lambda: initiator.attempts == 2)
        else:
            await trio.sleep(2.0)  # past the re-arm delay
            assert initiator.attempts == 1
        a.shutdown()


# --- back-off, under the mock clock ----------------------------------------------------


async def test_back_off_doubles_with_jitter_up_to_the_maximum(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only A runs, so nothing ever answers; each attempt expires after 1 s.
    pair = make_pair(tmp_path, a_half_open_timeout=1.0)
    starts: list[float] = []
    original = Initiator._attempt

    async def timed(self: Initiator, attempt: int) -> object:
        starts.append(trio.current_time())
        return await original(self, attempt)

    monkeypatch.setattr(Initiator, "_attempt", timed)
    async with trio.open_nursery() as nursery:
        a = await pair.start_a(nursery)
        await wait_for(lambda: len(starts) == 9, timeout=1000)
        a.shutdown()
    waits = [later - earlier - 1.0 for earlier, later in itertools.pairwise(starts)]
    for index, wait in enumerate(waits):
        backoff = min(2.0**index, INITIATE_BACKOFF_MAX)
        assert 0.8 * backoff - 1e-6 <= wait <= backoff + 1e-6, (index, waits)
    assert waits[-1] > 20  # capped, not 128 s


def _delete_from_b(b: Node, spi_r: bytes) -> None:
    actor = b.supervisor.actor_for(spi_r)
    assert actor is not None
    session = actor.session
    assert isinstance(session, IkeSession)
    session.delete_ike(trio.current_time())
    for datagram in session.datagrams_to_send():
        b.dispatcher.send(datagram)


async def test_only_a_long_lived_sa_resets_the_back_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = make_pair(tmp_path, a_half_open_timeout=1.0)
    starts: list[float] = []
    original = Initiator._attempt

    async def timed(self: Initiator, attempt: int) -> object:
        starts.append(trio.current_time())
        return await original(self, attempt)

    monkeypatch.setattr(Initiator, "_attempt", timed)
    async with trio.open_nursery() as nursery:
        a = await pair.start_a(nursery)
        (initiator,) = a.initiators
        await wait_for(lambda: initiator.failures == 2, timeout=100)  # waited 1 s, then 2 s
        b = await pair.start_b(nursery)
        await wait_for(lambda: len(established(pair.b_events)) == 1, timeout=100)

        # Deleted at once: the next wait is the grown back-off (4 s, less jitter).
        deleted = trio.current_time()
        _delete_from_b(b, established(pair.b_events)[0].spi_r)
        await wait_for(lambda: len(established(pair.b_events)) == 2, timeout=100)
        assert 3.2 - 0.1 <= starts[3] - deleted <= 4.0 + 0.1, (starts, deleted)

        # Up for longer than the largest back-off: the next wait is the first one again.
        await trio.sleep(INITIATE_BACKOFF_MAX + 1)
        deleted = trio.current_time()
        _delete_from_b(b, established(pair.b_events)[1].spi_r)
        await wait_for(lambda: len(established(pair.b_events)) == 3, timeout=100)
        assert 0.8 - 0.1 <= starts[4] - deleted <= 1.0 + 0.1, (starts, deleted)
        assert initiator.established == 2 and initiator.failures == 2
        a.shutdown()
        b.shutdown()


# --- routing by the Initiator flag ------------------------------------------------------


def _header(spi_i: bytes, spi_r: bytes, flags: int, exchange: int = 34) -> Header:
    return Header(spi_i, spi_r, 33, 0x20, exchange, flags, 0, 28)


async def test_message_from_an_original_responder_never_spawns_a_responder(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = RuntimeStats()

    def no_responders(spi_r: bytes, local: tuple[str, int], remote: tuple[str, int]) -> IkeSession:
        raise AssertionError("a responder session was created")

    supervisor = Supervisor(
        session_factory=no_responders,
        send=lambda datagram: None,
        event_sink=lambda event: None,
        stats=stats,
        half_open_timeout=5.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        # An IKE_SA_INIT response (R set, I clear) and a request from an original
        # responder (I clear), both for SPIs we never initiated: dropped.
        for flags in (0x20, 0x00):
            supervisor.route(_header(b"\x05" * 8, bytes(8), flags), b"", ("h", 1), ("p", 2), 0.0)
        assert stats.dropped_no_sa == 2
        assert supervisor.actor_count == supervisor.initiated_count == 0
        nursery.cancel_scope.cancel()


async def test_initiated_sa_gets_its_peers_messages_and_expires_half_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = RuntimeStats()
    sent: list[Datagram] = []
    supervisor = Supervisor(
        session_factory=lambda spi_r, local, remote: None,  # type: ignore[arg-type,return-value]
        send=sent.append,
        event_sink=lambda event: None,
        stats=stats,
        half_open_timeout=5.0,
        new_spi=lambda: b"\x07" * 8,
    )

    class Silent:
        """A session that never closes and has no timer: only the deadline ends it."""

        spi_i = b"\x07" * 8
        spi_r = bytes(8)
        closed = False

        def __init__(self) -> None:
            self.received: list[bytes] = []

        def receive_datagram_untrusted(self, data: bytes, local: object, remote: object,
                                       now: float) -> None:
            self.received.append(data)

        def datagrams_to_send(self) -> list[Datagram]:
            return []

        def get_timer(self) -> float | None:
            return None

        def handle_timer(self, now: float) -> None:
            pass

        def next_event(self) -> None:
            return None

        def end_here(self) -> None:
            pass

        pending = None  # its exchanges never wait for the runtime

        def resume(self, now: float) -> None:
            pass

    silent = Silent()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        outcomes = []

        async def initiate() -> None:
            outcomes.append(await supervisor.run_initiated(lambda spi_i, now: silent))

        nursery.start_soon(initiate)
        await trio.testing.wait_all_tasks_blocked()
        assert supervisor.initiated_count == 1
        # From the original responder (I clear): by our initiator SPI to the session.
        supervisor.route(_header(b"\x07" * 8, b"\x09" * 8, 0x20), b"reply", ("h", 1),
                         ("p", 2), trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert silent.received == [b"reply"]
        start = trio.current_time()
        await wait_for(lambda: bool(outcomes), timeout=100)
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
        (outcome,) = outcomes
        assert (outcome.spi_i, outcome.established) == (b"\x07" * 8, False)
        assert outcome.reason == "not established within 5 s"
        assert supervisor.initiated_count == 0
        assert stats.half_open_expired == 1
        nursery.cancel_scope.cancel()


# --- reauthentication, make-before-break (RFC 7296 2.8.3) ------------------------------

def _with_a_connection(pair: Pair, **changes: object) -> None:
    initiation = pair.a.initiations[0]
    pair.a = dataclasses.replace(pair.a, initiations=(dataclasses.replace(
        initiation, connection=dataclasses.replace(initiation.connection, **changes)),))


def _with_b_connection(pair: Pair, **changes: object) -> None:
    (conn,) = pair.b.policy.connections
    pair.b = dataclasses.replace(pair.b, policy=dataclasses.replace(
        pair.b.policy, connections=(dataclasses.replace(conn, **changes),)))


async def _both_deleted(pair: Pair) -> None:
    """Until both nodes have an IKE SA deleted (B's comes first: A's when B's answer to
    its Delete is in)."""
    await wait_for(lambda: all(any(isinstance(e, IkeSaDeleted) for e in events)
                               for events in (pair.a_events, pair.b_events)), timeout=10)


def _assert_made_before_broken(pair: Pair) -> tuple[IkeSaEstablished, IkeSaEstablished]:
    """A's events: the new IKE SA and its Child SA came up before A deleted the old one
    (REAUTHENTICATED); B saw INITIAL_CONTACT only on the first and the old SA deleted by
    its peer. Returns (old, new) as A saw them."""
    events = pair.a_events
    first, second = established(events)[:2]
    deleted = [(i, e.reason) for i, e in enumerate(events) if isinstance(e, IkeSaDeleted)
               and e.spi_i == first.spi_i]
    assert [reason for _, reason in deleted] == [REAUTHENTICATED]
    new_child = next(i for i, e in enumerate(events) if isinstance(e, ChildSaEstablished)
                     and e.ike_spi_i == second.spi_i)
    assert events.index(second) < new_child < deleted[0][0]
    b_first, b_second = established(pair.b_events)[:2]
    assert (b_first.spi_i, b_second.spi_i) == (first.spi_i, second.spi_i)
    assert b_first.initial_contact and not b_second.initial_contact
    assert [e.reason for e in pair.b_events if isinstance(e, IkeSaDeleted)
            and e.spi_i == first.spi_i] == ["deleted by peer"]
    return first, second


async def test_our_reauth_time_brings_up_a_new_sa_before_the_old_one_goes(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """reauth_time = 4 s on A's connection: at 3.6-4 s A initiates a second IKE SA
    without INITIAL_CONTACT, and once it and both its Child SAs are up (the second by
    CREATE_CHILD_SA) it deletes the first; the Initiator carries on with the new one,
    nothing initiated again."""
    caplog.set_level(logging.INFO)
    (host,) = pair.a.initiations[0].connection.children
    _with_a_connection(pair, reauth_time=4.0, children=(
        host, dataclasses.replace(host, name="host2", start_action="start")))
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        await _both_deleted(pair)
        first, second = _assert_made_before_broken(pair)
        host2 = [i for i, e in enumerate(pair.a_events) if isinstance(e, ChildSaEstablished)
                 and e.ike_spi_i == second.spi_i and e.name == "host2"]
        gone = [i for i, e in enumerate(pair.a_events) if isinstance(e, IkeSaDeleted)]
        assert host2 and host2[0] < gone[0]
        (initiator,) = a.initiators
        assert (initiator.attempts, initiator.reauthentications) == (1, 1)
        assert a.supervisor.initiated_count == 1
        assert a.supervisor.initiated_actor_for(second.spi_i) is not None
        assert b.supervisor.actor_count == 1
        a.shutdown()
        b.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert f"connection link: reauthenticating IKE SA {first.spi_i.hex()}_i with a new " \
        "IKE SA" in messages
    assert f"connection link: IKE SA {first.spi_i.hex()}_i replaced by " \
        f"{second.spi_i.hex()}_i; deleting it" in messages


async def test_the_peers_auth_lifetime_makes_us_reauthenticate_before_it_ends(
    pair: Pair
) -> None:
    """B has reauth_time = 5 s and tells A so (AUTH_LIFETIME, RFC 4478); A has none of its
    own, reauthenticates at 4.5 s, and B never has to delete the SA itself."""
    _with_b_connection(pair, reauth_time=5.0)
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        await _both_deleted(pair)
        _assert_made_before_broken(pair)
        assert not [e for e in pair.b_events
                    if isinstance(e, IkeSaDeleted) and e.reason == AUTH_EXPIRED]
        a.shutdown()
        b.shutdown()


async def test_a_refused_reauthentication_is_tried_again_while_the_old_sa_lasts(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """B loses its PSK before A's reauthentication at 18-20 s (reauth_time = 20): the new
    SA fails, the old one keeps carrying; B gets it back, and the second try, a second
    later and before the old SA's hard limit (22 s), replaces the old SA."""
    caplog.set_level(logging.INFO)
    _with_a_connection(pair, reauth_time=20.0)
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        await wait_for(lambda: len(established(pair.b_events)) == 1)
        b.reconfigure(dataclasses.replace(pair.b, policy=dataclasses.replace(
            pair.b.policy, secrets=())))
        await wait_for(lambda: any(isinstance(e, IkeSaFailed) for e in pair.b_events),
                       timeout=25)
        b.reconfigure(pair.b)
        await _both_deleted(pair)
        first, _ = _assert_made_before_broken(pair)
        (initiator,) = a.initiators
        assert (initiator.attempts, initiator.reauthentications) == (1, 2)
        a.shutdown()
        b.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"connection link: reauthentication of IKE SA {first.spi_i.hex()}"
                            "_i failed") for m in messages)


async def test_a_connection_the_peer_brought_up_is_not_initiated_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both nodes start the connection; A's SA is up when B's configuration starts it
    too (a reload). B, that SA's responder, holds it as the connection's SA and does not
    initiate another, which with INITIAL_CONTACT would make A drop it."""
    caplog.set_level(logging.INFO)
    pair = make_pair(tmp_path)
    b_start = node_config(tmp_path, "b2", B_HOST, (pair.b.ike_port, pair.b.natt_port),
                          A_HOST, pair.a.ike_port, start=True)
    async with trio.open_nursery() as nursery:
        b = await pair.start_b(nursery)
        a = await pair.start_a(nursery)
        await wait_for(lambda: len(established(pair.b_events)) == 1)
        b.reconfigure(dataclasses.replace(pair.b, policy=b_start.policy,
                                          initiations=b_start.initiations))
        (initiator,) = b.initiators
        await trio.sleep(1.5)
        assert initiator.attempts == 0
        assert len(established(pair.a_events)) == len(established(pair.b_events)) == 1
        assert not [e for e in pair.a_events + pair.b_events if isinstance(e, IkeSaDeleted)]
        a.shutdown()
        b.shutdown()
    (sa,) = established(pair.b_events)
    assert f"connection link: the peer brought it up (IKE SA {sa.spi_i.hex()}_i); " \
        "initiating again when that ends" in [r.getMessage() for r in caplog.records]
