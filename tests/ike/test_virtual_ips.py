"""Virtual IPs: address pools and the responder's CFG_REPLY (RFC 7296 2.19, 3.15)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, replace

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.errors import InvalidSyntax
from cluster.ike import session as session_module
from cluster.ike.child_sa import Random
from cluster.ike.configuration import encode_attributes, parse_attributes_untrusted
from cluster.ike.constants import CfgType, ConfigAttribute, NotifyType
from cluster.ike.events import (
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaRekeyed,
)
from cluster.ike.identity import parse_identity
from cluster.ike.ike_auth import build_auth_request
from cluster.ike.message import decode_untrusted
from cluster.ike.payloads import CpPayload, NotifyPayload, Payload, SaPayload, TsiPayload
from cluster.ike.pools import AddressPending, AddressPool, FramedPool, Lease, SharedPool
from cluster.ike.sa import IkeSa
from cluster.ike.session import IkeSession
from cluster.ike.snapshot import restore, snapshot_of
from cluster.ike.state import State
from cluster.ike.traffic_selectors import TrafficSelector
from cluster.store import ClaimAddress, MemoryStore
from tests.ike.sessions import child, drain, psk_connection, psk_pair, run_handshake, transfer

ALICE = parse_identity("alice@example.test")
BOB = parse_identity("bob@example.test")
CAROL = parse_identity("carol@example.test")

# --- pools -----------------------------------------------------------------------------


def test_a_subnet_pool_leaves_out_its_network_and_broadcast_address() -> None:
    pool = AddressPool.parse("p", "10.3.0.0/30")
    assert (str(pool.first), pool.size) == ("10.3.0.1", 2)
    leases = [pool.acquire(ident) for ident in (ALICE, BOB, CAROL)]
    assert [str(lease.address) if lease else None for lease in leases] == [
        "10.3.0.1", "10.3.0.2", None]


def test_ranges_single_addresses_and_ipv6() -> None:
    assert (str(AddressPool.parse("p", "10.3.0.10-10.3.0.19").first),
            AddressPool.parse("p", "10.3.0.10 - 10.3.0.19").size) == ("10.3.0.10", 10)
    assert AddressPool.parse("p", "10.3.0.7").size == 1
    v6 = AddressPool.parse("p", "fd00:3::/64", ("fd00::53",))
    assert (v6.version, str(v6.first), v6.size) == (6, "fd00:3::1", 2**64 - 2)
    assert v6.dns == (ipaddress.ip_address("fd00::53"),)
    for bad in ("10.3.0.9-10.3.0.1", "10.3.0.1-fd00::1", "banana"):
        with pytest.raises(ValueError):
            AddressPool.parse("p", bad)


def test_an_identity_keeps_its_address_online_and_offline() -> None:
    pool = AddressPool.parse("p", "10.3.0.0/24")
    first = pool.acquire(ALICE)
    again = pool.acquire(ALICE)  # a second IKE SA of the same identity
    assert first is not None and first == again and pool.online == 1
    pool.release(first)
    assert (pool.online, pool.offline) == (1, 0)  # the other SA still holds it
    pool.release(first)
    assert (pool.online, pool.offline) == (0, 1)
    assert pool.acquire(BOB) != first  # a never used address first
    back = pool.acquire(ALICE)
    assert back == first and (pool.online, pool.offline) == (2, 0)


def test_a_full_pool_reassigns_the_oldest_offline_lease() -> None:
    pool = AddressPool.parse("p", "10.3.0.1-10.3.0.2")
    alice, bob = pool.acquire(ALICE), pool.acquire(BOB)
    assert alice is not None and bob is not None
    assert pool.acquire(CAROL) is None  # every address is online
    pool.release(bob)
    pool.release(alice)
    carol = pool.acquire(CAROL)
    assert carol is not None and carol.address == bob.address  # bob's went offline first
    assert pool.lease_of(BOB) is None and pool.lease_of(ALICE) == alice.address


# --- attributes ------------------------------------------------------------------------


def test_attributes_round_trip_and_the_reserved_bit_is_ignored() -> None:
    data = encode_attributes([(1, b""), (3, bytes(4))])
    assert parse_attributes_untrusted(data) == [(1, b""), (3, bytes(4))]
    assert parse_attributes_untrusted(bytes.fromhex("80010000")) == [(1, b"")]
    for truncated in (bytes.fromhex("0001"), bytes.fromhex("00030004000000")):
        with pytest.raises(InvalidSyntax):
            parse_attributes_untrusted(truncated)


# --- the exchange ----------------------------------------------------------------------

V4 = (ConfigAttribute.INTERNAL_IP4_ADDRESS, b"")
V4_DNS = (ConfigAttribute.INTERNAL_IP4_DNS, b"")
V6 = (ConfigAttribute.INTERNAL_IP6_ADDRESS, b"")
ANY = ("0.0.0.0/0", "::/0")
_BUILD = build_auth_request


def _ask_for(*kinds: tuple[int, bytes], tsi: tuple[str, ...]
             ) -> Callable[[IkeSa, Random], list[Payload]]:
    """Our initiator's IKE_AUTH request with a CFG_REQUEST and TSi for any address, as
    strongSwan sends it before it knows its virtual IP."""
    def with_request(sa: IkeSa, rng: Random) -> list[Payload]:
        selectors = TsiPayload(tuple(TrafficSelector.from_network(n) for n in tsi))
        payloads = [selectors if isinstance(p, TsiPayload) else p for p in _BUILD(sa, rng)]
        if kinds:
            payloads.append(CpPayload(CfgType.CFG_REQUEST, encode_attributes(list(kinds))))
        return payloads

    return with_request


@dataclass
class Exchange:
    client: IkeSession
    gateway: IkeSession
    reply: list[Payload]  # the IKE_AUTH response's payloads
    gateway_events: list[Event]


def _exchange(monkeypatch: pytest.MonkeyPatch, *pools: AddressPool,
              ask: tuple[tuple[int, bytes], ...] = (V4, V4_DNS), tsi: tuple[str, ...] = ANY,
              client_id: str = "client.example.test", framed: tuple[str, ...] = (),
              radius_attributes: tuple[tuple[int, bytes], ...] = ()) -> Exchange:
    monkeypatch.setattr(session_module, "build_auth_request", _ask_for(*ask, tsi=tsi))
    gw_conn = replace(psk_connection(children=(child(remote_ts="dynamic"),)), pools=pools)
    client_conn = psk_connection(
        local_id=client_id, remote_id="gw.example.test",
        children=(child(local_ts="dynamic", remote_ts="10.99.2.0/24"),))
    client, gateway = psk_pair(gw_conn, client_conn)
    transfer(client, gateway)
    transfer(gateway, client)
    # what an eap-radius exchange takes from the Access-Accept (Framed-IP-Address)
    gateway.sa.framed_addresses = tuple(ipaddress.ip_address(a) for a in framed)
    gateway.sa.radius_attributes = radius_attributes
    transfer(client, gateway)  # IKE_AUTH request
    [response] = gateway.datagrams_to_send()
    sk = client.sa.sk
    assert sk is not None
    reply = sk.unprotect_untrusted(response.data, decode_untrusted(response.data))
    assert reply is not None
    client.receive_datagram_untrusted(response.data, response.remote, response.local, 0.0)
    return Exchange(client, gateway, reply, drain(gateway))


def _config_reply(reply: list[Payload]) -> list[tuple[int, bytes]]:
    [cp] = [p for p in reply if isinstance(p, CpPayload)]
    assert cp.cfg_type == CfgType.CFG_REPLY
    return parse_attributes_untrusted(cp.attributes)


def _child(events: list[Event]) -> ChildSaEstablished:
    [established] = [e for e in events if isinstance(e, ChildSaEstablished)]
    return established


def test_the_peer_gets_an_address_and_the_pools_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = AddressPool.parse("rw", "10.99.3.0/24", ("10.99.2.53", "fd99:2::53"))
    out = _exchange(monkeypatch, pool)
    assert _config_reply(out.reply) == [
        (ConfigAttribute.INTERNAL_IP4_ADDRESS, ipaddress.ip_address("10.99.3.1").packed),
        (ConfigAttribute.INTERNAL_IP4_DNS, ipaddress.ip_address("10.99.2.53").packed)]
    # RFC 7296 2.19: CP follows AUTH, before the Child SA's payloads
    kinds = [type(p).__name__ for p in out.reply]
    assert kinds.index("CpPayload") == kinds.index("AuthPayload") + 1
    assert kinds.index("CpPayload") < kinds.index("SaPayload")
    # "dynamic" on the remote side is now the virtual IP, not the outer address
    assert [str(ts) for ts in _child(out.gateway_events).remote_ts] == ["10.99.3.1/32"]
    [established] = [e for e in out.gateway_events if isinstance(e, IkeSaEstablished)]
    assert established.virtual_ips == ("10.99.3.1",)
    assert out.client.state is State.ESTABLISHED
    assert [str(ts) for ts in _child(drain(out.client)).local_ts] == ["10.99.3.1/32"]


def test_ipv6_and_both_families(monkeypatch: pytest.MonkeyPatch) -> None:
    v4 = AddressPool.parse("v4", "10.99.3.0/24")
    v6 = AddressPool.parse("v6", "fd99:3::/64", ("fd99:2::53",))
    out = _exchange(monkeypatch, v4, v6, ask=(V4, V6))
    assert _config_reply(out.reply) == [
        (ConfigAttribute.INTERNAL_IP4_ADDRESS, ipaddress.ip_address("10.99.3.1").packed),
        (ConfigAttribute.INTERNAL_IP6_ADDRESS,
         ipaddress.ip_address("fd99:3::1").packed + bytes([128])),
        (ConfigAttribute.INTERNAL_IP6_DNS, ipaddress.ip_address("fd99:2::53").packed)]
    assert [str(ts) for ts in _child(out.gateway_events).remote_ts] == [
        "10.99.3.1/32", "fd99:3::1/128"]


def test_the_radius_servers_address_comes_first_and_a_pool_serves_the_other_family(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pools = ["radius", "v4"]: the server assigned only an IPv6 address; the IPv4 one
    comes from the pool. The lease survives a snapshot (msgpack) and a takeover."""
    framed, v4 = FramedPool(), AddressPool.parse("v4", "10.99.3.0/24")
    out = _exchange(monkeypatch, framed, v4, ask=(V4, V6), framed=("fd99:3::99",))
    assert _config_reply(out.reply) == [
        (ConfigAttribute.INTERNAL_IP4_ADDRESS, ipaddress.ip_address("10.99.3.1").packed),
        (ConfigAttribute.INTERNAL_IP6_ADDRESS,
         ipaddress.ip_address("fd99:3::99").packed + bytes([128]))]
    assert [str(ts) for ts in _child(out.gateway_events).remote_ts] == [
        "10.99.3.1/32", "fd99:3::99/128"]
    assert (framed.online, framed.size) == (1, 0)
    record = msgpack.unpackb(msgpack.packb(snapshot_of(out.gateway, 1.0)))
    taken = restore(record, out.gateway.sa.policy, 1.0)
    assert [str(lease.address) for lease in taken.sa.leases] == ["10.99.3.1", "fd99:3::99"]
    assert taken.sa.leases[1].pool is framed and framed.online == 1  # the same holder
    out.gateway.end_here()
    taken.end_here()
    assert framed.online == 0


def test_the_radius_servers_dns_servers_come_first_and_the_pools_are_not_repeated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Access-Accept named (config_attributes) goes to the peer whatever the
    family, as strongSwan forwards it; the pool's DNS servers follow unless named."""
    pool = AddressPool.parse("rw", "10.99.3.0/24", ("10.99.2.53", "10.99.2.54"))
    dns, wins = ipaddress.ip_address("10.99.2.54").packed, bytes((10, 99, 2, 137))
    dns6 = ipaddress.ip_address("fd99:2::53").packed
    out = _exchange(monkeypatch, pool, radius_attributes=(
        (ConfigAttribute.INTERNAL_IP4_DNS, dns), (ConfigAttribute.INTERNAL_IP4_NBNS, wins),
        (ConfigAttribute.INTERNAL_IP6_DNS, dns6)))
    assert _config_reply(out.reply) == [
        (ConfigAttribute.INTERNAL_IP4_ADDRESS, ipaddress.ip_address("10.99.3.1").packed),
        (ConfigAttribute.INTERNAL_IP4_DNS, dns), (ConfigAttribute.INTERNAL_IP4_NBNS, wins),
        (ConfigAttribute.INTERNAL_IP6_DNS, dns6),
        (ConfigAttribute.INTERNAL_IP4_DNS, ipaddress.ip_address("10.99.2.53").packed)]


def test_a_family_without_a_pool_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _exchange(monkeypatch, AddressPool.parse("v4", "10.99.3.0/24"), ask=(V4, V6))
    assert [kind for kind, _ in _config_reply(out.reply)] == [
        ConfigAttribute.INTERNAL_IP4_ADDRESS]


def test_an_exhausted_pool_answers_internal_address_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pool = AddressPool.parse("one", "10.99.3.7")
    assert pool.acquire(parse_identity("someone.example.test")) is not None
    out = _exchange(monkeypatch, pool)
    notifies = [p.notify_type for p in out.reply if isinstance(p, NotifyPayload)]
    assert NotifyType.INTERNAL_ADDRESS_FAILURE in notifies
    # RFC 7296 3.10.1: no Child SA; the IKE SA itself stands
    assert not any(isinstance(p, CpPayload | SaPayload) for p in out.reply)
    assert not [e for e in out.gateway_events if isinstance(e, ChildSaEstablished)]
    assert out.gateway.state is State.ESTABLISHED


def test_no_pools_or_no_address_asked_gives_no_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _exchange(monkeypatch, tsi=("10.99.0.1/32",))
    assert not any(isinstance(p, CpPayload) for p in out.reply)
    assert [str(ts) for ts in _child(out.gateway_events).remote_ts] == ["10.99.0.1/32"]
    pool = AddressPool.parse("rw", "10.99.3.0/24")
    out = _exchange(monkeypatch, pool, ask=(V4_DNS,), tsi=("10.99.0.1/32",))
    assert not any(isinstance(p, CpPayload) for p in out.reply)
    assert pool.online == 0


def test_a_malformed_request_is_invalid_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = AddressPool.parse("rw", "10.99.3.0/24")
    out = _exchange(monkeypatch, pool, ask=((ConfigAttribute.INTERNAL_IP4_ADDRESS, b"\0\0"),))
    notifies = [p.notify_type for p in out.reply if isinstance(p, NotifyPayload)]
    assert notifies == [NotifyType.INVALID_SYNTAX]
    assert out.gateway.state is State.CLOSED and pool.online == 0


def test_the_lease_lives_as_long_as_the_ike_sa_and_its_rekeys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pool = AddressPool.parse("rw", "10.99.3.0/24")
    out = _exchange(monkeypatch, pool)
    client, gateway = out.client, out.gateway
    assert (pool.online, pool.offline) == (1, 0)
    client.rekey_ike(1.0)
    run_handshake(client, gateway)
    assert [e for e in drain(gateway) if isinstance(e, IkeSaRekeyed)]
    assert (pool.online, pool.offline) == (1, 0)  # the old SA's Delete kept the lease
    client.rekey_child(next(iter(client.sa.children)), 2.0)
    run_handshake(client, gateway)
    assert [str(ts) for ts in _child(drain(gateway)).remote_ts] == ["10.99.3.1/32"]
    client.delete_ike(3.0)
    run_handshake(client, gateway)
    assert [e for e in drain(gateway) if isinstance(e, IkeSaDeleted)]
    assert (pool.online, pool.offline) == (0, 1)
    assert pool.lease_of(parse_identity("client.example.test")) == ipaddress.ip_address(
        "10.99.3.1")


@given(st.binary(max_size=64))
def test_any_attribute_bytes_parse_or_are_invalid_syntax(data: bytes) -> None:
    """Never another exception, and a parse accounts for every byte."""
    try:
        attributes = parse_attributes_untrusted(data)
    except InvalidSyntax:
        return
    assert sum(4 + len(value) for _, value in attributes) == len(data)
    assert all(0 <= kind <= 0x7FFF for kind, _ in attributes)


def test_a_session_ending_here_without_closing_returns_its_lease(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the supervisor calls when an actor retires, also after a failure."""
    pool = AddressPool.parse("rw", "10.99.3.0/24")
    out = _exchange(monkeypatch, pool)
    assert (pool.online, out.gateway.state) == (1, State.ESTABLISHED)
    out.gateway.end_here()
    assert (pool.online, pool.offline) == (0, 1)
    out.gateway.end_here()  # twice is harmless
    assert (pool.online, pool.offline) == (0, 1)


# --- as the initiator ------------------------------------------------------------------


def _client_pair(*pools: AddressPool, vips: tuple[int, ...] = (4,)
                 ) -> tuple[IkeSession, IkeSession]:
    gw_conn = replace(psk_connection(children=(child(remote_ts="dynamic"),)), pools=pools)
    client_conn = replace(psk_connection(
        local_id="client.example.test", remote_id="gw.example.test",
        children=(child(local_ts="dynamic", remote_ts="10.99.2.0/24"),)), vips=vips)
    return psk_pair(gw_conn, client_conn)


def test_our_initiator_asks_for_an_address_and_its_selectors_become_it() -> None:
    pool = AddressPool.parse("rw", "10.99.3.0/24", ("10.99.2.53",))
    client, gateway = _client_pair(pool)
    run_handshake(client, gateway)
    assert client.state is State.ESTABLISHED and client.sa.own_vips == ("10.99.3.1",)
    events = drain(client)
    [established] = [e for e in events if isinstance(e, IkeSaEstablished)]
    assert established.own_virtual_ips == ("10.99.3.1",)
    assert [str(ts) for ts in _child(events).local_ts] == ["10.99.3.1/32"]
    assert [str(ts) for ts in _child(drain(gateway)).remote_ts] == ["10.99.3.1/32"]


def test_a_reauthentication_asks_for_the_addresses_it_has_by_name() -> None:
    """RFC 7296 3.15.1: the CFG_REQUEST may name the address wanted; our initiator names
    the old SA's (IkeSession.initiator's wanted_vips), one per family, as strongSwan does
    when it reauthenticates. Our gateway takes it as a hint and answers as ever."""
    pool = AddressPool.parse("rw", "10.99.3.0/24")
    client, gateway = _client_pair(pool, vips=(4, 6))
    client = IkeSession.initiator(client.sa.connection, client.sa.policy, bytes(range(8)),
                                  client.sa.local, client.sa.remote, 0.0,
                                  wanted_vips=("fd99:3::7", "10.99.3.1"))
    transfer(client, gateway)
    transfer(gateway, client)
    [request] = client.datagrams_to_send()  # IKE_AUTH
    sk = gateway.sa.sk
    assert sk is not None
    inner = sk.unprotect_untrusted(request.data, decode_untrusted(request.data))
    assert inner is not None
    [cp] = [p for p in inner if isinstance(p, CpPayload)]
    assert parse_attributes_untrusted(cp.attributes) == [
        (ConfigAttribute.INTERNAL_IP4_ADDRESS, ipaddress.IPv4Address("10.99.3.1").packed),
        (ConfigAttribute.INTERNAL_IP4_DNS, b""),
        (ConfigAttribute.INTERNAL_IP6_ADDRESS,
         ipaddress.IPv6Address("fd99:3::7").packed + b"\x80"),
        (ConfigAttribute.INTERNAL_IP6_DNS, b""),
    ]
    gateway.receive_datagram_untrusted(request.data, request.remote, request.local, 0.0)
    transfer(gateway, client)
    assert client.state is State.ESTABLISHED and len(client.sa.own_vips) == 1  # IPv4 only


def test_our_initiator_deletes_an_sa_that_came_without_its_address() -> None:
    client, gateway = _client_pair()  # the responder has no pool: no CFG_REPLY
    run_handshake(client, gateway)
    assert client.sa.own_vips == ()
    assert client.last_error == "the responder assigned no virtual IP"
    assert client.state is State.CLOSED and gateway.state is State.CLOSED  # Delete answered


# --- shared pools (a cluster) ------------------------------------------------------------


def _shared(store: MemoryStore, name: str = "rw", addrs: str = "10.99.3.0/30") -> SharedPool:
    async def claim(pool: str, size: int, holder: bytes, identity: bytes,
                    ttl: float) -> int | None:
        return await store.run(ClaimAddress(pool, size, holder, identity, ttl))

    return SharedPool(AddressPool.parse(name, addrs), claim, 3600.0)


async def test_a_shared_pool_parks_the_exchange_until_the_store_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    pool = _shared(store)
    monkeypatch.setattr(session_module, "build_auth_request", _ask_for(V4, tsi=ANY))
    gw_conn = replace(psk_connection(children=(child(remote_ts="dynamic"),)), pools=(pool,))
    client, gateway = psk_pair(gw_conn, psk_connection(
        local_id="client.example.test", remote_id="gw.example.test",
        children=(child(local_ts="dynamic", remote_ts="10.99.2.0/24"),)))
    transfer(client, gateway)
    transfer(gateway, client)
    transfer(client, gateway)  # IKE_AUTH: parked, nothing answered yet
    pending = gateway.pending
    assert pending is not None and pending.pools == (pool,)
    assert gateway.datagrams_to_send() == [] and gateway.state is not State.ESTABLISHED
    assert pending.identity == parse_identity("client.example.test")
    for waiting in pending.pools:
        assert await waiting.fetch(pending.holder, pending.identity)
    gateway.resume(0.0)
    assert gateway.pending is None and gateway.state is State.ESTABLISHED
    run_handshake(client, gateway)
    assert client.state is State.ESTABLISHED
    [lease] = gateway.sa.leases
    assert (str(lease.address), lease.holder) == ("10.99.3.1", pending.holder)
    assert pool.online == 1
    # the SA's end frees its address in the store (through the responder's queue)
    gateway.delete_ike(1.0)
    run_handshake(gateway, client)
    assert pool.to_free == [(0, pending.holder)] and pool.online == 0


async def test_two_responders_sharing_a_store_never_lease_one_address_twice() -> None:
    store = MemoryStore()
    first, second = _shared(store), _shared(store)  # one pool, two processes
    assert await first.fetch(b"sa-1", ALICE) and await second.fetch(b"sa-2", BOB)
    a = first.acquire(ALICE, b"sa-1")
    b = second.acquire(BOB, b"sa-2")
    assert a is not None and b is not None and a.address != b.address
    assert not await first.fetch(b"sa-3", CAROL)  # a /30: two addresses, both held
    assert first.acquire(CAROL, b"sa-3") is None
    # alice's second SA, at the other responder, shares her address (a reauthentication)
    assert await second.fetch(b"sa-4", ALICE)
    again = second.acquire(ALICE, b"sa-4")
    assert again is not None and again.address == a.address
    with pytest.raises(AddressPending):
        second.acquire(CAROL, b"sa-5")  # never fetched: the exchange must wait


async def test_a_taken_over_sa_keeps_its_address_and_frees_it_at_its_end() -> None:
    store = MemoryStore()
    owner, survivor = _shared(store), _shared(store)
    assert await owner.fetch(b"sa-1", ALICE)
    lease = owner.acquire(ALICE, b"sa-1")
    assert lease is not None
    adopted = Lease(survivor, lease.address, lease.holder)
    survivor.adopt(adopted)
    assert survivor.online == 1
    survivor.release(adopted)
    assert survivor.to_free == [(0, b"sa-1")]
