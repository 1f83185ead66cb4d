"""Payload codecs (RFC 7296 3.2-3.16): round trips, and every malformation as ParseError.

Also the session's handling of unknown payloads (RFC 7296 2.5): a non-critical one is
skipped, a critical one in IKE_SA_INIT is answered with UNSUPPORTED_CRITICAL_PAYLOAD.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import ParseError
from cluster.ike import session as session_module
from cluster.ike.constants import (
    AuthMethod,
    ExchangeType,
    IdType,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
    TsType,
)
from cluster.ike.events import IkeSaFailed
from cluster.ike.ike_init import build_init_request
from cluster.ike.message import Message, decode_untrusted, encode_plain
from cluster.ike.payloads import (
    AuthPayload,
    CertPayload,
    CertreqPayload,
    CpPayload,
    DeletePayload,
    IdiPayload,
    IdrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
    UnknownPayload,
    VendorPayload,
    encode_payloads,
    pull_payloads_untrusted,
    type_of,
)
from cluster.ike.proposals import Proposal, Transform
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from cluster.ike.traffic_selectors import TrafficSelector
from cluster.wire import Buffer
from tests.ike.sessions import CLIENT, GW, client_for, psk_policy, run_handshake, transfer

IKE_PROPOSAL = Proposal(1, ProtocolId.IKE, b"", (
    Transform(TransformType.ENCR, 20, 256),
    Transform(TransformType.ENCR, 12, 128),
    Transform(TransformType.PRF, 5),
    Transform(TransformType.DH, 31),
    Transform(TransformType.DH, 19),
))
ESP_PROPOSAL = Proposal(2, ProtocolId.ESP, b"\x01\x02\x03\x04", (
    Transform(TransformType.ENCR, 28),
    Transform(TransformType.ESN, 0),
))
TS4 = TrafficSelector.from_network("10.1.0.0/16", 6, 80, 443)
TS6 = TrafficSelector.from_network("fd00:1::/64")

EVERY_PAYLOAD: list[Payload] = [
    SaPayload((IKE_PROPOSAL, ESP_PROPOSAL)),
    KePayload(31, os.urandom(32)),
    NoncePayload(os.urandom(32)),
    IdiPayload(IdType.FQDN, b"client.example.test"),
    IdrPayload(IdType.IPV4_ADDR, bytes([10, 0, 0, 1])),
    CertPayload(4, b"\x30\x03\x02\x01\x01"),
    CertreqPayload(4, os.urandom(40)),
    AuthPayload(AuthMethod.PSK, os.urandom(32)),
    NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, os.urandom(20)),
    NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, b"\xaa\xbb\xcc\xdd"),
    NotifyPayload(NotifyType.INITIAL_CONTACT),
    DeletePayload(ProtocolId.IKE),
    DeletePayload(ProtocolId.ESP, (b"\x00\x00\x01\x00", b"\xff\xff\xff\xff")),
    VendorPayload(b"strongSwan"),
    TsiPayload((TS4, TS6)),
    TsrPayload((TrafficSelector.for_host("192.0.2.7"),)),
    CpPayload(1, bytes.fromhex("00010000")),
    UnknownPayload(200, False, b"opaque"),
    UnknownPayload(201, True, b""),
]


def decode(data: bytes, first: int) -> list[Payload]:
    payloads, sk = pull_payloads_untrusted(Buffer(data), first)
    assert sk == 0
    return payloads


def generic(next_type: int, body: bytes, *, critical: bool = False,
            length: int | None = None) -> bytes:
    """A payload with its generic header (RFC 7296 3.2), length overridable."""
    size = 4 + len(body) if length is None else length
    return struct.pack("!BBH", next_type, 0x80 if critical else 0, size) + body


# --- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("payload", EVERY_PAYLOAD, ids=lambda p: type(p).__name__)
def test_each_payload_round_trips(payload: Payload) -> None:
    data = encode_payloads([payload])
    assert decode(data, type_of(payload)) == [payload]


def test_a_chain_of_every_payload_round_trips() -> None:
    data = encode_payloads(EVERY_PAYLOAD)
    assert decode(data, type_of(EVERY_PAYLOAD[0])) == EVERY_PAYLOAD


def test_message_round_trip_with_header() -> None:
    msg = Message(b"I" * 8, b"R" * 8, ExchangeType.IKE_SA_INIT, 0, False, True,
                  list(EVERY_PAYLOAD[:3]))
    data = encode_plain(msg)
    decoded = decode_untrusted(data)
    assert decoded.header.spi_i == b"I" * 8 and decoded.header.spi_r == b"R" * 8
    assert decoded.header.exchange == ExchangeType.IKE_SA_INIT
    assert decoded.header.is_initiator and not decoded.header.is_response
    assert decoded.header.version == 0x20
    assert decoded.header.length == len(data)
    assert decoded.payloads == EVERY_PAYLOAD[:3]
    assert decoded.sk_offset == 0


def test_unknown_payload_keeps_its_critical_bit_and_body() -> None:
    data = generic(0, b"xyz", critical=False)
    assert decode(data, 222) == [UnknownPayload(222, False, b"xyz")]
    data = generic(0, b"xyz", critical=True)
    assert decode(data, 222) == [UnknownPayload(222, True, b"xyz")]


def test_transform_key_length_attribute_is_tv_14() -> None:
    data = encode_payloads([SaPayload((IKE_PROPOSAL,))])
    assert bytes.fromhex("800e0100") in data  # AF=1, type 14, 256 bits
    assert bytes.fromhex("800e0080") in data  # 128 bits


def test_unknown_transform_attribute_is_skipped() -> None:
    # one transform with a TLV attribute (type 0x0001, 2 bytes) followed by the key length
    transform = struct.pack("!BBHBBH", 0, 0, 8 + 6 + 4, 1, 0, 20) \
        + struct.pack("!HH", 0x0001, 2) + b"zz" + struct.pack("!HH", 0x800E, 128)
    proposal = struct.pack("!BBHBBBB", 0, 0, 8 + len(transform), 1, 1, 0, 1) + transform
    [sa] = decode(generic(0, proposal), PayloadType.SA)
    assert isinstance(sa, SaPayload)
    assert sa.proposals[0].transforms == (Transform(1, 20, 128),)


_SELECTOR = st.builds(
    lambda v6, proto, a, b, lo, hi: TrafficSelector(
        TsType.IPV6_ADDR_RANGE if v6 else TsType.IPV4_ADDR_RANGE, proto, min(lo, hi),
        max(lo, hi), min(a, b)[: 16 if v6 else 4], max(a, b)[: 16 if v6 else 4]),
    st.booleans(), st.integers(0, 255), st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16), st.integers(0, 65535), st.integers(0, 65535),
)
_TRANSFORM = st.builds(Transform, st.integers(1, 5), st.integers(0, 65535),
                       st.none() | st.integers(0, 65535))
_PROPOSAL = st.builds(Proposal, st.integers(1, 255), st.sampled_from([1, 3]),
                      st.sampled_from([b"", b"\x00\x00\x10\x00"]),
                      st.lists(_TRANSFORM, min_size=1, max_size=6).map(tuple))
_PAYLOAD: st.SearchStrategy[Payload] = st.one_of(
    st.builds(SaPayload, st.lists(_PROPOSAL, min_size=1, max_size=4).map(tuple)),
    st.builds(KePayload, st.integers(0, 65535), st.binary(max_size=80)),
    st.builds(NoncePayload, st.binary(min_size=16, max_size=256)),
    st.builds(IdiPayload, st.integers(0, 255), st.binary(max_size=40)),
    st.builds(IdrPayload, st.integers(0, 255), st.binary(max_size=40)),
    st.builds(CertPayload, st.integers(0, 255), st.binary(max_size=40)),
    st.builds(AuthPayload, st.integers(0, 255), st.binary(max_size=40)),
    st.builds(NotifyPayload, st.integers(0, 65535), st.binary(max_size=30),
              st.integers(0, 255), st.binary(max_size=8)),
    st.builds(DeletePayload, st.just(3),
              st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=5).map(tuple)),
    st.builds(TsiPayload, st.lists(_SELECTOR, min_size=1, max_size=4).map(tuple)),
    st.builds(TsrPayload, st.lists(_SELECTOR, min_size=1, max_size=4).map(tuple)),
    st.builds(VendorPayload, st.binary(max_size=30)),
    st.builds(UnknownPayload, st.integers(49, 52) | st.integers(54, 255), st.booleans(),
              st.binary(max_size=30)),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(_PAYLOAD, min_size=1, max_size=6))
def test_random_chains_round_trip(payloads: list[Payload]) -> None:
    data = encode_payloads(payloads)
    assert decode(data, type_of(payloads[0])) == payloads


# --- truncated and oversized input ---------------------------------------------------------------

def test_every_truncation_of_a_chain_is_a_parse_error() -> None:
    data = encode_payloads(EVERY_PAYLOAD)
    first = type_of(EVERY_PAYLOAD[0])
    for cut in range(len(data)):
        with pytest.raises(ParseError):
            pull_payloads_untrusted(Buffer(data[:cut]), first)


def test_bytes_after_the_last_payload_are_a_parse_error() -> None:
    data = encode_payloads([NoncePayload(bytes(16))])
    with pytest.raises(ParseError):
        decode(data + b"\x00", PayloadType.NONCE)


def test_payload_length_beyond_the_buffer() -> None:
    with pytest.raises(ParseError):
        decode(generic(0, bytes(16), length=4 + 17), PayloadType.NONCE)


@pytest.mark.parametrize("length", [0, 1, 3])
def test_payload_length_below_the_generic_header(length: int) -> None:
    with pytest.raises(ParseError):
        decode(generic(0, b"", length=length) + bytes(8), PayloadType.VENDOR)


def test_too_many_payloads() -> None:
    chain = encode_payloads([VendorPayload(b"")] * 129)
    with pytest.raises(ParseError):
        decode(chain, PayloadType.VENDOR)
    assert len(decode(encode_payloads([VendorPayload(b"")] * 128), PayloadType.VENDOR)) == 128


# --- SA payload: lengths, counts, last-substructure flags -------------------------------------

def _transform(last: int, t_type: int = 1, t_id: int = 20, attrs: bytes = b"",
               length: int | None = None) -> bytes:
    size = 8 + len(attrs) if length is None else length
    return struct.pack("!BBHBBH", last, 0, size, t_type, 0, t_id) + attrs


def _proposal(last: int, transforms: bytes, count: int, spi: bytes = b"", number: int = 1,
              length: int | None = None) -> bytes:
    size = 8 + len(spi) + len(transforms) if length is None else length
    return struct.pack("!BBHBBBB", last, 0, size, number, 1, len(spi), count) + spi + transforms


def _sa(body: bytes) -> list[Payload]:
    return decode(generic(0, body), PayloadType.SA)


def test_well_formed_hand_built_sa_decodes() -> None:
    body = _proposal(2, _transform(3) + _transform(0, 2, 5), 2) \
        + _proposal(0, _transform(0, 4, 31), 1, number=2)
    [sa] = _sa(body)
    assert isinstance(sa, SaPayload)
    assert [p.number for p in sa.proposals] == [1, 2]


SA_MALFORMED: dict[str, bytes] = {
    "transform count higher than transforms": _proposal(0, _transform(3) + _transform(0), 3),
    "transform count lower than transforms": _proposal(0, _transform(3) + _transform(0), 1),
    "last transform flagged 'more'": _proposal(0, _transform(3) + _transform(3), 2),
    "middle transform flagged 'last'": _proposal(0, _transform(0) + _transform(0), 2),
    "transform last value 1": _proposal(0, _transform(1), 1),
    "transform length below 8": _proposal(0, _transform(0, length=7), 1),
    "transform length past the proposal": _proposal(0, _transform(0, length=12), 1),
    "transform attribute truncated": _proposal(0, _transform(0, attrs=b"\x80\x0e\x01"), 1),
    "TLV attribute overruns transform": _proposal(0, _transform(0, attrs=b"\x00\x01\x00\x09"),
                                                   1),
    "proposal length below 8": _proposal(0, _transform(0), 1, length=7),
    "proposal length past the payload": _proposal(0, _transform(0), 1, length=40),
    "proposal length short of its transforms": _proposal(0, _transform(0), 1, length=12),
    "SPI size past the proposal": struct.pack("!BBHBBBB", 0, 0, 8, 1, 1, 8, 0),
    "last proposal flagged 'more'": _proposal(2, _transform(0), 1),
    "proposal last value 3": _proposal(3, _transform(0), 1) + _proposal(0, _transform(0), 1),
    "bytes after the last proposal": _proposal(0, _transform(0), 1) + b"\x00\x00",
    "empty SA payload": b"",
}


@pytest.mark.parametrize("body", SA_MALFORMED.values(), ids=SA_MALFORMED.keys())
def test_malformed_sa_payload(body: bytes) -> None:
    with pytest.raises(ParseError):
        _sa(body)


def test_too_many_proposals() -> None:
    one = _proposal(2, _transform(0), 1)
    with pytest.raises(ParseError):
        _sa(one * 64 + _proposal(0, _transform(0), 1))
    assert len(_sa(one * 63 + _proposal(0, _transform(0), 1))[0].proposals) == 64  # type: ignore[attr-defined]


# --- traffic selectors, nonce, delete, notify, KE, ID, CERT ------------------------------------

def _ts(ts_type: int = 7, size: int = 4, length: int | None = None) -> bytes:
    ln = 8 + 2 * size if length is None else length
    return struct.pack("!BBHHH", ts_type, 0, ln, 0, 65535) + bytes(size) + b"\xff" * size


TS_MALFORMED: dict[str, bytes] = {
    "count zero": b"\x00\x00\x00\x00",
    "count higher than selectors": b"\x02\x00\x00\x00" + _ts(),
    "count lower than selectors": b"\x01\x00\x00\x00" + _ts() + _ts(),
    "IPv4 selector length 24": b"\x01\x00\x00\x00" + _ts(length=24),
    "IPv6 selector length 16": b"\x01\x00\x00\x00" + _ts(8, 16, length=16),
    "IPv4 selector truncated": b"\x01\x00\x00\x00" + _ts()[:-1],
    "unknown selector type": b"\x01\x00\x00\x00" + _ts(9),
    "header truncated": b"\x01\x00",
}


@pytest.mark.parametrize("body", TS_MALFORMED.values(), ids=TS_MALFORMED.keys())
@pytest.mark.parametrize("kind", [PayloadType.TSI, PayloadType.TSR])
def test_malformed_traffic_selectors(kind: PayloadType, body: bytes) -> None:
    with pytest.raises(ParseError):
        decode(generic(0, body), kind)


def test_well_formed_hand_built_selectors() -> None:
    [p] = decode(generic(0, b"\x02\x00\x00\x00" + _ts() + _ts(8, 16)), PayloadType.TSI)
    assert isinstance(p, TsiPayload)
    assert [s.ts_type for s in p.selectors] == [TsType.IPV4_ADDR_RANGE, TsType.IPV6_ADDR_RANGE]


@pytest.mark.parametrize(("size", "ok"), [(0, False), (15, False), (16, True), (32, True),
                                          (256, True), (257, False)])
def test_nonce_size_limits(size: int, ok: bool) -> None:  # RFC 7296 3.9: 16..256 octets
    data = generic(0, bytes(size))
    if ok:
        assert decode(data, PayloadType.NONCE) == [NoncePayload(bytes(size))]
    else:
        with pytest.raises(ParseError):
            decode(data, PayloadType.NONCE)


DELETE_MALFORMED: dict[str, bytes] = {
    "IKE with SPI size 4": struct.pack("!BBH", 1, 4, 1) + bytes(4),
    "IKE with a count": struct.pack("!BBH", 1, 0, 1),
    "ESP with SPI size 0": struct.pack("!BBH", 3, 0, 0),
    "ESP with SPI size 8": struct.pack("!BBH", 3, 8, 1) + bytes(8),
    "ESP count higher than SPIs": struct.pack("!BBH", 3, 4, 2) + bytes(4),
    "ESP count lower than SPIs": struct.pack("!BBH", 3, 4, 1) + bytes(8),
    "ESP partial SPI": struct.pack("!BBH", 3, 4, 1) + bytes(3),
    "header truncated": b"\x03\x04\x00",
}


@pytest.mark.parametrize("body", DELETE_MALFORMED.values(), ids=DELETE_MALFORMED.keys())
def test_malformed_delete(body: bytes) -> None:
    with pytest.raises(ParseError):
        decode(generic(0, body), PayloadType.DELETE)


def test_empty_esp_delete_round_trips() -> None:
    p = DeletePayload(ProtocolId.ESP, ())
    assert decode(encode_payloads([p]), PayloadType.DELETE) == [p]


OTHER_MALFORMED: list[tuple[str, int, bytes]] = [
    ("notify SPI size past the body", PayloadType.NOTIFY, struct.pack("!BBH", 3, 4, 16390)),
    ("notify header truncated", PayloadType.NOTIFY, b"\x00\x00\x40"),
    ("KE header truncated", PayloadType.KE, b"\x00\x1f\x00"),
    ("IDi header truncated", PayloadType.IDI, b"\x02\x00\x00"),
    ("IDr empty", PayloadType.IDR, b""),
    ("AUTH header truncated", PayloadType.AUTH, b"\x02"),
    ("CERT empty", PayloadType.CERT, b""),
    ("CERTREQ empty", PayloadType.CERTREQ, b""),
    ("CP header truncated", PayloadType.CP, b"\x01\x00"),
]


@pytest.mark.parametrize(("kind", "body"), [(k, b) for _, k, b in OTHER_MALFORMED],
                         ids=[n for n, _, _ in OTHER_MALFORMED])
def test_other_malformed_bodies(kind: int, body: bytes) -> None:
    with pytest.raises(ParseError):
        decode(generic(0, body), kind)


# --- message framing -----------------------------------------------------------------------

def _header(next_payload: int, length: int, version: int = 0x20, exchange: int = 34,
            flags: int = 0x08) -> bytes:
    return struct.pack("!8s8sBBBBII", b"I" * 8, bytes(8), next_payload, version, exchange,
                       flags, 0, length)


HEADER_MALFORMED: dict[str, bytes] = {
    "shorter than a header": _header(0, 28)[:27],
    "length field too big": _header(0, 29),
    "length field too small": _header(0, 28) + b"\x00",
    "major version 1": _header(0, 28, version=0x10),
    "major version 3": _header(0, 28, version=0x30),
    "SK payload not last": _header(PayloadType.SK, 28 + 8 + 4)
    + generic(0, b"abcd", length=8) + b"\x00" * 4,
    "SK payload length too long": _header(PayloadType.SK, 28 + 8) + generic(0, b"abcd",
                                                                             length=12),
    "SK header truncated": _header(PayloadType.SK, 28 + 2) + b"\x00\x00",
    "SKF fragment": _header(PayloadType.SKF, 28 + 8) + generic(0, b"abcd"),
    "payload chain truncated": _header(PayloadType.NONCE, 28 + 4) + generic(0, b"", length=20),
}


@pytest.mark.parametrize("data", HEADER_MALFORMED.values(), ids=HEADER_MALFORMED.keys())
def test_malformed_messages(data: bytes) -> None:
    with pytest.raises(ParseError):
        decode_untrusted(data)


def test_minor_version_is_ignored() -> None:  # RFC 7296 3.1: only the major version counts
    assert decode_untrusted(_header(0, 28, version=0x21)).payloads == []


def test_sk_payload_is_located_after_plain_payloads() -> None:
    plain = generic(PayloadType.SK, b"v" * 4)
    data = _header(PayloadType.VENDOR, 28 + len(plain) + 8) + plain \
        + generic(PayloadType.IDI, b"1234")
    decoded = decode_untrusted(data)
    assert decoded.payloads == [VendorPayload(b"vvvv")]
    assert decoded.sk_offset == 28 + len(plain)
    assert decoded.sk_first == PayloadType.IDI


# --- the session and unknown payloads (RFC 7296 2.5) -----------------------------------------

Builder = Callable[..., list[Payload]]


def _pair(monkeypatch: pytest.MonkeyPatch, extra: Payload) -> tuple[IkeSession, IkeSession]:
    """Our initiator with `extra` appended to its IKE_SA_INIT request, and a responder."""
    original: Builder = build_init_request

    def with_extra(*args: object, **kwargs: object) -> list[Payload]:
        return [*original(*args, **kwargs), extra]

    monkeypatch.setattr(session_module, "build_init_request", with_extra)
    pol = psk_policy()
    cpol = psk_policy(client_for(pol.connections[0]),
                      ids=("client.example.test", "gw.example.test"))
    client = IkeSession.initiator(cpol.connections[0], cpol, os.urandom(8), CLIENT, GW, 0.0)
    gateway = IkeSession.responder(pol, os.urandom(8), GW, CLIENT)
    return client, gateway


def test_unknown_non_critical_payload_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    client, gateway = _pair(monkeypatch, UnknownPayload(200, False, b"future"))
    request = client.datagrams_to_send()[0].data
    assert UnknownPayload(200, False, b"future") in decode_untrusted(request).payloads
    gateway.receive_datagram_untrusted(request, GW, CLIENT, 0.0)
    client.receive_datagram_untrusted(gateway.datagrams_to_send()[0].data, CLIENT, GW, 0.0)
    run_handshake(client, gateway)
    assert client.state is State.ESTABLISHED and gateway.state is State.ESTABLISHED


def test_unknown_critical_payload_in_init_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    client, gateway = _pair(monkeypatch, UnknownPayload(200, True, b"must understand"))
    transfer(client, gateway)
    [reply] = gateway.datagrams_to_send()
    decoded = decode_untrusted(reply.data)
    assert decoded.header.is_response
    assert decoded.header.spi_r == bytes(8)  # no state kept for a refused IKE_SA_INIT
    notify = decoded.payloads[0]
    assert isinstance(notify, NotifyPayload)
    assert notify.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert notify.data == bytes([200])  # RFC 7296 3.10.1: the offending payload type
    assert gateway.state is State.CLOSED
    client.receive_datagram_untrusted(reply.data, CLIENT, GW, 0.0)
    assert client.state is State.CLOSED
    events = []
    while (e := client.next_event()) is not None:
        events.append(e)
    assert any(isinstance(e, IkeSaFailed) for e in events)
