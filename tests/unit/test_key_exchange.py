"""Key exchange methods: self-agreement, RFC 3526 primes from pi, RFC 6989 / RFC 8031 peer
value checks, the IKEv2 ECP encoding, and the RFC 5903 / RFC 7748 vectors."""

from __future__ import annotations

import types

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cluster import key_exchange
from cluster.errors import ParseError
from cluster.key_exchange import (
    DH_NAMES,
    DhGroup,
    EcpExchange,
    ExponentialPool,
    ModpExchange,
    MontgomeryExchange,
    new_key_exchange,
    public_value_size,
)

ALL_GROUPS = list(DhGroup)
SIZES = {
    DhGroup.MODP1024: 128, DhGroup.MODP2048: 256, DhGroup.MODP3072: 384, DhGroup.MODP4096: 512,
    DhGroup.ECP256: 64, DhGroup.ECP384: 96, DhGroup.ECP521: 132,
    DhGroup.CURVE25519: 32, DhGroup.CURVE448: 56,
}


@pytest.mark.parametrize("group", ALL_GROUPS, ids=[g.name for g in ALL_GROUPS])
def test_every_group_agrees_with_itself(group: DhGroup) -> None:
    a, b = new_key_exchange(group), new_key_exchange(group)
    assert a.group == b.group == group
    pa, pb = a.public_value(), b.public_value()
    assert len(pa) == len(pb) == public_value_size(group) == SIZES[group]
    secret = a.shared_secret_untrusted(pb)
    assert secret == b.shared_secret_untrusted(pa)
    assert len(secret) in {SIZES[group], SIZES[group] // 2}  # ECP: x coordinate only
    assert any(secret)


@pytest.mark.parametrize("group", ALL_GROUPS, ids=[g.name for g in ALL_GROUPS])
def test_a_private_value_makes_the_same_exchange_again(group: DhGroup) -> None:
    """What another node needs to finish an exchange this one started (a rekey in flight
    when it died): the same public value and the same shared secret."""
    ours, peer = new_key_exchange(group), new_key_exchange(group)
    again = new_key_exchange(group, ours.private_value())
    assert again.public_value() == ours.public_value()
    assert again.shared_secret_untrusted(peer.public_value()) == \
        ours.shared_secret_untrusted(peer.public_value())
    assert new_key_exchange(group).private_value() != ours.private_value()


def test_keyword_table() -> None:
    assert DH_NAMES["x25519"] == DH_NAMES["curve25519"] == DhGroup.CURVE25519
    assert DH_NAMES["modp2048"] == 14 and DH_NAMES["ecp521"] == 21 and DH_NAMES["x448"] == 32


def test_unsupported_group_raises_value_error() -> None:
    with pytest.raises(ValueError):
        new_key_exchange(1)  # MODP 768 is not offered


# --- RFC 3526: p = 2^n - 2^(n-64) - 1 + 2^64 * (floor(2^(n-130) * pi) + k) ------------------

def _arctan_inverse(x: int, one: int) -> int:
    """arctan(1/x) * one, by the alternating Taylor series in integers."""
    total = term = one // x
    x2, k, sign = x * x, 3, -1
    while term:
        term //= x2
        total += sign * (term // k)
        sign, k = -sign, k + 2
    return total


def _pi_fixed(bits: int) -> int:
    """floor(pi * 2^bits) (Machin: pi = 16 atan(1/5) - 4 atan(1/239)), 64 guard bits."""
    guard = 64
    one = 1 << (bits + guard)
    pi = 16 * _arctan_inverse(5, one) - 4 * _arctan_inverse(239, one)
    return pi >> guard


def test_machin_pi_is_right() -> None:
    # first 64 fraction bits of pi are 0x243F6A8885A308D3 (the hex expansion of pi)
    assert _pi_fixed(64) == (3 << 64) | 0x243F6A8885A308D3


@pytest.mark.parametrize(("group", "bits", "k"), [
    (DhGroup.MODP2048, 2048, 124476),
    (DhGroup.MODP3072, 3072, 1690314),
    (DhGroup.MODP4096, 4096, 240904),
])
def test_modp_prime_follows_rfc3526_formula(group: DhGroup, bits: int, k: int) -> None:
    expected = 2**bits - 2 ** (bits - 64) - 1 + 2**64 * (_pi_fixed(bits - 130) + k)
    prime = key_exchange._MODP_PRIMES[group]  # the table the module says tests check
    assert prime == expected
    assert prime.bit_length() == bits
    assert public_value_size(group) == bits // 8


# --- RFC 6989 checks on the peer's value --------------------------------------------------------

@pytest.mark.parametrize("group", [DhGroup.MODP2048, DhGroup.MODP3072, DhGroup.MODP4096])
def test_modp_rejects_degenerate_and_misencoded_values(group: DhGroup) -> None:
    ours = ModpExchange(group)
    p = key_exchange._MODP_PRIMES[group]
    size = SIZES[group]
    for y in (0, 1, p - 1, p, p + 1, 2**(size * 8) - 1):
        with pytest.raises(ParseError):
            ours.shared_secret_untrusted(y.to_bytes(size, "big"))
    peer = ModpExchange(group).public_value()
    with pytest.raises(ParseError):
        ours.shared_secret_untrusted(peer[1:])  # one byte short (leading zero stripped)
    with pytest.raises(ParseError):
        ours.shared_secret_untrusted(b"\x00" + peer)
    with pytest.raises(ParseError):
        ours.shared_secret_untrusted(b"")
    # 2 is in range and must be accepted (it generates the group)
    assert len(ours.shared_secret_untrusted((2).to_bytes(size, "big"))) == size


@pytest.mark.parametrize("group", [DhGroup.ECP256, DhGroup.ECP384, DhGroup.ECP521])
def test_ecp_rejects_points_off_the_curve_and_wrong_lengths(group: DhGroup) -> None:
    ours = EcpExchange(group)
    half = SIZES[group] // 2
    off_curve = (1).to_bytes(half, "big") + (1).to_bytes(half, "big")
    with pytest.raises(ParseError):
        ours.shared_secret_untrusted(off_curve)
    with pytest.raises(ParseError):
        ours.shared_secret_untrusted(bytes(2 * half))  # the point at "infinity" encoding
    good = EcpExchange(group).public_value()
    flipped = bytearray(good)
    flipped[-1] ^= 1  # y no longer matches x
    with pytest.raises(ParseError):
        ours.shared_secret_untrusted(bytes(flipped))
    with pytest.raises(ParseError):
        ours.shared_secret_untrusted(b"\x04" + good)  # the X9.62 prefix is not IKEv2's encoding
    with pytest.raises(ParseError):
        ours.shared_secret_untrusted(good[:-1])


@pytest.mark.parametrize("group", [DhGroup.ECP256, DhGroup.ECP384, DhGroup.ECP521])
def test_ecp_public_value_is_x_then_y_without_format_byte(group: DhGroup) -> None:
    ours = EcpExchange(group)
    value = ours.public_value()
    half = SIZES[group] // 2
    assert len(value) == 2 * half
    curve = {DhGroup.ECP256: ec.SECP256R1(), DhGroup.ECP384: ec.SECP384R1(),
             DhGroup.ECP521: ec.SECP521R1()}[group]
    point = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + value)
    numbers = point.public_numbers()
    assert value == numbers.x.to_bytes(half, "big") + numbers.y.to_bytes(half, "big")


# RFC 7748 5 / RFC 8031 2.3: u-coordinates of small order give an all-zero secret
X25519_LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


@pytest.mark.parametrize("point", X25519_LOW_ORDER)
def test_x25519_rejects_low_order_points(point: str) -> None:
    with pytest.raises(ParseError):
        MontgomeryExchange(DhGroup.CURVE25519).shared_secret_untrusted(bytes.fromhex(point))


def test_x25519_and_x448_reject_wrong_lengths() -> None:
    with pytest.raises(ParseError):
        MontgomeryExchange(DhGroup.CURVE25519).shared_secret_untrusted(bytes(30) + b"\x09")
    with pytest.raises(ParseError):
        MontgomeryExchange(DhGroup.CURVE25519).shared_secret_untrusted(b"\x09" + bytes(32))
    with pytest.raises(ParseError):
        MontgomeryExchange(DhGroup.CURVE448).shared_secret_untrusted(b"\x05" + bytes(54))


@pytest.mark.parametrize("u", [0, 1])
def test_x448_rejects_low_order_points(u: int) -> None:
    with pytest.raises(ParseError):
        MontgomeryExchange(DhGroup.CURVE448).shared_secret_untrusted(u.to_bytes(56, "little"))


# --- RFC 5903 8.1: ECP-256 with fixed private values ------------------------------------------

RFC5903_I = 0xC88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433
RFC5903_GI = ("DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180"
              "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3")
RFC5903_R = 0xC6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53
RFC5903_GR = ("D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
              "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB")
RFC5903_GIR = "D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE"


def _ecp_with_private(monkeypatch: pytest.MonkeyPatch, private: int) -> EcpExchange:
    fixed = ec.derive_private_key(private, ec.SECP256R1())
    monkeypatch.setattr(ec, "generate_private_key", lambda curve: fixed)
    exchange = EcpExchange(DhGroup.ECP256)
    monkeypatch.undo()
    return exchange


def test_ecp256_matches_rfc5903_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    initiator = _ecp_with_private(monkeypatch, RFC5903_I)
    responder = _ecp_with_private(monkeypatch, RFC5903_R)
    assert initiator.public_value().hex().upper() == RFC5903_GI
    assert responder.public_value().hex().upper() == RFC5903_GR
    # RFC 5903 7: the shared secret is the x coordinate alone
    assert initiator.shared_secret_untrusted(bytes.fromhex(RFC5903_GR)).hex().upper() \
        == RFC5903_GIR
    assert responder.shared_secret_untrusted(bytes.fromhex(RFC5903_GI)).hex().upper() \
        == RFC5903_GIR


def test_ecp256_public_value_drops_only_the_04_byte() -> None:
    fixed = ec.derive_private_key(RFC5903_I, ec.SECP256R1())
    x962 = fixed.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert x962[0] == 0x04 and x962[1:].hex().upper() == RFC5903_GI


# --- RFC 7748 6.1: X25519 ---------------------------------------------------------------------

ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def _x25519_with_private(monkeypatch: pytest.MonkeyPatch, private_hex: str) -> MontgomeryExchange:
    fixed = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
    fake = types.SimpleNamespace(
        X25519PrivateKey=types.SimpleNamespace(generate=lambda: fixed),
        X25519PublicKey=x25519.X25519PublicKey,
    )
    monkeypatch.setattr(key_exchange, "x25519", fake)
    exchange = MontgomeryExchange(DhGroup.CURVE25519)
    monkeypatch.undo()
    return exchange


def test_x25519_matches_rfc7748_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    alice = _x25519_with_private(monkeypatch, ALICE_PRIVATE)
    bob = _x25519_with_private(monkeypatch, BOB_PRIVATE)
    assert alice.public_value().hex() == ALICE_PUBLIC
    assert bob.public_value().hex() == BOB_PUBLIC
    assert alice.shared_secret_untrusted(bytes.fromhex(BOB_PUBLIC)).hex() == SHARED
    assert bob.shared_secret_untrusted(bytes.fromhex(ALICE_PUBLIC)).hex() == SHARED


def test_x448_public_value_is_the_raw_u_coordinate() -> None:
    ours = MontgomeryExchange(DhGroup.CURVE448)
    value = ours.public_value()
    assert len(value) == 56
    x448.X448PublicKey.from_public_bytes(value)  # decodes as a raw key


def test_pool_shares_a_curve_value_until_it_is_too_old() -> None:
    pool = ExponentialPool(10.0)
    first, serial = pool.take(DhGroup.CURVE25519, 100.0)
    again, same = pool.take(DhGroup.CURVE25519, 109.9)
    assert again is first and same == serial != 0
    later, other = pool.take(DhGroup.CURVE25519, 110.0)
    assert later is not first and other not in (0, serial)
    assert pool.take(DhGroup.ECP256, 110.0)[0] is not later  # one value per group
    assert pool.made == 3


def test_pool_forgets_a_value_when_an_sa_that_used_it_ends() -> None:
    pool = ExponentialPool(10.0)
    first, serial = pool.take(DhGroup.ECP256, 0.0)
    pool.forget(serial)
    second, newer = pool.take(DhGroup.ECP256, 1.0)
    assert second is not first
    pool.forget(serial)  # another SA of the old value ending leaves the new one alone
    assert pool.take(DhGroup.ECP256, 2.0) == (second, newer)
    pool.forget(0)  # an SA that used no shared value
    assert pool.take(DhGroup.ECP256, 3.0) == (second, newer)


def test_pool_never_shares_modp_values_nor_with_max_age_zero() -> None:
    pool = ExponentialPool(10.0)
    a, s = pool.take(DhGroup.MODP2048, 0.0)
    b, t = pool.take(DhGroup.MODP2048, 0.0)
    assert a is not b and s == t == 0
    fresh = ExponentialPool(0.0)
    c, u = fresh.take(DhGroup.CURVE25519, 0.0)
    d, v = fresh.take(DhGroup.CURVE25519, 0.0)
    assert c is not d and u == v == 0


@pytest.mark.parametrize("group", [DhGroup.CURVE25519, DhGroup.ECP256])
def test_a_shared_value_still_refuses_bad_peer_values(group: DhGroup) -> None:
    pool = ExponentialPool(10.0)
    ours, _ = pool.take(group, 0.0)
    peer = new_key_exchange(group)
    assert ours.shared_secret_untrusted(peer.public_value()) \
        == peer.shared_secret_untrusted(ours.public_value())
    with pytest.raises(ParseError):  # u = 0 (small order) / not a point on the curve
        pool.take(group, 1.0)[0].shared_secret_untrusted(bytes(public_value_size(group)))
