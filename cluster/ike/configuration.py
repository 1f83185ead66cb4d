"""The Configuration payload (RFC 7296 2.19, 3.15): virtual IPs for peers that ask.

The responder answers a CFG_REQUEST in IKE_AUTH with a CFG_REPLY carrying an address
from the connection's pools (with the pool's DNS servers, and those a RADIUS server
gave the user); the Child SA's `dynamic` remote selector then stands for that address
instead of the peer's outer one.
"""

from __future__ import annotations

import ipaddress
import struct

from ..errors import InternalAddressFailure, InvalidSyntax, ParseError
from ..wire import Buffer
from .constants import CfgType, ConfigAttribute
from .identity import Identity, eap_identity_untrusted
from .payloads import CpPayload, Payload, first_of
from .policy import ConnectionConfig
from .pools import Lease
from .sa import IkeSa

_ATTRIBUTE = struct.Struct("!HH")
_ADDRESS_ATTRIBUTES = {4: ConfigAttribute.INTERNAL_IP4_ADDRESS,
                       6: ConfigAttribute.INTERNAL_IP6_ADDRESS}
_DNS_ATTRIBUTES = {4: ConfigAttribute.INTERNAL_IP4_DNS, 6: ConfigAttribute.INTERNAL_IP6_DNS}
# the value a request may carry: empty, or an address (IPv6 with its prefix length)
_REQUEST_LENGTHS: dict[int, tuple[int, ...]] = {
    ConfigAttribute.INTERNAL_IP4_ADDRESS: (0, 4), ConfigAttribute.INTERNAL_IP6_ADDRESS: (0, 17)}


def parse_attributes_untrusted(data: bytes) -> list[tuple[int, bytes]]:
    """(type, value) pairs of a Configuration payload (RFC 7296 3.15.1)."""
    buf = Buffer(data)
    out: list[tuple[int, bytes]] = []
    try:
        while not buf.eof():
            kind, length = buf.pull_header(_ATTRIBUTE)
            out.append((kind & 0x7FFF, buf.pull_bytes(length)))  # the R bit is ignored
    except ParseError as exc:
        raise InvalidSyntax(f"configuration attributes: {exc}") from None
    return out


def encode_attributes(attributes: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_ATTRIBUTE.pack(kind, len(value)) + value for kind, value in attributes)


def lease_identity(sa: IkeSa) -> Identity:
    """Whose virtual IP it is (a pool gives an identity its earlier address again): the
    EAP identity when the peer logged in with EAP, as strongSwan's pools key leases.
    Windows sends its own IP address as IKE identity, the same for users behind
    different NATs, who must not share one address."""
    if sa.eap_identity:
        eap = eap_identity_untrusted(sa.eap_identity.encode())
        if eap is not None:
            return eap
    assert sa.remote_id is not None
    return sa.remote_id


def respond_config(sa: IkeSa, conn: ConnectionConfig, payloads: list[Payload]) -> list[Payload]:
    """The CFG_REPLY for the peer's CFG_REQUEST, leasing its virtual IPs to `sa`.

    Nothing when the peer asked for no address or the connection has no pools (the
    request is then ignored, as strongSwan does); InternalAddressFailure when it asked
    and no pool had an address left for it.
    """
    cp = first_of(payloads, CpPayload)
    if cp is None or cp.cfg_type != CfgType.CFG_REQUEST or not conn.pools:
        return []
    wanted: list[int] = []
    for kind, value in parse_attributes_untrusted(cp.attributes):
        if kind in _REQUEST_LENGTHS:
            if len(value) not in _REQUEST_LENGTHS[kind]:
                raise InvalidSyntax(f"configuration attribute {kind} of {len(value)} bytes")
            version = 4 if kind == ConfigAttribute.INTERNAL_IP4_ADDRESS else 6
            if version not in wanted:
                wanted.append(version)
    if not wanted:
        return []
    leases: list[Lease] = []
    holder = sa.spi_i + sa.spi_r  # a shared pool's holder: these SPIs, through rekeys too
    identity = lease_identity(sa)
    for version in wanted:  # any requested address is a hint we do not follow
        for pool in conn.pools:
            # (a shared pool may raise AddressPending)
            lease = pool.offer(version, identity, holder, sa.framed_addresses)
            if lease is not None:
                leases.append(lease)
                break
    if not leases:
        raise InternalAddressFailure("no virtual IP left in the connection's pools")
    sa.leases = tuple(leases)
    reply: list[tuple[int, bytes]] = []
    for lease in leases:
        value = lease.address.packed + (b"\x80" if lease.address.version == 6 else b"")
        reply.append((_ADDRESS_ATTRIBUTES[lease.address.version], value))
    # a RADIUS server's DNS servers, netmask... for this user (forwarded as strongSwan
    # does, whatever the family), then the pools' DNS servers of each leased family
    reply += sa.radius_attributes
    for lease in leases:
        reply += [(_DNS_ATTRIBUTES[d.version], d.packed) for d in lease.pool.dns
                  if d.version == lease.address.version
                  and (_DNS_ATTRIBUTES[d.version], d.packed) not in reply]
    return [CpPayload(CfgType.CFG_REPLY, encode_attributes(reply))]


def release_leases(sa: IkeSa, *, shared: bool = True) -> None:
    """The IKE SA holding the leases ended (its rekeyed successors hold them until then).
    `shared=False`: only this process's pools' (the SA may live on at another node)."""
    kept = []
    for lease in sa.leases:
        if shared or not lease.pool.shared:
            lease.pool.release(lease)
        else:
            kept.append(lease)
    sa.leases = tuple(kept)


def dynamic_addresses(sa: IkeSa) -> tuple[str, ...]:
    """What a `dynamic` remote selector stands for: the virtual IPs, else the peer."""
    if sa.leases:
        return tuple(str(lease.address) for lease in sa.leases)
    return (sa.remote[0],)


def own_dynamic_addresses(sa: IkeSa) -> tuple[str, ...]:
    """What a `dynamic` local selector stands for once the SA is up: the virtual IPs
    the responder assigned us, else our address."""
    return sa.own_vips or (sa.local[0],)


# --- as the initiator --------------------------------------------------------------------

_ANY = {4: "0.0.0.0/0", 6: "::/0"}


def config_request(families: tuple[int, ...], wanted: tuple[str, ...] = ()) -> CpPayload:
    """CFG_REQUEST for an address (and the DNS servers) of each family (RFC 7296 3.15.1),
    naming the one of `wanted` of that family if any (a reauthentication asks for the
    address it has, as strongSwan does; the responder may give another)."""
    attributes: list[tuple[int, bytes]] = []
    for family in families:
        value = b""
        for text in wanted:
            address = ipaddress.ip_address(text)
            if address.version == family:
                value = address.packed + (b"\x80" if family == 6 else b"")  # /128
                break
        attributes += [(_ADDRESS_ATTRIBUTES[family], value), (_DNS_ATTRIBUTES[family], b"")]
    return CpPayload(CfgType.CFG_REQUEST, encode_attributes(attributes))


def any_address(family: int) -> str:
    """What a `dynamic` local selector stands for before the address is known."""
    return _ANY[family]


def assigned_addresses(payloads: list[Payload]) -> tuple[str, ...]:
    """The virtual IPs in the responder's CFG_REPLY (none when it sent none)."""
    cp = first_of(payloads, CpPayload)
    if cp is None or cp.cfg_type != CfgType.CFG_REPLY:
        return ()
    out: list[str] = []
    for kind, value in parse_attributes_untrusted(cp.attributes):
        if kind == ConfigAttribute.INTERNAL_IP4_ADDRESS and len(value) == 4:
            out.append(str(ipaddress.IPv4Address(value)))
        elif kind == ConfigAttribute.INTERNAL_IP6_ADDRESS and len(value) == 17:
            out.append(str(ipaddress.IPv6Address(value[:16])))
    return tuple(out)
