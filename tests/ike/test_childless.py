"""RFC 6023 childless IKE SAs: the responder announces that it accepts them."""

from __future__ import annotations

from cluster.ike.constants import NotifyType
from cluster.ike.message import decode_untrusted
from tests.ike.sessions import psk_pair, run_handshake


def test_the_ike_sa_init_response_announces_childless_support() -> None:
    initiator, responder = psk_pair()
    (request,) = initiator.datagrams_to_send()
    assert not any(getattr(p, "notify_type", None) == NotifyType.CHILDLESS_IKEV2_SUPPORTED
                   for p in decode_untrusted(request.data).payloads)
    responder.receive_datagram_untrusted(request.data, request.remote, request.local, 0.0)
    (reply,) = responder.datagrams_to_send()
    assert any(getattr(p, "notify_type", None) == NotifyType.CHILDLESS_IKEV2_SUPPORTED
               for p in decode_untrusted(reply.data).payloads)
    assert responder.sa.childless


def test_an_ike_auth_with_a_child_sa_still_gets_one() -> None:
    initiator, responder = psk_pair()
    run_handshake(initiator, responder)
    assert len(responder.sa.children) == 1 and len(initiator.sa.children) == 1
