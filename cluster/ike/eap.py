"""EAP (RFC 3748) as the authenticator, with EAP-MSCHAPv2 (draft-kamath-pppext-eap-mschapv2).

Sans-IO: `EapMschapv2Server.start` gives the first EAP request, `process` takes each EAP
response and gives the next request; once the peer acknowledged our Success, `msk` is
the key both AUTH payloads are computed with (RFC 7296 2.16). Any wrong answer raises
AuthenticationFailed: the IKE_AUTH exchange then ends with that notify instead of an
MS-CHAPv2 Failure round trip (which would let a peer retry).
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from enum import IntEnum

from ..errors import AuthenticationFailed
from .mschapv2 import authenticator_response, msk, nt_password_hash, nt_response

Random = Callable[[int], bytes]
_HEAD = struct.Struct("!BBH")  # code, identifier, length
_MSCHAP_HEAD = struct.Struct("!BBHB")  # opcode, MS-CHAPv2-ID, MS-Length, Value-Size
_SUCCESS_HEAD = struct.Struct("!BBH")  # opcode, MS-CHAPv2-ID, MS-Length
SERVER_NAME = b"ike-cluster"


class Code(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    SUCCESS = 3
    FAILURE = 4


class EapType(IntEnum):
    IDENTITY = 1
    NAK = 3
    MSCHAPV2 = 26


class OpCode(IntEnum):
    CHALLENGE = 1
    RESPONSE = 2
    SUCCESS = 3
    FAILURE = 4


def packet(code: int, identifier: int, eap_type: int | None = None, data: bytes = b"") -> bytes:
    body = b"" if eap_type is None else bytes((eap_type,)) + data
    return _HEAD.pack(code, identifier, 4 + len(body)) + body


def parse_response_untrusted(data: bytes, identifier: int) -> tuple[int, bytes]:
    """(type, type data) of an EAP Response to our request `identifier`."""
    if len(data) < 5:
        raise AuthenticationFailed("EAP: short packet")
    code, ident, length = _HEAD.unpack_from(data)
    if code != Code.RESPONSE or ident != identifier or length != len(data):
        raise AuthenticationFailed(f"EAP: expected response {identifier}, got code {code} "
                                   f"id {ident} length {length}/{len(data)}")
    return data[4], data[5:]


class EapAuthenticator:
    """What the methods share: EAP identifiers, the EAP-Identity request that starts the
    conversation, the peer's identity and, once `done`, the MSK."""

    def __init__(self, rng: Random) -> None:
        self._id = rng(1)[0]
        self._step = "identity"
        self.identity = b""
        self.msk: bytes | None = None

    def _request(self, eap_type: int, data: bytes) -> bytes:
        self._id = (self._id + 1) & 0xFF
        return packet(Code.REQUEST, self._id, eap_type, data)

    def start(self) -> bytes:
        return self._request(EapType.IDENTITY, b"")

    @property
    def done(self) -> bool:
        return self._step == "done"


class EapMschapv2Server(EapAuthenticator):
    """One peer's EAP conversation: Identity, then MS-CHAPv2 challenge and success.

    `secret_of(identity)` gives the user's password, or None for an unknown user (who
    still gets a challenge, so that the answer does not tell which users exist).
    """

    def __init__(self, rng: Random, secret_of: Callable[[bytes], bytes | None]) -> None:
        super().__init__(rng)
        self._rng = rng
        self._secret_of = secret_of
        self._challenge = b""
        self._password_hash: bytes | None = None

    def process(self, data: bytes) -> bytes:
        """The next EAP packet for the peer's response `data`."""
        eap_type, body = parse_response_untrusted(data, self._id)
        if eap_type == EapType.NAK:
            raise AuthenticationFailed("EAP: the peer refused EAP-MSCHAPv2")
        if self._step == "identity" and eap_type == EapType.IDENTITY:
            return self._challenge_for(body)
        if eap_type != EapType.MSCHAPV2 or not body:
            raise AuthenticationFailed(f"EAP: unexpected type {eap_type} in step {self._step}")
        if self._step == "challenge" and body[0] == OpCode.RESPONSE:
            return self._check(body)
        if self._step == "success" and body[0] == OpCode.SUCCESS:
            self._step = "done"
            return packet(Code.SUCCESS, self._id)
        raise AuthenticationFailed(f"EAP-MSCHAPv2: unexpected opcode {body[0]} in {self._step}")

    def _challenge_for(self, identity: bytes) -> bytes:
        self.identity = identity
        secret = self._secret_of(identity)
        # an unknown user is challenged like a known one, with a hash nothing matches
        self._password_hash = None if secret is None else nt_password_hash(secret)
        self._challenge = self._rng(16)
        self._step = "challenge"
        value = self._challenge + SERVER_NAME
        ms_id = (self._id + 1) & 0xFF  # the MS-CHAPv2-ID follows the EAP identifier
        return self._request(EapType.MSCHAPV2, _MSCHAP_HEAD.pack(
            OpCode.CHALLENGE, ms_id, _MSCHAP_HEAD.size + len(value), 16) + value)

    def _check(self, body: bytes) -> bytes:
        if len(body) < _MSCHAP_HEAD.size + 49:
            raise AuthenticationFailed("EAP-MSCHAPv2: short response")
        _, ms_id, _, size = _MSCHAP_HEAD.unpack_from(body)
        if size != 49:
            raise AuthenticationFailed(f"EAP-MSCHAPv2: response value of {size} bytes")
        value = body[_MSCHAP_HEAD.size:_MSCHAP_HEAD.size + 49]
        name = body[_MSCHAP_HEAD.size + 49:]
        peer_challenge, answer = value[:16], value[24:48]
        expected = None
        if self._password_hash is not None:
            expected = nt_response(self._challenge, peer_challenge, name, self._password_hash)
        if expected is None or not hmac.compare_digest(expected, answer):
            raise AuthenticationFailed(
                f"EAP-MSCHAPv2: wrong password for {self.identity.decode(errors='replace')!r}"
                if expected is not None else
                f"EAP-MSCHAPv2: no secret for {self.identity.decode(errors='replace')!r}")
        assert self._password_hash is not None
        self.msk = msk(self._password_hash, answer)
        message = authenticator_response(self._password_hash, answer, peer_challenge,
                                         self._challenge, name) + b" M=Welcome"
        self._step = "success"
        return self._request(EapType.MSCHAPV2, _SUCCESS_HEAD.pack(
            OpCode.SUCCESS, ms_id, _SUCCESS_HEAD.size + len(message)) + message)
