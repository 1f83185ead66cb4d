"""Product bugs the node fuzzer found, each reproduced without the node.

The fuzzer reports them as exceptions escaping an actor; these tests pin the cause.
"""

from __future__ import annotations

from dataclasses import replace

from cluster.ike.policy import Lifetime
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from tests.ike.sessions import child, psk_connection, psk_pair, run_handshake


def step_timers(session: IkeSession, until: float) -> float:
    """Run the session's timers as the actor does, up to `until`; the last time handled.

    The actor refuses a timer still due right after handling it (`SessionTimerStuck`),
    since stepping again would spin: so does this."""
    now = 0.0
    while (timer := session.get_timer()) is not None and timer <= until:
        now = max(now, timer)
        session.handle_timer(now)
        session.datagrams_to_send()  # nobody answers
        after = session.get_timer()
        assert after is None or after > now, f"timer {after} still due after handling {now}"
    return now


def test_child_sa_expiring_while_its_delete_waits_does_not_stall_the_timer() -> None:
    """Seen in a 10-minute fuzz run (seed 11): `SessionTimerStuck: timer 149771.2738 not
    after now 149771.2739` tore an IKE SA down. A Child SA marked for deletion (ours
    queued behind, or still waiting for, another request) kept its life_time deadline;
    once that passed, `handle_timer` skipped it as "already deleting" and `get_timer`
    went on reporting it due."""
    gateway_conn = replace(
        psk_connection(children=(replace(child(), lifetime=Lifetime(10.0, 11.0)),)),
        lifetime=Lifetime(0.0),
    )
    client, gateway = psk_pair(gateway_conn)
    run_handshake(client, gateway)
    assert gateway.state is State.ESTABLISHED
    [spi_in] = gateway.sa.children
    assert gateway.sa.children[spi_in].expire_at == 11.0
    # a request of ours is outstanding (the peer is slow), so the delete has to wait
    assert gateway.check_liveness(5.0)
    gateway.delete_child(spi_in, 5.0)
    assert gateway.sa.children[spi_in].deleting and gateway.sa.pending is not None
    # the Child SA's life_time passes while the liveness check is still retransmitted
    last = step_timers(gateway, until=20.0)
    assert last >= 11.0
    assert gateway.state is State.ESTABLISHED
