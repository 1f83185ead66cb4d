"""Product bugs the node fuzzer found, each reproduced without the node.

The fuzzer reports them as exceptions escaping an actor; these tests pin the cause.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.ike.constants import ExchangeType, NotifyType, PayloadType
from cluster.ike.message import decode_untrusted
from cluster.ike.payloads import NotifyPayload, encode_payloads
from cluster.ike.policy import Lifetime
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from tests.ike.sessions import child, psk_connection, psk_pair, run_handshake

from .mutations import Chain, SaKeys, seal


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


def refuse_with_invalid_ke(client: IkeSession, gateway: IkeSession, group: bytes,
                           now: float) -> None:
    """The client answers the gateway's outstanding CREATE_CHILD_SA with
    N(INVALID_KE_PAYLOAD) naming `group` (RFC 7296 1.3, 3.10.1)."""
    pending = gateway.sa.pending
    assert pending is not None and pending.exchange == ExchangeType.CREATE_CHILD_SA
    gateway.datagrams_to_send()
    refusal = Chain(PayloadType.NOTIFY, encode_payloads(
        [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, group)]))
    data = seal(SaKeys.of(client), ExchangeType.CREATE_CHILD_SA, pending.message_id, refusal,
                response=True)
    gateway.receive_datagram_untrusted(data, gateway.sa.local, gateway.sa.remote, now)


@pytest.mark.parametrize("group", [0, 9999, 14, 31])
def test_ike_rekey_refused_with_a_group_we_did_not_offer_is_retried_later(group: int) -> None:
    """Seen in the CI fuzz run (seed 42024, cookies off): `ValueError: 0 is not a valid
    DhGroup` escaped an actor. The peer refused our IKE rekey with INVALID_KE_PAYLOAD
    naming group 0; we queued a retry with that group and building it raised. Only a group
    we offered, other than the one we sent, is worth a retry (RFC 7296 1.3, 2.7)."""
    client, gateway = psk_pair()  # x25519 (31) only
    run_handshake(client, gateway)
    gateway.rekey_ike(1.0)
    refuse_with_invalid_ke(client, gateway, group.to_bytes(2, "big"), 1.0)
    assert gateway.state is State.ESTABLISHED
    assert gateway.sa.pending is None and not gateway.sa.queue  # no retry with that group
    assert not gateway.sa.rekeying and 1.0 < gateway.sa.rekey_at < float("inf")  # later


@pytest.mark.parametrize("group", [0, 9999, 19, 31])
def test_child_rekey_refused_with_a_group_we_did_not_offer_is_retried_later(group: int) -> None:
    """The same for a Child SA rekey with PFS (x25519 offered and sent)."""
    gw = psk_connection(children=(child(proposals=("aes256gcm16-x25519",)),))
    client, gateway = psk_pair(gw)
    run_handshake(client, gateway)
    [spi_in] = gateway.sa.children
    gateway.rekey_child(spi_in, 1.0)
    refuse_with_invalid_ke(client, gateway, group.to_bytes(2, "big"), 1.0)
    assert gateway.state is State.ESTABLISHED
    assert gateway.sa.pending is None and not gateway.sa.queue
    old = gateway.sa.children[spi_in]
    assert not old.rekeying and 1.0 < old.rekey_at < float("inf")


def test_child_rekey_refused_with_an_offered_group_is_retried_with_it() -> None:
    """The legitimate case stays: we offered 14 besides x25519 and sent x25519."""
    gw = psk_connection(children=(child(proposals=("aes256gcm16-x25519-modp2048",)),))
    client, gateway = psk_pair(gw)
    run_handshake(client, gateway)
    [spi_in] = gateway.sa.children
    gateway.rekey_child(spi_in, 1.0)
    refuse_with_invalid_ke(client, gateway, (14).to_bytes(2, "big"), 1.0)
    assert gateway.sa.pending is not None  # the retry went out at once
    assert decode_untrusted(gateway.datagrams_to_send()[0].data).header.message_id == \
        gateway.sa.pending.message_id


def test_ike_sa_expiring_while_a_request_is_outstanding_does_not_stall_the_timer() -> None:
    """Seen in a slow fuzz run (seed 5, cookies on, under tracemalloc): SessionTimerStuck,
    "timer 98215.937 not after now 98216.415", and the witness SA was torn down with it.
    When the IKE SA's life_time passed, `handle_timer` queued the delete and returned at
    once; with the delete waiting behind another request the SA stayed ESTABLISHED, so a
    Child SA deadline that had passed in the same call stayed due for ever."""
    gateway_conn = replace(
        psk_connection(children=(replace(child(), lifetime=Lifetime(5.0, 30.0, 0.0)),)),
        lifetime=Lifetime(10.0, 11.0, 0.0),
    )
    client, gateway = psk_pair(gateway_conn)
    run_handshake(client, gateway)
    assert gateway.check_liveness(4.0)  # unanswered: the delete will have to wait
    # the actor wakes late (a busy node): the child's rekey and the IKE SA's life_time
    # are both due
    gateway.handle_timer(12.0)
    assert gateway.state is State.ESTABLISHED and gateway.sa.queue  # the delete waits
    timer = gateway.get_timer()
    assert timer is not None and timer > 12.0


def test_child_sa_whose_rekey_and_expiry_both_passed_does_not_stall_the_timer() -> None:
    """The same kind of stall, found while looking for the one above: an actor woken after
    both a Child SA's rekey time and its life_time (life_time close to rekey_time, a busy
    node) deleted the Child SA and left its rekey deadline due."""
    gateway_conn = psk_connection(children=(replace(child(), lifetime=Lifetime(5.0, 6.0, 0.0)),))
    client, gateway = psk_pair(gateway_conn)
    run_handshake(client, gateway)
    gateway.handle_timer(7.0)
    assert gateway.sa.pending is not None  # the Child SA's delete went out
    timer = gateway.get_timer()
    assert timer is not None and timer > 7.0
