"""swanctl's send_cert (always, ifasked, never) and send_certreq on a connection: which
CERT and CERTREQ payloads our messages carry (RFC 7296 3.6, 3.7)."""

from __future__ import annotations

from dataclasses import replace

from cluster.ike.constants import ExchangeType
from cluster.ike.message import decode_untrusted
from cluster.ike.payloads import CertPayload, CertreqPayload, Payload
from cluster.ike.policy import ResponderPolicy
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from tests.ike.test_session import cert_sessions, pki


def _exchange(client: IkeSession, gateway: IkeSession
              ) -> dict[tuple[int, bool], list[Payload]]:
    """Run the handshake; each message's payloads by (exchange, is_response), the
    protected ones decrypted with the receiver's keys."""
    seen: dict[tuple[int, bool], list[Payload]] = {}
    for _ in range(6):
        moved = 0
        for sender, receiver in ((client, gateway), (gateway, client)):
            for d in sender.datagrams_to_send():
                moved += 1
                receiver.receive_datagram_untrusted(d.data, d.remote, d.local, 0.0)
                decoded = decode_untrusted(d.data)
                key = (decoded.header.exchange, decoded.header.is_response)
                if decoded.sk_offset:
                    sk = receiver.sa.sk
                    assert sk is not None
                    seen.setdefault(key, sk.unprotect_untrusted(d.data, decoded) or [])
                else:
                    seen.setdefault(key, decoded.payloads)
        if not moved:
            break
    return seen


def _sessions(gw_send_cert: str = "always", *, gw_certreq: bool = True,
              client_certreq: bool = True, client_pins_gw: bool = False
              ) -> tuple[IkeSession, IkeSession]:
    p = pki("p256")
    client, gateway = cert_sessions(p.gateway, p.client, p.ca.cert, p.ca.cert)
    gw_conn = replace(gateway.sa.policy.connections[0], send_cert=gw_send_cert,
                      send_certreq=gw_certreq)
    client_conn = replace(client.sa.connection, send_certreq=client_certreq)
    if client_pins_gw:  # the client holds the gateway's certificate: it needs no CERT
        client_conn = replace(client_conn, remote=replace(client_conn.remote,
                                                          certs=(p.gateway.cert,)))
    client = IkeSession.initiator(client_conn, ResponderPolicy((client_conn,)), client.spi_i,
                                  client.sa.local, client.sa.remote, 0.0)
    gateway = IkeSession.responder(ResponderPolicy((gw_conn,)), gateway.spi_r,
                                   gateway.sa.local, gateway.sa.remote)
    return client, gateway


def _has(payloads: list[Payload], kind: type[Payload]) -> bool:
    return any(isinstance(p, kind) for p in payloads)


INIT_RESPONSE = (ExchangeType.IKE_SA_INIT, True)
AUTH_REQUEST = (ExchangeType.IKE_AUTH, False)
AUTH_RESPONSE = (ExchangeType.IKE_AUTH, True)


def test_always_sends_our_certificate_and_both_send_certreqs() -> None:
    client, gateway = _sessions()
    seen = _exchange(client, gateway)
    assert client.state is gateway.state is State.ESTABLISHED
    assert _has(seen[INIT_RESPONSE], CertreqPayload) and _has(seen[AUTH_REQUEST], CertreqPayload)
    assert _has(seen[AUTH_RESPONSE], CertPayload) and _has(seen[AUTH_REQUEST], CertPayload)


def test_ifasked_sends_it_only_to_a_peer_that_sent_a_certreq() -> None:
    client, gateway = _sessions("ifasked")
    seen = _exchange(client, gateway)
    assert gateway.state is State.ESTABLISHED and _has(seen[AUTH_RESPONSE], CertPayload)
    # no CERTREQ from the client, which holds the gateway's certificate instead
    client, gateway = _sessions("ifasked", client_certreq=False, client_pins_gw=True)
    seen = _exchange(client, gateway)
    assert not _has(seen[AUTH_REQUEST], CertreqPayload)
    assert not _has(seen[AUTH_RESPONSE], CertPayload)
    assert client.state is gateway.state is State.ESTABLISHED, client.last_error


def test_never_sends_no_certificate_and_send_certreq_no_no_certreq() -> None:
    client, gateway = _sessions("never", gw_certreq=False, client_pins_gw=True)
    seen = _exchange(client, gateway)
    assert not _has(seen[AUTH_RESPONSE], CertPayload)
    assert not _has(seen[INIT_RESPONSE], CertreqPayload)
    assert client.state is gateway.state is State.ESTABLISHED, client.last_error
    # a client that has only the CA cannot verify a gateway that sends nothing
    client, gateway = _sessions("never")
    _exchange(client, gateway)
    assert client.state is not State.ESTABLISHED
