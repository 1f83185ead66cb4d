"""An IKE SA continued from its snapshot (as another node would after a failover)."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from cluster.ike.events import (
    PEER_NOT_RESPONDING,
    TERMINATED,
    ChildSaDeleted,
    ChildSaEstablished,
    ExchangeCompleted,
    IkeSaDeleted,
    IkeSaRekeyed,
)
from cluster.ike.policy import ConnectionConfig, Lifetime
from cluster.ike.session import IkeSession
from cluster.ike.snapshot import SECRET_FIELDS, restore, snapshot_of
from cluster.ike.state import State
from cluster.transforms import SHA256_96
from tests.ike.sessions import child, drain, psk_connection, psk_pair, transfer


def established(gw_conn: ConnectionConfig | None = None) -> tuple[IkeSession, IkeSession]:
    client, gateway = psk_pair(gw_conn)
    for _ in range(4):
        transfer(client, gateway)
        transfer(gateway, client)
    drain(client)
    drain(gateway)
    return client, gateway


def taken_over(gateway: IkeSession, now: float, *, old_node: bool = False) -> IkeSession:
    """The gateway's SA through msgpack, as a store would carry it, restored at `now`;
    `old_node`: as a node of an earlier version stored it, without our request in flight
    (which only RFC 6311 then settles)."""
    record = msgpack.unpackb(msgpack.packb(snapshot_of(gateway, 0.0)), raw=False)
    if old_node:
        del record["request"]
    return restore(record, gateway.sa.policy, now)


def test_the_snapshot_marks_every_key_as_secret() -> None:
    _, gateway = established()
    record = snapshot_of(gateway, 0.0)
    keys = gateway.sa.keys
    assert keys is not None
    public = msgpack.packb({k: v for k, v in record.items() if k not in SECRET_FIELDS})
    for secret in (keys.sk_d, keys.sk_ei, keys.sk_er, keys.sk_pi, keys.sk_pr):
        assert secret not in public
    for sa in gateway.sa.children.values():
        assert sa.keys.encr_i not in public and sa.keys.encr_r not in public


def test_a_restored_responder_answers_the_next_request() -> None:
    client, gateway = established()
    other_node = taken_over(gateway, 1000.0)
    assert other_node.state is State.ESTABLISHED
    assert (other_node.spi_i, other_node.spi_r) == (gateway.spi_i, gateway.spi_r)
    assert client.check_liveness(1.0)
    transfer(client, other_node, 1000.0)
    transfer(other_node, client, 1000.0)
    assert client.sa.pending is None and client.drops == {} and other_node.drops == {}
    assert [e.result for e in drain(other_node) if isinstance(e, ExchangeCompleted)] == ["ok"]


def test_a_retransmission_across_the_takeover_gets_the_same_bytes() -> None:
    client, gateway = established()
    assert client.check_liveness(1.0)
    [request] = client.datagrams_to_send()
    gateway.receive_datagram_untrusted(request.data, request.remote, request.local, 1.0)
    [held_back] = gateway.datagrams_to_send()  # the response is lost; the node dies
    other_node = taken_over(gateway, 50.0)
    other_node.receive_datagram_untrusted(request.data, request.remote, request.local, 50.0)
    [again] = other_node.datagrams_to_send()
    assert again.data == held_back.data and other_node.retransmits_answered == 1


def test_children_rekeys_and_lifetimes_survive_the_takeover() -> None:
    client, gateway = established()
    other_node = taken_over(gateway, 500.0)
    [spi] = other_node.sa.children
    timer = other_node.get_timer()
    assert timer is not None and timer > 500.0  # the lifetimes moved with the clock
    other_node.rekey_child(spi, 501.0)
    for _ in range(4):
        transfer(other_node, client, 501.0)
        transfer(client, other_node, 501.0)
    [new] = [e for e in drain(other_node) if isinstance(e, ChildSaEstablished)]
    assert new.replaces == spi and list(other_node.sa.children) == [new.spi_in]
    other_node.rekey_ike(502.0)
    for _ in range(6):
        transfer(other_node, client, 502.0)
        transfer(client, other_node, 502.0)
    assert any(isinstance(e, IkeSaRekeyed) for e in drain(other_node))
    assert client.drops == {} and other_node.drops == {}
    assert client.state is State.ESTABLISHED and other_node.state is State.ESTABLISHED


def test_a_child_sa_record_gives_back_the_same_event_through_msgpack() -> None:
    import pytest

    from cluster.errors import ParseError
    from cluster.ike.snapshot import child_event, child_record

    client, gateway = psk_pair()
    events = []
    for _ in range(4):
        transfer(client, gateway)
        transfer(gateway, client)
        while (event := gateway.next_event()) is not None:
            events.append(event)
    (child,) = [e for e in events if isinstance(e, ChildSaEstablished)]
    packed = msgpack.packb(child_record(child), use_bin_type=True)
    assert child_event(msgpack.unpackb(packed, raw=False)) == child
    broken = child_record(child) | {"encr": "rot13"}
    with pytest.raises(ParseError):
        child_event(broken)
    # the child's settings travel to the worker; a record made before one was there
    # reads as its default (inactivity, replay window, TFC padding, volume: none; the
    # DSCP and ECN copied, as swanctl's defaults have it)
    settings: dict[str, object] = {
        "inactivity": 600.0, "copy_dscp": False, "replay_window": 4096, "tfc_padding": 1000,
        "copy_ecn": False, "volume": (1000, 1100, 0, 60)}
    for name, value in settings.items():
        changed = replace(child, **{name: value})  # type: ignore[arg-type]
        assert getattr(child, name) != value and child_event(child_record(changed)) == changed
        older = child_record(changed)
        del older[name]
        assert child_event(older) == child, name
    short = replace(child, integ=SHA256_96)  # (a child with sha256_96 = true)
    assert child_event(child_record(short)).integ is SHA256_96
    limited = replace(child, volume=(1000, 1100, 0, 60))
    with pytest.raises(ParseError):
        child_event(child_record(limited) | {"volume": [1, 2]})


def _rekey_lost_with_its_owner(gateway: IkeSession) -> None:
    """The gateway starts an IKE SA rekey whose request never leaves (its node died)."""
    gateway.rekey_ike(1.0)
    assert gateway.datagrams_to_send()  # lost with the node
    record = snapshot_of(gateway, 1.0)
    assert record["in_flight"] and record["request"][3] == "rekey_ike"


def test_rfc6311_sync_repairs_ids_after_a_request_lost_with_its_owner() -> None:
    """The old owner, of an earlier version, sent an IKE SA rekey request (its snapshot
    says our next ID is 1, not what the request was) that never reached the peer; the
    new owner's IDs are one ahead of what the peer expects.
    A request sent like that is dropped; so requests wait for RFC 6311's exchange, then
    go out with the synced IDs and are answered."""
    client, gateway = established()
    assert client.sa.mid_sync and gateway.sa.mid_sync  # both announced it in IKE_AUTH
    _rekey_lost_with_its_owner(gateway)

    unsynced = taken_over(gateway, 2.0, old_node=True)
    unsynced.sa.mid_sync = False  # (as with a peer without RFC 6311: nothing waits)
    assert unsynced.check_liveness(2.0)
    transfer(unsynced, client, 2.0)
    assert client.drops.get("message_id") == 1 and not client.datagrams_to_send()

    synced = taken_over(gateway, 3.0, old_node=True)
    assert synced.sa.ids_unsure and synced.sa.pending is None
    assert synced.check_liveness(3.0)
    assert not synced.datagrams_to_send()  # held: it would be one ID ahead
    assert synced.sync_message_ids(3.0)
    transfer(synced, client, 3.0)  # message ID 0, N(IKEV2_MESSAGE_ID_SYNC)
    transfer(client, synced, 3.0)
    assert synced.message_id_syncs == 1 and client.message_id_syncs == 1
    assert client.sa.peer_next_id == synced.sa.our_next_id - 1  # the liveness check went
    transfer(synced, client, 3.0)
    transfer(client, synced, 3.0)
    assert synced.sa.pending is None and not synced.sa.queue  # answered
    assert client.drops == {"message_id": 1} and synced.retransmits_sent == 0


def test_a_rekey_under_way_is_due_at_once_on_the_new_owner() -> None:
    """A rekey whose request the new owner does not resume (one still queued, or in
    flight in an older node's snapshot) must not be forgotten: its timer was spent."""
    client, gateway = established()
    (spi_in,) = gateway.sa.children
    assert gateway.check_liveness(1.0)
    gateway.rekey_child(spi_in, 1.0)  # queued behind the liveness check
    gateway.datagrams_to_send()
    resumed = taken_over(gateway, 2.0)
    assert resumed.sa.children[spi_in].rekey_at <= 2.0
    assert not resumed.sa.children[spi_in].rekeying
    resumed.handle_timer(2.0)  # the liveness check goes again; the rekey is queued
    transfer(resumed, client, 2.0)
    transfer(client, resumed, 2.0)  # answered: the rekey goes
    transfer(resumed, client, 2.0)
    transfer(client, resumed, 2.0)
    assert [e.replaces for e in drain(resumed) if isinstance(e, ChildSaEstablished)] == [spi_in]

    client, gateway = established()
    _rekey_lost_with_its_owner(gateway)
    synced = taken_over(gateway, 2.0, old_node=True)
    assert synced.sa.rekey_at <= 2.0
    synced.handle_timer(2.0)
    assert not synced.datagrams_to_send()  # the rekey waits for the sync
    assert synced.sync_message_ids(2.0)
    for _ in range(3):  # the sync, the rekey, the old SA's deletion
        transfer(synced, client, 2.0)
        transfer(client, synced, 2.0)
    assert any(isinstance(e, IkeSaRekeyed) for e in drain(synced))


def test_a_takeover_owes_the_sync_until_the_peer_answers_and_then_no_more() -> None:
    """The doubt about the message IDs travels with the SA: a node that took it over
    and had not synced yet passes it on (its own snapshot says in flight, nothing
    pending), and once any of our requests is answered it is gone, so the next takeover
    asks for no sync (strongSwan with an AEAD IKE cipher could not answer it and would
    drop the SA)."""
    client, gateway = established()
    _rekey_lost_with_its_owner(gateway)
    survivor = taken_over(gateway, 2.0, old_node=True)
    assert survivor.sa.pending is None and snapshot_of(survivor, 2.0)["in_flight"]
    third = taken_over(survivor, 3.0)
    assert third.sa.ids_unsure and snapshot_of(third, 3.0)["in_flight"]

    assert third.sync_message_ids(3.0)
    transfer(third, client, 3.0)
    assert snapshot_of(third, 3.0)["in_flight"]  # asked, not answered yet
    transfer(client, third, 3.0)
    assert third.message_id_syncs == 1
    assert not snapshot_of(third, 3.0)["in_flight"]
    assert not taken_over(third, 4.0).sa.ids_unsure

    # a request answered in step settles it too (a peer without RFC 6311, or IDs that
    # were in step after all)
    peer, other = established()
    _rekey_lost_with_its_owner(other)
    resumed = taken_over(other, 2.0, old_node=True)
    resumed.sa.our_next_id -= 1  # (the lost request's ID, as if it had never been sent)
    resumed.sa.mid_sync = False  # (nothing waits for a sync)
    assert resumed.check_liveness(2.0)
    transfer(resumed, peer, 2.0)
    transfer(peer, resumed, 2.0)
    assert resumed.sa.pending is None and not resumed.sa.ids_unsure
    assert not snapshot_of(resumed, 2.0)["in_flight"]


@pytest.mark.parametrize("reached_the_peer", [False, True])
def test_the_new_owner_sends_a_lost_liveness_check_again(reached_the_peer: bool) -> None:
    """The old owner's liveness check is in its snapshot: the new owner sends the same
    datagram again at once, a retransmission the peer answers whether the original
    reached it (its cached response) or not (answered now). No sync is needed."""
    client, gateway = established()
    assert gateway.check_liveness(1.0)
    (sent,) = gateway.datagrams_to_send()
    if reached_the_peer:
        client.receive_datagram_untrusted(sent.data, sent.remote, sent.local, 1.0)
        assert client.datagrams_to_send()  # its answer is lost with the node
    resumed = taken_over(gateway, 2.0)
    assert not resumed.sa.ids_unsure and resumed.get_timer() == 2.0
    resumed.handle_timer(2.0)
    (again,) = resumed.datagrams_to_send()
    assert again.data == sent.data
    client.receive_datagram_untrusted(again.data, again.remote, again.local, 2.0)
    transfer(client, resumed, 2.0)
    assert resumed.sa.pending is None and resumed.sa.our_next_id == 1
    assert client.message_id_syncs == 0 and not client.drops
    assert resumed.check_liveness(3.0)  # and the next one is in step
    transfer(resumed, client, 3.0)
    transfer(client, resumed, 3.0)
    assert resumed.sa.pending is None and not client.drops


@pytest.mark.parametrize("esp", ["aes256gcm16", "aes256gcm16-x25519",
                                 "aes256gcm16-modp2048"])
@pytest.mark.parametrize("reached_the_peer", [False, True])
def test_the_new_owner_completes_a_child_sa_rekey_in_flight(reached_the_peer: bool,
                                                           esp: str) -> None:
    """The old owner's rekey request, with its nonce, new SPI and key exchange, is in its
    snapshot: the new owner sends it again and finishes the rekey with the answer."""
    client, gateway = established(psk_connection(children=(child(proposals=(esp,)),)))
    (spi_in,) = gateway.sa.children
    gateway.rekey_child(spi_in, 1.0)
    (sent,) = gateway.datagrams_to_send()
    if reached_the_peer:
        client.receive_datagram_untrusted(sent.data, sent.remote, sent.local, 1.0)
        assert client.datagrams_to_send()  # its answer is lost with the node
    record = msgpack.unpackb(msgpack.packb(snapshot_of(gateway, 0.0)), raw=False)
    public = msgpack.packb({k: v for k, v in record.items() if k not in SECRET_FIELDS})
    task = gateway.sa.pending.task  # type: ignore[union-attr]
    assert (task.ke is not None) == ("-" in esp)
    assert task.nonce not in public and (task.ke is None or task.ke.private_value() not in public)
    resumed = restore(record, gateway.sa.policy, 2.0)
    assert resumed.sa.children[spi_in].rekeying and not resumed.sa.ids_unsure
    resumed.handle_timer(2.0)
    (again,) = resumed.datagrams_to_send()
    assert again.data == sent.data
    client.receive_datagram_untrusted(again.data, again.remote, again.local, 2.0)
    transfer(client, resumed, 2.0)  # the answer: a new Child SA, then we delete the old
    transfer(resumed, client, 2.0)
    transfer(client, resumed, 2.0)
    new = [e for e in drain(resumed) if isinstance(e, ChildSaEstablished)]
    assert [e.replaces for e in new] == [spi_in]
    assert list(resumed.sa.children) == [new[0].spi_in] == [task.new_spi]
    assert [c.spi_out for c in client.sa.children.values()] == [task.new_spi]
    assert not client.drops and client.message_id_syncs == 0


def test_the_new_owner_completes_an_ike_sa_rekey_in_flight() -> None:
    client, gateway = established()
    _rekey_lost_with_its_owner(gateway)
    resumed = taken_over(gateway, 2.0)
    assert resumed.sa.rekeying and not resumed.sa.ids_unsure
    resumed.handle_timer(2.0)  # the request again; its rekey time is due, but under way
    (again,) = resumed.datagrams_to_send()
    client.receive_datagram_untrusted(again.data, again.remote, again.local, 2.0)
    for _ in range(2):  # the answer; our Delete of the old IKE SA and its answer
        transfer(client, resumed, 2.0)
        transfer(resumed, client, 2.0)
    events = drain(resumed)
    assert any(isinstance(e, IkeSaRekeyed) for e in events), events
    assert resumed.sa.spi_i != gateway.sa.spi_i and not resumed.sa.pending
    assert client.message_id_syncs == 0 and not client.drops


def test_the_new_owner_completes_a_child_sa_deletion_in_flight() -> None:
    client, gateway = established()
    (spi_in,) = gateway.sa.children
    gateway.delete_child(spi_in, 1.0)
    gateway.datagrams_to_send()  # lost with the node
    drain(gateway)
    resumed = taken_over(gateway, 2.0)
    assert resumed.sa.children[spi_in].deleting
    resumed.handle_timer(2.0)
    transfer(resumed, client, 2.0)
    transfer(client, resumed, 2.0)
    deleted = [e for e in drain(resumed) if isinstance(e, ChildSaDeleted)]
    assert [e.spi_in for e in deleted] == [spi_in] and not resumed.sa.children
    assert not client.sa.children


@pytest.mark.parametrize("request_", ["delete", "rekey"])
def test_the_new_owner_finishes_a_request_about_a_child_sa_that_expired(request_: str
                                                                     ) -> None:
    """A Child SA that reached its hard lifetime is gone from the snapshot, but our Delete
    or rekey of it in flight is not: the new owner sends it again, the Delete still tells
    the peer, and the rekey's answer brings a Child SA of its own."""
    lifetime = Lifetime(0.0, 5.0)
    client, gateway = established(
        psk_connection(children=(replace(child(), lifetime=lifetime),)))
    (spi_in,) = gateway.sa.children
    if request_ == "delete":
        gateway.delete_child(spi_in, 2.0)
    else:
        gateway.rekey_child(spi_in, 2.0)
    (sent,) = gateway.datagrams_to_send()  # lost with the node
    gateway.handle_timer(5.0)
    assert not gateway.sa.children
    drain(gateway)
    resumed = taken_over(gateway, 5.5)
    resumed.handle_timer(5.5)
    (again,) = resumed.datagrams_to_send()
    assert again.data == sent.data
    client.receive_datagram_untrusted(again.data, again.remote, again.local, 5.5)
    for _ in range(3):
        transfer(client, resumed, 5.5)
        transfer(resumed, client, 5.5)
    events = drain(resumed)
    if request_ == "delete":
        assert not [e for e in events if isinstance(e, (ChildSaEstablished, ChildSaDeleted))]
        assert not resumed.sa.children and not client.sa.children
    else:
        [new] = [e for e in events if isinstance(e, ChildSaEstablished)]
        assert new.replaces == b"" and list(resumed.sa.children) == [new.spi_in]
        assert [c.spi_out for c in client.sa.children.values()] == [new.spi_in]
    assert resumed.sa.pending is None and not client.drops


def test_what_radius_accounting_needs_survives_the_takeover() -> None:
    _, gateway = established()
    sa = gateway.sa
    assert sa.authenticated_at > 0  # set when it was established
    sa.eap_identity, sa.radius_classes, sa.radius_interim = "carol", (b"group-a",), 300
    other_node = taken_over(gateway, 1000.0)
    assert (other_node.sa.authenticated_at, other_node.sa.eap_identity,
            other_node.sa.radius_classes, other_node.sa.radius_interim) == (
        sa.authenticated_at, "carol", (b"group-a",), 300)


@pytest.mark.parametrize("peer_answers", [True, False])
def test_the_new_owner_finishes_an_ike_sa_deletion_in_flight(peer_answers: bool) -> None:
    """The old owner's Delete of the IKE SA (an operator's terminate) is in its snapshot:
    the new owner holds the SA as being deleted and sends the Delete again. The peer
    answers it (the original was lost, or it answers from its cache), and the SA ends
    with the operator's reason; a peer that had the Delete and forgot the SA answers
    nothing, and the SA ends when the retransmissions do."""
    client, gateway = established()
    gateway.delete_ike(1.0, TERMINATED)
    (sent,) = gateway.datagrams_to_send()
    assert gateway.sa.state is State.DELETING
    resumed = taken_over(gateway, 2.0)
    assert resumed.sa.state is State.DELETING and not resumed.sa.ids_unsure
    resumed.handle_timer(2.0)
    (again,) = resumed.datagrams_to_send()
    assert again.data == sent.data
    now = 2.0
    if peer_answers:
        client.receive_datagram_untrusted(again.data, again.remote, again.local, now)
        transfer(client, resumed, now)
    while not resumed.closed and now < 300.0:
        now = resumed.get_timer() or now + 1.0
        resumed.handle_timer(now)
        resumed.datagrams_to_send()
    [deleted] = [e for e in drain(resumed) if isinstance(e, IkeSaDeleted)]
    assert deleted.reason == (TERMINATED if peer_answers else PEER_NOT_RESPONDING)
    assert (now == 2.0) == peer_answers and client.closed == peer_answers
