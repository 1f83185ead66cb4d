"""CREATE_CHILD_SA, rekeys, lifetimes and liveness between our initiator and responder."""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

import pytest

from cluster.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaMoved,
    IkeSaRekeyed,
    IkeSaRetired,
)
from cluster.ike.policy import ConnectionConfig, Lifetime
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from cluster.transforms import SHA256_96
from tests.ike.sessions import (
    child,
    client_for,
    drain,
    psk_connection,
    psk_pair,
    run_handshake,
    transfer,
)

E = TypeVar("E")


def of(events: list[Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def settle(a: IkeSession, b: IkeSession, now: float) -> None:
    """Move datagrams both ways until neither side has anything to send."""
    for _ in range(50):
        if not (transfer(a, b, now) + transfer(b, a, now)):
            return
    raise AssertionError("the exchange did not settle")


def established(gw_conn: ConnectionConfig | None = None,
                client_conn: ConnectionConfig | None = None) -> tuple[IkeSession, IkeSession]:
    client, gateway = psk_pair(gw_conn, client_conn)
    settle(client, gateway, 0.0)
    assert client.state is State.ESTABLISHED and gateway.state is State.ESTABLISHED
    drain(client)
    drain(gateway)
    return client, gateway


def only_child(session: IkeSession) -> bytes:
    [spi] = session.sa.children
    return spi


def assert_mirrored(client_events: list[Event], gateway_events: list[Event]) -> None:
    [c] = of(client_events, ChildSaEstablished)
    [g] = of(gateway_events, ChildSaEstablished)
    assert (c.spi_in, c.spi_out) == (g.spi_out, g.spi_in)
    assert c.encr_key_in == g.encr_key_out and c.encr_key_out == g.encr_key_in


@pytest.mark.parametrize("who", ["client", "gateway"])
def test_child_rekey_replaces_the_sa_and_deletes_the_old_one(who: str) -> None:
    client, gateway = established()
    old_client, old_gateway = only_child(client), only_child(gateway)
    initiator = client if who == "client" else gateway
    initiator.rekey_child(only_child(initiator), 1.0)
    settle(client, gateway, 1.0)
    c_events, g_events = drain(client), drain(gateway)
    assert_mirrored(c_events, g_events)
    [c_new] = of(c_events, ChildSaEstablished)
    [g_new] = of(g_events, ChildSaEstablished)
    assert c_new.replaces == old_client and g_new.replaces == old_gateway
    assert [d.spi_in for d in of(c_events, ChildSaDeleted)] == [old_client]
    assert [d.spi_in for d in of(g_events, ChildSaDeleted)] == [old_gateway]
    assert list(client.sa.children) == [c_new.spi_in]
    assert list(gateway.sa.children) == [g_new.spi_in]
    assert client.drops == {} and gateway.drops == {}


def test_child_rekey_with_pfs_carries_a_key_exchange() -> None:
    pfs = psk_connection(children=(child(proposals=("aes256gcm16-x25519",)),))
    client, gateway = established(pfs)
    before = gateway.sa.children[only_child(gateway)]
    client.rekey_child(only_child(client), 1.0)
    settle(client, gateway, 1.0)
    c_events, g_events = drain(client), drain(gateway)
    assert_mirrored(c_events, g_events)
    [g_new] = of(g_events, ChildSaEstablished)
    after = gateway.sa.children[g_new.spi_in]
    assert after.chosen.dh == 31 and before.chosen.dh is None  # IKE_AUTH carries no KE


def test_pfs_group_mismatch_is_settled_by_invalid_ke() -> None:
    gw = psk_connection(children=(child(proposals=("aes256gcm16-modp2048",)),))
    client_conn = replace(client_for(gw), children=(child(
        local_ts="10.99.1.0/24", remote_ts="10.99.2.0/24",
        proposals=("aes256gcm16-x25519-modp2048",)),))
    client, gateway = established(gw, client_conn)
    client.rekey_child(only_child(client), 1.0)  # its KE is for x25519, the gateway wants 14
    settle(client, gateway, 1.0)
    c_events, g_events = drain(client), drain(gateway)
    assert_mirrored(c_events, g_events)
    assert gateway.sa.children[only_child(gateway)].chosen.dh == 14


def test_pfs_demanded_by_us_is_not_given_up() -> None:
    gw = psk_connection(children=(child(proposals=("aes256gcm16-x25519",)),))
    client_conn = replace(client_for(gw), children=(child(
        local_ts="10.99.1.0/24", remote_ts="10.99.2.0/24", proposals=("aes256gcm16",)),))
    client, gateway = established(gw, client_conn)
    old = only_child(gateway)
    client.rekey_child(only_child(client), 1.0)
    settle(client, gateway, 1.0)
    assert only_child(gateway) == old  # NO_PROPOSAL_CHOSEN: the old SA stays
    assert not of(drain(gateway), ChildSaEstablished)


@pytest.mark.parametrize("who", ["client", "gateway"])
def test_ike_rekey_moves_the_children_to_new_spis(who: str) -> None:
    client, gateway = established()
    old = (client.spi_i, client.spi_r)
    children = (only_child(client), only_child(gateway))
    initiator = client if who == "client" else gateway
    initiator.rekey_ike(1.0)
    settle(client, gateway, 1.0)
    c_events, g_events = drain(client), drain(gateway)
    new = (client.spi_i, client.spi_r)
    assert new != old and new == (gateway.spi_i, gateway.spi_r)
    for events in (c_events, g_events):
        [rekeyed] = of(events, IkeSaRekeyed)
        assert (rekeyed.old_spi_i, rekeyed.old_spi_r) == old
        assert (rekeyed.spi_i, rekeyed.spi_r) == new
        assert [(r.spi_i, r.spi_r) for r in of(events, IkeSaRetired)] == [old]
        assert not of(events, ChildSaDeleted) and not of(events, IkeSaDeleted)
    assert (only_child(client), only_child(gateway)) == children
    # the rekey's initiator is the new SA's initiator (RFC 7296 2.18)
    assert client.sa.is_initiator is (who == "client")
    assert gateway.sa.is_initiator is (who == "gateway")
    assert client.sa.our_next_id == 0 or client.sa.our_next_id == 0 + (who == "client") * 0
    assert client.check_liveness(2.0)
    settle(client, gateway, 2.0)
    assert client.drops == {} and gateway.drops == {}
    assert client.state is State.ESTABLISHED and gateway.state is State.ESTABLISHED


def test_child_rekey_after_an_ike_rekey_uses_the_new_keys() -> None:
    client, gateway = established()
    client.rekey_ike(1.0)
    settle(client, gateway, 1.0)
    gateway.rekey_child(only_child(gateway), 2.0)
    settle(client, gateway, 2.0)
    c_events, g_events = drain(client), drain(gateway)
    assert_mirrored(c_events, g_events)
    assert client.drops == {} and gateway.drops == {}


def test_simultaneous_child_rekeys_leave_one_new_sa_on_both_sides() -> None:
    client, gateway = established()
    client.rekey_child(only_child(client), 1.0)
    gateway.rekey_child(only_child(gateway), 1.0)
    # both requests cross on the wire before either response
    c_out, g_out = client.datagrams_to_send(), gateway.datagrams_to_send()
    for d in c_out:
        gateway.receive_datagram_untrusted(d.data, d.remote, d.local, 1.0)
    for d in g_out:
        client.receive_datagram_untrusted(d.data, d.remote, d.local, 1.0)
    settle(client, gateway, 1.0)
    assert len(client.sa.children) == 1 and len(gateway.sa.children) == 1
    [c_spi], [g_spi] = client.sa.children, gateway.sa.children
    c_child, g_child = client.sa.children[c_spi], gateway.sa.children[g_spi]
    assert (c_child.spi_in, c_child.spi_out) == (g_child.spi_out, g_child.spi_in)
    assert c_child.keys == g_child.keys
    assert client.drops == {} and gateway.drops == {}


def test_ike_rekey_by_the_peer_waits_for_our_outstanding_request() -> None:
    """RFC 7296 2.25: while a request of ours is outstanding, the peer's IKE SA rekey gets
    TEMPORARY_FAILURE; taken over, the request would die with the old IKE SA. (strongSwan
    can drop a request whose message ID equals a response it is processing; the Child SA
    whose Delete was lost that way stayed on our side for good.)"""
    client, gateway = established()
    spis = (gateway.spi_i, gateway.spi_r)
    gateway.delete_child(only_child(gateway), 1.0)
    assert len(gateway.datagrams_to_send()) == 1  # lost: the gateway must send it again
    client.rekey_ike(1.0)
    settle(client, gateway, 1.0)
    assert (client.spi_i, client.spi_r) == (gateway.spi_i, gateway.spi_r) == spis
    for _ in range(20):  # the retransmitted Delete, then the client's rekey again
        now = min(t for t in (client.get_timer(), gateway.get_timer()) if t is not None)
        client.handle_timer(now)
        gateway.handle_timer(now)
        settle(client, gateway, now)
        if (gateway.spi_i, gateway.spi_r) != spis:
            break
    assert (client.spi_i, client.spi_r) == (gateway.spi_i, gateway.spi_r) != spis
    assert client.sa.children == {} and gateway.sa.children == {}
    assert client.state is State.ESTABLISHED and gateway.state is State.ESTABLISHED


def test_rekey_of_a_child_sa_we_are_deleting_gets_temporary_failure() -> None:
    """RFC 7296 2.25.1: not CHILD_SA_NOT_FOUND, which tells the peer to create it anew."""
    client, gateway = established()
    gateway.delete_child(only_child(gateway), 1.0)
    held = gateway.datagrams_to_send()
    client.rekey_child(only_child(client), 1.0)
    transfer(client, gateway, 1.0)  # the rekey request overtakes the Delete
    transfer(gateway, client, 1.0)
    assert client.sa.children  # refused for now, not forgotten
    for d in held:
        client.receive_datagram_untrusted(d.data, d.remote, d.local, 1.0)
    settle(client, gateway, 1.0)
    [deleted] = of(drain(client), ChildSaDeleted)
    assert deleted.reason == "deleted by peer"
    assert client.sa.children == {} and gateway.sa.children == {}
    assert not of(drain(gateway), ChildSaEstablished)


def test_lifetimes_make_the_responder_rekey() -> None:
    short = replace(psk_connection(children=(replace(child(), lifetime=Lifetime(10.0)),)),
                    lifetime=Lifetime(30.0))
    client, gateway = established(short)
    child_rekey = gateway.get_timer()
    assert child_rekey is not None and 9.0 <= child_rekey <= 10.0  # rand_time: 10 % jitter
    old = only_child(gateway)
    gateway.handle_timer(child_rekey)
    settle(client, gateway, child_rekey)
    assert only_child(gateway) != old
    [new] = of(drain(gateway), ChildSaEstablished)
    assert new.replaces == old
    ike_rekey = gateway.get_timer()
    assert ike_rekey is not None
    spis = (gateway.spi_i, gateway.spi_r)
    for _ in range(5):  # child rekeys come first; then the IKE SA's turn
        now = gateway.get_timer()
        assert now is not None
        gateway.handle_timer(now)
        settle(client, gateway, now)
        if (gateway.spi_i, gateway.spi_r) != spis:
            break
    assert (gateway.spi_i, gateway.spi_r) != spis
    assert gateway.state is State.ESTABLISHED and client.state is State.ESTABLISHED


NO_REKEY = Lifetime(0.0, 5.0)  # no rekey; the hard lifetime at 5 s


def test_a_child_sa_past_its_hard_lifetime_goes_at_once_and_is_created_again() -> None:
    """RFC 4301 4.4.2.1: at its hard lifetime (life_time) a Child SA ends, keys and all,
    before the peer answers the Delete that tells it. As strongSwan does, one nobody
    rekeyed is created again, with the selectors it had."""
    no_rekey = psk_connection(children=(replace(child(), lifetime=NO_REKEY),))
    client, gateway = established(no_rekey)
    old = only_child(gateway)
    [selectors] = [(c.local_ts, c.remote_ts) for c in gateway.sa.children.values()]
    gateway.handle_timer(4.9)
    assert not drain(gateway) and old in gateway.sa.children
    gateway.handle_timer(5.0)
    [gone] = of(drain(gateway), ChildSaDeleted)  # before any answer
    assert (gone.spi_in, gone.reason) == (old, "expired")
    assert gateway.sa.children == {}
    settle(client, gateway, 5.0)
    [told] = of(drain(client), ChildSaDeleted)
    assert told.spi_out == old
    events = drain(gateway)
    assert not of(events, ChildSaDeleted)  # the Delete's answer adds nothing
    [again] = of(events, ChildSaEstablished)
    assert again.spi_in != old and again.replaces == b"" and again.we_initiated
    assert (again.local_ts, again.remote_ts) == selectors
    assert only_child(client) == again.spi_out and only_child(gateway) == again.spi_in
    assert gateway.state is State.ESTABLISHED


def test_a_child_sa_the_data_plane_ended_is_expired_and_created_again() -> None:
    """The data plane's hard byte/packet limit (or exhausted sequence numbers) removed
    the Child SA: as at its life_time, it goes here at once, the peer is told, and it is
    created again with its selectors (strongSwan does the same after a hard expire)."""
    client, gateway = established()
    old = only_child(gateway)
    gateway.expire_child(old, 1.0)
    [gone] = of(drain(gateway), ChildSaDeleted)
    assert (gone.spi_in, gone.reason) == (old, "expired") and gateway.sa.children == {}
    settle(client, gateway, 1.0)
    [again] = of(drain(gateway), ChildSaEstablished)
    assert again.replaces == b"" and list(gateway.sa.children) == [again.spi_in]
    assert list(client.sa.children) == [again.spi_out]
    gateway.expire_child(old, 2.0)  # (again: it is gone, nothing happens)
    assert not gateway.datagrams_to_send() and not drain(gateway)


def test_a_child_sa_whose_delete_is_unanswered_goes_at_its_hard_lifetime() -> None:
    """A Child SA we are deleting still has its keys while the Delete waits for an
    answer, but not past its life_time: then it goes, the Delete goes on, and nothing is
    created again (we wanted it gone)."""
    no_rekey = psk_connection(children=(replace(child(), lifetime=NO_REKEY),))
    client, gateway = established(no_rekey)
    spi = only_child(gateway)
    gateway.delete_child(spi, 1.0)
    [delete] = gateway.datagrams_to_send()  # lost
    gateway.handle_timer(4.9)
    assert spi in gateway.sa.children and not drain(gateway)
    gateway.handle_timer(5.0)
    [gone] = of(drain(gateway), ChildSaDeleted)
    assert (gone.spi_in, gone.reason) == (spi, "expired")
    assert gateway.sa.children == {} and gateway.sa.pending is not None
    client.receive_datagram_untrusted(delete.data, delete.remote, delete.local, 5.0)
    settle(client, gateway, 5.0)
    assert gateway.sa.pending is None and not gateway.sa.queue
    assert gateway.sa.children == {} and client.sa.children == {}
    events = drain(gateway)
    assert not of(events, ChildSaDeleted) and not of(events, ChildSaEstablished)


def test_a_child_sa_that_expires_during_its_rekey_is_followed_by_the_rekeys_sa() -> None:
    """Our rekey in flight at the hard lifetime: the old SA goes at once, and the
    answer's SA stands alone (no successor of a gone SA, nothing created besides)."""
    short = psk_connection(children=(replace(child(), lifetime=NO_REKEY),))
    client, gateway = established(short)
    old = only_child(gateway)
    gateway.rekey_child(old, 2.0)  # (its retransmission is due at 6 s)
    [rekey] = gateway.datagrams_to_send()  # delayed
    gateway.handle_timer(5.0)
    [gone] = of(drain(gateway), ChildSaDeleted)
    assert (gone.spi_in, gone.reason) == (old, "expired")
    client.receive_datagram_untrusted(rekey.data, rekey.remote, rekey.local, 5.0)
    settle(client, gateway, 5.0)
    [new] = of(drain(gateway), ChildSaEstablished)
    assert new.replaces == b"" and new.spi_in != old
    assert list(gateway.sa.children) == [new.spi_in]
    assert list(client.sa.children) == [new.spi_out]  # the Delete of the old came too


def test_a_child_sa_expired_during_a_rekey_the_peer_refuses_is_created_again() -> None:
    short = psk_connection(children=(replace(child(), lifetime=NO_REKEY),))
    client, gateway = established(short)
    old = only_child(gateway)
    gateway.rekey_child(old, 2.0)  # (its retransmission is due at 6 s)
    [rekey] = gateway.datagrams_to_send()
    gateway.handle_timer(5.0)
    client.delete_child(only_child(client), 5.0)  # so the peer answers CHILD_SA_NOT_FOUND
    settle(client, gateway, 5.0)
    assert client.sa.children == {} and gateway.sa.children == {}
    client.receive_datagram_untrusted(rekey.data, rekey.remote, rekey.local, 5.0)
    settle(client, gateway, 5.0)
    [again] = of(drain(gateway), ChildSaEstablished)
    assert again.replaces == b""
    assert list(gateway.sa.children) == [again.spi_in]
    assert list(client.sa.children) == [again.spi_out]


def test_dpd_checks_liveness_after_silence() -> None:
    watched = replace(psk_connection(), dpd_delay=2.0)
    client, gateway = established(watched)
    assert gateway.get_timer() == 2.0
    gateway.handle_timer(2.0)
    [probe] = gateway.datagrams_to_send()
    client.receive_datagram_untrusted(probe.data, probe.remote, probe.local, 2.0)
    transfer(client, gateway, 2.0)
    assert gateway.sa.pending is None and gateway.sa.last_heard == 2.0
    assert gateway.get_timer() == 4.0


def test_esp_from_the_peer_puts_the_liveness_check_off() -> None:
    """RFC 7296 2.4: a liveness check only when nothing protected came back recently;
    ESP on a Child SA counts (the data plane tells, `traffic_seen`)."""
    watched = replace(psk_connection(), dpd_delay=2.0)
    _, gateway = established(watched)
    gateway.traffic_seen(1.5)
    assert gateway.get_timer() == 3.5
    gateway.handle_timer(2.0)  # the old deadline: nothing to do
    assert not gateway.datagrams_to_send() and gateway.sa.pending is None
    gateway.traffic_seen(1.0)  # (an older sighting changes nothing)
    assert gateway.get_timer() == 3.5
    gateway.handle_timer(3.5)
    assert len(gateway.datagrams_to_send()) == 1 and gateway.sa.pending is not None


def test_dead_peer_is_cleared_after_the_retransmissions() -> None:
    watched = replace(psk_connection(), dpd_delay=2.0)
    _, gateway = established(watched)
    now = 2.0
    for _ in range(20):
        gateway.handle_timer(now)
        gateway.datagrams_to_send()  # the peer is gone: nothing comes back
        if gateway.closed:
            break
        timer = gateway.get_timer()
        assert timer is not None
        now = timer
    assert gateway.closed
    events = drain(gateway)
    assert of(events, IkeSaDeleted)[0].reason == "peer not responding"
    assert len(of(events, ChildSaDeleted)) == 1
    total = gateway.sa.policy.retransmission.total()
    assert now == pytest.approx(2.0 + total)


def test_delete_child_from_the_responder() -> None:
    client, gateway = established()
    gateway.delete_child(only_child(gateway), 1.0)
    settle(client, gateway, 1.0)
    assert client.sa.children == {} and gateway.sa.children == {}
    assert len(of(drain(client), ChildSaDeleted)) == 1
    assert len(of(drain(gateway), ChildSaDeleted)) == 1


# --- NAT: keepalives and rebinding (RFC 3948 2.3, RFC 7296 2.23) ---------------------------


@pytest.mark.parametrize("interval", [20.0, 7.0, 0.0])  # the default, [ike] keep_alive, off
def test_a_responder_behind_a_nat_sends_keepalives(interval: float) -> None:
    client, _ = psk_pair()
    inside = ("192.168.7.2", 500)  # the gateway's own address; the client talks to GW
    _, gateway = psk_pair(gateway=inside)
    if interval != 20.0:
        gateway.sa.policy = replace(gateway.sa.policy, keep_alive=interval)
    for _ in range(4):
        for d in client.datagrams_to_send():
            gateway.receive_datagram_untrusted(d.data, inside, d.local, 0.0)
        for d in gateway.datagrams_to_send():
            client.receive_datagram_untrusted(d.data, d.remote, GW_NATTED, 0.0)
    assert gateway.state is State.ESTABLISHED and gateway.sa.behind_nat
    assert not client.sa.behind_nat  # the client sees no NAT in front of itself
    timer = gateway.get_timer()
    if not interval:
        assert timer is None or timer > 600  # only the lifetimes are due
        gateway.handle_timer(600.0)
        assert gateway.datagrams_to_send() == []
        return
    assert timer == interval
    gateway.handle_timer(timer)
    [keepalive] = gateway.datagrams_to_send()
    assert keepalive.keepalive and keepalive.data == b"\xff"
    assert gateway.get_timer() == 2 * interval
    # another node that takes the SA over goes on with them (at once, then each interval)
    from cluster.ike.snapshot import restore, snapshot_of

    taken_over = restore(snapshot_of(gateway, 30.0), gateway.sa.policy, 30.0)
    assert taken_over.get_timer() == 30.0
    taken_over.handle_timer(30.0)
    [keepalive] = taken_over.datagrams_to_send()
    assert keepalive.keepalive and keepalive.data == b"\xff"
    assert taken_over.get_timer() == 30.0 + interval


GW_NATTED = ("10.99.0.2", 4500)


def test_peer_behind_a_nat_is_followed_to_its_new_port() -> None:
    gw = psk_connection()
    client_conn = replace(client_for(gw), encap=True)  # faked NAT: the gateway sees one
    client, gateway = established(gw, client_conn)
    assert gateway.sa.nat_remote
    assert client.check_liveness(1.0)
    [probe] = client.datagrams_to_send()
    rebound = (probe.local[0], 61000)  # the NAT gave the client a new port
    gateway.receive_datagram_untrusted(probe.data, probe.remote, rebound, 1.0)
    [reply] = gateway.datagrams_to_send()
    assert reply.remote == rebound and gateway.sa.remote == rebound
    [moved] = of(drain(gateway), IkeSaMoved)
    assert moved.remote == rebound


def test_peer_without_a_nat_is_not_followed() -> None:
    client, gateway = established()
    assert not gateway.sa.nat_remote
    assert client.check_liveness(1.0)
    [probe] = client.datagrams_to_send()
    elsewhere = ("10.99.0.77", 500)
    gateway.receive_datagram_untrusted(probe.data, probe.remote, elsewhere, 1.0)
    assert gateway.sa.remote != elsewhere
    assert not of(drain(gateway), IkeSaMoved)


def test_an_ike_rekey_keeps_who_authenticated_and_how() -> None:
    """The user an EAP exchange authenticated, the RADIUS Session-Timeout and the PPK
    mark stay with the SA through its rekey (sas, snapshots, accounting read them)."""
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    gateway.sa.eap_identity, gateway.sa.session_timeout, gateway.sa.ppk = "carol", 60.0, True
    client.rekey_ike(1.0)
    run_handshake(client, gateway)
    assert [e for e in drain(gateway) if isinstance(e, IkeSaRekeyed)]
    assert (gateway.sa.eap_identity, gateway.sa.session_timeout, gateway.sa.ppk) == (
        "carol", 60.0, True)


@pytest.mark.parametrize("who", ["client", "gateway"])
def test_an_ike_rekey_keeps_the_roles_and_what_both_announced(who: str) -> None:
    """RFC 7296 2.18 makes whoever starts an IKE rekey the new SA's initiator, but the
    gateway stays the gateway (strongSwan's COND_ORIGINAL_INITIATOR): it may still
    redirect the peer (RFC 5685) and end its service (a RADIUS CoA), also after a
    snapshot. What both announced in IKE_AUTH (REDIRECT_SUPPORTED, RFC 6311 message ID
    sync) goes on with the SA."""
    from cluster.ike.snapshot import restore, snapshot_of

    client, gateway = psk_pair()
    run_handshake(client, gateway)
    gateway.sa.redirect_supported = True
    assert gateway.sa.mid_sync and not gateway.sa.original_initiator
    assert client.sa.original_initiator
    starter = client if who == "client" else gateway
    starter.rekey_ike(1.0)
    run_handshake(starter, client if starter is gateway else gateway)
    assert [e for e in drain(gateway) if isinstance(e, IkeSaRekeyed)]
    assert gateway.sa.is_initiator is (who == "gateway")
    assert (gateway.sa.original_initiator, client.sa.original_initiator) == (False, True)
    assert gateway.sa.redirect_supported and gateway.sa.mid_sync and client.sa.mid_sync
    taken_over = restore(snapshot_of(gateway, 2.0), gateway.sa.policy, 2.0)
    assert taken_over.sa.original_initiator is False
    assert taken_over.sa.is_initiator is (who == "gateway")
    assert not client.redirect("gw2.example.test", 2.0)  # the client never redirects
    assert taken_over.limit_session(60, 2.0)
    assert gateway.redirect("gw2.example.test", 2.0)


def test_sha256_96_cuts_only_the_data_planes_icv() -> None:
    """swanctl's sha256_96: HMAC-SHA-256 is negotiated as ever (transform 12, the peer
    sees nothing); our Child SAs, the rekeyed one too, go to the data plane with a 96-bit
    ICV. Without HMAC-SHA-256 it changes nothing."""
    cbc = replace(child(proposals=("aes128-sha256",)), sha256_96=True)
    gw = psk_connection(children=(cbc,))
    plain = client_for(gw)
    plain = replace(plain, children=tuple(replace(c, sha256_96=False) for c in plain.children))
    client, gateway = psk_pair(gw, plain)
    settle(client, gateway, 0.0)
    [theirs] = of(drain(client), ChildSaEstablished)
    [ours] = of(drain(gateway), ChildSaEstablished)
    assert theirs.integ is not None and (theirs.integ.name, theirs.integ.icv_size) == \
        ("sha256", 16)
    assert ours.integ is SHA256_96 and ours.integ.icv_size == 12
    assert ours.integ.transform_id == theirs.integ.transform_id
    assert ours.integ_key_in == theirs.integ_key_out
    client.rekey_child(only_child(client), 1.0)
    settle(client, gateway, 1.0)
    [rekeyed] = of(drain(gateway), ChildSaEstablished)
    assert rekeyed.integ is SHA256_96
    gcm = replace(child(), sha256_96=True)
    client, gateway = psk_pair(psk_connection(children=(gcm,)))
    settle(client, gateway, 0.0)
    [aead] = of(drain(gateway), ChildSaEstablished)
    assert aead.integ is None


@pytest.mark.parametrize("who", ["client", "gateway"])
def test_a_child_sa_the_peer_lost_is_created_again_with_its_selectors(who: str) -> None:
    """RFC 7296 2.25: our rekey answered with CHILD_SA_NOT_FOUND (the peer's rekey of it
    died with its IKE SA, say): we delete ours silently and create it again from scratch,
    with the selectors it had, so the tunnel does not stay without a Child SA."""
    client, gateway = established()
    ours, theirs = (client, gateway) if who == "client" else (gateway, client)
    old = ours.sa.children[only_child(ours)]
    del theirs.sa.children[only_child(theirs)]  # the peer has lost it
    ours.rekey_child(old.spi_in, 1.0)
    settle(client, gateway, 1.0)
    our_events, their_events = drain(ours), drain(theirs)
    [gone] = of(our_events, ChildSaDeleted)
    assert (gone.spi_in, gone.reason) == (old.spi_in, "unknown to the peer")
    [new] = of(our_events, ChildSaEstablished)
    assert new.replaces == b"" and new.spi_in != old.spi_in
    [mirror] = of(their_events, ChildSaEstablished)
    assert (mirror.spi_in, mirror.spi_out) == (new.spi_out, new.spi_in)
    again = ours.sa.children[only_child(ours)]
    assert (again.name, again.local_ts, again.remote_ts) == (old.name, old.local_ts,
                                                             old.remote_ts)
    assert ours.drops == {} and theirs.drops == {}


def test_a_child_sa_the_peer_lost_while_we_delete_it_is_not_created_again() -> None:
    client, gateway = established()
    spi = only_child(gateway)
    del client.sa.children[only_child(client)]
    gateway.rekey_child(spi, 1.0)
    gateway.delete_child(spi, 1.0)  # queued behind the rekey
    settle(client, gateway, 1.0)
    [gone] = of(drain(gateway), ChildSaDeleted)
    assert gone.reason == "unknown to the peer"
    assert gateway.sa.children == {} and client.sa.children == {}
    assert not of(drain(client), ChildSaEstablished)
    assert gateway.state is State.ESTABLISHED
