"""`run_node` end to end over loopback UDP, against our own initiator."""

from __future__ import annotations

import functools
import logging
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from cluster.config import NodeConfig, load_config
from cluster.ike.constants import NON_ESP_MARKER
from cluster.ike.events import Event, IkeSaDeleted, IkeSaEstablished
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from cluster.runtime import supervisor as supervisor_module
from cluster.runtime.node import Node, run_node

from .conftest import Setup, write_responder_config
from .initiator_peer import InitiatorPeer


async def start_node(nursery: trio.Nursery, config: NodeConfig) -> Node:
    node: Node = await nursery.start(functools.partial(run_node, config, handle_signals=False))
    return node


async def open_peer(setup: Setup, host: str) -> InitiatorPeer:
    config = setup.node_config
    return await InitiatorPeer.open(
        (host, config.ike_port), config.natt_port, setup.connection, setup.initiator_policy
    )


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@contextmanager
def raw_socket(family: int = socket.AF_INET) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        yield sock
    finally:
        sock.close()


async def test_establishes_over_ipv4_and_ipv6(setup: Setup) -> None:
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, setup.node_config)
        for host in ("127.0.0.1", "::1"):
            peer = await open_peer(setup, host)
            try:
                event = await peer.establish()
            finally:
                peer.close()
            assert event.spi_i == peer.session.spi_i
            actor = node.supervisor.actor_for(event.spi_r)
            assert actor is not None and actor.established
            assert actor.session.spi_i == peer.session.spi_i
        assert node.stats.ike_sas_established == 2
        assert node.supervisor.actor_count == 2
        assert node.supervisor.half_open_count == 0
        node.shutdown()


async def test_many_concurrent_sas(setup: Setup) -> None:
    count = 40
    established: list[IkeSaEstablished] = []

    async def one(host: str) -> None:
        peer = await open_peer(setup, host)
        try:
            established.append(await peer.establish(timeout=30))
        finally:
            peer.close()

    # 20 peers per address at once: past strongSwan's default per-address limit of 5
    config = replace(setup.node_config, dos=replace(setup.node_config.dos, block_threshold=0))
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        async with trio.open_nursery() as peers:
            for i in range(count):
                peers.start_soon(one, "::1" if i % 2 else "127.0.0.1")
        assert len({e.spi_r for e in established}) == count
        assert node.supervisor.actor_count == count
        assert node.stats.ike_sas_established == count
        assert node.stats.actor_failures == 0
        node.shutdown()


async def test_failing_actor_is_torn_down_and_others_keep_working(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    chosen: set[bytes] = set()
    original = IkeSession.receive_datagram_untrusted

    def fail_for_chosen_sa(
        self: IkeSession, data: bytes, local: tuple[str, int], remote: tuple[str, int], now: float
    ) -> None:
        # Only requests (initiator flag set) reaching the responder side of the chosen SA.
        if data[:8] in chosen and data[19] & 0x08:
            raise RuntimeError("injected failure")
        original(self, data, local, remote, now)

    monkeypatch.setattr(IkeSession, "receive_datagram_untrusted", fail_for_chosen_sa)

    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, setup.node_config)
        victim = await open_peer(setup, "127.0.0.1")
        first = await victim.establish()
        assert node.supervisor.is_routed(first.spi_i, first.spi_r)

        chosen.add(first.spi_i)
        victim.start_liveness_check()
        await victim.flush()
        await wait_for(lambda: node.stats.actor_failures == 1)
        victim.close()

        assert not node.supervisor.is_routed(first.spi_i, first.spi_r)
        assert node.supervisor.actor_for(first.spi_r) is None
        # The torn-down SA is reported deleted, so the log names it.
        assert any(
            "deleted" in r.getMessage() and first.spi_r.hex() in r.getMessage()
            for r in caplog.records
        )
        assert any(r.exc_info and "injected failure" in str(r.exc_info[1]) for r in caplog.records)

        # The node keeps serving: two more SAs come up and answer liveness checks.
        for host in ("127.0.0.1", "::1"):
            peer = await open_peer(setup, host)
            try:
                event = await peer.establish()
                await peer.check_liveness()
            finally:
                peer.close()
            assert node.supervisor.is_routed(event.spi_i, event.spi_r)
        assert node.stats.actor_failures == 1
        node.shutdown()


async def test_full_mailbox_drops_without_blocking_the_reader(setup: Setup) -> None:
    config = setup.node_config
    initiator = IkeSession.initiator(
        setup.connection,
        setup.initiator_policy,
        b"\x11" * 8,
        ("127.0.0.1", 1),
        ("127.0.0.1", config.ike_port),
        trio.current_time(),
    )
    (init,) = initiator.datagrams_to_send()
    copies = 80
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        with raw_socket() as sock:
            # All copies are queued in the kernel before the node's reader runs, so
            # one batch finds the actor's mailbox full long before the actor runs.
            for _ in range(copies):
                sock.sendto(init.data, ("127.0.0.1", config.ike_port))
            await wait_for(lambda: node.stats.datagrams_in == copies)
        assert node.stats.actors_started == 1  # every copy went to the same half-open SA
        assert node.stats.dropped_mailbox_full >= copies - 2 * 32
        assert node.stats.dropped_mailbox_full > 0
        node.shutdown()


async def test_nat_t_port_marker_keepalive_and_esp(setup: Setup) -> None:
    config = setup.node_config
    initiator = IkeSession.initiator(
        setup.connection,
        setup.initiator_policy,
        b"\x22" * 8,
        ("127.0.0.1", 1),
        ("127.0.0.1", config.natt_port),
        trio.current_time(),
    )
    (init,) = initiator.datagrams_to_send()
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        with raw_socket() as sock:
            natt = ("127.0.0.1", config.natt_port)
            sock.sendto(b"\xff", natt)  # NAT keepalive (RFC 3948 2.3)
            sock.sendto(b"\x00\x00\x10\x01" + bytes(60), natt)  # ESP: SPI 0x1001
            sock.sendto(NON_ESP_MARKER + init.data, natt)
            await wait_for(lambda: node.stats.datagrams_in == 3)
            sock.settimeout(5)
            reply, source = sock.recvfrom(65535)
        assert node.stats.natt_keepalives == 1
        assert node.stats.dropped_esp_on_natt == 1
        assert node.stats.actors_started == 1
        # The answer leaves from the NAT-T port with the non-ESP marker in front.
        assert source[1] == config.natt_port
        assert reply[:4] == NON_ESP_MARKER
        assert reply[4:12] == b"\x22" * 8
        node.shutdown()


async def test_malformed_and_unknown_spi_are_counted(setup: Setup) -> None:
    config = setup.node_config
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        with raw_socket(socket.AF_INET6) as sock:
            ike = ("::1", config.ike_port)
            sock.sendto(b"not ike", ike)
            # A well-formed INFORMATIONAL request for an SA that does not exist
            header = b"\x01" * 8 + b"\x02" * 8 + bytes([0, 0x20, 37, 0x08]) + bytes(4)
            sock.sendto(header + (28).to_bytes(4, "big"), ike)
            await wait_for(lambda: node.stats.datagrams_in == 2)
        assert node.stats.dropped_malformed == 1
        assert node.stats.dropped_no_sa == 1
        assert node.supervisor.actor_count == 0
        node.shutdown()


async def test_shutdown_closes_sockets_and_logs_counters(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = setup.node_config
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        peer = await open_peer(setup, "127.0.0.1")
        try:
            await peer.establish()
        finally:
            peer.close()
        node.shutdown()
    assert node.supervisor.actor_count == 0
    assert node.stats.actors_retired == 1
    assert all(ep.sock.fileno() == -1 for ep in node.dispatcher.endpoints)
    # Every port is free again.
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        for port in (config.ike_port, config.natt_port):
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((host, port))
    stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert stopped and "ike_sas_established=1" in stopped[-1]
    assert any("listening on" in r.getMessage() for r in caplog.records)


async def test_peer_delete_is_logged_and_retires_the_actor(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, setup.node_config)
        peer = await open_peer(setup, "::1")
        try:
            event = await peer.establish()
            await peer.delete()
        finally:
            peer.close()
        await wait_for(lambda: node.supervisor.actor_count == 0)
        assert not node.supervisor.is_routed(event.spi_i, event.spi_r)
        assert node.stats.ike_sas_deleted == 1
        assert node.stats.actor_failures == 0
        node.shutdown()
    # The interop tests grep the node log for exactly this.
    assert any(
        "deleted" in r.getMessage() and event.spi_r.hex() in r.getMessage() for r in caplog.records
    )


async def test_wildcard_addresses_learn_the_local_address(setup: Setup, tmp_path: Path) -> None:
    base = setup.node_config
    path = write_responder_config(tmp_path, ("0.0.0.0", "::"), base.ike_port, base.natt_port)
    config = load_config(path)
    seen: list[Event] = []
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(
            functools.partial(run_node, config, handle_signals=False, event_sink=seen.append)
        )
        for host in ("127.0.0.1", "::1"):
            peer = await open_peer(setup, host)
            try:
                await peer.establish()
            finally:
                peer.close()
        node.shutdown()
    locals_seen = [e.local for e in seen if isinstance(e, IkeSaEstablished)]
    # The session saw the address the peer really sent to, not the wildcard.
    assert locals_seen == [("127.0.0.1", base.ike_port), ("::1", base.ike_port)]


async def test_initial_contact_replaces_the_older_sas_of_the_same_identities(
    setup: Setup,
) -> None:
    config = setup.node_config
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        first = await open_peer(setup, "127.0.0.1")
        second = await InitiatorPeer.open(
            ("127.0.0.1", config.ike_port), config.natt_port, setup.connection,
            setup.initiator_policy, initial_contact=True,
        )
        try:
            old = await first.establish()
            assert node.supervisor.actor_for(old.spi_r) is not None
            new = await second.establish()
            # RFC 7296 2.4: the older SA of the same identities goes, quietly
            await wait_for(lambda: node.supervisor.actor_for(old.spi_r) is None)
            assert node.supervisor.actor_for(new.spi_r) is not None
            assert node.stats.ike_sas_deleted == 1
        finally:
            first.close()
            second.close()
        node.shutdown()


def _unique(config: NodeConfig, policy: str) -> NodeConfig:
    connections = tuple(replace(c, unique=policy) for c in config.policy.connections)
    return replace(config, policy=replace(config.policy, connections=connections))


@pytest.mark.parametrize("policy", ["replace", "keep"])
async def test_unique_replace_or_keep_deletes_one_of_two_sas_of_the_same_identities(
    setup: Setup, policy: str,
) -> None:
    """swanctl's `unique`: a second IKE SA of the same identities without INITIAL_CONTACT
    makes the node delete the older one ("replace") or the new one ("keep"), with a
    Delete the peer answers."""
    config = _unique(setup.node_config, policy)
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        first = await open_peer(setup, "127.0.0.1")
        second = await open_peer(setup, "127.0.0.1")
        try:
            old = await first.establish()
            new = await second.establish()
            goes, stays = (first, new) if policy == "replace" else (second, old)
            gone = old if policy == "replace" else new
            await goes.run_until(lambda e: isinstance(e, IkeSaDeleted))
            await wait_for(lambda: node.supervisor.actor_for(gone.spi_r) is None)
            assert node.supervisor.actor_for(stays.spi_r) is not None
        finally:
            first.close()
            second.close()
        node.shutdown()


def _up(node: Node, spi_r: bytes) -> bool:
    """Whether the node holds the SA with `spi_r`, established (no Delete started)."""
    actor = node.supervisor.actor_for(spi_r)
    return actor is not None and isinstance(actor.session, IkeSession) and \
        actor.session.state is State.ESTABLISHED


@pytest.mark.parametrize("policy", ["replace", "keep"])
async def test_a_second_sa_from_the_same_address_and_port_is_taken_for_a_reauthentication(
    setup: Setup, policy: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """strongSwan's uniqueness check: a second IKE SA of the same identities from the
    very address and port of the first, without INITIAL_CONTACT, is a make-before-break
    reauthentication (RFC 7296 2.8.3), not a second login. "keep" keeps both (the peer
    deletes the old one); "replace" deletes the old one REAUTH_GRACE later, not at once,
    so the peer's new Child SAs are up before the old ones go."""
    monkeypatch.setattr(supervisor_module, "REAUTH_GRACE", 1.0)
    config = _unique(setup.node_config, policy)
    server = ("127.0.0.1", config.ike_port)
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        first = await open_peer(setup, "127.0.0.1")
        try:
            old = await first.establish()
            session = IkeSession.initiator(setup.connection, setup.initiator_policy,
                                           secrets.token_bytes(8), first.local, server,
                                           trio.current_time())
            new = await InitiatorPeer(first.sock, session, config.natt_port).establish()
            started = trio.current_time()
            await trio.sleep(0.3)
            assert _up(node, old.spi_r) and _up(node, new.spi_r)  # no Delete under way
            if policy == "replace":
                await first.run_until(lambda e: isinstance(e, IkeSaDeleted))
                assert trio.current_time() - started >= 0.9
                await wait_for(lambda: node.supervisor.actor_for(old.spi_r) is None)
            else:
                await trio.sleep(1.5)  # past what "replace" waits
                assert _up(node, old.spi_r)
            assert _up(node, new.spi_r)
        finally:
            first.close()
        node.shutdown()


@pytest.mark.parametrize("policy", ["no", "never"])
async def test_without_initial_contact_two_sas_stay_and_never_ignores_it(
    setup: Setup, policy: str,
) -> None:
    config = _unique(setup.node_config, policy)
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config)
        first = await open_peer(setup, "127.0.0.1")
        second = await open_peer(setup, "127.0.0.1")
        third = await InitiatorPeer.open(
            ("127.0.0.1", config.ike_port), config.natt_port, setup.connection,
            setup.initiator_policy, initial_contact=True,
        )
        try:
            sas = [await peer.establish() for peer in (first, second)]
            await trio.sleep(0.2)
            assert all(node.supervisor.actor_for(sa.spi_r) is not None for sa in sas)
            await third.establish()
            if policy == "never":  # INITIAL_CONTACT does not replace either
                await trio.sleep(0.2)
                assert all(node.supervisor.actor_for(sa.spi_r) is not None for sa in sas)
            else:
                await wait_for(lambda: all(node.supervisor.actor_for(sa.spi_r) is None
                                           for sa in sas))
        finally:
            for peer in (first, second, third):
                peer.close()
        node.shutdown()
