"""RFC 7383 inside whole sessions: negotiated in IKE_SA_INIT, used when a message is too big."""

from __future__ import annotations

from dataclasses import replace

import pytest

import cluster.ike.session as session_module
from cluster.ike.message import decode_untrusted
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from tests.ike.sessions import CLIENT, GW, client_for, drain, psk_connection, psk_pair, transfer


def test_fragmentation_is_negotiated_but_unused_for_small_messages() -> None:
    client, gateway = psk_pair()
    for _ in range(4):
        transfer(client, gateway)
        transfer(gateway, client)
    assert client.sa.fragmentation and gateway.sa.fragmentation
    assert client.state is State.ESTABLISHED and gateway.state is State.ESTABLISHED


def test_large_messages_travel_in_fragments_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "FRAGMENT_SIZE", 220)  # forces IKE_AUTH apart
    client, gateway = psk_pair()
    transfer(client, gateway)
    transfer(gateway, client)
    auth_request = client.datagrams_to_send()
    assert len(auth_request) > 1
    assert all(decode_untrusted(d.data).is_fragment for d in auth_request)
    assert all(len(d.data) <= 220 - 28 for d in auth_request)
    for d in reversed(auth_request):  # out of order
        gateway.receive_datagram_untrusted(d.data, d.remote, d.local, 0.0)
    response = gateway.datagrams_to_send()
    assert len(response) > 1 and gateway.state is State.ESTABLISHED
    # a retransmitted request: its first fragment brings back the whole cached response
    gateway.receive_datagram_untrusted(auth_request[0].data, CLIENT, GW, 0.5)
    assert [d.data for d in gateway.datagrams_to_send()] == [d.data for d in response]
    for d in response:
        client.receive_datagram_untrusted(d.data, d.remote, d.local, 1.0)
    assert client.state is State.ESTABLISHED
    assert client.drops == {} and gateway.drops == {}
    assert drain(client) and drain(gateway)


def test_fragments_from_a_peer_that_did_not_negotiate_are_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "FRAGMENT_SIZE", 220)
    client, gateway = psk_pair()
    transfer(client, gateway)
    transfer(gateway, client)
    gateway.sa.fragmentation = False  # as if the peer had not announced it
    for d in client.datagrams_to_send():
        gateway.receive_datagram_untrusted(d.data, d.remote, d.local, 0.0)
    assert gateway.state is State.HALF_OPEN
    assert gateway.drops.get("unexpected_fragment", 0) > 0


def _pair_with(client_fragmentation: str, gateway_fragmentation: str
               ) -> tuple[IkeSession, IkeSession]:
    gw = replace(psk_connection(), fragmentation=gateway_fragmentation)
    return psk_pair(gw, replace(client_for(gw), fragmentation=client_fragmentation))


@pytest.mark.parametrize(("client_side", "gateway_side"), [("no", "yes"), ("yes", "no")])
def test_fragmentation_no_on_either_side_keeps_it_off(
        monkeypatch: pytest.MonkeyPatch, client_side: str, gateway_side: str) -> None:
    """swanctl's fragmentation = no: not announced (nor echoed), so whole messages go
    however large, and both ends still come up (over a path without the limit)."""
    monkeypatch.setattr(session_module, "FRAGMENT_SIZE", 220)
    client, gateway = _pair_with(client_side, gateway_side)
    for _ in range(4):
        transfer(client, gateway)
        transfer(gateway, client)
    assert not client.sa.fragmentation and not gateway.sa.fragmentation
    assert client.state is State.ESTABLISHED and gateway.state is State.ESTABLISHED


def test_fragmentation_accept_takes_fragments_but_sends_whole_messages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "FRAGMENT_SIZE", 220)
    client, gateway = _pair_with("yes", "accept")
    transfer(client, gateway)
    transfer(gateway, client)
    auth_request = client.datagrams_to_send()
    assert len(auth_request) > 1  # the client fragments, the gateway takes them
    for d in auth_request:
        gateway.receive_datagram_untrusted(d.data, d.remote, d.local, 0.0)
    (response,) = gateway.datagrams_to_send()  # one whole message back
    assert not decode_untrusted(response.data).is_fragment
    client.receive_datagram_untrusted(response.data, response.remote, response.local, 0.0)
    assert client.state is State.ESTABLISHED and gateway.state is State.ESTABLISHED
