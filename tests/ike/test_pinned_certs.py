"""swanctl's `certs` on the remote end: the peer must authenticate with one of these
certificates, trusted as they are (a self-signed one needs no CA), and may leave its
CERT payload out; with `cacerts` as well, it must also chain to one of those."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from cluster.ike.events import IkeSaEstablished, IkeSaFailed
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from tests.ike.test_session import (
    NOW,
    Issued,
    _new_key,
    _sign_hash,
    assert_established,
    cert_sessions,
    handshake,
    make_ca,
    make_leaf,
    of_type,
    one,
    pki,
)


def self_signed(dns: str, *, days: tuple[int, int] = (-1, 30)) -> Issued:
    key = _new_key("p256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW + timedelta(days=days[0]))
        .not_valid_after(NOW + timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .sign(key, _sign_hash(key))
    )
    return Issued(cert, key)


def pinned_sessions(client: Issued, pinned: tuple[x509.Certificate, ...],
                    ca: x509.Certificate | None = None) -> tuple[IkeSession, IkeSession]:
    """cert_sessions with the gateway's remote end holding `pinned` (and the CA `ca`)."""
    p = pki("p256")
    return cert_sessions(p.gateway, client, ca, p.ca.cert, gw_pins=pinned)


def test_a_pinned_self_signed_certificate_gets_in_without_a_ca() -> None:
    mine = self_signed("client.example.test")
    out = handshake(*pinned_sessions(mine, (self_signed("other.example.test").cert,
                                            mine.cert)))
    assert_established(out)
    assert one(out.gateway_events, IkeSaEstablished).remote_id == "client.example.test"


@pytest.mark.parametrize("case", ["another key, the same name", "expired", "not yet valid",
                                  "pinned, but not from the CA"])
def test_anything_but_a_pinned_certificate_valid_now_is_refused(case: str) -> None:
    ca = pki("p256").ca.cert
    if case == "another key, the same name":
        client, pinned, cacerts = self_signed("client.example.test"), \
            (self_signed("client.example.test").cert,), None
    elif case in ("expired", "not yet valid"):
        client = self_signed("client.example.test",
                             days=(-30, -1) if case == "expired" else (1, 30))
        pinned, cacerts = (client.cert,), None
    else:
        client = make_leaf(make_ca("p256", "Other CA"), "p256", "client.example.test")
        pinned, cacerts = (client.cert,), ca
    out = handshake(*pinned_sessions(client, pinned, cacerts))
    assert out.gateway.state is State.CLOSED
    one(out.gateway_events, IkeSaFailed)
    assert not of_type(out.gateway_events, IkeSaEstablished)
    expected = {"another key, the same name": "is not one of the connection's certs",
                "expired": "is not valid now", "not yet valid": "is not valid now"}
    if case in expected:
        assert expected[case] in out.gateway.last_error, out.gateway.last_error


def test_a_pinned_certificate_from_the_ca_passes_both_checks() -> None:
    p = pki("p256")
    out = handshake(*pinned_sessions(p.client, (p.client.cert,), p.ca.cert))
    assert_established(out)
