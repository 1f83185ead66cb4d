"""A connection we initiate with several children to start: IKE_AUTH brings the first,
one CREATE_CHILD_SA each the others (RFC 7296 1.3.1), as strongSwan does."""

from __future__ import annotations

import os
from dataclasses import replace

from cluster.ike.constants import ExchangeType
from cluster.ike.create_child import CreateChild
from cluster.ike.events import ChildSaEstablished, ChildSaFailed, ExchangeCompleted, IkeSaFailed
from cluster.ike.identity import parse_identity_pattern
from cluster.ike.policy import ChildConfig, ConnectionConfig, RemoteAuth
from cluster.ike.pools import AddressPool
from cluster.ike.session import IkeSession
from cluster.ike.snapshot import restore, snapshot_of
from tests.ike.sessions import (
    CLIENT,
    GW,
    child,
    client_for,
    drain,
    psk_connection,
    psk_pair,
    psk_policy,
    run_handshake,
    transfer,
)


def _started(*children: ChildConfig) -> tuple[ChildConfig, ...]:
    return tuple(replace(c, start_action="start") for c in children)


def _pair(gw_children: tuple[ChildConfig, ...],
          client_children: tuple[ChildConfig, ...] | None = None
          ) -> tuple[IkeSession, IkeSession]:
    gw = psk_connection(children=gw_children)
    client = client_for(gw)
    if client_children is not None:
        client = replace(client, children=client_children)
    return psk_pair(gw, client)


NET = child("net", local_ts="10.99.2.0/24", remote_ts="10.99.1.0/24")
NET2 = child("net2", local_ts="10.99.4.0/24", remote_ts="10.99.3.0/24",
             proposals=("aes128gcm16-modp2048", "aes128gcm16-x25519"))
NET3 = child("net3", local_ts="10.99.6.0/24", remote_ts="10.99.5.0/24")


def _client_children() -> tuple[ChildConfig, ...]:
    mirrored = client_for(psk_connection(children=(NET, NET2, NET3))).children
    return _started(*mirrored)


def test_every_child_to_start_comes_up_the_others_by_create_child_sa() -> None:
    client, gateway = _pair((NET, NET2, NET3), _client_children())
    run_handshake(client, gateway, rounds=12)
    ours = [e for e in drain(client) if isinstance(e, ChildSaEstablished)]
    theirs = [e for e in drain(gateway) if isinstance(e, ChildSaEstablished)]
    assert [e.name for e in ours] == ["net", "net2", "net3"]
    assert [e.name for e in theirs] == ["net", "net2", "net3"]
    for mine, peer in zip(ours, theirs, strict=True):
        assert (mine.spi_in, mine.spi_out) == (peer.spi_out, peer.spi_in)
        assert mine.encr_key_out == peer.encr_key_in and mine.encr_key_in == peer.encr_key_out
        assert mine.local_ts == peer.remote_ts and mine.remote_ts == peer.local_ts
    assert [str(ts) for ts in ours[1].local_ts] == ["10.99.3.0/24"]
    assert client.sa.children.keys() == {e.spi_in for e in ours}


def test_pfs_for_a_new_child_follows_invalid_ke_payload() -> None:
    """net2 offers MODP-2048 first and x25519 second; a gateway that takes only x25519
    answers INVALID_KE_PAYLOAD and the second request carries an x25519 KE."""
    gw_net2 = replace(NET2, esp_proposals=child(proposals=("aes128gcm16-x25519",)).esp_proposals)
    client, gateway = _pair((NET, gw_net2), _client_children()[:2])
    run_handshake(client, gateway, rounds=12)
    events = drain(client)
    assert [e.name for e in events if isinstance(e, ChildSaEstablished)] == ["net", "net2"]
    create = [e for e in events if isinstance(e, ExchangeCompleted)
              and e.exchange == ExchangeType.CREATE_CHILD_SA]
    assert [e.result for e in create] == ["InvalidKePayload", "ok"]


def test_a_child_the_peer_refuses_is_reported_and_the_rest_come_up() -> None:
    """The gateway has no net2: TS_UNACCEPTABLE for it, a ChildSaFailed event naming it,
    and net3 comes up after it all the same."""
    client, gateway = _pair((NET, NET3), _client_children())
    run_handshake(client, gateway, rounds=12)
    events = drain(client)
    assert [e.name for e in events if isinstance(e, ChildSaEstablished)] == ["net", "net3"]
    (failed,) = [e for e in events if isinstance(e, ChildSaFailed)]
    assert failed.name == "net2" and "TS_UNACCEPTABLE" in failed.reason, failed
    assert not client.closed


def test_children_not_to_start_are_left_alone() -> None:
    children = (_client_children()[0], replace(_client_children()[1], start_action="none"))
    client, gateway = _pair((NET, NET2), children)
    run_handshake(client, gateway, rounds=12)
    assert [e.name for e in drain(client) if isinstance(e, ChildSaEstablished)] == ["net"]


def test_a_create_child_in_flight_survives_a_snapshot() -> None:
    """Another node that takes the SA over sends the request again and installs what
    the answer brings (the nonce, SPI and key exchange travel in the snapshot)."""
    client, gateway = _pair((NET, NET2), _client_children()[:2])
    for _ in range(2):  # IKE_SA_INIT, IKE_AUTH: net is up, net2's request goes out next
        transfer(client, gateway)
        transfer(gateway, client)
    assert [c.name for c in client.sa.children.values()] == ["net"]
    pending = client.sa.pending
    assert pending is not None and isinstance(pending.task, CreateChild), pending
    assert pending.task.group is not None and pending.task.ke is not None
    lost = client.datagrams_to_send()  # the request, lost with this node
    assert lost
    taken = restore(snapshot_of(client, 0.0), client.sa.policy, 0.0)
    taken.handle_timer(0.0)
    resent = taken.datagrams_to_send()
    assert [d.data for d in resent] == [d.data for d in lost]
    for d in resent:
        gateway.receive_datagram_untrusted(d.data, d.remote, d.local, 0.0)
    transfer(gateway, taken)
    names = [e.name for e in drain(taken) if isinstance(e, ChildSaEstablished)]
    assert names == ["net2"]


def _peer_deletes_child(client: IkeSession, gateway: IkeSession, name: str = "net") -> None:
    """The gateway deletes its Child SA `name` (RFC 7296 1.4.1) and the client answers."""
    (spi_in,) = [s for s, c in gateway.sa.children.items() if c.name == name]
    gateway.delete_child(spi_in, 1.0)
    transfer(gateway, client, 1.0)


def test_close_action_start_brings_a_child_the_peer_deleted_back() -> None:
    """swanctl's close_action = "start": our answer to the peer's Delete goes out, then
    our CREATE_CHILD_SA for that child on the same IKE SA."""
    started = (replace(_client_children()[0], close_action="start"),)
    client, gateway = _pair((NET,), started)
    run_handshake(client, gateway)
    drain(client)
    _peer_deletes_child(client, gateway)
    run_handshake(client, gateway)
    events = drain(client)
    assert [type(e).__name__ for e in events if isinstance(e, ChildSaEstablished | ChildSaFailed)
            ] == ["ChildSaEstablished"]
    assert [c.name for c in client.sa.children.values()] == ["net"]
    assert [c.name for c in gateway.sa.children.values()] == ["net"]


def test_close_action_none_or_a_rekey_leaves_a_deleted_child_alone() -> None:
    client, gateway = _pair((NET,), _client_children()[:1])
    run_handshake(client, gateway)
    _peer_deletes_child(client, gateway)
    run_handshake(client, gateway)
    assert client.sa.children == {} and client.sa.queue == type(client.sa.queue)()
    # close_action = "start", but the peer deletes the old SA after its rekey
    started = (replace(_client_children()[0], close_action="start"),)
    client, gateway = _pair((NET,), started)
    run_handshake(client, gateway)
    (old,) = gateway.sa.children
    gateway.rekey_child(old, 1.0)
    run_handshake(gateway, client)
    drain(client)
    run_handshake(client, gateway)
    assert len(client.sa.children) == 1
    assert not any(isinstance(e, ChildSaEstablished) for e in drain(client))


def test_start_child_asks_once_and_only_for_a_child_that_is_missing() -> None:
    client, gateway = _pair((NET,), _client_children()[:1])
    run_handshake(client, gateway)
    assert not client.start_child("net", 1.0)  # it is up
    assert not client.start_child("nothing", 1.0)  # no such child
    _peer_deletes_child(client, gateway)
    assert client.start_child("net", 2.0)
    assert not client.start_child("net", 2.0)  # asked already
    run_handshake(client, gateway)
    assert [e.name for e in drain(client) if isinstance(e, ChildSaEstablished)][-1:] == ["net"]
    assert len(client.sa.children) == 1


def test_childless_force_brings_every_child_by_create_child_sa() -> None:
    """RFC 6023 with swanctl's childless = force on our initiator: IKE_AUTH carries no
    Child SA, one CREATE_CHILD_SA each child to start does."""
    client, gateway = _pair((NET, NET2), _client_children()[:2])
    client = IkeSession.initiator(replace(client.sa.connection, childless="force"),
                                  client.sa.policy, client.spi_i, client.sa.local,
                                  client.sa.remote, 0.0)
    run_handshake(client, gateway, rounds=12)
    events = drain(client)
    assert [e.name for e in events if isinstance(e, ChildSaEstablished)] == ["net", "net2"]
    creates = [e for e in events if isinstance(e, ExchangeCompleted)
               and e.exchange == ExchangeType.CREATE_CHILD_SA and e.result == "ok"]
    assert len(creates) == 2  # IKE_AUTH brought none


def _childless_client(gw_conns: tuple[ConnectionConfig, ...], client_id: str,
                      childless: str) -> tuple[IkeSession, IkeSession]:
    gw = gw_conns[0]
    client = replace(client_for(gw, client_id), childless=childless,
                     children=_client_children()[:1])
    policy = psk_policy(*gw_conns)
    client_policy = psk_policy(client, ids=(client_id, "%any"))
    initiator = IkeSession.initiator(client, client_policy, os.urandom(8), CLIENT, GW, 0.0)
    return initiator, IkeSession.responder(policy, os.urandom(8), GW, CLIENT)


def test_childless_never_and_force_refuse_the_other_kind_with_invalid_syntax() -> None:
    allow = replace(psk_connection("open", children=(NET,)),
                    remote=RemoteAuth("psk", parse_identity_pattern("open.example.test")))
    never = replace(psk_connection("closed", children=(NET,)), childless="never",
                    remote=RemoteAuth("psk", parse_identity_pattern("closed.example.test")))
    force = replace(psk_connection("forced", children=(NET,)), childless="force",
                    remote=RemoteAuth("psk", parse_identity_pattern("forced.example.test")))
    cases = [((allow, never), "closed.example.test", "force"),  # announced (open), refused
             ((force,), "forced.example.test", "allow")]
    for gw_conns, client_id, childless in cases:
        client, gateway = _childless_client(gw_conns, client_id, childless)
        run_handshake(client, gateway)
        (failed,) = [e for e in drain(gateway) if isinstance(e, IkeSaFailed)]
        assert "childless" in failed.reason, failed
        assert client.closed and gateway.closed
    # a responder whose every connection says never does not announce the extension,
    # and our forced initiator gives up before IKE_AUTH
    client, gateway = _childless_client((never,), "closed.example.test", "force")
    run_handshake(client, gateway)
    (failed,) = [e for e in drain(client) if isinstance(e, IkeSaFailed)]
    assert "does not support childless IKE SAs" in failed.reason, failed


def _road_warrior(close_action: str = "none") -> tuple[IkeSession, IkeSession]:
    """Our road warrior (vips) and our gateway with a pool, up: the client has
    10.99.3.1."""
    gw = replace(psk_connection(children=(replace(child(remote_ts="dynamic"),
                                                  close_action=close_action),)),
                 pools=(AddressPool.parse("rw", "10.99.3.0/24"),))
    road_warrior = replace(psk_connection(
        local_id="client.example.test", remote_id="gw.example.test",
        children=(child(local_ts="dynamic", remote_ts="10.99.2.0/24"),)), vips=(4,))
    client, gateway = psk_pair(gw, road_warrior)
    run_handshake(client, gateway)
    return client, gateway


def test_a_gateway_rekeys_the_child_sa_of_our_road_warrior() -> None:
    """The gateway's CREATE_CHILD_SA names our virtual IP in TSr; our "dynamic" local
    selector stands for it (it stood for our outer address: TS_UNACCEPTABLE)."""
    client, gateway = _road_warrior()
    drain(client)
    (spi_in,) = gateway.sa.children
    gateway.rekey_child(spi_in, 1.0)
    run_handshake(gateway, client)
    (rekeyed,) = [e for e in drain(client) if isinstance(e, ChildSaEstablished)]
    assert rekeyed.replaces and [str(ts) for ts in rekeyed.local_ts] == ["10.99.3.1/32"]


def test_close_action_start_on_a_road_warrior_gateway_names_the_virtual_ip() -> None:
    """Our gateway (the IKE responder) gave the client a virtual IP; the client deletes
    the Child SA, and with close_action = "start" the gateway brings it back itself,
    its "dynamic" remote selector standing for the client's virtual IP, not its outer
    address."""
    client, gateway = _road_warrior("start")
    assert client.sa.own_vips == ("10.99.3.1",)
    drain(gateway)
    (spi_in,) = client.sa.children
    client.delete_child(spi_in, 1.0)
    run_handshake(client, gateway)
    (again,) = [e for e in drain(gateway) if isinstance(e, ChildSaEstablished)]
    assert [str(ts) for ts in again.remote_ts] == ["10.99.3.1/32"]
    assert [str(ts) for ts in again.local_ts] == ["10.99.2.0/24"]
    assert [c.name for c in client.sa.children.values()] == ["net"]


def test_creating_children_holds_until_the_last_child_to_start_is_answered() -> None:
    """What the Initiator waits for before it deletes the SA a reauthentication replaces:
    every child to start has had its CREATE_CHILD_SA answered (up or refused)."""
    client, gateway = _pair((NET, NET3), _client_children())
    assert not client.creating_children
    for _ in range(4):  # IKE_SA_INIT and IKE_AUTH
        transfer(client, gateway)
        transfer(gateway, client)
        if client.sa.children:
            break
    assert client.creating_children  # net2 and net3 to come
    run_handshake(client, gateway, rounds=12)
    assert not client.creating_children
    assert sorted(c.name for c in client.sa.children.values()) == ["net", "net3"]
