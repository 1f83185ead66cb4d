"""RFC 5685 gateway-initiated redirect: the notification data and the IKE_SA_INIT case."""

from __future__ import annotations

import os

import pytest

from cluster.errors import Redirected
from cluster.ike.constants import NotifyType
from cluster.ike.ike_init import redirect_data, respond_init
from cluster.ike.message import decode_untrusted
from cluster.ike.payloads import NoncePayload, NotifyPayload
from cluster.ike.sa import IkeSa
from cluster.ike.state import State
from tests.ike.sessions import CLIENT, GW, psk_pair, psk_policy, run_handshake


def test_redirect_data_names_the_gateway_by_type() -> None:
    assert redirect_data("10.0.0.5") == bytes([1, 4, 10, 0, 0, 5])
    assert redirect_data("2001:db8::1") == bytes([2, 16]) + bytes.fromhex(
        "20010db8000000000000000000000001")
    assert redirect_data("vpn2.example.test", b"NONCE") == \
        bytes([3, 17]) + b"vpn2.example.test" + b"NONCE"
    with pytest.raises(ValueError):
        redirect_data("a" * 300)


def _init_request(redirect_supported: bool) -> list[object]:
    initiator, _ = psk_pair()
    (request,) = initiator.datagrams_to_send()
    payloads = list(decode_untrusted(request.data).payloads)
    if redirect_supported:
        payloads.append(NotifyPayload(NotifyType.REDIRECT_SUPPORTED))
    return payloads


def test_an_initiator_that_supports_it_is_redirected_with_its_nonce() -> None:
    payloads = _init_request(True)
    sa = IkeSa(psk_policy(), False, os.urandom(8), os.urandom(8), GW, CLIENT)
    sa.redirect_to = "10.99.0.3"
    with pytest.raises(Redirected) as raised:
        respond_init(sa, payloads, os.urandom)  # type: ignore[arg-type]
    (nonce,) = [p for p in payloads if isinstance(p, NoncePayload)]
    assert raised.value.data == redirect_data("10.99.0.3", nonce.data)
    # one that does not announce support is answered as usual
    sa = IkeSa(psk_policy(), False, os.urandom(8), os.urandom(8), GW, CLIENT)
    sa.redirect_to = "10.99.0.3"
    assert respond_init(sa, _init_request(False), os.urandom)  # type: ignore[arg-type]
    assert not sa.redirect_supported


def test_an_established_sa_is_redirected_only_if_its_peer_supports_it() -> None:
    initiator, responder = psk_pair()
    run_handshake(initiator, responder)
    assert responder.state is State.ESTABLISHED
    assert not responder.redirect("10.99.0.3", 0.0)  # our initiator does not announce it
    responder.sa.redirect_supported = True
    assert responder.redirect("10.99.0.3", 0.0)
    (request,) = responder.datagrams_to_send()
    initiator.receive_datagram_untrusted(request.data, request.remote, request.local, 0.0)
    assert initiator.datagrams_to_send()  # answered as an INFORMATIONAL request
