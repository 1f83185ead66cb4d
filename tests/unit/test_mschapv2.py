"""MS-CHAPv2 arithmetic against the published vectors (RFC 1320, RFC 2759 9.2, RFC 3079
3.5.3)."""

from __future__ import annotations

import pytest

from cluster.ike.mschapv2 import (
    authenticator_response,
    challenge_hash,
    master_key,
    md4,
    msk,
    nt_password_hash,
    nt_response,
)

USER = b"User"
PASSWORD = b"clientPass"
AUTH_CHALLENGE = bytes.fromhex("5B5D7C7D7B3F2F3E3C2C602132262628")
PEER_CHALLENGE = bytes.fromhex("21402324255E262A28295F2B3A337C7E")
NT_RESPONSE = bytes.fromhex("82309ECD8D708B5EA08FAA3981CD83544233114A3D85D6DF")


@pytest.mark.parametrize(("message", "digest"), [
    (b"", "31d6cfe0d16ae931b73c59d7e0c089c0"),
    (b"a", "bde52cb31de33e46245e05fbdbd6fb24"),
    (b"abc", "a448017aaf21d8525fc10ae87aa6729d"),
    (b"message digest", "d9130a8164549fe818874806e1c7014b"),
    (b"abcdefghijklmnopqrstuvwxyz", "d79e1c308aa5bbcdeea8ed63df412da9"),
    (b"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
     "e33b4ddc9c38f2199c3e7b164fcc0536"),
])  # fmt: skip
def test_md4_rfc1320_vectors(message: bytes, digest: str) -> None:
    assert md4(message).hex() == digest


def test_rfc2759_vectors() -> None:
    password_hash = nt_password_hash(PASSWORD)
    assert password_hash.hex().upper() == "44EBBA8D5312B8D611474411F56989AE"
    assert md4(password_hash).hex().upper() == "41C00C584BD2D91C4017A2A12FA59F3F"
    assert challenge_hash(PEER_CHALLENGE, AUTH_CHALLENGE, USER).hex().upper() == (
        "D02E4386BCE91226")
    assert nt_response(AUTH_CHALLENGE, PEER_CHALLENGE, USER, password_hash) == NT_RESPONSE
    assert authenticator_response(password_hash, NT_RESPONSE, PEER_CHALLENGE, AUTH_CHALLENGE,
                                  USER) == b"S=407A5589115FD0D6209F510FE9C04566932CDA56"


def test_rfc3079_master_key_and_the_msk() -> None:
    password_hash = nt_password_hash(PASSWORD)
    assert master_key(password_hash, NT_RESPONSE).hex().upper() == (
        "FDECE3717A8C838CB388E527AE3CDD31")
    key = msk(password_hash, NT_RESPONSE)
    # RFC 3079 3.5.3's 128-bit SendStartKey is derived with Magic3: the server's send key,
    # which comes second in the MSK
    assert key[16:].hex().upper() == "8B7CDC149B993A1BA118CB153F56DCCB"
    assert len(key) == 32


def test_a_domain_in_the_user_name_is_not_hashed() -> None:
    assert challenge_hash(PEER_CHALLENGE, AUTH_CHALLENGE, b"CORP\\User") == challenge_hash(
        PEER_CHALLENGE, AUTH_CHALLENGE, USER)
