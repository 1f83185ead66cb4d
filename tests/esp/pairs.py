"""Child SA parameters for both ends of one SA pair, and packets to send through them."""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import os
import struct

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from cluster.esp import ChildSaParams, Sad, Selector
from cluster.esp.ip import internet_checksum, ip_header
from cluster.transforms import ENCR_ALGORITHMS, INTEG_ALGORITHMS

# (encr, integ) names of every supported combination
ALGORITHMS = [
    ("aes128gcm16", None),
    ("aes256gcm16", None),
    ("chacha20poly1305", None),
    ("aes128", "sha256"),
    ("aes256", "sha384"),
    ("aes256", "sha512"),
    ("aes128", "sha1"),
    ("3des", "sha1"),  # legacy
]

GW_A = "192.0.2.1"
GW_B = "198.51.100.2"
NET_A = "10.99.1.0/24"
NET_B = "10.99.2.0/24"
GW6_A = "2001:db8::1"
GW6_B = "2001:db8:1::2"
NET6_A = "fd00:a::/64"
NET6_B = "fd00:b::/64"


def params(encr: str = "aes256gcm16", integ: str | None = None, *, esn: bool = False,
           mode: str = "tunnel", v6: bool = False, spi_in: bytes = b"\xc0\x00\x00\x01",
           spi_out: bytes = b"\xc1\x00\x00\x01", **changes: object) -> ChildSaParams:
    """Our side (A) of an SA between gateway A and gateway B."""
    enc = ENCR_ALGORITHMS[encr]
    mac = INTEG_ALGORITHMS[integ] if integ else None
    rng = os.urandom
    local, remote = (GW6_A, GW6_B) if v6 else (GW_A, GW_B)
    if mode == "tunnel":
        local_ts = (Selector.from_network(NET6_A if v6 else NET_A),)
        remote_ts = (Selector.from_network(NET6_B if v6 else NET_B),)
    else:
        local_ts, remote_ts = (Selector.from_network(local),), (Selector.from_network(remote),)
    base = ChildSaParams(
        spi_in=spi_in, spi_out=spi_out, encr=enc, integ=mac, esn=esn,
        encr_key_in=rng(enc.keymat_size), integ_key_in=rng(mac.key_size) if mac else b"",
        encr_key_out=rng(enc.keymat_size), integ_key_out=rng(mac.key_size) if mac else b"",
        mode=mode, local=(local, 4500), remote=(remote, 4500),
        local_ts=local_ts, remote_ts=remote_ts)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def mirror(p: ChildSaParams, **changes: object) -> ChildSaParams:
    """The peer's (B's) view of the same SA pair."""
    return dataclasses.replace(
        p, spi_in=p.spi_out, spi_out=p.spi_in,
        encr_key_in=p.encr_key_out, integ_key_in=p.integ_key_out,
        encr_key_out=p.encr_key_in, integ_key_out=p.integ_key_in,
        local=p.remote, remote=p.local, local_ts=p.remote_ts, remote_ts=p.local_ts,
        **changes)  # type: ignore[arg-type]


def pair(p: ChildSaParams, **peer_changes: object) -> tuple[Sad, Sad]:
    a, b = Sad(), Sad()
    a.install(p)
    b.install(mirror(p, **peer_changes))
    return a, b


def packet(src: str, dst: str, protocol: int = 17, payload: bytes = b"x" * 100,
           sport: int = 40000, dport: int = 5201) -> bytes:
    """An IPv4/IPv6 packet with a valid UDP/TCP/ICMP header (checksums right)."""
    s = ipaddress.ip_address(src).packed
    d = ipaddress.ip_address(dst).packed
    if protocol == 17:
        segment = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        position = 6
    elif protocol == 6:
        segment = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 65535, 0, 0) \
            + payload
        position = 16
    elif protocol in (1, 58):
        segment = struct.pack("!BBHHH", 8 if protocol == 1 else 128, 0, 0, 1, 1) + payload
        position = 2
    else:
        segment, position = payload, -1
    if position >= 0:
        pseudo = s + d + struct.pack("!IxxxB", len(segment), protocol)
        covered = segment if protocol == 1 else pseudo + segment
        checksum = internet_checksum(covered)
        if protocol == 17 and checksum == 0:
            checksum = 0xFFFF
        segment = segment[:position] + struct.pack("!H", checksum) + segment[position + 2:]
    return ip_header(s, d, protocol, len(segment)) + segment


def seal(p: ChildSaParams, seq: int, plaintext: bytes) -> bytes:
    """An ESP packet from A's outbound keys around a plaintext we choose (trailer included).

    Written with plain `cryptography` calls, apart from the code under test, to craft
    packets it would never build: bad padding, odd next headers, foreign IVs.
    """
    seq_low = struct.pack("!I", seq & 0xFFFFFFFF)
    high = struct.pack("!I", seq >> 32) if p.esn else b""
    key_len = p.encr.key_bits // 8
    key, salt = p.encr_key_out[:key_len], p.encr_key_out[key_len:]
    if p.encr.aead:
        aead = AESGCM(key) if "gcm" in p.encr.name else ChaCha20Poly1305(key)
        iv = struct.pack("!Q", seq ^ 0x5A5A)
        aad = p.spi_out + high + seq_low
        return p.spi_out + seq_low + iv + aead.encrypt(salt + iv, plaintext, aad)
    assert p.integ is not None
    iv = os.urandom(p.encr.block_size)
    cipher = TripleDES(key) if p.encr.name == "3des" else algorithms.AES(key)
    encryptor = Cipher(cipher, modes.CBC(iv)).encryptor()
    body = p.spi_out + seq_low + iv + encryptor.update(plaintext) + encryptor.finalize()
    icv = hmac.new(p.integ_key_out, body + high, p.integ.hash_name).digest()
    return body + icv[: p.integ.icv_size]


def trailer(size: int, next_header: int, block: int = 4) -> bytes:
    """Default padding for `size` payload bytes, pad length and next header."""
    pad = -(size + 2) % block
    return bytes([*range(1, pad + 1), pad, next_header])


def with_tos(ip: bytes, tos: int) -> bytes:
    """`ip` with its TOS (IPv4, checksum fixed) or traffic class (IPv6) set to `tos`."""
    data = bytearray(ip)
    if data[0] >> 4 == 4:
        data[1] = tos
        data[10:12] = b"\x00\x00"
        data[10:12] = internet_checksum(bytes(data[:20])).to_bytes(2, "big")
    else:
        data[0] = 0x60 | tos >> 4
        data[1] = (tos & 0x0F) << 4 | data[1] & 0x0F
    return bytes(data)
