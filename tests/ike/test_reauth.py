"""reauth_time as the responder: AUTH_LIFETIME (RFC 4478), and the SA goes if the peer
does not authenticate again in time. As the initiator: our reauth_time or the peer's
AUTH_LIFETIME makes the SA due for a make-before-break reauthentication (RFC 7296 2.8.3),
which the runtime's Initiator carries out (tests/runtime/test_initiator.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.ike.constants import NotifyType
from cluster.ike.events import AUTH_EXPIRED, IkeSaDeleted, IkeSaReauthDue, IkeSaRekeyed
from cluster.ike.message import decode_untrusted
from cluster.ike.payloads import DeletePayload, NotifyPayload
from cluster.ike.session import IkeSession
from cluster.ike.snapshot import restore, snapshot_of
from cluster.ike.state import State
from tests.ike.sessions import (
    client_for,
    drain,
    psk_connection,
    psk_pair,
    psk_policy,
    run_handshake,
    transfer,
)

REAUTH = 600.0


def _told(reauth_time: float, session_timeout: float = 0.0
          ) -> tuple[IkeSession, IkeSession, int | None]:
    """A client and gateway through IKE_AUTH (the gateway's SA given a RADIUS
    `session_timeout` before it), and the AUTH_LIFETIME its response told, if any."""
    gw_conn = replace(psk_connection(), reauth_time=reauth_time)
    client, gateway = psk_pair(gw_conn, client_for(psk_connection()))
    transfer(client, gateway)
    transfer(gateway, client)
    gateway.sa.session_timeout = session_timeout
    transfer(client, gateway)
    [response] = gateway.datagrams_to_send()
    sk = client.sa.sk
    assert sk is not None
    inner = sk.unprotect_untrusted(response.data, decode_untrusted(response.data))
    assert inner is not None
    told = [int.from_bytes(p.data) for p in inner
            if isinstance(p, NotifyPayload) and p.notify_type == NotifyType.AUTH_LIFETIME]
    client.receive_datagram_untrusted(response.data, response.remote, response.local, 0.0)
    return client, gateway, told[0] if told else None


def test_the_responder_announces_auth_lifetime_and_deletes_the_sa_after_it() -> None:
    client, gateway, told = _told(REAUTH)
    assert told == 600
    sk = client.sa.sk
    assert sk is not None
    assert gateway.state is State.ESTABLISHED
    # the peer did not authenticate again: a tenth later the SA is deleted
    assert gateway.get_timer() == 1.1 * REAUTH  # nothing else is due sooner
    gateway.handle_timer(1.1 * REAUTH - 1)
    assert not gateway.datagrams_to_send()
    gateway.handle_timer(1.1 * REAUTH)
    [delete] = gateway.datagrams_to_send()
    inner = sk.unprotect_untrusted(delete.data, decode_untrusted(delete.data))
    assert inner is not None and isinstance(inner[0], DeletePayload)


def test_the_deadline_outlives_ike_rekeys_and_snapshots() -> None:
    gw_conn = replace(psk_connection(), reauth_time=REAUTH)
    client, gateway = psk_pair(gw_conn, client_for(psk_connection()))
    run_handshake(client, gateway)
    deadline = gateway.sa.reauth_at
    client.rekey_ike(100.0)
    for _ in range(4):  # the rekey, 100 s later
        transfer(client, gateway, 100.0)
        transfer(gateway, client, 100.0)
    assert [e for e in drain(gateway) if isinstance(e, IkeSaRekeyed)]
    assert gateway.sa.reauth_at == deadline  # a rekey is no new authentication
    restored = restore(snapshot_of(gateway, 200.0), psk_policy(gw_conn), 200.0)
    assert abs(restored.sa.reauth_at - deadline) < 1e-6
    restored.handle_timer(deadline)
    assert restored.state is State.DELETING


def test_without_reauth_time_nothing_is_announced_or_due() -> None:
    client, gateway, told = _told(0.0)
    run_handshake(client, gateway)
    assert told is None
    assert gateway.sa.reauth_at == float("inf")
    assert not [e for e in drain(gateway) if isinstance(e, IkeSaDeleted)]


def test_a_radius_session_timeout_is_the_end_of_service_and_the_earlier_limit_wins() -> None:
    """A RADIUS Session-Timeout (what eap-radius takes from the Access-Accept): the peer
    is told a tenth earlier, the SA ends at the timeout itself (AUTH_EXPIRED); with a
    reauth_time too, whichever ends sooner decides."""
    for reauth_time, timeout, told, deadline in ((0.0, 300.0, 270, 300.0),
                                                 (REAUTH, 300.0, 270, 300.0),
                                                 (200.0, 300.0, 200, 220.0)):
        client, gateway, announced = _told(reauth_time, timeout)
        assert announced == told
        assert gateway.get_timer() == pytest.approx(deadline)
        gateway.handle_timer(deadline + 0.001)
        transfer(gateway, client, deadline)
        transfer(client, gateway, deadline)
        [deleted] = [e for e in drain(gateway) if isinstance(e, IkeSaDeleted)]
        assert deleted.reason == AUTH_EXPIRED


def test_a_coa_session_timeout_tells_the_peer_in_an_informational_and_ends_the_sa() -> None:
    """IkeSession.limit_session (a RADIUS CoA-Request's Session-Timeout): an INFORMATIONAL
    request with AUTH_LIFETIME a tenth short of it goes to the peer, and the SA ends at
    it (AUTH_EXPIRED); the client's side is never asked."""
    client, gateway, told = _told(0.0)
    assert told is None
    assert not client.limit_session(300, 10.0)  # we initiated that one
    assert gateway.limit_session(300, 10.0)
    [request] = gateway.datagrams_to_send()
    sk = client.sa.sk
    assert sk is not None
    header = decode_untrusted(request.data)
    inner = sk.unprotect_untrusted(request.data, header)
    assert inner is not None and header.header.exchange == 37  # INFORMATIONAL
    assert [(p.notify_type, int.from_bytes(p.data)) for p in inner
            if isinstance(p, NotifyPayload)] == [(NotifyType.AUTH_LIFETIME, 270)]
    client.receive_datagram_untrusted(request.data, request.remote, request.local, 10.0)
    transfer(client, gateway, 10.0)  # its answer
    assert gateway.get_timer() == pytest.approx(310.0)
    gateway.handle_timer(310.0)
    transfer(gateway, client, 310.0)
    transfer(client, gateway, 310.0)
    [deleted] = [e for e in drain(gateway) if isinstance(e, IkeSaDeleted)]
    assert deleted.reason == AUTH_EXPIRED


# --- as the initiator ------------------------------------------------------------------

def test_our_reauth_time_makes_an_initiated_sa_due_then_deletes_it_if_nothing_came() -> None:
    """swanctl's reauth_time on a connection we initiate: due at it less up to a tenth
    (its default rand_time), an IkeSaReauthDue and nothing sent (the Initiator brings up
    the new SA); if no new SA deletes this one, it goes a tenth after (over_time)."""
    client, gateway = psk_pair(client_conn=replace(client_for(psk_connection()),
                                                   reauth_time=REAUTH))
    run_handshake(client, gateway)
    drain(client)
    due = client.sa.reauth_due
    assert 0.9 * REAUTH <= due <= REAUTH
    assert gateway.sa.reauth_due == float("inf")  # the responder's own reauth_time is told
    assert client.get_timer() == due
    client.handle_timer(due)
    assert [e for e in drain(client) if isinstance(e, IkeSaReauthDue)] == [
        IkeSaReauthDue(client.spi_i, client.spi_r, "rw")]
    assert not client.datagrams_to_send() and client.state is State.ESTABLISHED
    assert client.get_timer() == pytest.approx(1.1 * REAUTH)  # due once only
    client.handle_timer(1.1 * REAUTH)
    transfer(client, gateway, 1.1 * REAUTH)
    transfer(gateway, client, 1.1 * REAUTH)
    [deleted] = [e for e in drain(client) if isinstance(e, IkeSaDeleted)]
    assert deleted.reason == AUTH_EXPIRED


def test_the_peers_auth_lifetime_makes_our_sa_due_at_nine_tenths_of_it() -> None:
    """RFC 4478 3: AUTH_LIFETIME in the IKE_AUTH response, and later in an INFORMATIONAL
    request (a RADIUS CoA's Session-Timeout); the earlier time wins."""
    client, gateway, told = _told(REAUTH)
    assert told == 600
    assert client.sa.reauth_due == pytest.approx(0.9 * 600)
    assert gateway.limit_session(300, 10.0)  # AUTH_LIFETIME 270
    transfer(gateway, client, 10.0)
    assert client.sa.reauth_due == pytest.approx(10.0 + 0.9 * 270)
    client.handle_timer(client.sa.reauth_due)
    assert [type(e) for e in drain(client) if isinstance(e, IkeSaReauthDue)] == [IkeSaReauthDue]


def test_the_reauthentication_time_outlives_ike_rekeys_and_snapshots() -> None:
    client, gateway, _ = _told(REAUTH)
    due = client.sa.reauth_due
    client.rekey_ike(100.0)
    for _ in range(4):
        transfer(client, gateway, 100.0)
        transfer(gateway, client, 100.0)
    assert [e for e in drain(client) if isinstance(e, IkeSaRekeyed)]
    assert client.sa.reauth_due == due  # a rekey is no new authentication
    restored = restore(snapshot_of(client, 200.0), client.sa.policy, 200.0)
    assert restored.sa.reauth_due == pytest.approx(due)
    restored.handle_timer(due)
    assert [e for e in drain(restored) if isinstance(e, IkeSaReauthDue)]
