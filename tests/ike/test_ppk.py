"""RFC 8784 post-quantum preshared keys, both roles in memory."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import replace

import pytest

from cluster.ike.constants import NotifyType
from cluster.ike.events import IkeSaEstablished, IkeSaFailed
from cluster.ike.identity import parse_identity_pattern
from cluster.ike.keymat import IkeKeys, mix_ppk
from cluster.ike.policy import ConnectionConfig, ResponderPolicy, SharedSecret
from cluster.ike.pools import AddressPending, AddressPool, SharedPool
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from cluster.store import ClaimAddress, MemoryStore
from cluster.transforms import PRF_ALGORITHMS
from tests.ike.sessions import (
    CLIENT,
    GW,
    child,
    client_for,
    drain,
    psk_connection,
    psk_policy,
    run_handshake,
    transfer,
)

PPK = bytes(range(32))


def _with_ppks(policy: ResponderPolicy, *ppks: tuple[str, bytes]) -> ResponderPolicy:
    extra = tuple(SharedSecret((parse_identity_pattern(i),), key, "ppk") for i, key in ppks)
    return replace(policy, secrets=policy.secrets + extra)


def _sessions(gw: ConnectionConfig, client: ConnectionConfig,
              gw_ppks: tuple[tuple[str, bytes], ...],
              client_ppks: tuple[tuple[str, bytes], ...]) -> tuple[IkeSession, IkeSession]:
    gw_policy = _with_ppks(psk_policy(gw), *gw_ppks)
    client_policy = _with_ppks(psk_policy(client, ids=("client.example.test", "%any")),
                               *client_ppks)
    initiator = IkeSession.initiator(client, client_policy, os.urandom(8), CLIENT, GW, 0.0)
    responder = IkeSession.responder(gw_policy, os.urandom(8), GW, CLIENT)
    return initiator, responder


def _pair(gw: ConnectionConfig, client: ConnectionConfig, gw_ppks: tuple[tuple[str, bytes], ...],
          client_ppks: tuple[tuple[str, bytes], ...]) -> tuple[IkeSession, IkeSession]:
    initiator, responder = _sessions(gw, client, gw_ppks, client_ppks)
    run_handshake(initiator, responder)
    return initiator, responder


def _established(session: IkeSession) -> IkeSaEstablished | None:
    found = [e for e in drain(session) if isinstance(e, IkeSaEstablished)]
    return found[0] if found else None


def test_mixing_follows_rfc_8784_prf_plus_of_the_ppk_over_each_key() -> None:
    prf = PRF_ALGORITHMS["prfsha256"]
    keys = IkeKeys(*(bytes([n]) * 32 for n in range(1, 8)))
    mixed = mix_ppk(prf, PPK, keys)

    def prf_plus_32(seed: bytes) -> bytes:  # one block: T1 = prf(PPK, seed | 0x01)
        return hmac.new(PPK, seed + b"\x01", hashlib.sha256).digest()

    assert mixed.sk_d == prf_plus_32(keys.sk_d)
    assert mixed.sk_pi == prf_plus_32(keys.sk_pi)
    assert mixed.sk_pr == prf_plus_32(keys.sk_pr)
    assert (mixed.sk_ai, mixed.sk_ar, mixed.sk_ei, mixed.sk_er) == (
        keys.sk_ai, keys.sk_ar, keys.sk_ei, keys.sk_er)


def test_a_shared_ppk_is_mixed_into_both_sides_keys() -> None:
    gw = psk_connection()
    client = replace(client_for(gw), ppk_id=b"pq-1")
    initiator, responder = _pair(gw, client, (("pq-1", PPK),), (("pq-1", PPK),))
    assert initiator.state is State.ESTABLISHED and responder.state is State.ESTABLISHED
    assert initiator.sa.ppk and responder.sa.ppk
    assert initiator.sa.keys == responder.sa.keys
    plain = _pair(gw, client_for(gw), (), ())  # the same exchange without a PPK
    assert not plain[0].sa.ppk
    event = _established(responder)
    assert event is not None and event.ppk
    (child_i,) = initiator.sa.children.values()
    (child_r,) = responder.sa.children.values()
    assert child_i.keys == child_r.keys  # derived from the mixed SK_d on both sides


def test_a_responder_without_the_ppk_checks_no_ppk_auth_when_it_is_optional() -> None:
    gw = psk_connection()
    client = replace(client_for(gw), ppk_id=b"pq-1")
    initiator, responder = _pair(gw, client, (("other", PPK),), (("pq-1", PPK),))
    assert initiator.state is State.ESTABLISHED and responder.state is State.ESTABLISHED
    assert not initiator.sa.ppk and not responder.sa.ppk


@pytest.mark.parametrize("case", ["responder requires", "initiator requires",
                                  "different ppk", "wrong ppk_id"])
def test_a_ppk_that_cannot_be_used_fails_the_sa(case: str) -> None:
    gw = psk_connection()
    client = replace(client_for(gw), ppk_id=b"pq-1")
    gw_ppks: tuple[tuple[str, bytes], ...] = (("pq-1", PPK),)
    client_ppks: tuple[tuple[str, bytes], ...] = (("pq-1", PPK),)
    if case == "responder requires":
        gw = replace(gw, ppk_required=True)
        client = client_for(psk_connection())  # no ppk_id: it sends no PPK
        client_ppks = ()
    elif case == "initiator requires":
        client = replace(client, ppk_required=True)
        gw_ppks = ()
    elif case == "different ppk":
        client_ppks = (("pq-1", bytes(32)),)
    else:
        gw = replace(gw, ppk_id=b"pq-2")
        gw_ppks = (("pq-1", PPK), ("pq-2", PPK))
    initiator, responder = _pair(gw, client, gw_ppks, client_ppks)
    assert initiator.state is not State.ESTABLISHED
    assert responder.state is not State.ESTABLISHED
    failed = [e for e in drain(initiator) if isinstance(e, IkeSaFailed)]
    assert failed, case


def test_ppk_notifies_only_where_both_announce() -> None:
    """USE_PPK in IKE_SA_INIT only back to a peer that sent it, and only with a PPK."""
    from cluster.ike.message import decode_untrusted

    gw = psk_connection()
    client = replace(client_for(gw), ppk_id=b"pq-1")
    for gw_ppks, expected in (((), False), ((("pq-1", PPK),), True)):
        gw_policy = _with_ppks(psk_policy(gw), *gw_ppks)
        client_policy = _with_ppks(psk_policy(client, ids=("client.example.test", "%any")),
                                   ("pq-1", PPK))
        initiator = IkeSession.initiator(client, client_policy, os.urandom(8), CLIENT, GW, 0.0)
        responder = IkeSession.responder(gw_policy, os.urandom(8), GW, CLIENT)
        (request,) = initiator.datagrams_to_send()
        assert any(getattr(p, "notify_type", None) == NotifyType.USE_PPK
                   for p in decode_untrusted(request.data).payloads)
        responder.receive_datagram_untrusted(request.data, request.remote, request.local, 0.0)
        (reply,) = responder.datagrams_to_send()
        announced = any(getattr(p, "notify_type", None) == NotifyType.USE_PPK
                        for p in decode_untrusted(reply.data).payloads)
        assert announced is expected


def test_a_takeover_keeps_the_ppk_mark_and_the_mixed_keys() -> None:
    from cluster.ike.snapshot import restore, snapshot_of

    gw = psk_connection()
    client = replace(client_for(gw), ppk_id=b"pq-1")
    _, responder = _pair(gw, client, (("pq-1", PPK),), (("pq-1", PPK),))
    responder.sa.redirect_supported = True
    record = snapshot_of(responder, 0.0)
    assert record["ppk"] is True and record["redirect"] is True
    survivor = restore(record, _with_ppks(psk_policy(gw), ("pq-1", PPK)), 0.0)
    assert survivor.sa.ppk and survivor.sa.redirect_supported
    assert survivor.sa.keys == responder.sa.keys


async def test_an_exchange_parked_for_a_shared_pool_mixes_the_ppk_in_once() -> None:
    """In a cluster an IKE_AUTH that asks for an address waits for the store and then
    runs again from the start: the PPK must be mixed into the keys of the IKE_SA_INIT,
    not a second time into keys that already have it (the peer's AUTH would not verify)."""
    store = MemoryStore()

    async def claim(pool: str, size: int, holder: bytes, identity: bytes,
                    ttl: float) -> int | None:
        return await store.run(ClaimAddress(pool, size, holder, identity, ttl))

    pool = SharedPool(AddressPool.parse("rw", "10.99.3.0/30"), claim, 3600.0)
    gw = replace(psk_connection(children=(child(remote_ts="dynamic"),)), pools=(pool,))
    client = replace(psk_connection(
        local_id="client.example.test", remote_id="gw.example.test",
        children=(child(local_ts="dynamic", remote_ts="10.99.2.0/24"),)),
        vips=(4,), ppk_id=b"pq-1")
    initiator, responder = _sessions(gw, client, (("pq-1", PPK),), (("pq-1", PPK),))
    for sender, receiver in ((initiator, responder), (responder, initiator),
                             (initiator, responder)):
        transfer(sender, receiver)
    pending = responder.pending
    assert isinstance(pending, AddressPending)  # parked, nothing answered yet
    assert await pool.fetch(pending.holder, pending.identity)
    responder.resume(0.0)
    run_handshake(initiator, responder)
    assert responder.state is State.ESTABLISHED and initiator.state is State.ESTABLISHED
    assert initiator.sa.ppk and responder.sa.ppk
    assert initiator.sa.keys == responder.sa.keys
    assert initiator.sa.own_vips == ("10.99.3.1",)
