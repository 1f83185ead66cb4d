"""Responder cookies (RFC 7296 2.6): layout, binding, secret rotation by the caller's clock."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools

import pytest

from cluster.ike.cookies import COOKIE_SIZE, CookieSecrets

SPI = bytes.fromhex("0102030405060708")
NONCE = bytes(range(32))
IP = "198.51.100.7"


def counting_rng() -> tuple[CookieSecrets, list[bytes]]:
    """Secrets whose values the test knows: 32 bytes of 0x01, then 0x02, ..."""
    made: list[bytes] = []
    counter = itertools.count(1)

    def rng(n: int) -> bytes:
        made.append(bytes([next(counter)]) * n)
        return made[-1]

    return CookieSecrets(lifetime=10.0, rng=rng), made


def test_cookie_is_version_then_sha256_over_nonce_address_spi_secret() -> None:
    jar, made = counting_rng()
    cookie = jar.make_cookie(SPI, NONCE, IP, now=0.0)
    assert len(cookie) == COOKIE_SIZE == 36
    assert cookie[:4] == jar.version.to_bytes(4, "big") == (1).to_bytes(4, "big")
    expected = hashlib.sha256(
        len(NONCE).to_bytes(2, "big") + NONCE + ipaddress.ip_address(IP).packed + SPI + made[0]
    ).digest()
    assert cookie[4:] == expected


def test_cookie_checks_for_the_same_request() -> None:
    jar = CookieSecrets()
    cookie = jar.make_cookie(SPI, NONCE, IP, now=100.0)
    assert jar.check_cookie(cookie, SPI, NONCE, IP, now=100.5)
    v6 = "2001:db8::7"
    assert jar.check_cookie(jar.make_cookie(SPI, NONCE, v6, 1.0), SPI, NONCE, v6, 1.0)


@pytest.mark.parametrize(
    ("spi", "nonce", "ip"),
    [
        (bytes(8), NONCE, IP),  # another initiator SPI
        (SPI, NONCE[:-1] + b"\xff", IP),  # another nonce
        (SPI, NONCE + b"\x00", IP),  # a longer nonce
        (SPI, NONCE, "198.51.100.8"),  # another address
        (SPI, NONCE, "::ffff:198.51.100.7"),  # the same IPv4 address, mapped to IPv6
    ],
)
def test_cookie_is_bound_to_spi_nonce_and_address(spi: bytes, nonce: bytes, ip: str) -> None:
    jar = CookieSecrets()
    cookie = jar.make_cookie(SPI, NONCE, IP, now=0.0)
    assert not jar.check_cookie(cookie, spi, nonce, ip, now=0.0)


def test_ipv6_interface_id_cannot_stand_in_for_an_ipv4_peer() -> None:
    # Ni | IPi would be the same bytes without the length in front of Ni.
    jar = CookieSecrets()
    v4 = "192.0.2.1"
    v6_tail = ipaddress.ip_address(v4).packed
    short_nonce = NONCE[:16]
    v6 = str(ipaddress.ip_address(bytes(range(16, 28)) + v6_tail))
    long_nonce = short_nonce + bytes(range(16, 28))
    assert short_nonce + ipaddress.ip_address(v6).packed == long_nonce + v6_tail
    cookie = jar.make_cookie(SPI, short_nonce, v6, now=0.0)
    assert not jar.check_cookie(cookie, SPI, long_nonce, v4, now=0.0)


def test_tampered_or_truncated_cookie_is_refused() -> None:
    jar = CookieSecrets()
    cookie = jar.make_cookie(SPI, NONCE, IP, now=0.0)
    flipped = cookie[:-1] + bytes([cookie[-1] ^ 1])
    assert not jar.check_cookie(flipped, SPI, NONCE, IP, now=0.0)
    assert not jar.check_cookie(cookie[:-1], SPI, NONCE, IP, now=0.0)
    assert not jar.check_cookie(cookie + b"\x00", SPI, NONCE, IP, now=0.0)
    assert not jar.check_cookie(b"", SPI, NONCE, IP, now=0.0)
    other_version = (jar.version + 5).to_bytes(4, "big") + cookie[4:]
    assert not jar.check_cookie(other_version, SPI, NONCE, IP, now=0.0)


def test_old_cookie_valid_for_one_rotation_then_refused() -> None:
    jar, made = counting_rng()
    cookie = jar.make_cookie(SPI, NONCE, IP, now=0.0)
    assert jar.check_cookie(cookie, SPI, NONCE, IP, now=9.9)
    assert len(made) == 1
    # at 10 s the secret rotates; the cookie now names the previous one
    assert jar.check_cookie(cookie, SPI, NONCE, IP, now=10.0)
    assert len(made) == 2 and jar.version == 2
    assert jar.version_known(cookie, now=19.9)
    assert jar.check_cookie(cookie, SPI, NONCE, IP, now=19.9)
    # the second rotation retires it
    assert not jar.check_cookie(cookie, SPI, NONCE, IP, now=20.0)
    assert not jar.version_known(cookie, now=20.0)
    assert len(made) == 3 and jar.version == 3


def test_new_cookies_use_the_new_secret_after_rotation() -> None:
    jar, _ = counting_rng()
    first = jar.make_cookie(SPI, NONCE, IP, now=0.0)
    second = jar.make_cookie(SPI, NONCE, IP, now=12.0)
    assert first[:4] != second[:4] and first[4:] != second[4:]
    assert jar.check_cookie(first, SPI, NONCE, IP, now=12.0)
    assert jar.check_cookie(second, SPI, NONCE, IP, now=12.0)


def test_after_a_long_idle_gap_no_old_secret_survives() -> None:
    jar, _ = counting_rng()
    cookie = jar.make_cookie(SPI, NONCE, IP, now=0.0)
    # the rotation due at 10 s happens lazily at 25 s; by then the secret it would
    # have made "previous" was due to go too (at 20 s)
    assert not jar.check_cookie(cookie, SPI, NONCE, IP, now=25.0)


def test_time_only_moves_secrets_forward_by_the_callers_clock() -> None:
    jar, made = counting_rng()
    for now in (0.0, 1.0, 5.0, 9.99):
        jar.make_cookie(SPI, NONCE, IP, now)
    assert len(made) == 1


def test_lifetime_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        CookieSecrets(lifetime=0)
