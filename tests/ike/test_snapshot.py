"""An IKE SA continued from its snapshot (as another node would after a failover)."""

from __future__ import annotations

import msgpack

from cluster.ike.events import ChildSaEstablished, ExchangeCompleted, IkeSaRekeyed
from cluster.ike.session import IkeSession
from cluster.ike.snapshot import SECRET_FIELDS, restore, snapshot_of
from cluster.ike.state import State
from tests.ike.sessions import drain, psk_pair, transfer


def established() -> tuple[IkeSession, IkeSession]:
    client, gateway = psk_pair()
    for _ in range(4):
        transfer(client, gateway)
        transfer(gateway, client)
    drain(client)
    drain(gateway)
    return client, gateway


def taken_over(gateway: IkeSession, now: float) -> IkeSession:
    """The gateway's SA through msgpack, as a store would carry it, restored at `now`."""
    record = msgpack.unpackb(msgpack.packb(snapshot_of(gateway, 0.0)), raw=False)
    return restore(record, gateway.sa.policy, now)


def test_the_snapshot_marks_every_key_as_secret() -> None:
    _, gateway = established()
    record = snapshot_of(gateway, 0.0)
    keys = gateway.sa.keys
    assert keys is not None
    public = msgpack.packb({k: v for k, v in record.items() if k not in SECRET_FIELDS})
    for secret in (keys.sk_d, keys.sk_ei, keys.sk_er, keys.sk_pi, keys.sk_pr):
        assert secret not in public
    for child in gateway.sa.children.values():
        assert child.keys.encr_i not in public and child.keys.encr_r not in public


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


def test_rfc6311_sync_repairs_ids_after_a_request_lost_with_its_owner() -> None:
    """The old owner sent a liveness request (its snapshot says our next ID is 1) that
    never reached the peer; the new owner's IDs are one ahead of what the peer expects.
    Without a sync its next request is dropped; after RFC 6311's exchange it is answered."""
    client, gateway = established()
    assert client.sa.mid_sync and gateway.sa.mid_sync  # both announced it in IKE_AUTH
    assert gateway.check_liveness(1.0)
    gateway.datagrams_to_send()  # lost with the node
    assert snapshot_of(gateway, 1.0)["in_flight"]  # what tells the new owner to sync

    unsynced = taken_over(gateway, 2.0)
    assert unsynced.check_liveness(2.0)
    transfer(unsynced, client, 2.0)
    assert client.drops.get("message_id") == 1 and not client.datagrams_to_send()

    synced = taken_over(gateway, 3.0)
    assert synced.sync_message_ids(3.0)
    transfer(synced, client, 3.0)  # message ID 0, N(IKEV2_MESSAGE_ID_SYNC)
    transfer(client, synced, 3.0)
    assert synced.message_id_syncs == 1 and client.message_id_syncs == 1
    assert client.sa.peer_next_id == synced.sa.our_next_id
    assert synced.check_liveness(4.0)
    transfer(synced, client, 4.0)
    transfer(client, synced, 4.0)
    assert synced.sa.pending is None  # answered
    drain(client)
    assert synced.retransmits_sent == 0


def test_what_radius_accounting_needs_survives_the_takeover() -> None:
    _, gateway = established()
    sa = gateway.sa
    assert sa.authenticated_at > 0  # set when it was established
    sa.eap_identity, sa.radius_classes, sa.radius_interim = "carol", (b"group-a",), 300
    other_node = taken_over(gateway, 1000.0)
    assert (other_node.sa.authenticated_at, other_node.sa.eap_identity,
            other_node.sa.radius_classes, other_node.sa.radius_interim) == (
        sa.authenticated_at, "carol", (b"group-a",), 300)
