"""Our initiator against our responder, in memory: every proposal family, PSK and
certificate authentication, failures, retransmission, liveness, deletes and NAT."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from cluster.ike import child_sa
from cluster.ike.constants import ExchangeType, NotifyType, ProtocolId, TransformType
from cluster.ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    ExchangeCompleted,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
)
from cluster.ike.identity import parse_identity, parse_identity_pattern
from cluster.ike.message import Message, decode_untrusted, encode_plain
from cluster.ike.payloads import (
    DeletePayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    UnknownPayload,
)
from cluster.ike.policy import (
    ConnectionConfig,
    LocalAuth,
    PrivateKey,
    RemoteAuth,
    ResponderPolicy,
    Retransmission,
)
from cluster.ike.proposals import (
    ChosenAlgorithms,
    ConfiguredProposal,
    Proposal,
    Transform,
    parse_proposal,
)
from cluster.ike.session import Datagram, IkeSession
from cluster.ike.state import State
from cluster.key_exchange import ExponentialPool, new_key_exchange
from cluster.transforms import Encr, Esn, Integ
from tests.ike.sessions import (
    CLIENT,
    GW,
    child,
    client_for,
    drain,
    ike,
    psk_connection,
    psk_pair,
    psk_policy,
    run_handshake,
    transfer,
)

E = TypeVar("E")

RETRANSMIT_TRIES = Retransmission().tries


def of_type(events: list[Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def one(events: list[Event], kind: type[E]) -> E:
    found = of_type(events, kind)
    assert len(found) == 1, f"expected one {kind.__name__}, got {events}"
    return found[0]


def state(session: IkeSession) -> State:
    """The state, read through a call so the type checker does not pin it between steps."""
    return session.state


@dataclass
class Outcome:
    client: IkeSession
    gateway: IkeSession
    client_events: list[Event]
    gateway_events: list[Event]


def handshake(client: IkeSession, gateway: IkeSession) -> Outcome:
    run_handshake(client, gateway)
    return Outcome(client, gateway, drain(client), drain(gateway))


def assert_established(out: Outcome) -> tuple[ChildSaEstablished, ChildSaEstablished]:
    """Both sides up with one mirrored Child SA; returns (client child, gateway child)."""
    assert out.client.state is State.ESTABLISHED, out.client.last_error
    assert out.gateway.state is State.ESTABLISHED, out.gateway.last_error
    c_ike = one(out.client_events, IkeSaEstablished)
    g_ike = one(out.gateway_events, IkeSaEstablished)
    assert (c_ike.spi_i, c_ike.spi_r) == (g_ike.spi_i, g_ike.spi_r)
    assert c_ike.spi_r != bytes(8)
    assert c_ike.algorithms == g_ike.algorithms
    assert (c_ike.local_id, c_ike.remote_id) == (g_ike.remote_id, g_ike.local_id)
    c_child = one(out.client_events, ChildSaEstablished)
    g_child = one(out.gateway_events, ChildSaEstablished)
    # ordering: the IKE SA is announced before its first Child SA
    assert out.gateway_events.index(g_ike) < out.gateway_events.index(g_child)
    assert (g_child.ike_spi_i, g_child.ike_spi_r) == (g_ike.spi_i, g_ike.spi_r)
    assert (c_child.spi_in, c_child.spi_out) == (g_child.spi_out, g_child.spi_in)
    assert int.from_bytes(g_child.spi_in, "big") >= 256
    assert g_child.encr_key_in == c_child.encr_key_out
    assert g_child.integ_key_in == c_child.integ_key_out
    assert g_child.encr_key_out == c_child.encr_key_in
    assert g_child.integ_key_out == c_child.integ_key_in
    assert g_child.encr_key_in != g_child.encr_key_out
    assert len(g_child.encr_key_in) == g_child.encr.keymat_size
    assert len(g_child.integ_key_in) == (g_child.integ.key_size if g_child.integ else 0)
    assert (g_child.encr, g_child.integ, g_child.esn) == (c_child.encr, c_child.integ,
                                                          c_child.esn)
    assert (g_child.local_ts, g_child.remote_ts) == (c_child.remote_ts, c_child.local_ts)
    assert g_child.mode == c_child.mode
    for events, responder in ((out.client_events, False), (out.gateway_events, True)):
        completed = of_type(events, ExchangeCompleted)
        assert [(e.exchange, e.as_responder, e.result) for e in completed] == [
            (ExchangeType.IKE_SA_INIT, responder, "ok"), (ExchangeType.IKE_AUTH, responder, "ok")]
    assert out.client.drops == {} and out.gateway.drops == {}
    return c_child, g_child


# --- every proposal family, PSK ----------------------------------------------------------------

FAMILIES = [
    ("aes256gcm16-prfsha256-x25519", "aes256gcm16"),
    ("aes128-sha256-modp2048", "aes128-sha256"),
    ("aes256-sha384-ecp384", "aes256-sha384"),
    ("chacha20poly1305-prfsha256-x25519", "chacha20poly1305"),
    ("aes128gcm16-prfsha256-ecp256", "aes128gcm16-esn"),
    ("aes256-sha512-x448", "aes256-sha512"),
    ("aes256-sha256-modp3072", "aes128gcm16"),
    ("aes128-sha384-modp4096", "aes256-sha256"),
    ("aes256gcm16-prfsha512-ecp521", "chacha20poly1305"),
]


@pytest.mark.parametrize(("ike_text", "esp_text"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_psk_handshake_for_every_family(ike_text: str, esp_text: str) -> None:
    gw_conn = psk_connection(proposals=(ike_text,), children=(child(proposals=(esp_text,)),))
    out = handshake(*psk_pair(gw_conn))
    _, g_child = assert_established(out)
    g_ike = one(out.gateway_events, IkeSaEstablished)
    assert g_ike.connection == "rw" and g_ike.nat is False
    assert g_ike.local_id == "gw.example.test" and g_ike.remote_id == "client.example.test"
    expected_ike = ike(ike_text)[0]
    assert g_ike.algorithms.startswith(expected_ike.encr[0].name)
    assert g_child.encr.name == esp_text.split("-")[0]
    assert g_child.esn == esp_text.endswith("-esn")
    assert g_child.name == "net" and g_child.mode == "tunnel"
    assert str(g_child.local_ts[0]) == "10.99.2.0/24"
    assert str(g_child.remote_ts[0]) == "10.99.1.0/24"
    assert (g_child.local, g_child.remote) == (GW, CLIENT)


def test_responder_prefers_its_own_proposal_order() -> None:
    gw_conn = psk_connection(proposals=("aes256gcm16-prfsha256-x25519",
                                        "aes128-sha256-x25519"))
    client_conn = replace(client_for(gw_conn), proposals=ike("aes128-sha256-x25519",
                                                              "aes256gcm16-prfsha256-x25519"))
    out = handshake(*psk_pair(gw_conn, client_conn))
    assert_established(out)
    assert one(out.gateway_events, IkeSaEstablished).algorithms.startswith("aes256gcm16")


# --- certificates ------------------------------------------------------------------------------

NOW = datetime.now(UTC)


def _new_key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey


def make_ca(kind: str, name: str = "Test CA") -> Issued:
    key = _new_key(kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                     False), critical=True)
        .sign(key, _sign_hash(key))
    )
    return Issued(cert, key)


def make_leaf(ca: Issued, kind: str, dns: str) -> Issued:
    key = _new_key(kind)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, _sign_hash(ca.key))
    )
    return Issued(cert, key)


@dataclass(frozen=True)
class Pki:
    ca: Issued
    gateway: Issued
    client: Issued


_PKI_CACHE: dict[str, Pki] = {}


def pki(kind: str) -> Pki:
    if kind not in _PKI_CACHE:
        ca = make_ca(kind, f"Test CA {kind}")
        _PKI_CACHE[kind] = Pki(ca, make_leaf(ca, kind, "gw.example.test"),
                               make_leaf(ca, kind, "client.example.test"))
    return _PKI_CACHE[kind]


def cert_sessions(gw: Issued, client_leaf: Issued, gw_trusts: x509.Certificate | None,
                  client_trusts: x509.Certificate,
                  gw_remote_id: str = "%any", *,
                  gw_pins: tuple[x509.Certificate, ...] = ()) -> tuple[IkeSession, IkeSession]:
    """A client and a gateway with certificates; the gateway trusts the CA `gw_trusts`
    (None: none) and the certificates `gw_pins` (swanctl's remote certs)."""
    gw_conn = ConnectionConfig(
        "certs", 2, ike("aes256gcm16-prfsha256-x25519"),
        LocalAuth("pubkey", parse_identity("gw.example.test"), gw.cert, gw.key),
        RemoteAuth("pubkey", parse_identity_pattern(gw_remote_id),
                   (gw_trusts,) if gw_trusts is not None else (), certs=gw_pins),
        (child(),),
    )
    client_conn = replace(
        client_for(gw_conn),
        local=LocalAuth("pubkey", parse_identity("client.example.test"), client_leaf.cert,
                        client_leaf.key),
        remote=RemoteAuth("pubkey", parse_identity_pattern("gw.example.test"),
                          (client_trusts,)),
    )
    client = IkeSession.initiator(client_conn, ResponderPolicy((client_conn,)), os.urandom(8),
                                  CLIENT, GW, 0.0)
    gateway = IkeSession.responder(ResponderPolicy((gw_conn,)), os.urandom(8), GW, CLIENT)
    return client, gateway


KINDS = ["rsa", "p256", "p384", "ed25519"]


@pytest.mark.parametrize("kind", KINDS)
def test_certificate_handshake(kind: str) -> None:
    p = pki(kind)
    out = handshake(*cert_sessions(p.gateway, p.client, p.ca.cert, p.ca.cert))
    assert_established(out)
    g_ike = one(out.gateway_events, IkeSaEstablished)
    assert g_ike.remote_id == "client.example.test" and g_ike.connection == "certs"


def test_certificate_from_another_ca_is_rejected() -> None:
    good, other = pki("p256"), make_ca("p256", "Other CA")
    stranger = make_leaf(other, "p256", "client.example.test")
    out = handshake(*cert_sessions(good.gateway, stranger, good.ca.cert, good.ca.cert))
    assert out.gateway.state is State.CLOSED
    assert out.client.state is State.CLOSED
    one(out.gateway_events, IkeSaFailed)
    one(out.client_events, IkeSaFailed)
    assert not of_type(out.gateway_events, ChildSaEstablished)
    assert "not a known CA" in out.gateway.last_error or "issuer" in out.gateway.last_error


def test_gateway_certificate_from_another_ca_is_rejected_by_the_client() -> None:
    good, other = pki("p256"), make_ca("p256", "Other CA")
    fake_gw = make_leaf(other, "p256", "gw.example.test")
    out = handshake(*cert_sessions(fake_gw, good.client, good.ca.cert, good.ca.cert))
    assert out.client.state is State.CLOSED
    one(out.client_events, IkeSaFailed)
    assert not of_type(out.client_events, ChildSaEstablished)


def test_certificate_without_the_claimed_identity_is_rejected() -> None:
    p = pki("p256")
    wrong_name = make_leaf(p.ca, "p256", "mallory.example.test")
    client, gateway = cert_sessions(p.gateway, wrong_name, p.ca.cert, p.ca.cert)
    out = handshake(client, gateway)
    assert out.gateway.state is State.CLOSED
    one(out.gateway_events, IkeSaFailed)


# --- failures ------------------------------------------------------------------------------

def _auth_response_notify(gateway_reply: Datagram, client: IkeSession) -> list[int]:
    sk = client.sa.sk
    assert sk is not None
    inner = sk.unprotect_untrusted(gateway_reply.data, decode_untrusted(gateway_reply.data))
    assert inner is not None
    return [p.notify_type for p in inner if isinstance(p, NotifyPayload)]


def test_wrong_psk_fails_authentication() -> None:
    client, gateway = psk_pair(client_secret=b"not-the-secret")
    transfer(client, gateway)
    transfer(gateway, client)
    transfer(client, gateway)  # IKE_AUTH request
    [reply] = gateway.datagrams_to_send()
    assert _auth_response_notify(reply, client) == [NotifyType.AUTHENTICATION_FAILED]
    assert gateway.state is State.CLOSED
    g_events = drain(gateway)
    failed = one(g_events, IkeSaFailed)
    assert (failed.spi_i, failed.spi_r) == (client.spi_i, gateway.spi_r)
    assert not of_type(g_events, IkeSaEstablished)
    assert of_type(g_events, ExchangeCompleted)[-1].result == "AuthenticationFailed"
    client.receive_datagram_untrusted(reply.data, CLIENT, GW, 0.0)
    assert client.state is State.CLOSED
    one(drain(client), IkeSaFailed)


def test_unknown_identity_is_refused() -> None:
    gw_conn = psk_connection(remote_id="client.example.test")
    client_conn = client_for(gw_conn, client_id="stranger.example.test")
    out = handshake(*psk_pair(gw_conn, client_conn))
    assert out.gateway.state is State.CLOSED and out.client.state is State.CLOSED
    one(out.gateway_events, IkeSaFailed)
    one(out.client_events, IkeSaFailed)
    assert "stranger.example.test" in out.gateway.last_error


def test_no_proposal_chosen() -> None:
    gw_conn = psk_connection(proposals=("aes256gcm16-prfsha256-x25519",))
    client_conn = replace(client_for(gw_conn), proposals=ike("aes128-sha256-ecp256"))
    client, gateway = psk_pair(gw_conn, client_conn)
    transfer(client, gateway)
    [reply] = gateway.datagrams_to_send()
    decoded = decode_untrusted(reply.data)
    assert decoded.header.spi_r == bytes(8)
    assert [p.notify_type for p in decoded.payloads if isinstance(p, NotifyPayload)] == [
        NotifyType.NO_PROPOSAL_CHOSEN]
    assert gateway.state is State.CLOSED
    one(drain(gateway), IkeSaFailed)
    client.receive_datagram_untrusted(reply.data, CLIENT, GW, 0.0)
    assert client.state is State.CLOSED
    one(drain(client), IkeSaFailed)


def test_invalid_ke_payload_round_trip() -> None:
    gw_conn = psk_connection(proposals=("aes256gcm16-prfsha256-x25519",))
    client_conn = replace(client_for(gw_conn),
                          proposals=ike("aes256gcm16-prfsha256-ecp256-x25519"))
    client, refusing = psk_pair(gw_conn, client_conn)
    assert client.sa.ke is not None and client.sa.ke.group == 19  # first group of ours
    transfer(client, refusing)
    [reply] = refusing.datagrams_to_send()
    decoded = decode_untrusted(reply.data)
    [notify] = decoded.payloads
    assert isinstance(notify, NotifyPayload)
    assert notify.notify_type == NotifyType.INVALID_KE_PAYLOAD
    assert notify.data == (31).to_bytes(2, "big")  # RFC 7296 3.10.1: the group we accept
    assert decoded.header.spi_r == bytes(8)
    client.receive_datagram_untrusted(reply.data, CLIENT, GW, 0.0)
    assert client.state is State.INIT_SENT
    [retry] = client.datagrams_to_send()
    again = decode_untrusted(retry.data)
    assert again.header.message_id == 0 and again.header.spi_i == client.spi_i
    assert client.sa.ke is not None and client.sa.ke.group == 31
    # the refusing responder kept no state; a fresh one takes the retry
    gateway = IkeSession.responder(refusing.sa.policy, os.urandom(8), GW, CLIENT)
    gateway.receive_datagram_untrusted(retry.data, GW, CLIENT, 0.0)
    out = handshake(client, gateway)
    assert out.client.state is State.ESTABLISHED and out.gateway.state is State.ESTABLISHED
    assert one(out.gateway_events, IkeSaEstablished).algorithms.endswith("curve25519")
    one(out.client_events, ChildSaEstablished)


def test_ts_unacceptable_keeps_the_ike_sa_without_a_child() -> None:
    gw_conn = psk_connection()
    base = client_for(gw_conn)
    wrong = replace(base.children[0], local_ts=child(local_ts="192.168.7.0/24").local_ts)
    client, gateway = psk_pair(gw_conn, replace(base, children=(wrong,)))
    transfer(client, gateway)
    transfer(gateway, client)
    transfer(client, gateway)
    [reply] = gateway.datagrams_to_send()
    # the IKE SA stands (with RFC 6311 support announced); only its Child SA is refused
    assert _auth_response_notify(reply, client) == [
        NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED, NotifyType.TS_UNACCEPTABLE]
    client.receive_datagram_untrusted(reply.data, CLIENT, GW, 0.0)
    out = Outcome(client, gateway, drain(client), drain(gateway))
    assert out.client.state is State.ESTABLISHED and out.gateway.state is State.ESTABLISHED
    one(out.client_events, IkeSaEstablished)
    one(out.gateway_events, IkeSaEstablished)
    assert not of_type(out.client_events + out.gateway_events, ChildSaEstablished)
    assert client.sa.children == {} and gateway.sa.children == {}


# --- modes ----------------------------------------------------------------------------------

def test_transport_mode_when_both_ask() -> None:
    gw_conn = psk_connection(children=(child(mode="transport", local_ts="dynamic",
                                              remote_ts="dynamic"),))
    out = handshake(*psk_pair(gw_conn))
    c_child, g_child = assert_established(out)
    assert g_child.mode == c_child.mode == "transport"
    assert str(g_child.local_ts[0]) == "10.99.0.2/32"
    assert str(g_child.remote_ts[0]) == "10.99.0.1/32"


def test_tunnel_gateway_answers_a_transport_request_with_a_tunnel() -> None:
    gw_conn = psk_connection()
    base = client_for(gw_conn)
    client_conn = replace(base, children=(replace(base.children[0], mode="transport"),))
    out = handshake(*psk_pair(gw_conn, client_conn))
    c_child, g_child = assert_established(out)
    assert g_child.mode == c_child.mode == "tunnel"


def test_transport_only_gateway_refuses_a_tunnel_child() -> None:
    gw_conn = psk_connection(children=(child(mode="transport"),))
    base = client_for(gw_conn)
    client_conn = replace(base, children=(replace(base.children[0], mode="tunnel"),))
    out = handshake(*psk_pair(gw_conn, client_conn))
    assert out.client.state is State.ESTABLISHED and out.gateway.state is State.ESTABLISHED
    assert not of_type(out.gateway_events, ChildSaEstablished)


# --- retransmission and message IDs ----------------------------------------------------------

@dataclass
class Recorded:
    client: IkeSession
    gateway: IkeSession
    requests: list[bytes]
    responses: list[bytes]


def recorded_handshake() -> Recorded:
    client, gateway = psk_pair()
    requests: list[bytes] = []
    responses: list[bytes] = []
    for _ in range(2):
        for d in client.datagrams_to_send():
            requests.append(d.data)
            gateway.receive_datagram_untrusted(d.data, d.remote, d.local, 0.0)
        for d in gateway.datagrams_to_send():
            responses.append(d.data)
            client.receive_datagram_untrusted(d.data, d.remote, d.local, 0.0)
    assert client.state is State.ESTABLISHED and gateway.state is State.ESTABLISHED
    drain(client)
    drain(gateway)
    return Recorded(client, gateway, requests, responses)


def test_retransmitted_request_gets_the_cached_response_bytes() -> None:
    r = recorded_handshake()
    r.gateway.receive_datagram_untrusted(r.requests[-1], GW, CLIENT, 1.0)
    [again] = r.gateway.datagrams_to_send()
    assert again.data == r.responses[-1]
    assert r.gateway.retransmits_answered == 1
    assert drain(r.gateway) == []  # nothing is processed twice
    assert r.gateway.state is State.ESTABLISHED


def test_retransmitted_ike_sa_init_gets_the_cached_response() -> None:
    client, gateway = psk_pair()
    [request] = client.datagrams_to_send()
    gateway.receive_datagram_untrusted(request.data, GW, CLIENT, 0.0)
    [first] = gateway.datagrams_to_send()
    gateway.receive_datagram_untrusted(request.data, GW, CLIENT, 0.5)
    [second] = gateway.datagrams_to_send()
    assert first.data == second.data
    assert gateway.state is State.HALF_OPEN


def test_old_request_is_ignored() -> None:
    r = recorded_handshake()
    r.gateway.receive_datagram_untrusted(r.requests[0], GW, CLIENT, 1.0)  # IKE_SA_INIT, id 0
    assert r.gateway.datagrams_to_send() == []
    assert r.gateway.drops == {"message_id": 1}
    assert r.gateway.state is State.ESTABLISHED


def test_request_id_from_the_future_is_ignored() -> None:
    r = recorded_handshake()
    sk = r.client.sa.sk
    assert sk is not None
    data = sk.protect(Message(r.client.spi_i, r.client.spi_r, ExchangeType.INFORMATIONAL, 7,
                              False, True, []))
    r.gateway.receive_datagram_untrusted(data, GW, CLIENT, 1.0)
    assert r.gateway.datagrams_to_send() == []
    assert r.gateway.drops == {"message_id": 1}


def test_response_nobody_asked_for_is_dropped() -> None:
    r = recorded_handshake()
    r.client.receive_datagram_untrusted(r.responses[-1], CLIENT, GW, 1.0)
    assert r.client.drops == {"unexpected_response": 1}
    assert r.client.state is State.ESTABLISHED


def test_ike_auth_to_a_fresh_responder_is_dropped() -> None:
    r = recorded_handshake()
    fresh = IkeSession.responder(r.gateway.sa.policy, os.urandom(8), GW, CLIENT)
    fresh.receive_datagram_untrusted(r.requests[1], GW, CLIENT, 0.0)
    assert fresh.datagrams_to_send() == [] and fresh.state is State.INITIAL
    assert sum(fresh.drops.values()) == 1


def test_initiator_retransmits_then_gives_up() -> None:
    client, _ = psk_pair()
    [first] = client.datagrams_to_send()
    deadline = client.get_timer()
    assert deadline is not None and deadline > 0.0
    client.handle_timer(deadline - 0.01)  # not yet
    assert client.datagrams_to_send() == []
    for _ in range(RETRANSMIT_TRIES):
        deadline = client.get_timer()
        assert deadline is not None
        client.handle_timer(deadline)
        [again] = client.datagrams_to_send()
        assert again.data == first.data
    deadline = client.get_timer()
    assert deadline is not None
    client.handle_timer(deadline)
    assert client.state is State.CLOSED
    assert client.datagrams_to_send() == []
    failed = one(drain(client), IkeSaFailed)
    assert "not responding" in failed.reason


# --- INFORMATIONAL -------------------------------------------------------------------------------

def test_liveness_check_is_answered() -> None:
    r = recorded_handshake()
    assert r.client.check_liveness(5.0)
    assert not r.client.check_liveness(5.0)  # one request outstanding at a time
    assert r.client.get_timer() is not None
    transfer(r.client, r.gateway, 5.0)
    [reply] = r.gateway.datagrams_to_send()
    assert decode_untrusted(reply.data).header.exchange == ExchangeType.INFORMATIONAL
    r.client.receive_datagram_untrusted(reply.data, CLIENT, GW, 5.1)
    assert r.client.sa.pending is None
    assert [(e.exchange, e.result) for e in of_type(drain(r.client), ExchangeCompleted)] == [
        (ExchangeType.INFORMATIONAL, "ok")]
    assert [(e.exchange, e.as_responder) for e in of_type(drain(r.gateway),
                                                          ExchangeCompleted)] == [
        (ExchangeType.INFORMATIONAL, True)]
    assert r.client.check_liveness(6.0)  # and the next one uses a new message ID
    transfer(r.client, r.gateway, 6.0)
    transfer(r.gateway, r.client, 6.0)
    assert r.client.drops == {} and r.gateway.drops == {}
    assert r.client.state is State.ESTABLISHED and r.gateway.state is State.ESTABLISHED


def test_unanswered_liveness_check_closes_the_sa() -> None:
    r = recorded_handshake()
    assert r.client.check_liveness(0.0)
    r.client.datagrams_to_send()
    for _ in range(RETRANSMIT_TRIES + 1):
        deadline = r.client.get_timer()
        assert deadline is not None
        r.client.handle_timer(deadline)
    assert r.client.state is State.CLOSED
    events = drain(r.client)
    one(events, IkeSaDeleted)
    one(events, ChildSaDeleted)


def test_client_deletes_the_ike_sa() -> None:
    r = recorded_handshake()
    r.client.delete_ike(1.0)
    assert state(r.client) is State.DELETING
    transfer(r.client, r.gateway, 1.0)
    assert r.gateway.state is State.CLOSED
    g_events = drain(r.gateway)
    deleted = one(g_events, IkeSaDeleted)
    assert (deleted.spi_i, deleted.spi_r) == (r.client.spi_i, r.gateway.spi_r)
    one(g_events, ChildSaDeleted)
    transfer(r.gateway, r.client, 1.0)
    assert r.client.state is State.CLOSED
    c_events = drain(r.client)
    one(c_events, IkeSaDeleted)
    one(c_events, ChildSaDeleted)
    assert not of_type(c_events + g_events, IkeSaFailed)


def test_gateway_deletes_the_ike_sa() -> None:
    r = recorded_handshake()
    r.gateway.delete_ike(1.0)
    assert state(r.gateway) is State.DELETING
    transfer(r.gateway, r.client, 1.0)
    assert r.client.state is State.CLOSED
    one(drain(r.client), IkeSaDeleted)
    transfer(r.client, r.gateway, 1.0)
    assert r.gateway.state is State.CLOSED
    one(drain(r.gateway), IkeSaDeleted)
    assert r.client.drops == {} and r.gateway.drops == {}


def test_peer_deletes_a_child_sa() -> None:
    r = recorded_handshake()
    [c_child] = r.client.sa.children.values()
    [g_child] = r.gateway.sa.children.values()
    sk = r.client.sa.sk
    assert sk is not None
    # RFC 7296 3.11: the deleting end names the SPI it receives on
    request = sk.protect(Message(r.client.spi_i, r.client.spi_r, ExchangeType.INFORMATIONAL, 2,
                                 False, True, [DeletePayload(ProtocolId.ESP,
                                                             (c_child.spi_in,))]))
    r.gateway.receive_datagram_untrusted(request, GW, CLIENT, 1.0)
    [reply] = r.gateway.datagrams_to_send()
    assert r.gateway.state is State.ESTABLISHED
    assert r.gateway.sa.children == {}
    deleted = one(drain(r.gateway), ChildSaDeleted)
    assert (deleted.spi_in, deleted.spi_out) == (g_child.spi_in, g_child.spi_out)
    inner = sk.unprotect_untrusted(reply.data, decode_untrusted(reply.data))
    assert inner == [DeletePayload(ProtocolId.ESP, (g_child.spi_in,))]


def test_delete_of_an_unknown_child_gets_an_empty_answer() -> None:
    r = recorded_handshake()
    sk = r.client.sa.sk
    assert sk is not None
    request = sk.protect(Message(r.client.spi_i, r.client.spi_r, ExchangeType.INFORMATIONAL, 2,
                                 False, True, [DeletePayload(ProtocolId.ESP, (b"\x99" * 4,))]))
    r.gateway.receive_datagram_untrusted(request, GW, CLIENT, 1.0)
    [reply] = r.gateway.datagrams_to_send()
    assert sk.unprotect_untrusted(reply.data, decode_untrusted(reply.data)) == []
    assert len(r.gateway.sa.children) == 1


def test_empty_create_child_sa_gets_invalid_syntax() -> None:
    r = recorded_handshake()
    sk = r.client.sa.sk
    assert sk is not None
    request = sk.protect(Message(r.client.spi_i, r.client.spi_r, ExchangeType.CREATE_CHILD_SA,
                                 2, False, True, []))
    r.gateway.receive_datagram_untrusted(request, GW, CLIENT, 1.0)
    [reply] = r.gateway.datagrams_to_send()
    inner = sk.unprotect_untrusted(reply.data, decode_untrusted(reply.data))
    assert inner == [NotifyPayload(NotifyType.INVALID_SYNTAX)]
    assert r.gateway.state is State.ESTABLISHED


# --- NAT, IPv6, tampering -------------------------------------------------------------------------

def test_nat_detection_moves_to_4500_and_encapsulates() -> None:
    gw_conn = psk_connection()
    client_conn = replace(client_for(gw_conn), encap=True)
    client, gateway = psk_pair(gw_conn, client_conn)
    transfer(client, gateway)
    transfer(gateway, client)
    [auth] = client.datagrams_to_send()
    assert auth.local == (CLIENT[0], 4500) and auth.remote == (GW[0], 4500)
    gateway.receive_datagram_untrusted(auth.data, auth.remote, auth.local, 0.0)
    transfer(gateway, client)
    out = Outcome(client, gateway, drain(client), drain(gateway))
    c_child, g_child = assert_established(out)
    assert g_child.encap and c_child.encap
    assert one(out.gateway_events, IkeSaEstablished).nat
    assert one(out.client_events, IkeSaEstablished).nat
    assert g_child.remote == (CLIENT[0], 4500) and g_child.local == (GW[0], 4500)
    assert gateway.sa.nat_remote and client.sa.nat_local


def test_no_nat_stays_on_500() -> None:
    out = handshake(*psk_pair())
    c_child, g_child = assert_established(out)
    assert not g_child.encap and not c_child.encap
    assert g_child.remote == CLIENT


GW6 = ("fd00:99::2", 500)
CLIENT6 = ("fd00:99::1", 500)


def test_ipv6_addresses_and_selectors() -> None:
    gw_conn = psk_connection(children=(child(local_ts="fd00:99:2::/64",
                                             remote_ts="fd00:99:1::/64"),))
    out = handshake(*psk_pair(gw_conn, client=CLIENT6, gateway=GW6))
    _, g_child = assert_established(out)
    assert str(g_child.local_ts[0]) == "fd00:99:2::/64"
    assert str(g_child.remote_ts[0]) == "fd00:99:1::/64"
    assert (g_child.local, g_child.remote) == (GW6, CLIENT6)


def test_ipv6_transport_mode_with_dynamic_selectors() -> None:
    gw_conn = psk_connection(children=(child(mode="transport", local_ts="dynamic",
                                              remote_ts="dynamic"),))
    out = handshake(*psk_pair(gw_conn, client=CLIENT6, gateway=GW6))
    _, g_child = assert_established(out)
    assert str(g_child.local_ts[0]) == "fd00:99::2/128" and g_child.mode == "transport"


def _flips(data: bytes) -> Iterator[bytes]:
    """The message with one bit flipped in the IV, the ciphertext and the ICV."""
    for index in (28 + 4, len(data) // 2 + 14, len(data) - 1):
        tampered = bytearray(data)
        tampered[index] ^= 0x40
        yield bytes(tampered)


@pytest.mark.parametrize("ike_text", ["aes256gcm16-prfsha256-x25519", "aes128-sha256-x25519",
                                      "chacha20poly1305-prfsha256-x25519"])
def test_tampered_sk_payload_is_dropped_silently(ike_text: str) -> None:
    client, gateway = psk_pair(psk_connection(proposals=(ike_text,)))
    transfer(client, gateway)
    transfer(gateway, client)
    [auth] = client.datagrams_to_send()
    for count, tampered in enumerate(_flips(auth.data), start=1):
        gateway.receive_datagram_untrusted(tampered, GW, CLIENT, 0.0)
        assert gateway.datagrams_to_send() == []
        assert gateway.drops == {"integrity": count}
        assert gateway.state is State.HALF_OPEN
    gateway.receive_datagram_untrusted(auth.data, GW, CLIENT, 0.0)
    transfer(gateway, client)
    assert gateway.state is State.ESTABLISHED and client.state is State.ESTABLISHED


def test_tampered_response_is_dropped_by_the_initiator() -> None:
    client, gateway = psk_pair()
    transfer(client, gateway)
    transfer(gateway, client)
    transfer(client, gateway)
    [reply] = gateway.datagrams_to_send()
    tampered = bytearray(reply.data)
    tampered[-5] ^= 1
    client.receive_datagram_untrusted(bytes(tampered), CLIENT, GW, 0.0)
    assert client.drops == {"integrity": 1} and state(client) is State.AUTH_SENT
    client.receive_datagram_untrusted(reply.data, CLIENT, GW, 0.0)
    assert client.state is State.ESTABLISHED


def test_closed_session_ignores_everything() -> None:
    r = recorded_handshake()
    r.client.delete_ike(0.0)
    run_handshake(r.client, r.gateway)
    assert r.gateway.closed and r.client.closed
    r.gateway.receive_datagram_untrusted(r.requests[-1], GW, CLIENT, 2.0)
    assert r.gateway.datagrams_to_send() == [] and r.gateway.retransmits_answered == 0


# --- the initiator checks what the responder chose (RFC 7296 3.3.6, 1.2) -------------------

def _init_response(client: IkeSession, payloads: list[Payload]) -> bytes:
    return encode_plain(Message(client.spi_i, b"R" * 8, ExchangeType.IKE_SA_INIT, 0, True,
                                False, payloads))


def _fake_choice(transforms: tuple[Transform, ...], group: int = 31) -> list[Payload]:
    peer = new_key_exchange(group)
    return [SaPayload((Proposal(1, ProtocolId.IKE, b"", transforms),)),
            KePayload(group, peer.public_value()), NoncePayload(os.urandom(32))]


def test_invalid_ke_naming_an_unsupported_group_fails_cleanly() -> None:
    client, _ = psk_pair()
    client.datagrams_to_send()
    reply = _init_response(client, [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD,
                                                  (2).to_bytes(2, "big"))])
    client.receive_datagram_untrusted(reply, CLIENT, GW, 0.0)  # must not raise
    assert client.state is State.CLOSED
    one(drain(client), IkeSaFailed)


def test_invalid_ke_naming_a_group_we_did_not_offer_fails() -> None:
    client, _ = psk_pair()  # offers x25519 only
    client.datagrams_to_send()
    reply = _init_response(client, [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD,
                                                  (14).to_bytes(2, "big"))])
    client.receive_datagram_untrusted(reply, CLIENT, GW, 0.0)
    assert client.datagrams_to_send() == []  # no IKE_SA_INIT with a KE for modp2048
    assert client.state is State.CLOSED


def test_cbc_choice_without_integrity_fails_cleanly() -> None:
    client, _ = psk_pair()
    client.datagrams_to_send()
    reply = _init_response(client, _fake_choice((
        Transform(TransformType.ENCR, Encr.AES_CBC, 128), Transform(TransformType.PRF, 5),
        Transform(TransformType.DH, 31))))
    client.receive_datagram_untrusted(reply, CLIENT, GW, 0.0)  # must not raise
    assert client.state is State.CLOSED


def test_ike_choice_we_did_not_offer_is_refused() -> None:
    client, _ = psk_pair()  # offers aes256gcm16-prfsha256-x25519 only
    client.datagrams_to_send()
    reply = _init_response(client, _fake_choice((
        Transform(TransformType.ENCR, Encr.AES_CBC, 128), Transform(TransformType.PRF, 5),
        Transform(TransformType.INTEG, Integ.HMAC_SHA2_256_128),
        Transform(TransformType.DH, 31))))
    client.receive_datagram_untrusted(reply, CLIENT, GW, 0.0)
    assert client.state is State.CLOSED
    one(drain(client), IkeSaFailed)


def test_esp_choice_we_did_not_offer_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    not_offered = parse_proposal("aes128-sha256", ProtocolId.ESP, False)

    def pick_anything(offered: Sequence[Proposal], configured: Sequence[ConfiguredProposal],
                      **kwargs: object) -> tuple[Proposal, ChosenAlgorithms]:
        return offered[0], ChosenAlgorithms(not_offered.encr[0], not_offered.integ[0], None,
                                            None, Esn.NO_ESN)

    monkeypatch.setattr(child_sa, "select_proposal", pick_anything)
    out = handshake(*psk_pair())  # the client offers aes256gcm16 only
    g_child = one(out.gateway_events, ChildSaEstablished)
    assert g_child.encr.name == "aes128"  # the misbehaving responder did install it
    assert not of_type(out.client_events, ChildSaEstablished)


# --- more configuration shapes ---------------------------------------------------------------

def test_second_child_config_is_picked_by_selectors() -> None:
    gw_conn = psk_connection(children=(child("net1"), child("net2", local_ts="10.50.0.0/16",
                                                           remote_ts="10.60.0.0/16")))
    client_conn = replace(client_for(gw_conn), children=(client_for(gw_conn).children[1],))
    out = handshake(*psk_pair(gw_conn, client_conn))
    _, g_child = assert_established(out)
    assert g_child.name == "net2"
    assert str(g_child.local_ts[0]) == "10.50.0.0/16"


def test_connection_is_chosen_by_the_peer_identity() -> None:
    alice = psk_connection("alice", remote_id="alice.example.test")
    bob = psk_connection("bob", remote_id="bob.example.test",
                         children=(child(local_ts="10.70.0.0/16"),))
    policy = psk_policy(alice, bob)
    client_conn = client_for(bob, client_id="bob.example.test")
    client, _ = psk_pair(bob, client_conn)
    gateway = IkeSession.responder(policy, os.urandom(8), GW, CLIENT)
    out = handshake(client, gateway)
    _, g_child = assert_established(out)
    assert one(out.gateway_events, IkeSaEstablished).connection == "bob"
    assert str(g_child.local_ts[0]) == "10.70.0.0/16"


def test_connection_limited_to_other_peers_is_not_offered() -> None:
    gw_conn = replace(psk_connection(), remote_addrs=("192.0.2.0/24",))
    out = handshake(*psk_pair(gw_conn, client_for(psk_connection())))
    assert out.gateway.state is State.CLOSED and out.client.state is State.CLOSED
    one(out.client_events, IkeSaFailed)


def test_idr_naming_another_gateway_identity_is_refused() -> None:
    gw_conn = psk_connection()
    client_conn = replace(client_for(gw_conn),
                          remote=RemoteAuth("psk", parse_identity_pattern("other.example.test")))
    out = handshake(*psk_pair(gw_conn, client_conn))
    assert out.gateway.state is State.CLOSED
    one(out.gateway_events, IkeSaFailed)
    assert not of_type(out.gateway_events, IkeSaEstablished)


def make_intermediate(root: Issued, kind: str) -> Issued:
    key = _new_key(kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intermediate CA")])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(root.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, _sign_hash(root.key))
    )
    return Issued(cert, key)


def test_certificate_chain_through_an_intermediate() -> None:
    root = pki("p256").ca
    intermediate = make_intermediate(root, "p256")
    gw_leaf = make_leaf(intermediate, "p256", "gw.example.test")
    client, gateway = cert_sessions(gw_leaf, pki("p256").client, root.cert, root.cert)
    # the gateway sends the intermediate along (LocalAuth.intermediates)
    gw_conn = gateway.sa.policy.connections[0]
    gw_conn = replace(gw_conn, local=replace(gw_conn.local, intermediates=(intermediate.cert,)))
    gateway = IkeSession.responder(ResponderPolicy((gw_conn,)), os.urandom(8), GW, CLIENT)
    assert_established(handshake(client, gateway))


def test_certificate_chain_without_the_intermediate_fails() -> None:
    root = pki("p256").ca
    intermediate = make_intermediate(root, "p256")
    gw_leaf = make_leaf(intermediate, "p256", "gw.example.test")
    out = handshake(*cert_sessions(gw_leaf, pki("p256").client, root.cert, root.cert))
    assert out.client.state is State.CLOSED
    one(out.client_events, IkeSaFailed)


def test_expired_certificate_is_refused() -> None:
    p = pki("ed25519")
    client, gateway = cert_sessions(p.gateway, p.client, p.ca.cert, p.ca.cert)
    late = IkeSession.responder(gateway.sa.policy, os.urandom(8), GW, CLIENT,
                                wall_clock=lambda: NOW + timedelta(days=365))
    out = handshake(client, late)
    assert out.gateway.state is State.CLOSED
    one(out.gateway_events, IkeSaFailed)
    assert "expired" in out.gateway.last_error


# --- more exchanges ----------------------------------------------------------------------------

def test_lost_ike_auth_response_is_recovered_by_retransmission() -> None:
    client, gateway = psk_pair()
    transfer(client, gateway)
    transfer(gateway, client)
    transfer(client, gateway, 0.1)
    [lost] = gateway.datagrams_to_send()
    deadline = client.get_timer()
    assert deadline is not None
    client.handle_timer(deadline)
    transfer(client, gateway, deadline)
    [again] = gateway.datagrams_to_send()
    assert again.data == lost.data and gateway.retransmits_answered == 1
    client.receive_datagram_untrusted(again.data, CLIENT, GW, deadline)
    assert client.state is State.ESTABLISHED and client.sa.pending is None


def test_gateway_liveness_check_is_answered_by_the_client() -> None:
    r = recorded_handshake()
    assert r.gateway.check_liveness(1.0)
    [request] = r.gateway.datagrams_to_send()
    header = decode_untrusted(request.data).header
    assert header.message_id == 0 and not header.is_initiator  # the responder's own IDs
    r.client.receive_datagram_untrusted(request.data, CLIENT, GW, 1.0)
    transfer(r.client, r.gateway, 1.0)
    assert r.gateway.sa.pending is None
    assert r.client.drops == {} and r.gateway.drops == {}


def test_simultaneous_delete_closes_both_once() -> None:
    r = recorded_handshake()
    r.client.delete_ike(1.0)
    r.gateway.delete_ike(1.0)
    [from_client] = r.client.datagrams_to_send()
    [from_gateway] = r.gateway.datagrams_to_send()
    r.gateway.receive_datagram_untrusted(from_client.data, GW, CLIENT, 1.0)
    r.client.receive_datagram_untrusted(from_gateway.data, CLIENT, GW, 1.0)
    assert r.client.closed and r.gateway.closed
    run_handshake(r.client, r.gateway)  # the crossing responses change nothing
    for session in (r.client, r.gateway):
        events = drain(session)
        one(events, IkeSaDeleted)
        one(events, ChildSaDeleted)


def test_unknown_critical_payload_in_informational_is_answered() -> None:
    r = recorded_handshake()
    sk = r.client.sa.sk
    assert sk is not None
    request = sk.protect(Message(r.client.spi_i, r.client.spi_r, ExchangeType.INFORMATIONAL, 2,
                                 False, True, [UnknownPayload(200, True, b"x")]))
    r.gateway.receive_datagram_untrusted(request, GW, CLIENT, 1.0)
    [reply] = r.gateway.datagrams_to_send()
    inner = sk.unprotect_untrusted(reply.data, decode_untrusted(reply.data))
    assert inner == [NotifyPayload(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes([200]))]
    assert r.gateway.state is State.ESTABLISHED


def test_unknown_non_critical_payload_in_informational_is_ignored() -> None:
    r = recorded_handshake()
    sk = r.client.sa.sk
    assert sk is not None
    request = sk.protect(Message(r.client.spi_i, r.client.spi_r, ExchangeType.INFORMATIONAL, 2,
                                 False, True, [UnknownPayload(200, False, b"x")]))
    r.gateway.receive_datagram_untrusted(request, GW, CLIENT, 1.0)
    [reply] = r.gateway.datagrams_to_send()
    assert sk.unprotect_untrusted(reply.data, decode_untrusted(reply.data)) == []


def test_only_a_copy_of_the_last_request_gets_the_cached_response() -> None:
    r = recorded_handshake()
    bare = struct.pack("!8s8sBBBBII", r.client.spi_i, r.client.spi_r, 0, 0x20,
                       ExchangeType.INFORMATIONAL, 0x08, 1, 28)
    r.gateway.receive_datagram_untrusted(bare, GW, CLIENT, 1.0)
    assert r.gateway.datagrams_to_send() == []
    assert r.gateway.retransmits_answered == 0


def _responder_ke(pool: ExponentialPool, gw_conn: ConnectionConfig) -> tuple[bytes, Outcome]:
    """A whole handshake against a responder drawing on `pool`; our KE value and the outcome."""
    client, _ = psk_pair(gw_conn)
    gateway = IkeSession.responder(psk_policy(gw_conn), os.urandom(8), GW, CLIENT,
                                   exponentials=pool)
    transfer(client, gateway)
    (reply,) = gateway.datagrams_to_send()
    ke = next(p for p in decode_untrusted(reply.data).payloads if isinstance(p, KePayload))
    client.receive_datagram_untrusted(reply.data, reply.remote, reply.local, 0.0)
    return ke.data, handshake(client, gateway)


def test_responders_sharing_a_dh_value_each_derive_their_own_keys() -> None:
    # RFC 7296 2.12: one DH value of ours serves several IKE_SA_INIT exchanges
    pool = ExponentialPool(10.0)
    gw_conn = psk_connection()
    first_ke, first = _responder_ke(pool, gw_conn)
    second_ke, second = _responder_ke(pool, gw_conn)
    assert_established(first)
    assert_established(second)
    assert first_ke == second_ke and pool.made == 1
    assert first.gateway.sa.keys is not None and second.gateway.sa.keys is not None
    assert first.gateway.sa.keys.sk_d != second.gateway.sa.keys.sk_d  # other nonces, other peer
    assert first.gateway.sa.ke is None  # the SA keeps its keys, no reference to our DH value


def test_a_shared_dh_value_is_never_used_again_once_one_of_its_sas_ends() -> None:
    pool = ExponentialPool(10.0)
    gw_conn = psk_connection()
    first_ke, first = _responder_ke(pool, gw_conn)
    first.gateway.end_here()  # what the supervisor calls when the actor retires
    second_ke, second = _responder_ke(pool, gw_conn)
    assert_established(second)
    assert second_ke != first_ke and pool.made == 2
