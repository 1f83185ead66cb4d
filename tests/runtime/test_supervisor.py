"""The supervisor on the memory-only path: datagrams in by call, out into a list.

No sockets here, so `autojump_clock` can run the half-open timer in no time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from cluster.ike.events import Event, IkeSaAdopted, IkeSaDeleted, IkeSaEstablished
from cluster.ike.message import decode_untrusted
from cluster.ike.payloads import KePayload
from cluster.ike.session import Address, Datagram, IkeSession
from cluster.runtime.actor import Session, SessionTimerStuck
from cluster.runtime.node import responder_factory
from cluster.runtime.stats import RuntimeStats
from cluster.runtime.supervisor import Supervisor
from tests.ike.sessions import drain, psk_pair, run_handshake

from .conftest import Setup
from .harness import CLIENT, SERVER, Harness


@pytest.fixture
async def harness(setup: Setup) -> AsyncIterator[Harness]:
    stats = RuntimeStats()
    sent: list[Datagram] = []
    events: list[Event] = []
    supervisor = Supervisor(
        session_factory=responder_factory(setup.node_config),
        send=sent.append,
        event_sink=events.append,
        stats=stats,
        half_open_timeout=30.0,
    )
    h = Harness(setup, supervisor, stats, sent, events)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        yield h
        nursery.cancel_scope.cancel()


async def test_new_ike_sa_init_starts_an_actor_with_a_fresh_spi(harness: Harness) -> None:
    init = harness.initiator()
    harness.to_responder(init)
    await trio.testing.wait_all_tasks_blocked()
    assert harness.stats.actors_started == 1
    assert harness.supervisor.half_open_count == 1
    (reply,) = harness.sent
    spi_r = reply.data[8:16]
    assert spi_r != bytes(8)
    assert harness.supervisor.actor_for(spi_r) is not None
    assert reply.remote == CLIENT and reply.local == SERVER


async def test_retransmitted_ike_sa_init_reaches_the_same_actor(harness: Harness) -> None:
    init = harness.initiator()
    (first,) = init.datagrams_to_send()
    for _ in range(3):
        harness.supervisor.route_untrusted(first.data, SERVER, CLIENT, trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
    assert harness.stats.actors_started == 1
    assert len({d.data[8:16] for d in harness.sent}) == 1  # one responder SPI answered


async def test_same_initiator_spi_from_another_peer_is_another_sa(harness: Harness) -> None:
    init = harness.initiator()
    (first,) = init.datagrams_to_send()
    harness.supervisor.route_untrusted(first.data, SERVER, CLIENT, trio.current_time())
    harness.supervisor.route_untrusted(
        first.data, SERVER, ("203.0.113.9", 500), trio.current_time()
    )
    await trio.testing.wait_all_tasks_blocked()
    assert harness.stats.actors_started == 2
    assert harness.supervisor.half_open_count == 2


async def test_established_sa_leaves_the_half_open_table(harness: Harness) -> None:
    event = await harness.establish(harness.initiator())
    assert harness.supervisor.half_open_count == 0
    assert harness.supervisor.actor_count == 1
    assert harness.supervisor.is_routed(event.spi_i, event.spi_r)
    assert any(isinstance(e, IkeSaEstablished) for e in harness.events)
    assert harness.stats.ike_sas_established == 1


async def test_half_open_timeout_retires_the_actor(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    harness.to_responder(harness.initiator())
    await trio.testing.wait_all_tasks_blocked()
    assert harness.supervisor.actor_count == 1
    await trio.sleep(29.0)
    assert harness.supervisor.actor_count == 1
    await trio.sleep(2.0)
    assert harness.supervisor.actor_count == 0
    assert harness.supervisor.half_open_count == 0
    assert harness.stats.half_open_expired == 1
    assert harness.stats.actors_retired == 1


async def test_established_sa_outlives_the_half_open_timeout(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    event = await harness.establish(harness.initiator())
    await trio.sleep(120.0)
    assert harness.supervisor.is_routed(event.spi_i, event.spi_r)
    assert harness.stats.half_open_expired == 0


async def test_full_mailbox_drops_and_counts(harness: Harness) -> None:
    (init,) = harness.initiator().datagrams_to_send()
    # route() never awaits, so the actor cannot run between these 40 calls.
    for _ in range(40):
        harness.supervisor.route_untrusted(init.data, SERVER, CLIENT, trio.current_time())
    assert harness.stats.dropped_mailbox_full == 40 - harness.supervisor.mailbox_size
    assert harness.stats.actors_started == 1


async def test_unknown_spi_and_garbage_are_dropped(harness: Harness) -> None:
    event = await harness.establish(harness.initiator())
    other = b"\x09" * 8
    header = event.spi_i + other + bytes([0, 0x20, 37, 0x08, 0, 0, 0, 1, 0, 0, 0, 28])
    harness.supervisor.route_untrusted(header, SERVER, CLIENT, trio.current_time())
    # right responder SPI, wrong initiator SPI
    header = b"\x07" * 8 + event.spi_r + bytes([0, 0x20, 37, 0x08, 0, 0, 0, 1, 0, 0, 0, 28])
    harness.supervisor.route_untrusted(header, SERVER, CLIENT, trio.current_time())
    harness.supervisor.route_untrusted(b"\x00" * 10, SERVER, CLIENT, trio.current_time())
    assert harness.stats.dropped_no_sa == 2
    assert harness.stats.dropped_malformed == 1


async def test_exception_in_one_actor_spares_the_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = await harness.establish(harness.initiator(b"\x0a" * 8))
    b = await harness.establish(harness.initiator(b"\x0b" * 8))
    actor = harness.supervisor.actor_for(a.spi_r)
    assert actor is not None

    broken = actor.session
    original = IkeSession.receive_datagram_untrusted

    def explode(self: IkeSession, data: bytes, local: Address, remote: Address, now: float) -> None:
        if self is broken:  # only this SA's session object breaks
            raise ValueError("boom")
        original(self, data, local, remote, now)

    monkeypatch.setattr(IkeSession, "receive_datagram_untrusted", explode)
    header = a.spi_i + a.spi_r + bytes([0, 0x20, 37, 0x08, 0, 0, 0, 2, 0, 0, 0, 28])
    harness.supervisor.route_untrusted(header, SERVER, CLIENT, trio.current_time())
    await trio.testing.wait_all_tasks_blocked()

    assert harness.stats.actor_failures == 1
    assert not harness.supervisor.is_routed(a.spi_i, a.spi_r)
    assert harness.supervisor.is_routed(b.spi_i, b.spi_r)
    deleted = [e for e in harness.events if isinstance(e, IkeSaDeleted)]
    assert [(e.spi_r, e.reason) for e in deleted] == [(a.spi_r, "actor failed")]
    assert any("boom" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    # and new SAs still come up
    c = await harness.establish(harness.initiator(b"\x0c" * 8))
    assert harness.supervisor.is_routed(c.spi_i, c.spi_r)


class StuckTimerSession:
    """A broken core whose timer never advances: the actor must not spin on it."""

    spi_i = b"\x05" * 8
    spi_r = b"\x06" * 8
    closed = False

    def receive_datagram_untrusted(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> None:
        pass

    def datagrams_to_send(self) -> list[Datagram]:
        return []

    def get_timer(self) -> float | None:
        return 0.0

    def handle_timer(self, now: float) -> None:
        pass

    def next_event(self) -> Event | None:
        return None

    def end_here(self) -> None:
        pass

    pending = None  # its exchanges never wait for the runtime

    def resume(self, now: float) -> None:
        pass


async def test_session_timer_that_does_not_advance_fails_only_that_actor(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    stats = RuntimeStats()

    def factory(spi_r: bytes, local: Address, remote: Address) -> Session:
        return StuckTimerSession()

    supervisor = Supervisor(
        session_factory=factory,
        send=lambda d: None,
        event_sink=lambda e: None,
        stats=stats,
        half_open_timeout=30.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        init = IkeSession.initiator(
            setup.connection, setup.initiator_policy, b"\x01" * 8, CLIENT, SERVER, 0.0
        )
        (d,) = init.datagrams_to_send()
        supervisor.route_untrusted(d.data, SERVER, CLIENT, trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert stats.actor_failures == 1
        assert supervisor.actor_count == 0
        assert any(
            r.exc_info and isinstance(r.exc_info[1], SessionTimerStuck) for r in caplog.records
        )
        nursery.cancel_scope.cancel()


async def test_session_factory_failure_is_counted(setup: Setup) -> None:
    stats = RuntimeStats()

    def factory(spi_r: bytes, local: Address, remote: Address) -> Session:
        raise RuntimeError("no session today")

    supervisor = Supervisor(
        session_factory=factory,
        send=lambda d: None,
        event_sink=lambda e: None,
        stats=stats,
        half_open_timeout=30.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        init = IkeSession.initiator(
            setup.connection, setup.initiator_policy, b"\x01" * 8, CLIENT, SERVER, 0.0
        )
        (d,) = init.datagrams_to_send()
        supervisor.route_untrusted(d.data, SERVER, CLIENT, trio.current_time())
        assert stats.actor_failures == 1
        assert supervisor.actor_count == 0
        nursery.cancel_scope.cancel()


def _our_ke(datagram: Datagram) -> bytes:
    payloads = decode_untrusted(datagram.data).payloads
    return next(p.data for p in payloads if isinstance(p, KePayload))


async def test_a_shared_dh_value_goes_when_its_sas_retire(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    # reuse allowed for an hour, so only the retirement can end the sharing
    config = dataclasses.replace(setup.node_config, dh_reuse=3600.0)
    sent: list[Datagram] = []
    supervisor = Supervisor(session_factory=responder_factory(config), send=sent.append,
                            event_sink=lambda event: None, stats=RuntimeStats(),
                            half_open_timeout=30.0)
    h = Harness(setup, supervisor, supervisor.stats, sent, [])
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        h.to_responder(h.initiator(b"\x01" * 8))
        h.to_responder(h.initiator(b"\x02" * 8))
        await trio.testing.wait_all_tasks_blocked()
        first, second = sent
        assert _our_ke(first) == _our_ke(second)  # RFC 7296 2.12: one value, two SAs
        await trio.sleep(31.0)  # both expire half-open: their actors retire
        assert supervisor.actor_count == 0
        h.to_responder(h.initiator(b"\x03" * 8))
        await trio.testing.wait_all_tasks_blocked()
        assert _our_ke(sent[2]) != _our_ke(first)
        nursery.cancel_scope.cancel()


async def test_an_adopted_sa_is_ended_by_an_announcement_of_its_identities(
        harness: Harness) -> None:
    """A taken-over SA knows its identities: INITIAL_CONTACT from another responder
    reaches it like an SA established here."""
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    (established,) = [e for e in drain(gateway) if isinstance(e, IkeSaEstablished)]
    supervisor = harness.supervisor
    actor = supervisor.adopt(gateway, trio.current_time())
    assert actor is not None
    key = (established.local_id, established.remote_id)
    assert supervisor.replace_identity(key, "initial_contact", bytes(8)) == 1
    await trio.testing.wait_all_tasks_blocked()
    assert supervisor.actor_for(gateway.spi_r) is None


async def test_an_adopted_sa_tells_the_accounting_and_keeps_its_login_time(
        harness: Harness) -> None:
    """A takeover: IkeSaAdopted goes to the event sink (RADIUS accounting goes on), and
    unique = "keep" orders the SA by when its peer authenticated, not by the takeover."""
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    drain(gateway)
    gateway.sa.authenticated_at = 1000.0  # long before
    supervisor = harness.supervisor
    assert supervisor.adopt(gateway, trio.current_time()) is not None
    assert supervisor.since_of(gateway.spi_r) == 1000.0
    [adopted] = [e for e in harness.events if isinstance(e, IkeSaAdopted)]
    assert (adopted.spi_i, adopted.spi_r, adopted.authenticated_at) == (
        gateway.spi_i, gateway.spi_r, 1000.0)
    assert adopted.children == tuple(gateway.sa.children)
