"""The EAP-MSCHAPv2 authenticator, driven by a peer written from RFC 2759 and
draft-kamath-pppext-eap-mschapv2 (the strongSwan test in tests/interop is the judge)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.errors import AuthenticationFailed
from cluster.ike.eap import Code, EapMschapv2Server, EapType, OpCode, packet
from cluster.ike.mschapv2 import authenticator_response, msk, nt_password_hash, nt_response

USERS = {b"carol": b"Carol's pa55word"}


def server() -> EapMschapv2Server:
    return EapMschapv2Server(os.urandom, USERS.get)


def answer(request: bytes, eap_type: int, data: bytes) -> bytes:
    return packet(Code.RESPONSE, request[1], eap_type, data)


class Peer:
    """The client side of one conversation."""

    def __init__(self, user: bytes, password: bytes) -> None:
        self.user, self.password = user, password
        self.peer_challenge = os.urandom(16)
        self.response = b""

    def respond(self, challenge_request: bytes) -> bytes:
        code, _, length, eap_type = struct.unpack_from("!BBHB", challenge_request)
        assert (code, eap_type, length) == (Code.REQUEST, EapType.MSCHAPV2,
                                            len(challenge_request))
        opcode, ms_id, ms_length, size = struct.unpack_from("!BBHB", challenge_request, 5)
        assert (opcode, ms_id, size) == (OpCode.CHALLENGE, challenge_request[1], 16)
        assert ms_length == len(challenge_request) - 5
        challenge = challenge_request[10:26]
        self.challenge = challenge
        self.response = nt_response(challenge, self.peer_challenge, self.user,
                                    nt_password_hash(self.password))
        value = self.peer_challenge + bytes(8) + self.response + b"\0"
        body = struct.pack("!BBHB", OpCode.RESPONSE, ms_id, 5 + 49 + len(self.user), 49)
        return answer(challenge_request, EapType.MSCHAPV2, body + value + self.user)


def test_a_user_with_the_right_password_gets_success_and_both_sides_the_same_msk() -> None:
    eap, peer = server(), Peer(b"carol", USERS[b"carol"])
    identity_request = eap.start()
    assert identity_request[0] == Code.REQUEST and identity_request[4] == EapType.IDENTITY
    challenge = eap.process(answer(identity_request, EapType.IDENTITY, b"carol"))
    success = eap.process(peer.respond(challenge))
    assert success[4] == EapType.MSCHAPV2 and success[5] == OpCode.SUCCESS
    expected = authenticator_response(nt_password_hash(peer.password), peer.response,
                                      peer.peer_challenge, peer.challenge, b"carol")
    assert success[9:].startswith(expected + b" M=")  # the server proves the password too
    assert not eap.done
    final = eap.process(answer(success, EapType.MSCHAPV2, bytes((OpCode.SUCCESS,))))
    assert final == packet(Code.SUCCESS, success[1])
    assert eap.done and eap.identity == b"carol"
    assert eap.msk == msk(nt_password_hash(peer.password), peer.response)


@pytest.mark.parametrize(("user", "password", "reason"), [
    (b"carol", b"guess", "wrong password for 'carol'"),
    (b"mallory", b"anything", "no secret for 'mallory'"),
])  # fmt: skip
def test_a_wrong_password_or_unknown_user_fails_after_the_challenge(
        user: bytes, password: bytes, reason: str) -> None:
    eap, peer = server(), Peer(user, password)
    challenge = eap.process(answer(eap.start(), EapType.IDENTITY, user))
    assert challenge[4] == EapType.MSCHAPV2  # unknown users are challenged all the same
    with pytest.raises(AuthenticationFailed, match=reason):
        eap.process(peer.respond(challenge))
    assert eap.msk is None and not eap.done


BAD_FIRST_ANSWERS = {
    "truncated": lambda req: answer(req, EapType.IDENTITY, b"carol")[:-1],
    "too short": lambda req: b"\x02",
    "another identifier": lambda req: packet(Code.RESPONSE, (req[1] + 1) & 0xFF,
                                             EapType.IDENTITY, b"carol"),
    "a request": lambda req: packet(Code.REQUEST, req[1], EapType.IDENTITY, b"carol"),
    "nak": lambda req: answer(req, EapType.NAK, bytes((EapType.MSCHAPV2,))),
    "out of turn": lambda req: answer(req, EapType.MSCHAPV2, bytes((OpCode.SUCCESS,))),
}


@pytest.mark.parametrize("make", list(BAD_FIRST_ANSWERS.values()),
                         ids=list(BAD_FIRST_ANSWERS))
def test_out_of_turn_or_malformed_responses_fail(make: Callable[[bytes], bytes]) -> None:
    eap = server()
    with pytest.raises(AuthenticationFailed):
        eap.process(make(eap.start()))


def test_a_short_mschapv2_response_fails() -> None:
    eap = server()
    challenge = eap.process(answer(eap.start(), EapType.IDENTITY, b"carol"))
    with pytest.raises(AuthenticationFailed, match="short response"):
        eap.process(answer(challenge, EapType.MSCHAPV2, bytes((OpCode.RESPONSE, 0, 0, 9, 49))))


@given(st.binary(max_size=120))
def test_any_bytes_from_the_peer_are_an_answer_or_authentication_failed(data: bytes) -> None:
    """Whatever arrives in the EAP payload, in any step: a next packet or the one error."""
    for steps in range(3):
        eap, peer = server(), Peer(b"carol", USERS[b"carol"])
        request = eap.start()
        if steps >= 1:
            request = eap.process(answer(request, EapType.IDENTITY, b"carol"))
        if steps >= 2:
            request = eap.process(peer.respond(request))
        try:
            out = eap.process(data)
        except AuthenticationFailed:
            continue
        assert out[0] in (Code.REQUEST, Code.SUCCESS)
