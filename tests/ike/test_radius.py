"""The eap-radius relay, driven by a RADIUS server written here from RFC 2865, RFC 3579
and RFC 2548 (FreeRADIUS with strongSwan in tests/interop is the judge)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import struct
from collections.abc import Callable

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from cluster.errors import AuthenticationFailed
from cluster.ike.constants import ConfigAttribute
from cluster.ike.eap import Code, EapType, packet
from cluster.ike.identity import parse_identity_pattern
from cluster.ike.radius import (
    Attr,
    EapRadiusServer,
    Packet,
    RadiusBackend,
    RadiusPending,
    RadiusServer,
    RadiusSettings,
    Station,
    config_attributes,
    encode_dae_answer,
    framed_addresses,
    groups_of,
    mppe_key_untrusted,
    parse_dae_request_untrusted,
    parse_reply_untrusted,
)

SECRET = b"shared between gateway and server"
STATION = Station(("192.0.2.1", 4500), ("198.51.100.7", 61000), 0x1234)
MSK_RECV, MSK_SEND = os.urandom(32), os.urandom(32)


def attributes_of(data: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 20
    while at < len(data):
        out.append((data[at], data[at + 2:at + data[at + 1]]))
        at += data[at + 1]
    return out


def hide_key(key: bytes, secret: bytes, request_authenticator: bytes) -> bytes:
    """RFC 2548 2.4.2, the server's side."""
    salt = bytes((0x80 | os.urandom(1)[0], os.urandom(1)[0]))
    plain = bytes((len(key),)) + key
    plain += bytes(-len(plain) % 16)
    out, chain = b"", request_authenticator + salt
    for at in range(0, len(plain), 16):
        block = bytes(a ^ b for a, b in zip(plain[at:at + 16],
                                            hashlib.md5(secret + chain).digest(), strict=True))
        out += block
        chain = block
    return salt + out


def reply(request: bytes, code: int, attributes: list[tuple[int, bytes]],
          secret: bytes = SECRET, *, message_authenticator: bool = True) -> bytes:
    """An answer as a server builds it (RFC 3579 3.2, then RFC 2865 3)."""
    body = b"".join(bytes((kind, 2 + len(value))) + value for kind, value in attributes)
    if message_authenticator:
        body += bytes((Attr.MESSAGE_AUTHENTICATOR, 18)) + bytes(16)
    head = struct.pack("!BBH", code, request[1], 20 + len(body))
    if message_authenticator:
        mac = hmac.digest(secret, head + request[4:20] + body, "md5")
        body = body[:-16] + mac
    authenticator = hashlib.md5(head + request[4:20] + body + secret).digest()
    return head + authenticator + body


def eap_of(request: bytes) -> bytes:
    return b"".join(v for k, v in attributes_of(request) if k == Attr.EAP_MESSAGE)


class Server:
    """Answers each Access-Request with `answer(request)` (None: silence); checks what a
    server checks: our Message-Authenticator, first among the attributes."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, bytes]] = []

    async def __call__(self, server: RadiusServer, request: bytes, settings: RadiusSettings,
                       accept: Callable[[bytes], bool]) -> bytes | None:
        self.requests.append((server.name, request))
        assert request[0] == Packet.ACCESS_REQUEST
        assert request[20] == Attr.MESSAGE_AUTHENTICATOR  # first (BlastRADIUS)
        zeroed = request[:22] + bytes(16) + request[38:]
        assert hmac.compare_digest(hmac.digest(server.secret, zeroed, "md5"), request[22:38])
        data = self.answer(request)
        if data is None or not accept(data):
            return None
        return data


def relay(answer: Callable[[bytes], bytes | None], servers: tuple[str, ...] = ("one",),
          eap_id: str = "%any") -> tuple[EapRadiusServer, Server]:
    transport = Server(answer)
    backend = RadiusBackend()
    backend.transport = transport
    settings = RadiusSettings(tuple(RadiusServer(name, "192.0.2.9", secret=SECRET)
                                    for name in servers))
    return EapRadiusServer(os.urandom, settings, backend, STATION,
                           parse_identity_pattern(eap_id)), transport


def step(server: EapRadiusServer, eap: bytes) -> bytes:
    """What the session and the actor do: process, fetch when it waits, process again."""
    try:
        return server.process(eap)
    except RadiusPending as pending:
        trio.run(pending.fetch)
    return server.process(eap)


def identity_response(server: EapRadiusServer, user: bytes) -> bytes:
    request = server.start()
    assert request[0] == Code.REQUEST and request[4] == EapType.IDENTITY
    return packet(Code.RESPONSE, request[1], EapType.IDENTITY, user)


def md5_challenge(identifier: int) -> bytes:
    return packet(Code.REQUEST, identifier, 4, b"\x10" + os.urandom(16))


def conversation(request: bytes) -> bytes | None:
    """Identity -> challenge (with State); the answer to it -> accept with the keys."""
    attrs = dict(attributes_of(request))
    eap = eap_of(request)
    if eap[4] == EapType.IDENTITY:
        assert attrs[Attr.USER_NAME] == b"carol"
        assert Attr.STATE not in attrs
        return reply(request, Packet.ACCESS_CHALLENGE, [
            (Attr.EAP_MESSAGE, md5_challenge((eap[1] + 1) & 0xFF)), (Attr.STATE, b"state-1")])
    assert attrs[Attr.STATE] == b"state-1"
    return reply(request, Packet.ACCESS_ACCEPT, [
        (Attr.EAP_MESSAGE, packet(Code.SUCCESS, eap[1])),
        (Attr.VENDOR_SPECIFIC, struct.pack("!IBB", 311, 17, 2 + 34 + 16) +
         hide_key(MSK_RECV, SECRET, request[4:20])),
        (Attr.VENDOR_SPECIFIC, struct.pack("!IBB", 311, 16, 2 + 34 + 16) +
         hide_key(MSK_SEND, SECRET, request[4:20]))])


def test_a_conversation_is_relayed_and_the_msk_comes_from_the_mppe_keys() -> None:
    server, transport = relay(conversation)
    challenge = step(server, identity_response(server, b"carol"))
    assert challenge[0] == Code.REQUEST and challenge[4] == 4  # the server's method
    assert not server.done
    success = step(server, packet(Code.RESPONSE, challenge[1], 4, b"\x10" + bytes(16)))
    assert success[0] == Code.SUCCESS
    assert server.done and server.msk == MSK_RECV + MSK_SEND
    first = dict(attributes_of(transport.requests[0][1]))
    assert first[Attr.NAS_IP_ADDRESS] == bytes((192, 0, 2, 1))
    assert first[Attr.CALLING_STATION_ID] == b"198.51.100.7[61000]"
    assert first[Attr.CALLED_STATION_ID] == b"192.0.2.1[4500]"
    assert first[Attr.NAS_PORT] == b"\x00\x00\x12\x34"
    assert first[Attr.NAS_IDENTIFIER] == b"ike-cluster"


def test_a_long_eap_message_is_split_and_joined() -> None:
    big = os.urandom(700)

    def answer(request: bytes) -> bytes:
        chunks = packet(Code.REQUEST, (eap_of(request)[1] + 1) & 0xFF, 13, big)
        return reply(request, Packet.ACCESS_CHALLENGE,
                     [(Attr.EAP_MESSAGE, chunks[at:at + 253]) for at in range(0, len(chunks), 253)])

    server, transport = relay(answer)
    challenge = step(server, identity_response(server, b"carol"))
    assert challenge[5:] == big
    response = packet(Code.RESPONSE, challenge[1], 13, os.urandom(600))
    step(server, response)
    sent = [v for k, v in attributes_of(transport.requests[1][1]) if k == Attr.EAP_MESSAGE]
    assert [len(v) for v in sent] == [253, 253, 99] and b"".join(sent) == response


def test_a_reject_ends_the_exchange_with_its_reply_message() -> None:
    def answer(request: bytes) -> bytes:
        return reply(request, Packet.ACCESS_REJECT, [
            (Attr.EAP_MESSAGE, packet(Code.FAILURE, eap_of(request)[1])),
            (Attr.REPLY_MESSAGE, b"account locked")])

    server, _ = relay(answer)
    with pytest.raises(AuthenticationFailed, match="one rejected 'carol': account locked"):
        step(server, identity_response(server, b"carol"))


def test_an_accept_without_keys_is_refused() -> None:
    def answer(request: bytes) -> bytes:
        return reply(request, Packet.ACCESS_ACCEPT,
                     [(Attr.EAP_MESSAGE, packet(Code.SUCCESS, eap_of(request)[1]))])

    server, _ = relay(answer)
    with pytest.raises(AuthenticationFailed, match="without MS-MPPE keys"):
        step(server, identity_response(server, b"carol"))
    assert server.msk is None and not server.done


@pytest.mark.parametrize("forgery", ["secret", "no message authenticator", "identifier",
                                     "truncated", "tampered"])
def test_answers_that_do_not_verify_are_not_taken(forgery: str) -> None:
    def answer(request: bytes) -> bytes:
        attrs = [(Attr.EAP_MESSAGE, md5_challenge((eap_of(request)[1] + 1) & 0xFF))]
        if forgery == "secret":
            return reply(request, Packet.ACCESS_CHALLENGE, attrs, b"another secret")
        if forgery == "no message authenticator":
            return reply(request, Packet.ACCESS_CHALLENGE, attrs, message_authenticator=False)
        good = reply(request, Packet.ACCESS_CHALLENGE, attrs)
        if forgery == "identifier":
            return good[:1] + bytes(((good[1] + 1) & 0xFF,)) + good[2:]
        if forgery == "truncated":
            return good[:-1]
        return good[:-1] + bytes((good[-1] ^ 1,))

    server, transport = relay(answer)
    with pytest.raises(AuthenticationFailed, match="RADIUS: no answer from one"):
        step(server, identity_response(server, b"carol"))
    assert len(transport.requests) == 1


def test_a_silent_server_is_passed_over_for_the_next_until_a_state_binds() -> None:
    def answer(request: bytes) -> bytes | None:
        return None if transport.requests[-1][0] == "down" else conversation(request)

    server, transport = relay(answer, servers=("down", "up"))
    challenge = step(server, identity_response(server, b"carol"))
    assert [name for name, _ in transport.requests] == ["down", "up"]
    step(server, packet(Code.RESPONSE, challenge[1], 4, b"\x10" + bytes(16)))
    # the answer to the challenge goes where the State came from, not to the first again
    assert [name for name, _ in transport.requests] == ["down", "up", "up"]
    assert server.done


def test_an_identity_outside_eap_id_never_reaches_the_server() -> None:
    server, transport = relay(conversation, eap_id="*@example.test")
    with pytest.raises(AuthenticationFailed, match="does not match eap_id"):
        server.process(identity_response(server, b"carol@elsewhere.test"))
    assert transport.requests == []


def test_an_answer_to_another_request_is_not_reused() -> None:
    """A parked answer belongs to the EAP response it was fetched for."""
    server, _ = relay(conversation)
    first = identity_response(server, b"carol")
    with pytest.raises(RadiusPending) as pending:
        server.process(first)
    trio.run(pending.value.fetch)
    other = packet(Code.RESPONSE, first[1], EapType.IDENTITY, b"mallory")
    with pytest.raises(RadiusPending):
        server.process(other)


def test_mppe_keys_check_their_form() -> None:
    authenticator = os.urandom(16)
    hidden = hide_key(b"k" * 32, SECRET, authenticator)
    assert mppe_key_untrusted(hidden, SECRET, authenticator) == b"k" * 32
    for bad in (hidden[:1], b"\x00" + hidden[1:], hidden[:-3]):
        with pytest.raises(AuthenticationFailed):
            mppe_key_untrusted(bad, SECRET, authenticator)


def test_parse_reply_needs_an_answer_code() -> None:
    request = bytes((1, 7)) + bytes(18)
    data = reply(request, Packet.ACCESS_REQUEST, [])
    assert parse_reply_untrusted(data, 7, request[4:20], SECRET) is None
    data = reply(request, Packet.ACCESS_CHALLENGE, [])
    assert parse_reply_untrusted(data, 7, request[4:20], SECRET) is not None


def test_framed_addresses_leave_the_choice_values_to_the_pools() -> None:
    request = bytes((1, 7)) + bytes(18)

    def framed(*attributes: tuple[int, bytes]) -> list[str]:
        data = reply(request, Packet.ACCESS_ACCEPT, list(attributes))
        parsed = parse_reply_untrusted(data, 7, request[4:20], SECRET)
        assert parsed is not None
        return [str(a) for a in framed_addresses(parsed)]

    v6 = (Attr.FRAMED_IPV6_ADDRESS, bytes.fromhex("fd990003" + "00" * 11 + "99"))
    assert framed((Attr.FRAMED_IP_ADDRESS, bytes((10, 99, 3, 9))), v6) == [
        "10.99.3.9", "fd99:3::99"]
    # RFC 2865 5.8: 255.255.255.254 "the NAS should select", ...255 "the user may"
    assert framed((Attr.FRAMED_IP_ADDRESS, b"\xff\xff\xff\xfe")) == []
    assert framed((Attr.FRAMED_IP_ADDRESS, b"\xff\xff\xff\xff")) == []
    assert framed((Attr.FRAMED_IP_ADDRESS, b"\x0a\x00")) == []  # malformed: ignored


def vsa(vendor_id: int, vendor_type: int, value: bytes) -> tuple[int, bytes]:
    """RFC 2865 5.26: a Vendor-Specific attribute holding one vendor attribute."""
    return Attr.VENDOR_SPECIFIC, struct.pack("!IBB", vendor_id, vendor_type,
                                             2 + len(value)) + value


def test_the_accept_names_dns_and_wins_servers_as_strongswan_forwards_them() -> None:
    """RFC 2548 2.6-2.9 (Microsoft), Cisco VPN 3000's, RFC 6911 3.2 and RFC 2865 5.9
    become configuration attributes; malformed and repeated ones do not."""
    request = bytes((1, 7)) + bytes(18)
    dns6 = bytes.fromhex("fd990002" + "00" * 11 + "53")
    data = reply(request, Packet.ACCESS_ACCEPT, [
        vsa(311, 28, bytes((10, 99, 2, 53))), vsa(311, 29, bytes((10, 99, 2, 54))),
        vsa(311, 30, bytes((10, 99, 2, 137))), vsa(3076, 5, bytes((10, 99, 2, 53))),
        vsa(3076, 8, bytes((10, 99, 2, 138))), vsa(311, 28, b"\x0a\x00"),
        vsa(9, 28, bytes((10, 99, 2, 99))), (Attr.DNS_SERVER_IPV6_ADDRESS, dns6),
        (Attr.FRAMED_IP_NETMASK, bytes((255, 255, 255, 0))), (28, bytes(4))])
    parsed = parse_reply_untrusted(data, 7, request[4:20], SECRET)
    assert parsed is not None
    assert config_attributes(parsed) == (
        (ConfigAttribute.INTERNAL_IP6_DNS, dns6),
        (ConfigAttribute.INTERNAL_IP4_NETMASK, bytes((255, 255, 255, 0))),
        (ConfigAttribute.INTERNAL_IP4_DNS, bytes((10, 99, 2, 53))),
        (ConfigAttribute.INTERNAL_IP4_DNS, bytes((10, 99, 2, 54))),
        (ConfigAttribute.INTERNAL_IP4_NBNS, bytes((10, 99, 2, 137))),
        (ConfigAttribute.INTERNAL_IP4_NBNS, bytes((10, 99, 2, 138))))


@given(st.binary(max_size=300))
def test_any_datagram_is_an_answer_or_none(data: bytes) -> None:
    request = bytes((1, 7)) + bytes(18)
    assert parse_reply_untrusted(data, 7, request[4:20], SECRET) is None


@given(st.lists(st.tuples(st.sampled_from([Attr.FRAMED_IP_ADDRESS, Attr.FRAMED_IPV6_ADDRESS,
                                           Attr.VENDOR_SPECIFIC, Attr.EAP_MESSAGE]),
                          st.binary(max_size=60)), max_size=6))
def test_authentic_answers_with_any_attribute_values_never_raise_elsewhere(
        attributes: list[tuple[int, bytes]]) -> None:
    """Past both authenticators the values are still the server's to get wrong: the
    relay's readers refuse them with AuthenticationFailed or ignore them."""
    request = bytes((1, 7)) + bytes(18)
    data = reply(request, Packet.ACCESS_ACCEPT, attributes)
    parsed = parse_reply_untrusted(data, 7, request[4:20], SECRET)
    assert parsed is not None and parsed.attributes[:len(attributes)] == attributes
    framed_addresses(parsed)
    config_attributes(parsed)
    for vendor_type in (16, 17):
        value = parsed.vendor(311, vendor_type)
        if value is not None:
            with contextlib.suppress(AuthenticationFailed):
                mppe_key_untrusted(value, SECRET, request[4:20])


def test_the_accept_brings_its_class_session_timeout_and_user_name() -> None:
    def answer(request: bytes) -> bytes | None:
        accepted = conversation(request)
        if accepted is None or accepted[0] != Packet.ACCESS_ACCEPT:
            return accepted
        attributes = [*attributes_of(accepted)[:-1], (Attr.CLASS, b"staff"),
                      (Attr.USER_NAME, b"carol@example.test"),
                      (Attr.SESSION_TIMEOUT, (7200).to_bytes(4, "big")),
                      (Attr.ACCT_INTERIM_INTERVAL, (30).to_bytes(4, "big"))]
        return reply(request, Packet.ACCESS_ACCEPT, attributes)

    server, _ = relay(answer)
    challenge = step(server, identity_response(server, b"carol"))
    step(server, packet(Code.RESPONSE, challenge[1], 4, b"\x10" + bytes(16)))
    assert server.done and server.msk == MSK_RECV + MSK_SEND
    assert (server.classes, server.session_timeout) == ((b"staff",), 7200)
    assert server.interim_interval == 60  # RFC 2869 5.16: at least a minute
    assert server.identity == b"carol@example.test"  # RFC 2865 5.1: for accounting


@pytest.mark.parametrize(("attributes", "groups"), [
    ([], set()),
    ([(Attr.CLASS, b"admins"), (Attr.CLASS, b"net ops"), (Attr.CLASS, b"")], {"admins", "net ops"}),
    # Filter-Id counts with an ESP Tunnel-Type only (tag, then the type), the last one
    ([(Attr.FILTER_ID, b"staff")], set()),
    ([(Attr.TUNNEL_TYPE, b"\x00\x00\x00\x0a"), (Attr.FILTER_ID, b"staff")], set()),
    ([(Attr.TUNNEL_TYPE, b"\x01\x00\x00\x09"), (Attr.FILTER_ID, b"old"),
      (Attr.FILTER_ID, b"staff"), (Attr.CLASS, b"admins")], {"staff", "admins"}),
    ([(Attr.TUNNEL_TYPE, b"\x00\x09"), (Attr.FILTER_ID, b"staff")], set()),
])
def test_the_groups_of_an_accept_are_its_classes_and_an_esp_filter_id(
        attributes: list[tuple[int, bytes]], groups: set[str]) -> None:
    request = bytes((1, 7)) + bytes(18)
    data = reply(request, Packet.ACCESS_ACCEPT, attributes)
    parsed = parse_reply_untrusted(data, 7, request[4:20], SECRET)
    assert parsed is not None and groups_of(parsed) == groups


@pytest.mark.parametrize("user", [b"", b"\x00\x00", b"u" * 254])
def test_an_identity_no_user_name_can_carry_is_refused(user: bytes) -> None:
    server, transport = relay(conversation)
    with pytest.raises(AuthenticationFailed, match="an identity of"):
        server.process(identity_response(server, user))
    assert transport.requests == []


def test_without_a_transport_the_exchange_fails_cleanly() -> None:
    server = EapRadiusServer(os.urandom, RadiusSettings((RadiusServer("one", "192.0.2.9"),)),
                             RadiusBackend(), STATION, parse_identity_pattern("%any"))
    with pytest.raises(AuthenticationFailed, match="no answer from one"):
        step(server, identity_response(server, b"carol"))


@given(st.binary(max_size=300))
def test_any_datagram_at_the_dae_port_is_a_request_or_none(data: bytes) -> None:
    assert parse_dae_request_untrusted(data, SECRET) is None  # (none verifies by chance)


@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=6),
       st.sampled_from([Packet.DISCONNECT_REQUEST, Packet.COA_REQUEST]))
def test_authentic_dae_requests_parse_whatever_their_attributes(
        attributes: list[tuple[int, bytes]], code: int) -> None:
    attributes = [(k, v) for k, v in attributes if k != Attr.MESSAGE_AUTHENTICATOR]
    body = b"".join(bytes((kind, 2 + len(value))) + value for kind, value in attributes)
    head = struct.pack("!BBH", code, 9, 20 + len(body))
    data = head + hashlib.md5(head + bytes(16) + body + SECRET).digest() + body
    parsed = parse_dae_request_untrusted(data, SECRET)
    assert parsed is not None
    request, identifier, authenticator = parsed
    assert (request.code, identifier, request.attributes) == (code, 9, attributes)
    answer = encode_dae_answer(Packet.DISCONNECT_ACK, identifier, authenticator, [], SECRET)
    assert answer[4:20] == hashlib.md5(answer[:4] + authenticator + SECRET).digest()
