"""A responder loads the stored SAs rendezvous hashing gives it without waiting for the
peer: a dead owner's, or those a live one handed over. Their timers run on (here a
liveness check) however quiet the peer is. Those rendezvous gives to another live
responder are left to it. A real store, supervisor and sessions (the harness of
test_takeover_resend: node A stored the SA and let it go, node B runs)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio
import trio.testing

from cluster.ike.constants import ExchangeType
from cluster.ike.message import decode_untrusted
from cluster.ike.session import IkeSession
from cluster.rendezvous import choose
from tests.ike.sessions import drain, psk_connection, psk_pair, run_handshake
from tests.runtime.test_takeover_resend import TTL, node_b_after_a_died

DPD_DELAY = 2.0


def gateway_for(owner: str) -> IkeSession:
    """An established gateway (with DPD) whose SA rendezvous gives `owner` among A, B."""
    while True:
        client, gateway = psk_pair(replace(psk_connection(), dpd_delay=DPD_DELAY))
        run_handshake(client, gateway)
        drain(gateway)
        if choose(gateway.spi_i, ("A", "B")) == owner:
            return gateway


def informational_requests(sent: list[tuple[float, bytes]]) -> list[float]:
    return [at for at, data in sent
            if (header := decode_untrusted(data).header).exchange == ExchangeType.INFORMATIONAL
            and not header.is_response]


@pytest.mark.parametrize("how", ["owner died", "handed over"])
async def test_an_sa_given_to_this_node_is_loaded_and_checks_liveness_unasked(
        mock_clock: trio.testing.MockClock, how: str) -> None:
    gateway = gateway_for("B")
    async with node_b_after_a_died(gateway, a_alive=how == "handed over") as b:
        start = trio.current_time()
        mock_clock.jump(TTL / 3)  # one renewal round: B looks for what it should hold
        await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.actor_for(gateway.spi_r) is not None
        assert b.persistence.stats.takeovers == 1
        for _ in range(int(2 * DPD_DELAY / 0.25)):
            mock_clock.jump(0.25)
            await trio.testing.wait_all_tasks_blocked()
        checks = informational_requests(b.sent)
        assert checks, b.sent  # with not one datagram from the peer
        # (a dead owner's SA: our requests wait half a TTL for the workers' views)
        assert min(checks) - start >= (TTL / 2 if how == "owner died" else 0.0)


async def test_an_sa_rendezvous_gives_to_a_live_responder_is_left_to_it(
        mock_clock: trio.testing.MockClock) -> None:
    gateway = gateway_for("A")
    async with node_b_after_a_died(gateway, a_alive=True) as b:
        for _ in range(9):  # past the time B looks after the responders changed
            mock_clock.jump(TTL / 3)
            await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.actor_for(gateway.spi_r) is None
        assert b.persistence.stats.takeovers == 0 and not b.sent


async def test_an_sa_still_leased_elsewhere_is_taken_once_the_lease_ends_dropping_nothing(
        mock_clock: trio.testing.MockClock) -> None:
    """The old owner holds the lease a TTL more (it hands over at its next round): B's
    looks find it taken, which drops nothing (no datagram waited) and counts no
    lease_held, and B takes it once the lease is free."""
    gateway = gateway_for("B")
    async with node_b_after_a_died(gateway, a_alive=True, a_holds=True) as b:
        mock_clock.jump(TTL / 3)
        await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.actor_for(gateway.spi_r) is None
        for _ in range(3):
            mock_clock.jump(TTL / 3)
            await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.actor_for(gateway.spi_r) is not None
        assert b.persistence.stats.lease_held == 0
        assert b.supervisor.stats.dropped_no_sa == 0
