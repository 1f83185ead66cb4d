"""EAP through a RADIUS server (RFC 2865, RFC 3579), as strongSwan's eap-radius does it.

Sans-IO: the gateway asks the peer for its EAP identity itself, then relays each EAP
response to the server in an Access-Request and the server's EAP request (from an
Access-Challenge) back to the peer, until an Access-Accept brings EAP-Success and the
MSK in MS-MPPE-Recv-Key / MS-MPPE-Send-Key (RFC 2548 2.4.2-3), or an Access-Reject
ends the exchange. So any EAP method the server runs (MSCHAPv2, TLS, TTLS, PEAP...)
works without the gateway knowing it. The round trips are the runtime's: a request
raises `RadiusPending`, whose `fetch` sends it through the transport the runtime set
on `RadiusBackend`, and the exchange runs again with the answer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import AuthenticationFailed
from .constants import ConfigAttribute
from .eap import Code, EapType, packet, parse_response_untrusted
from .identity import IdentityPattern, eap_identity_untrusted
from .pending import Pending
from .pools import IPAddress

Random = Callable[[int], bytes]
_HEAD = struct.Struct("!BBH16s")  # code, identifier, length, authenticator
_VENDOR = struct.Struct("!IBB")  # vendor id, vendor type, vendor length
_U32 = struct.Struct("!I")


class Packet:
    """RFC 2865 3: packet codes."""

    ACCESS_REQUEST = 1
    ACCESS_ACCEPT = 2
    ACCESS_REJECT = 3
    ACCESS_CHALLENGE = 11
    ACCOUNTING_REQUEST = 4  # RFC 2866 3
    ACCOUNTING_RESPONSE = 5
    DISCONNECT_REQUEST = 40  # RFC 5176 3
    DISCONNECT_ACK = 41
    DISCONNECT_NAK = 42
    COA_REQUEST = 43
    COA_ACK = 44
    COA_NAK = 45


class Attr:
    """RFC 2865 5, RFC 3579 3: the attribute types the relay sends or reads."""

    USER_NAME = 1
    NAS_IP_ADDRESS = 4
    NAS_PORT = 5
    SERVICE_TYPE = 6
    REPLY_MESSAGE = 18
    FRAMED_IP_ADDRESS = 8
    FRAMED_IP_NETMASK = 9
    FILTER_ID = 11
    STATE = 24
    CLASS = 25
    SESSION_TIMEOUT = 27
    VENDOR_SPECIFIC = 26
    CALLED_STATION_ID = 30
    CALLING_STATION_ID = 31
    NAS_IDENTIFIER = 32
    ACCT_STATUS_TYPE = 40  # RFC 2866 5
    ACCT_INPUT_OCTETS = 42
    ACCT_OUTPUT_OCTETS = 43
    ACCT_SESSION_ID = 44
    ACCT_SESSION_TIME = 46
    ACCT_INPUT_PACKETS = 47
    ACCT_OUTPUT_PACKETS = 48
    ACCT_TERMINATE_CAUSE = 49
    ACCT_INPUT_GIGAWORDS = 52  # RFC 2869 5.1
    ACCT_OUTPUT_GIGAWORDS = 53
    NAS_PORT_TYPE = 61
    TUNNEL_TYPE = 64  # RFC 2868 3.1
    ACCT_INTERIM_INTERVAL = 85  # RFC 2869 5.16
    ERROR_CAUSE = 101  # RFC 5176 3.6
    EAP_MESSAGE = 79
    MESSAGE_AUTHENTICATOR = 80
    NAS_IPV6_ADDRESS = 95
    FRAMED_IPV6_ADDRESS = 168  # RFC 6911
    DNS_SERVER_IPV6_ADDRESS = 169  # RFC 6911 3.2


SERVICE_FRAMED = 2  # RFC 2865 5.6
PORT_TYPE_VIRTUAL = 5  # RFC 2865 5.41
VENDOR_MICROSOFT = 311  # RFC 2548
MS_MPPE_SEND_KEY = 16
MS_MPPE_RECV_KEY = 17
VENDOR_ALTIGA = 3076  # Cisco's VPN 3000 dictionary
MAX_VALUE = 253

# Access-Accept attributes that become the peer's configuration attributes (RFC 7296
# 3.15.1), as strongSwan's eap-radius forwards them: (vendor, type): (attribute, length)
_CONFIG_ATTRIBUTES: dict[tuple[int, int], tuple[ConfigAttribute, int]] = {
    (0, Attr.FRAMED_IP_NETMASK): (ConfigAttribute.INTERNAL_IP4_NETMASK, 4),
    (0, Attr.DNS_SERVER_IPV6_ADDRESS): (ConfigAttribute.INTERNAL_IP6_DNS, 16),
    (VENDOR_MICROSOFT, 28): (ConfigAttribute.INTERNAL_IP4_DNS, 4),  # MS-Primary-DNS-Server
    (VENDOR_MICROSOFT, 29): (ConfigAttribute.INTERNAL_IP4_DNS, 4),  # RFC 2548 2.6, 2.7
    (VENDOR_MICROSOFT, 30): (ConfigAttribute.INTERNAL_IP4_NBNS, 4),  # MS-Primary-NBNS-Server
    (VENDOR_MICROSOFT, 31): (ConfigAttribute.INTERNAL_IP4_NBNS, 4),  # RFC 2548 2.8, 2.9
    (VENDOR_ALTIGA, 5): (ConfigAttribute.INTERNAL_IP4_DNS, 4),  # CVPN3000-Primary-DNS
    (VENDOR_ALTIGA, 6): (ConfigAttribute.INTERNAL_IP4_DNS, 4),
    (VENDOR_ALTIGA, 7): (ConfigAttribute.INTERNAL_IP4_NBNS, 4),  # CVPN3000-Primary-WINS
    (VENDOR_ALTIGA, 8): (ConfigAttribute.INTERNAL_IP4_NBNS, 4),
}


@dataclass(frozen=True)
class RadiusServer:
    """One server of `[radius.servers.NAME]`."""

    name: str
    address: str
    port: int = 1812
    secret: bytes = field(default=b"", repr=False)
    acct_port: int = 1813


@dataclass(frozen=True)
class DaeSettings:
    """`[radius.dae]`: where Disconnect-Requests (RFC 5176) are taken, with what secret."""

    host: str
    port: int = 3799
    secret: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class RadiusSettings:
    """`[radius]`: the servers, tried in order, and strongSwan's retransmission defaults
    (charon.plugins.eap-radius: retransmit_timeout 2 s, base 1.4, tries 4)."""

    servers: tuple[RadiusServer, ...]
    nas_identifier: str = "ike-cluster"
    timeout: float = 2.0
    base: float = 1.4
    tries: int = 4
    # RFC 2866 Start and Stop for the IKE SAs of eap-radius users (strongSwan's
    # eap-radius accounting = yes)
    accounting: bool = False
    accounting_interval: float = 0.0  # seconds between Interim-Updates (0: none)
    dae: DaeSettings | None = None

    def delay(self, attempt: int) -> float:
        """Seconds to wait for an answer to try `attempt` (0-based)."""
        return self.timeout * self.base ** attempt


class RadiusTransport(Protocol):
    """Send `request` to `server` (again, as `settings` say) until `accept` takes a
    datagram from it; None when no answer came."""

    async def __call__(self, server: RadiusServer, request: bytes, settings: RadiusSettings,
                       accept: Callable[[bytes], bool]) -> bytes | None: ...


class RadiusBackend:
    """What the runtime provides (kept across configuration reloads)."""

    def __init__(self) -> None:
        self.transport: RadiusTransport | None = None  # set by the runtime


# --- the codec --------------------------------------------------------------------------


def attribute(attr_type: int, value: bytes) -> bytes:
    return bytes((attr_type, 2 + len(value))) + value


def u32(value: int) -> bytes:
    """An integer attribute's value (RFC 2865 5; counters wrap, Gigawords carry more)."""
    return _U32.pack(value & 0xFFFFFFFF)


def packed_address(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def encode_request(identifier: int, authenticator: bytes, attributes: list[bytes],
                   secret: bytes) -> bytes:
    """An Access-Request with Message-Authenticator (RFC 3579 3.2) as its first attribute
    (so that a forged answer cannot be spliced in front of it: BlastRADIUS, RFC 9765)."""
    body = attribute(Attr.MESSAGE_AUTHENTICATOR, bytes(16)) + b"".join(attributes)
    head = _HEAD.pack(Packet.ACCESS_REQUEST, identifier, _HEAD.size + len(body),
                      authenticator)
    mac = hmac.digest(secret, head + body, "md5")
    return head + body[:2] + mac + body[18:]


def encode_accounting(identifier: int, attributes: list[bytes], secret: bytes) -> bytes:
    """An Accounting-Request (RFC 2866 3): its authenticator is the MD5 of the packet
    with sixteen zero octets in its place, then the secret."""
    body = b"".join(attributes)
    head = struct.pack("!BBH", Packet.ACCOUNTING_REQUEST, identifier, _HEAD.size + len(body))
    authenticator = hashlib.md5(head + bytes(16) + body + secret).digest()
    return head + authenticator + body


@dataclass(frozen=True)
class Reply:
    code: int
    attributes: list[tuple[int, bytes]]

    def values(self, attr_type: int) -> list[bytes]:
        return [value for kind, value in self.attributes if kind == attr_type]

    def first(self, attr_type: int) -> bytes | None:
        found = self.values(attr_type)
        return found[0] if found else None

    def integer(self, attr_type: int) -> int:
        """A 32-bit integer attribute (RFC 2865 5); 0 when absent or malformed."""
        value = self.first(attr_type)
        return int.from_bytes(value) if value is not None and len(value) == 4 else 0

    def vendor(self, vendor_id: int, vendor_type: int) -> bytes | None:
        for vid, vtype, value in self.vendor_attributes():
            if vid == vendor_id and vtype == vendor_type:
                return value
        return None

    def vendor_attributes(self) -> list[tuple[int, int, bytes]]:
        """(vendor id, vendor type, value) of each well-formed Vendor-Specific
        attribute (RFC 2865 5.26, one vendor attribute in each)."""
        out = []
        for value in self.values(Attr.VENDOR_SPECIFIC):
            if len(value) < _VENDOR.size:
                continue
            vid, vtype, vlength = _VENDOR.unpack_from(value)
            if vlength == len(value) - 4:
                out.append((vid, vtype, value[_VENDOR.size:]))
        return out


_ACCESS_ANSWERS = (Packet.ACCESS_ACCEPT, Packet.ACCESS_REJECT, Packet.ACCESS_CHALLENGE)


def parse_reply_untrusted(data: bytes, identifier: int, request_authenticator: bytes,
                          secret: bytes, *, accounting: bool = False) -> Reply | None:
    """The server's answer to our request, or None for a datagram that is not one:
    malformed, another identifier, or failing the Response Authenticator (RFC 2865 3)
    or the Message-Authenticator (RFC 3579 3.2, required in every answer to an
    Access-Request here; checked in an Accounting-Response when present)."""
    if len(data) < _HEAD.size or data[1] != identifier:
        return None
    codes = (Packet.ACCOUNTING_RESPONSE,) if accounting else _ACCESS_ANSWERS
    return _verified_untrusted(data, codes, request_authenticator, secret,
                               need_mac=not accounting)


def parse_dae_request_untrusted(data: bytes, secret: bytes) -> tuple[Reply, int, bytes] | None:
    """A Disconnect-Request or CoA-Request (RFC 5176 3.5: its authenticator is the MD5 of
    the packet with sixteen zero octets in its place, then the secret; a
    Message-Authenticator is checked when present): (the request, its identifier, its
    authenticator), or None."""
    if len(data) < _HEAD.size:
        return None
    request = _verified_untrusted(data, (Packet.DISCONNECT_REQUEST, Packet.COA_REQUEST),
                                  bytes(16), secret, need_mac=False)
    return None if request is None else (request, data[1], data[4:20])


def encode_dae_answer(code: int, identifier: int, request_authenticator: bytes,
                      attributes: list[bytes], secret: bytes) -> bytes:
    """An ACK or NAK to a DAE request (its Response Authenticator as in RFC 2865 3)."""
    body = b"".join(attributes)
    head = struct.pack("!BBH", code, identifier, _HEAD.size + len(body))
    return head + hashlib.md5(head + request_authenticator + body + secret).digest() + body


def _verified_untrusted(data: bytes, codes: tuple[int, ...], base: bytes, secret: bytes, *,
                        need_mac: bool) -> Reply | None:
    """`data` if its code is one of `codes`, its authenticator the MD5 of the packet with
    `base` in its place (the request's authenticator, or zeros), then the secret, and its
    Message-Authenticator (required with `need_mac`) the HMAC of the packet with `base`."""
    code, _, length, authenticator = _HEAD.unpack_from(data)
    if length != len(data) or code not in codes:
        return None
    body = data[_HEAD.size:]
    expected = hashlib.md5(data[:4] + base + body + secret).digest()
    if not hmac.compare_digest(expected, authenticator):
        return None
    attributes: list[tuple[int, bytes]] = []
    at, mac_at = 0, -1
    while at < len(body):
        if at + 2 > len(body) or body[at + 1] < 2 or at + body[at + 1] > len(body):
            return None
        kind, size = body[at], body[at + 1]
        if kind == Attr.MESSAGE_AUTHENTICATOR:
            if size != 18 or mac_at >= 0:
                return None
            mac_at = at
        attributes.append((kind, body[at + 2:at + size]))
        at += size
    if mac_at < 0:
        return None if need_mac else Reply(code, attributes)
    zeroed = body[:mac_at + 2] + bytes(16) + body[mac_at + 18:]
    mac = hmac.digest(secret, data[:4] + base + zeroed, "md5")
    if not hmac.compare_digest(mac, body[mac_at + 2:mac_at + 18]):
        return None
    return Reply(code, attributes)


def mppe_key_untrusted(value: bytes, secret: bytes, request_authenticator: bytes) -> bytes:
    """An MS-MPPE-Send-Key or -Recv-Key in the clear (RFC 2548 2.4.2): a salt, then the
    key's length, the key and padding, each 16 bytes XORed with an MD5 chain."""
    salt, cipher = value[:2], value[2:]
    if len(value) < 2 or not salt[0] & 0x80 or not cipher or len(cipher) % 16:
        raise AuthenticationFailed("RADIUS: malformed MS-MPPE key")
    plain = bytearray()
    chain = request_authenticator + salt
    for at in range(0, len(cipher), 16):
        block = cipher[at:at + 16]
        pad = hashlib.md5(secret + chain).digest()
        plain += bytes(a ^ b for a, b in zip(block, pad, strict=True))
        chain = block
    if plain[0] > len(plain) - 1:
        raise AuthenticationFailed("RADIUS: MS-MPPE key longer than its attribute")
    return bytes(plain[1:1 + plain[0]])


# --- the relay --------------------------------------------------------------------------


@dataclass(frozen=True)
class Station:
    """Who talks to whom, for the request's NAS and station attributes (strongSwan sends
    the same: the gateway's and the peer's address with port)."""

    local: tuple[str, int]
    remote: tuple[str, int]
    nas_port: int


class RadiusPending(Pending):
    """An EAP response waits for the RADIUS server's answer."""

    def __init__(self, relay: EapRadiusServer, request: bytes) -> None:
        super().__init__(f"waiting for RADIUS server {relay.server.name}")
        self.relay, self.request = relay, request

    async def fetch(self) -> None:
        await self.relay.ask(self.request)


class EapRadiusServer:
    """One peer's EAP conversation relayed to RADIUS (the interface of EapMschapv2Server:
    `start`, `process`, `done`, `msk`, `identity`)."""

    def __init__(self, rng: Random, settings: RadiusSettings, backend: RadiusBackend,
                 station: Station, eap_id: IdentityPattern) -> None:
        if not settings.servers:
            raise AuthenticationFailed("RADIUS: no server configured")
        self._rng = rng
        self._settings = settings
        self._backend = backend
        self._station = station
        self._eap_id = eap_id
        self._server = 0
        self._id = rng(1)[0]
        self._radius_id = rng(1)[0]
        self._state: bytes | None = None
        self._asked: bytes | None = None  # the EAP response whose answer is below
        self._answer: tuple[bytes, bytes, Reply | None] | None = None  # request auth, reply
        self._step = "identity"
        self.identity = b""
        self.msk: bytes | None = None
        self.addresses: tuple[IPAddress, ...] = ()  # Framed-IP(v6)-Address of the accept
        self.config_attributes: tuple[tuple[int, bytes], ...] = ()  # its DNS servers...
        self.classes: tuple[bytes, ...] = ()
        self.groups: frozenset[str] = frozenset()  # what a connection's `groups` look at
        self.session_timeout = 0  # seconds of service the server grants (0: no limit)
        self.interim_interval = 0  # the server's Acct-Interim-Interval (0: ours)

    @property
    def server(self) -> RadiusServer:
        return self._settings.servers[self._server]

    @property
    def done(self) -> bool:
        return self._step == "done"

    def start(self) -> bytes:
        return packet(Code.REQUEST, self._id, EapType.IDENTITY, b"")

    def process(self, data: bytes) -> bytes:
        """The next EAP packet for the peer's response `data` (raises RadiusPending
        until the server answered it)."""
        if self._answer is not None and self._asked == data:
            return self._answered(data)
        eap_type, body = parse_response_untrusted(data, self._id)
        if self._step == "identity":
            if eap_type != EapType.IDENTITY:
                raise AuthenticationFailed(f"EAP: expected an identity, got type {eap_type}")
            # RFC 3748 5.1: the identity may end in NULs some clients add
            self.identity = body.rstrip(b"\x00")
            if not 0 < len(self.identity) <= MAX_VALUE:  # RFC 2865 5.1: User-Name
                raise AuthenticationFailed(f"EAP: an identity of {len(self.identity)} bytes")
            claimed = eap_identity_untrusted(self.identity)
            if not self._eap_id.any and (claimed is None or not self._eap_id.matches(claimed)):
                raise AuthenticationFailed(
                    f"EAP identity {self.identity.decode(errors='replace')!r} "
                    "does not match eap_id")
        self._asked, self._answer = data, None
        raise RadiusPending(self, data)

    def _attributes(self, eap: bytes) -> list[bytes]:
        out = nas_attributes(self._settings, self._station, self.identity)
        out += [attribute(Attr.EAP_MESSAGE, eap[at:at + MAX_VALUE])
                for at in range(0, len(eap), MAX_VALUE)]  # RFC 3579 3.1: split
        if self._state is not None:
            out.append(attribute(Attr.STATE, self._state))
        return out

    async def ask(self, eap: bytes) -> None:
        """The round trip for `eap` (awaited by the runtime): each server in turn until
        one answers; none answering ends the exchange when `process` runs again."""
        transport = self._backend.transport
        if transport is None:  # (a runtime without RADIUS: `process` fails the exchange)
            self._answer = (b"", b"", None)
            return
        servers = self._settings.servers
        # a conversation with State belongs to the server that issued it
        order = [self._server] if self._state is not None else list(range(len(servers)))
        for index in order:
            server = servers[index]
            self._radius_id = (self._radius_id + 1) & 0xFF
            authenticator = self._rng(16)
            request = encode_request(self._radius_id, authenticator, self._attributes(eap),
                                     server.secret)
            found: list[Reply] = []
            accept = acceptor(self._radius_id, authenticator, server.secret, found)
            await transport(server, request, self._settings, accept)
            if found:
                self._server = index
                self._answer = (authenticator, server.secret, found[0])
                return
        self._answer = (b"", b"", None)

    def _answered(self, data: bytes) -> bytes:
        assert self._answer is not None
        authenticator, secret, reply = self._answer
        self._answer = self._asked = None
        if reply is None:
            raise AuthenticationFailed(
                f"RADIUS: no answer from {', '.join(s.name for s in self._settings.servers)}")
        eap = b"".join(reply.values(Attr.EAP_MESSAGE))
        if reply.code == Packet.ACCESS_REJECT:
            message = b" ".join(reply.values(Attr.REPLY_MESSAGE)).decode(errors="replace")
            raise AuthenticationFailed(
                f"RADIUS: {self.server.name} rejected "
                f"{self.identity.decode(errors='replace')!r}" + (f": {message}" if message
                                                                  else ""))
        if len(eap) < 4 or eap[2] << 8 | eap[3] != len(eap):
            raise AuthenticationFailed(f"RADIUS: {self.server.name} sent no usable EAP message")
        if reply.code == Packet.ACCESS_CHALLENGE:
            if eap[0] != Code.REQUEST:
                raise AuthenticationFailed("RADIUS: a challenge without an EAP request")
            self._state = reply.first(Attr.STATE)
            self._step = "relay"
            self._id = eap[1]
            return eap
        # Access-Accept: EAP-Success and the MSK (strongSwan's order: receive, send key)
        if eap[0] != Code.SUCCESS:
            raise AuthenticationFailed("RADIUS: access accepted without EAP-Success")
        recv = reply.vendor(VENDOR_MICROSOFT, MS_MPPE_RECV_KEY)
        send = reply.vendor(VENDOR_MICROSOFT, MS_MPPE_SEND_KEY)
        if recv is None or send is None:
            raise AuthenticationFailed(
                f"RADIUS: {self.server.name} accepted without MS-MPPE keys (the EAP method "
                "must derive an MSK)")
        self.msk = mppe_key_untrusted(recv, secret, authenticator) + \
            mppe_key_untrusted(send, secret, authenticator)
        self.addresses = framed_addresses(reply)
        self.config_attributes = config_attributes(reply)
        # RFC 2865 5.1: a User-Name in the Access-Accept is the name for accounting (the
        # user behind an anonymous outer identity of EAP-TTLS or PEAP, say)
        user = reply.first(Attr.USER_NAME)
        if user and len(user) <= MAX_VALUE:
            self.identity = user
        self.classes = tuple(reply.values(Attr.CLASS))  # echoed in accounting (RFC 2865 5.25)
        self.groups = groups_of(reply)
        self.session_timeout = reply.integer(Attr.SESSION_TIMEOUT)  # RFC 2865 5.27
        interim = reply.integer(Attr.ACCT_INTERIM_INTERVAL)
        self.interim_interval = max(60, interim) if interim else 0  # RFC 2869 5.16: >= 60
        self._step = "done"
        return eap


TUNNEL_TYPE_ESP = 9  # RFC 2868 3.1


def groups_of(reply: Reply) -> frozenset[str]:
    """The groups an Access-Accept puts the user in, as strongSwan's eap-radius reads
    them (class_group, filter_id): each Class attribute, and the Filter-Id when a
    Tunnel-Type attribute says ESP (RFC 2868 3.1: a tag octet, then the type)."""
    names = list(reply.values(Attr.CLASS))
    esp = any(len(value) == 4 and int.from_bytes(value[1:]) == TUNNEL_TYPE_ESP
              for value in reply.values(Attr.TUNNEL_TYPE))
    if esp:
        names += reply.values(Attr.FILTER_ID)[-1:]  # (strongSwan: the last one)
    return frozenset(name.decode("utf-8", errors="replace") for name in names if name)


def nas_attributes(settings: RadiusSettings, station: Station, user: bytes) -> list[bytes]:
    """Who asks about whom, in every request (strongSwan sends the same set)."""
    out = [attribute(Attr.USER_NAME, user),
           attribute(Attr.NAS_IDENTIFIER, settings.nas_identifier.encode()),
           attribute(Attr.SERVICE_TYPE, u32(SERVICE_FRAMED)),
           attribute(Attr.NAS_PORT_TYPE, u32(PORT_TYPE_VIRTUAL)),
           attribute(Attr.NAS_PORT, u32(station.nas_port)),
           attribute(Attr.CALLED_STATION_ID, _station_id(station.local)),
           attribute(Attr.CALLING_STATION_ID, _station_id(station.remote))]
    address = station.local[0]
    if ":" in address:
        out.append(attribute(Attr.NAS_IPV6_ADDRESS, packed_address(address)))
    else:
        out.append(attribute(Attr.NAS_IP_ADDRESS, packed_address(address)))
    return out


def framed_addresses(reply: Reply) -> tuple[IPAddress, ...]:
    """The user's addresses in an Access-Accept: Framed-IP-Address unless it is one of
    RFC 2865 5.8's "let the NAS (or the user) choose" values, and Framed-IPv6-Address."""
    out: list[IPAddress] = []
    v4 = reply.first(Attr.FRAMED_IP_ADDRESS)
    if v4 is not None and len(v4) == 4 and v4 not in (b"\xff\xff\xff\xff", b"\xff\xff\xff\xfe"):
        out.append(ipaddress.IPv4Address(v4))
    v6 = reply.first(Attr.FRAMED_IPV6_ADDRESS)
    if v6 is not None and len(v6) == 16:
        out.append(ipaddress.IPv6Address(v6))
    return tuple(out)


def config_attributes(reply: Reply) -> tuple[tuple[int, bytes], ...]:
    """The configuration attributes (type, value) an Access-Accept gives the user: its
    netmask, DNS and NBNS (WINS) servers, in the order the server sent them."""
    found = [(0, kind, value) for kind, value in reply.attributes]
    found += reply.vendor_attributes()
    out: list[tuple[int, bytes]] = []
    for vendor_id, kind, value in found:
        known = _CONFIG_ATTRIBUTES.get((vendor_id, kind))
        if known is not None and len(value) == known[1] and (known[0], value) not in out:
            out.append((known[0], value))
    return tuple(out)


def acceptor(identifier: int, authenticator: bytes, secret: bytes, found: list[Reply], *,
             accounting: bool = False) -> Callable[[bytes], bool]:
    """For the transport: whether a datagram is the answer, which is kept in `found`."""
    def accept(data: bytes) -> bool:
        reply = parse_reply_untrusted(data, identifier, authenticator, secret,
                                      accounting=accounting)
        if reply is not None:
            found.append(reply)
        return reply is not None
    return accept


def _station_id(address: tuple[str, int]) -> bytes:
    return f"{address[0]}[{address[1]}]".encode()
