"""MOBIKE as the responder (RFC 4555): the initiator moves its IKE SA to new addresses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.ike import session as session_module
from cluster.ike.child_sa import Random
from cluster.ike.constants import ExchangeType, NotifyType
from cluster.ike.events import MOBIKE_UPDATE, IkeSaMoved
from cluster.ike.ike_auth import build_auth_request
from cluster.ike.ike_init import nat_hash
from cluster.ike.message import Message, decode_untrusted
from cluster.ike.payloads import NotifyPayload, Payload
from cluster.ike.sa import IkeSa
from cluster.ike.session import IkeSession
from cluster.ike.snapshot import restore, snapshot_of
from cluster.ike.state import State
from tests.ike.sessions import (
    CLIENT,
    GW,
    client_for,
    drain,
    psk_connection,
    psk_pair,
    psk_policy,
    run_handshake,
)

ROAMED = ("10.99.0.11", 4500)
GW_NATT = (GW[0], 4500)


def _with_mobike(sa: IkeSa, rng: Random) -> list[Payload]:
    """Our initiator's IKE_AUTH request announcing MOBIKE, as strongSwan's does."""
    return [*build_auth_request(sa, rng), NotifyPayload(NotifyType.MOBIKE_SUPPORTED)]


def _established(monkeypatch: pytest.MonkeyPatch, *, mobike: bool = True
                 ) -> tuple[IkeSession, IkeSession]:
    monkeypatch.setattr(session_module, "build_auth_request", _with_mobike)
    gw_conn = replace(psk_connection(), mobike=mobike)
    client, gateway = psk_pair(gw_conn, client_for(psk_connection()))
    run_handshake(client, gateway)
    assert gateway.state is State.ESTABLISHED
    drain(gateway)
    return client, gateway


def _inform(client: IkeSession, gateway: IkeSession, message_id: int,
            payloads: list[Payload], source: tuple[str, int]) -> list[Payload]:
    """An INFORMATIONAL request from `source` to the gateway's NAT-T port; its answer."""
    sk = client.sa.sk
    assert sk is not None
    request = sk.protect(Message(client.spi_i, client.spi_r, ExchangeType.INFORMATIONAL,
                                 message_id, False, True, payloads))
    gateway.receive_datagram_untrusted(request, GW_NATT, source, 1.0)
    [reply] = gateway.datagrams_to_send()
    assert (reply.local, reply.remote) == (GW_NATT, source)  # answered where it came from
    inner = sk.unprotect_untrusted(reply.data, decode_untrusted(reply.data))
    assert inner is not None
    return inner


def _nat_detection(client: IkeSession, source: tuple[str, int],
                   destination: tuple[str, int]) -> list[Payload]:
    return [NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP,
                          nat_hash(client.spi_i, client.spi_r, source)),
            NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                          nat_hash(client.spi_i, client.spi_r, destination))]


def test_mobike_is_announced_back_only_when_offered_and_allowed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, gateway = _established(monkeypatch)
    assert gateway.sa.mobike
    _, gateway = _established(monkeypatch, mobike=False)
    assert not gateway.sa.mobike
    monkeypatch.undo()
    client, gateway = psk_pair()  # our own initiator does not offer it
    run_handshake(client, gateway)
    assert gateway.state is State.ESTABLISHED and not gateway.sa.mobike


def test_update_sa_addresses_moves_the_sa_and_answers_nat_detection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client, gateway = _established(monkeypatch)
    cookie2 = NotifyPayload(NotifyType.COOKIE2, b"\x5a" * 16)
    answer = _inform(client, gateway, 2, [
        NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES), *_nat_detection(client, ROAMED, GW_NATT),
        cookie2], ROAMED)
    # RFC 4555 3.5: NAT detection for the addresses of this exchange; 3.8: COOKIE2 echoed
    assert answer == [*_nat_detection(client, GW_NATT, ROAMED), cookie2]
    assert (gateway.sa.local, gateway.sa.remote) == (GW_NATT, ROAMED)
    [moved] = [e for e in drain(gateway) if isinstance(e, IkeSaMoved)]
    assert (moved.local, moved.remote, moved.reason) == (GW_NATT, ROAMED, MOBIKE_UPDATE)
    assert not gateway.sa.nat  # the hashes matched: no NAT on the new path
    # the SA lives on at the new address
    assert gateway.check_liveness(2.0)
    [probe] = gateway.datagrams_to_send()
    assert probe.remote == ROAMED


def test_a_nat_on_the_new_path_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    client, gateway = _established(monkeypatch)
    behind = ("192.168.7.2", 4500)  # what the peer thinks its address is
    _inform(client, gateway, 2, [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES),
                                 *_nat_detection(client, behind, GW_NATT)], ROAMED)
    assert gateway.sa.nat_remote and not gateway.sa.behind_nat
    assert gateway.sa.remote == ROAMED


def test_without_an_update_only_the_answer_goes_to_the_new_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A path test (RFC 4555 3.7) or a liveness check with NAT detection from another
    address: answered there, the SA stays where it is."""
    client, gateway = _established(monkeypatch)
    before = (gateway.sa.local, gateway.sa.remote)
    answer = _inform(client, gateway, 2, _nat_detection(client, ROAMED, GW_NATT), ROAMED)
    assert answer == _nat_detection(client, GW_NATT, ROAMED)
    assert (gateway.sa.local, gateway.sa.remote) == before
    assert not [e for e in drain(gateway) if isinstance(e, IkeSaMoved)]


def test_without_mobike_an_update_is_not_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    client, gateway = _established(monkeypatch, mobike=False)
    before = (gateway.sa.local, gateway.sa.remote)
    answer = _inform(client, gateway, 2, [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES),
                                          *_nat_detection(client, ROAMED, GW_NATT)], ROAMED)
    assert answer == []
    assert (gateway.sa.local, gateway.sa.remote) == before


def test_mobike_survives_an_ike_rekey_and_a_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    client, gateway = _established(monkeypatch)
    old = gateway.sa.spi_r
    client.rekey_ike(1.0)
    run_handshake(client, gateway)
    assert gateway.sa.spi_r != old and gateway.sa.mobike
    record = snapshot_of(gateway, 1.0)
    restored = restore(record, psk_policy(replace(psk_connection(), mobike=True)), 1.0)
    assert restored.sa.mobike
    answer = _inform(client, restored, client.sa.our_next_id,
                     [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES)], ROAMED)
    assert answer == []
    assert restored.sa.remote == ROAMED != CLIENT


def test_an_update_without_nat_detection_keeps_the_nat_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client, gateway = _established(monkeypatch)
    ours_seen_as = ("203.0.113.5", 4500)  # a NAT in front of us: the peer saw another address
    _inform(client, gateway, 2, [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES),
                                 *_nat_detection(client, ROAMED, ours_seen_as)], ROAMED)
    assert gateway.sa.behind_nat and gateway.sa.nat_local
    elsewhere = ("10.99.0.12", 4500)
    _inform(client, gateway, 3, [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES)], elsewhere)
    assert gateway.sa.remote == elsewhere
    assert gateway.sa.behind_nat and gateway.sa.nat_local  # nothing said otherwise
