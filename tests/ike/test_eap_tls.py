"""The EAP-TLS authenticator (RFC 5216), driven by a peer written from the RFC on an
OpenSSL client (the strongSwan test in tests/interop is the judge): the handshake in
fragments both ways, the MSK both sides derive, and every way a peer can fail."""

from __future__ import annotations

import contextlib
import datetime
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from cluster.errors import AuthenticationFailed
from cluster.ike.auth import verify_certificate_chain
from cluster.ike.eap import Code, EapType, packet
from cluster.ike.eap_tls import EAP_TLS, FLAG_LENGTH, FLAG_MORE, FLAG_START, EapTlsServer
from cluster.ike.identity import cert_matches_identity, eap_identity_untrusted
from cluster.ike.pending import Pending
from tests.interop.certs import Credential, TestCa


def _load(cred: Credential) -> tuple[x509.Certificate, object]:
    cert = x509.load_pem_x509_certificates(cred.cert.read_bytes())[0]
    key = serialization.load_pem_private_key(cred.key.read_bytes(), None)
    return cert, key


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = TestCa(directory)
        self.other = TestCa(directory, stem="other", common_name="untrusted CA")
        self.gw = _load(self.ca.issue("gw.example.test", name="gw"))
        self.client = _load(self.ca.issue("client.example.test", key_type="rsa", name="c"))
        self.stranger = _load(self.other.issue("client.example.test", name="s"))
        self.seen: list[x509.Certificate] = []

    def verify(self, cert: x509.Certificate, chain: Sequence[x509.Certificate],
               identity: bytes) -> None:
        """What ike_auth's check does with the connection's CAs (tested there with
        strongSwan): the chain to our CA, the EAP identity in the certificate."""
        self.seen.append(cert)
        verify_certificate_chain(cert, chain, [self.ca.certificate],
                                 datetime.datetime.now(datetime.UTC))
        parsed = eap_identity_untrusted(identity)
        if parsed is None or not cert_matches_identity(cert, parsed):
            raise AuthenticationFailed(f"certificate does not contain {identity!r}")

    def server(self, fragment_size: int = 1024) -> EapTlsServer:
        cert, key = self.gw
        return EapTlsServer(os.urandom, cert, key, [], self.verify,  # type: ignore[arg-type]
                            fragment_size=fragment_size)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("eap-tls"))


class Peer:
    """The EAP-TLS peer: answers each request, fragments what it sends, acknowledges
    each fragment it gets (RFC 5216 2.1.5)."""

    def __init__(self, credential: tuple[x509.Certificate, object], identity: bytes,
                 fragment_size: int = 1024) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        cert, key = credential
        context.use_certificate(cert)
        context.use_privatekey(key)  # type: ignore[arg-type]
        self.tls = SSL.Connection(context, None)
        self.tls.set_connect_state()
        self.identity = identity
        self.fragment_size = fragment_size
        self.inbound = b""
        self.outbound = b""
        self.fragments_in = self.fragments_out = 0
        self.first = False  # the next fragment starts a message

    def respond(self, request: bytes) -> bytes:
        code, identifier, length, eap_type = struct.unpack_from("!BBHB", request)
        assert code == Code.REQUEST and length == len(request)
        if eap_type == EapType.IDENTITY:
            return packet(Code.RESPONSE, identifier, EapType.IDENTITY, self.identity)
        assert eap_type == EAP_TLS
        flags, data = request[5], request[6:]
        if flags & FLAG_LENGTH:
            data = data[4:]
        if flags & FLAG_START:
            self._run(b"")
        elif data or flags & FLAG_MORE:
            self.inbound += data
            self.fragments_in += 1
            if flags & FLAG_MORE:
                return packet(Code.RESPONSE, identifier, EAP_TLS, b"\x00")
            inbound, self.inbound = self.inbound, b""
            self._run(inbound)
        if not self.outbound:  # nothing to say: acknowledge
            return packet(Code.RESPONSE, identifier, EAP_TLS, b"\x00")
        total = len(self.outbound)
        piece, self.outbound = (self.outbound[:self.fragment_size],
                                self.outbound[self.fragment_size:])
        self.fragments_out += 1
        head = bytes((FLAG_MORE if self.outbound else 0,))
        if self.first and self.outbound:  # the first of several: L and the total length
            head = bytes((FLAG_MORE | FLAG_LENGTH,)) + struct.pack("!I", total)
        self.first = False
        return packet(Code.RESPONSE, identifier, EAP_TLS, head + piece)

    def _run(self, data: bytes) -> None:
        if data:
            self.tls.bio_write(data)
        with contextlib.suppress(SSL.WantReadError):
            self.tls.do_handshake()
        while True:
            try:
                chunk = self.tls.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            self.first = self.first or not self.outbound
            self.outbound += chunk


def converse(server: EapTlsServer, peer: Peer) -> bytes:
    """Run the conversation to its end; the last packet from the server."""
    request = server.start()
    for _ in range(100):
        request = server.process(peer.respond(request))
        if request[0] != Code.REQUEST:
            return request
    raise AssertionError("the conversation does not end")


@pytest.mark.parametrize("fragment_size", [1024, 150])
def test_a_client_with_a_certificate_of_our_ca_gets_success_and_both_sides_the_same_msk(
        pki: Pki, fragment_size: int) -> None:
    server = pki.server(fragment_size)
    peer = Peer(pki.client, b"client.example.test", fragment_size)
    last = converse(server, peer)
    assert last[0] == Code.SUCCESS and len(last) == 4 and server.done
    assert server.identity == b"client.example.test"
    assert server.msk is not None and len(server.msk) == 64
    assert server.msk == peer.tls.export_keying_material(b"client EAP encryption", 64)
    assert peer.tls.get_protocol_version_name() == "TLSv1.2"
    assert pki.seen[-1] == pki.client[0]
    # both sides' messages were fragmented (the RSA client certificate is past 150
    # bytes; the server's first flight past 1024)
    assert peer.fragments_out > 1 and peer.fragments_in > 1


@pytest.mark.parametrize("who", ["stranger", "wrong identity"])
def test_a_certificate_of_another_ca_or_without_the_eap_identity_fails(pki: Pki,
                                                                     who: str) -> None:
    peer = Peer(pki.stranger, b"client.example.test") if who == "stranger" else \
        Peer(pki.client, b"someone.example.test")
    with pytest.raises(AuthenticationFailed):
        converse(pki.server(), peer)


class _Fetching(Pending):
    """What ike_auth's check raises while a CRL the certificate names is downloaded."""


def test_a_check_that_waits_for_revocation_data_runs_again_on_the_same_response(
        pki: Pki) -> None:
    """The certificate check may raise a Pending (a CRL or OCSP answer to fetch): the
    session parks the IKE_AUTH and gives the server the same EAP response again, which
    must check again (not feed TLS twice) and then send our last flight; any other
    response meanwhile fails."""
    outcomes: list[Exception | None] = [_Fetching(), None]
    checks: list[x509.Certificate] = []

    def verify(cert: x509.Certificate, chain: Sequence[x509.Certificate],
               identity: bytes) -> None:
        checks.append(cert)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        pki.verify(cert, chain, identity)

    cert, key = pki.gw
    server = EapTlsServer(os.urandom, cert, key, [], verify)  # type: ignore[arg-type]
    peer = Peer(pki.client, b"client.example.test")
    request = server.start()
    waited = False
    for _ in range(100):
        response = peer.respond(request)
        try:
            request = server.process(response)
        except _Fetching:
            waited = True
            with pytest.raises(AuthenticationFailed, match="check waits"):
                server.process(response + b"x")  # (and changes nothing)
            request = server.process(response)  # the session's resumed exchange
        if request[0] != Code.REQUEST:
            break
    assert waited and checks == [pki.client[0], pki.client[0]]
    assert request[0] == Code.SUCCESS and server.msk is not None
    assert server.msk == peer.tls.export_keying_material(b"client EAP encryption", 64)


def test_a_client_without_a_certificate_fails(pki: Pki) -> None:
    context = SSL.Context(SSL.TLS_METHOD)
    peer = Peer(pki.client, b"client.example.test")
    peer.tls = SSL.Connection(context, None)
    peer.tls.set_connect_state()
    with pytest.raises(AuthenticationFailed, match="handshake failed"):
        converse(pki.server(), peer)


def test_out_of_turn_acknowledgements_and_other_types_fail(pki: Pki) -> None:
    server = pki.server()
    start = server.process(packet(Code.RESPONSE, server.start()[1], EapType.IDENTITY, b"x"))
    assert start[4:6] == bytes((EAP_TLS, FLAG_START))
    with pytest.raises(AuthenticationFailed, match="acknowledgement"):
        server.process(packet(Code.RESPONSE, start[1], EAP_TLS, b"\x00"))
    server = pki.server()
    with pytest.raises(AuthenticationFailed):
        server.process(packet(Code.RESPONSE, server.start()[1], 26, b"\x02"))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(st.binary(max_size=300), st.integers(0, 255))
def test_any_bytes_from_the_peer_are_an_answer_or_authentication_failed(
        pki: Pki, data: bytes, flags: int) -> None:
    """Whatever comes in an EAP-TLS response: a next packet or the one error."""
    server = pki.server()
    start = server.process(packet(Code.RESPONSE, server.start()[1], EapType.IDENTITY, b"x"))
    with contextlib.suppress(AuthenticationFailed):
        server.process(packet(Code.RESPONSE, start[1], EAP_TLS, bytes((flags,)) + data))
