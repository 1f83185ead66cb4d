"""Published vectors through the ESP code paths.

- draft-mcgrew-gcm-test-01 (the AES-GCM ESP test cases that go with RFC 4106): whole
  ESP packets, with and without ESN, AES-128/192/256. Their next header is 1, so they
  go through a transport-mode SA (the payload is handed on as protocol 1).
- RFC 7634 Appendix A: a ChaCha20-Poly1305 tunnel-mode ESP packet carrying an ICMP echo.
- RFC 4868 2.7.2: HMAC-SHA-256-128 / 384-192 / 512-256 authenticators, through the same
  keyed-object-and-truncate path the CBC SAs use.
Our own packets are also opened with plain `cryptography` calls, independent of our
stream tricks, to pin the wire layout (IV placement, AAD, ICV coverage).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from cluster.esp import ChildSa, ChildSaParams, EspDrop, Selector
from cluster.esp.ciphers import make_hmac
from cluster.transforms import ENCR_ALGORITHMS, INTEG_ALGORITHMS
from tests.esp.pairs import GW_A, GW_B, pair, params


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# (key, salt, spi, seq as on the draft (8 bytes = ESN), iv, plaintext incl. trailer, ct|tag)
MCGREW: list[tuple[str, str, str, str, str, str, str, str]] = [
    ("case 1 aes128 esn", "4c80cdefbb5d10da906ac73c3613a634", "2e443b68", "00004321",
     "8765432100000000", "4956ed7e3b244cfe",
     """45000048699a000080114db7c0a80102 c0a801010a9bf15638d3010000010000
        00000000045f736970045f7564700373 69700963796265726369747902646b00 0021000101020201""",
     """fecf537e729d5b07dc30df528dd22b76 8d1b98736696a6fd348509fa13ceac34
        cfa2436f14a3f3cf65925bf1f4a13c5d 15b21e1884f5ff6247aeabb786b93bce
        61bc17d768fd9732459018148f6cbe72 2fd04796562dfdb4"""),
    ("case 2 aes128", "feffe9928665731c6d6a8f9467308308", "cafebabe", "0000a5f8", "0000000a",
     "facedbaddecaf888",
     """4500003e698f000080114dccc0a80102 c0a801010a980035002a2343b2d00100
        00010000000000000373697009637962 65726369747902646b00000100010001""",
     """deb22cd9b07c72c16e3a65beeb8df304 a5a5897d33ae530f1ba76d5d114d2a5c
        3de81827c10e9a4f51330d0eec416642 cfbb85a5b47e48a4ec3b9ba95d918bd1
        83b70d3aa8bc6ee4c309e9d85a41ad4a"""),
    ("case 3 aes256", "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
     "11223344", "4a2cbfe3", "00000002", "0102030405060708",
     """4500003069a6400080062690c0a80102 9389155e0a9e008b2dc57ee000000000
        7002400020bf0000020405b401010402 01020201""",
     """ff425c9b724599df7a3bcd510194e00d 6a78107f1b0b1cbf06efae9d65a5d763
        748a637985771d347f0545659f14e99d ef842d8eb335f4eecfdbf831824b4c49 15956c96"""),
    ("case 5 aes128 esn", "3de09874b388e6491988d0c3607eae1f", "57690e43", "42f67e3f",
     "1010101010101010", "4e280000a2fca1a3",
     """4500003c99c300008001cb7c40679318 010101010800085c0200430061626364
        65666768696a6b6c6d6e6f7071727374 75767761626364656667686901020201""",
     """fba2caa4853cf9f0f22cb10d86dd83b0 fec75691cf1a04b00d1138ec9c357917
        65acbd8701ad79845bf9fe3fba487bc9 1755e6662b4c8d0d1f5e22739530320a
        e0d731cc978ecafaeae88f00e80d6e48"""),
    ("case 7 aes192", "feffe9928665731c6d6a8f9467308308feffe9928665731c", "cafebabe",
     "0000a5f8", "0000000a", "facedbaddecaf888",
     """45000028a4ad4000400678800a01038f 0a010612802306b8cb712602dd6bb03e 501016d075680001""",
     """a5b1f8066029aea40e598b8122de0242 0938b3ab33f828e687b8858b5bfbdbd0
        315b27452144cc7795457b9652037f53 18027b5b4cd7a636"""),
    ("case 8 aes128 esn", "abbccddef00112233445566778899aab", "decaf888", "00000100",
     "0000000000000001", "cafedebaceface74",
     """4500004933ba00007f119106c3fb1d10 c2b1d326c02831ce0035dd7b800302d5
        00004e20001e8c18d75b81dc91baa047 6b91b924b280389d92c963bac046ec95
        9b6266c04722b14923010101""",
     """18a6fd42f72cbf4ab2a2ea901f73d814 e3e7f243d95412e1c349c1d2fbec168f
        9190feebaf2cb01984e65863965d7472 b79da345e0e780191f0d2f0e0f496c22
        6f2127b27db35724e7845d68651f57e6 5f354f75ff17015769623436"""),
    ("case 9 aes256 esn", "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
     "73616c74", "17405e67", "156f3126dd0db99b", "616e640169766563",
     """45080028732c00004006e9f90a010612 0a01038f06b88023dd6bafbecb712602 50101f646d540001""",
     """f2d69ecdbd5a0d5b8d5ef38bad4da58d 1f278fde98ef67549d524a3018d9a57f
        f4d3a31ce673119e451626c2415771e3 b7eebca614c89b35"""),
    ("case 12 aes128 empty", "7d773d00c144c525ac619d18c84a3f47", "d9664267", "335467ae",
     "ffffffff", "43457e9182443bc6", "01020201",
     "437f866bcb3f699fe9b0822bac961c45 04bef270"),
    ("case 13 aes256 esn max", "6c6567616c697a656d6172696a75616e61616e64646f69746265666f72656961",
     "7475726e", "796b6963", "ffffffffffffffff", "333021696765746d",
     """45000030da3a00008001df3bc0a80005 c0a800010800c6cd0200070061626364
        65666768696a6b6c6d6e6f7071727374 01020201""",
     """f97ab2aa356d8edce17644ac8c78e25d d24dedbb29ebf1b64a274b39b49c3a86
        4cd3d78ca4ae68a32b42458fb57dbe82 1dcc63b9d0937ba2945f669368661a32 9fb4c053"""),
]


def _vector_sa(encr: str, keymat: bytes, spi: bytes, esn: bool, mode: str = "transport",
               local: str = GW_A, remote: str = GW_B,
               ts: tuple[tuple[Selector, ...], tuple[Selector, ...]] = ((), ())) -> ChildSa:
    enc = ENCR_ALGORITHMS[encr]
    p = ChildSaParams(spi_in=spi, spi_out=spi, encr=enc, integ=None, esn=esn,
                      encr_key_in=keymat, integ_key_in=b"", encr_key_out=keymat,
                      integ_key_out=b"", mode=mode, local=(local, 0), remote=(remote, 0),
                      local_ts=ts[0], remote_ts=ts[1])
    return ChildSa(p)


@pytest.mark.parametrize(("name", "key", "salt", "spi", "seq", "iv", "plain", "sealed"), MCGREW,
                         ids=[v[0] for v in MCGREW])
def test_gcm_esp_vectors_decapsulate(name: str, key: str, salt: str, spi: str, seq: str,
                                     iv: str, plain: str, sealed: str) -> None:
    keymat = h(key) + h(salt)
    encr = {16: "aes128gcm16", 24: "aes192gcm16", 32: "aes256gcm16"}[len(h(key))]
    esn = len(h(seq)) == 8
    full_seq = int(seq, 16)
    sa = _vector_sa(encr, keymat, h(spi), esn)
    if esn:
        # the receiver's window must sit just below the packet for A2.1 to infer its high bits
        sa.inbound.replay.top = full_seq - 1
    packet = h(spi) + struct.pack("!I", full_seq & 0xFFFFFFFF) + h(iv) + h(sealed)
    inner = sa.inbound.decapsulate_untrusted(packet)

    plaintext = h(plain)
    pad, next_header = plaintext[-2], plaintext[-1]
    payload = plaintext[: len(plaintext) - 2 - pad]
    assert inner[0] == 0x45 and inner[9] == next_header  # header rebuilt with the protocol
    assert inner[12:16] == bytes([198, 51, 100, 2]) and inner[16:20] == bytes([192, 0, 2, 1])
    assert struct.unpack("!H", inner[2:4])[0] == 20 + len(payload)
    assert inner[20:] == payload
    assert sa.inbound.replay.top == full_seq
    assert sa.counters.packets_in == 1


def test_gcm_esp_vector_with_wrong_high_bits_fails_integrity() -> None:
    """Case 1 authenticated with seq_hi = 0x87654321; an inferred high half of 1 must fail."""
    _name, key, salt, spi, _seq, iv, _plain, sealed = MCGREW[0]
    sa = _vector_sa("aes128gcm16", h(key) + h(salt), h(spi), esn=True)
    sa.inbound.replay.top = (1 << 32) - 1  # low half 0 is then inferred as 2^32
    packet = h(spi) + b"\x00\x00\x00\x00" + h(iv) + h(sealed)
    with pytest.raises(EspDrop) as drop:
        sa.inbound.decapsulate_untrusted(packet)
    assert drop.value.reason == "integrity_failures"


RFC7634_PLAIN = """
    45 00 00 54 a6 f2 00 00 40 01 e7 78 c6 33 64 05 c0 00 02 05 08 00 5b 7a 3a 08 00 00
    55 3b ec 10 00 07 36 27 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13 14 15 16 17 18 19 1a 1b
    1c 1d 1e 1f 20 21 22 23 24 25 26 27 28 29 2a 2b 2c 2d 2e 2f 30 31 32 33 34 35 36 37
    01 02 02 04"""
RFC7634_SEALED = """
    24 03 94 28 b9 7f 41 7e 3c 13 75 3a 4f 05 08 7b 67 c3 52 e6 a7 fa b1 b9 82 d4 66 ef
    40 7a e5 c6 14 ee 80 99 d5 28 44 eb 61 aa 95 df ab 4c 02 f7 2a a7 1e 7c 4c 4f 64 c9
    be fe 2f ac c6 38 e8 f3 cb ec 16 3f ac 46 9b 50 27 73 f6 fb 94 e6 64 da 91 65 b8 28
    29 f6 41 e0 76 aa a8 26 6b 7f b0 f7 b1 1b 36 99 07 e1 ad 43"""


def test_rfc7634_chacha20poly1305_tunnel_packet() -> None:
    keymat = bytes(range(0x80, 0xA0)) + bytes.fromhex("a0a1a2a3")
    spi = bytes.fromhex("01020304")
    # the receiving gateway: the inner packet goes 198.51.100.5 -> 192.0.2.5
    ts = ((Selector.from_network("192.0.2.5/32"),), (Selector.from_network("198.51.100.5/32"),))
    sa = _vector_sa("chacha20poly1305", keymat, spi, esn=False, mode="tunnel", ts=ts)
    packet = spi + struct.pack("!I", 5) + bytes.fromhex("1011121314151617") + h(RFC7634_SEALED)
    inner = sa.inbound.decapsulate_untrusted(packet)
    plaintext = h(RFC7634_PLAIN)
    assert plaintext[-1] == 4  # next header: IPv4
    assert inner == plaintext[:84]
    assert inner[9] == 1 and inner[12:16] == bytes([198, 51, 100, 5])


def test_rfc7634_packet_outside_the_selectors_is_a_policy_drop() -> None:
    keymat = bytes(range(0x80, 0xA0)) + bytes.fromhex("a0a1a2a3")
    spi = bytes.fromhex("01020304")
    ts = ((Selector.from_network("192.0.2.5/32"),), (Selector.from_network("203.0.113.0/24"),))
    sa = _vector_sa("chacha20poly1305", keymat, spi, esn=False, mode="tunnel", ts=ts)
    packet = spi + struct.pack("!I", 5) + bytes.fromhex("1011121314151617") + h(RFC7634_SEALED)
    with pytest.raises(EspDrop) as drop:
        sa.inbound.decapsulate_untrusted(packet)
    assert drop.value.reason == "policy_drops"
    assert sa.counters.policy_drops == 1 and sa.counters.packets_in == 0


# RFC 4868 2.7.2: (integ, key, data, truncated authenticator)
RFC4868 = [
    ("sha256", b"\x0b" * 32, b"Hi There", "198a607eb44bfbc69903a0f1cf2bbdc5"),
    ("sha256", b"JefeJefeJefeJefeJefeJefeJefeJefe", b"what do ya want for nothing?",
     "167f928588c5cc2eef8e3093caa0e87c"),
    ("sha256", b"\xaa" * 32, b"\xdd" * 50, "cdcb1220d1ecccea91e53aba3092f962"),
    ("sha256", bytes(range(1, 33)), b"\xcd" * 50, "372efcf9b40b35c2115b1346903d2ef4"),
    ("sha384", b"\x0b" * 48, b"Hi There", "b6a8d5636f5c6a7224f9977dcf7ee6c7fb6d0c48cbdee973"),
    ("sha512", b"\x0b" * 64, b"Hi There",
     "637edc6e01dce7e6742a99451aae82df23da3e92439e590e43e761b33e910fb8"),
]


@pytest.mark.parametrize(("integ", "key", "data", "expected"), RFC4868)
def test_rfc4868_authenticators_through_the_esp_hmac(integ: str, key: bytes, data: bytes,
                                                    expected: str) -> None:
    alg = INTEG_ALGORITHMS[integ]
    mac = make_hmac(alg, key).copy()  # the per-packet copy the CBC SAs make
    mac.update(data)
    assert mac.digest()[: alg.icv_size].hex() == expected


# --- our packets against plain library calls --------------------------------------------


@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("encr", ["aes128gcm16", "aes256gcm16", "chacha20poly1305"])
def test_aead_packet_layout(encr: str, esn: bool) -> None:
    p = params(encr, esn=esn, initial_seq=(5 << 32) + 41 if esn else 41)
    a, _ = pair(p)
    # a 24-byte IPv4/UDP-ish packet from 10.99.1.5 to 10.99.2.7
    inner = bytes.fromhex("45000018000000004011") + bytes(2) + bytes([10, 99, 1, 5]) \
        + bytes([10, 99, 2, 7]) + bytes(4)
    sa = a.outbound_for(inner)
    assert sa is not None
    esp = sa.encapsulate(inner)
    seq = p.initial_seq + 1
    assert esp[:4] == p.spi_out
    assert esp[4:8] == struct.pack("!I", seq & 0xFFFFFFFF)
    assert esp[8:16] == struct.pack("!Q", seq)  # counter IV
    key_len = p.encr.key_bits // 8
    key, salt = p.encr_key_out[:key_len], p.encr_key_out[key_len:]
    aead = AESGCM(key) if "gcm" in encr else ChaCha20Poly1305(key)
    aad = p.spi_out + (struct.pack("!II", seq >> 32, seq & 0xFFFFFFFF) if esn
                       else struct.pack("!I", seq))
    plain = aead.decrypt(salt + esp[8:16], esp[16:], aad)
    assert plain == inner + b"\x01\x02\x02\x04"  # 24 + 2 -> padded to 28 with 1, 2


@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize(("encr", "integ"), [("aes128", "sha256"), ("aes256", "sha512"),
                                             ("aes256", "sha384"), ("aes128", "sha1")])
def test_cbc_packets_are_standard_cbc_with_icv_over_the_packet(encr: str, integ: str,
                                                               esn: bool) -> None:
    p = params(encr, integ, esn=esn, initial_seq=(7 << 32) + 9 if esn else 9)
    a, b = pair(p)
    receiver = b.get(p.spi_out)
    assert receiver is not None
    receiver.inbound.replay.top = p.initial_seq  # so ESN inference finds the high half
    alg = INTEG_ALGORITHMS[integ]
    key = p.encr_key_out
    ivs = set()
    for size in (24, 60, 100, 1400):
        inner = bytes.fromhex("4500") + struct.pack("!H", size) + bytes(5) + b"\x11" \
            + bytes(2) + bytes([10, 99, 1, 5, 10, 99, 2, 7]) + bytes(size - 20)
        sa = a.outbound_for(inner)
        assert sa is not None
        esp = sa.encapsulate(inner)
        seq = sa.seq
        icv = esp[-alg.icv_size:]
        covered = esp[: -alg.icv_size] + (struct.pack("!I", seq >> 32) if esn else b"")
        assert icv == hmac.new(p.integ_key_out, covered, alg.hash_name).digest()[: alg.icv_size]
        iv, ciphertext = esp[8:24], esp[24: -alg.icv_size]
        ivs.add(iv)
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain = decryptor.update(ciphertext) + decryptor.finalize()
        pad = plain[-2]
        assert len(plain) % 16 == 0 and plain[-1] == 4
        assert plain[: -2 - pad] == inner and plain[-2 - pad: -2] == bytes(range(1, pad + 1))
        assert b.decapsulate_untrusted(esp) == inner
    assert len(ivs) == 4


@pytest.mark.parametrize("esn", [False, True])
def test_cbc_decapsulates_packets_built_by_plain_cbc(esn: bool) -> None:
    """Foreign packets with random IVs, several in a row (the stream decryptor's state)."""
    p = params("aes256", "sha256", esn=esn)
    sad_a, _ = pair(p)
    alg = INTEG_ALGORITHMS["sha256"]
    for seq in range(1, 6):
        inner = bytes.fromhex("45000020") + bytes(5) + b"\x11" + bytes(2) \
            + bytes([10, 99, 2, 7, 10, 99, 1, 5]) + bytes(12)
        pad = -(len(inner) + 2) % 16
        trailer = bytes(range(1, pad + 1)) + bytes([pad, 4])
        iv = hashlib.sha256(bytes([seq])).digest()[:16]
        encryptor = Cipher(algorithms.AES(p.encr_key_in), modes.CBC(iv)).encryptor()
        ciphertext = encryptor.update(inner + trailer) + encryptor.finalize()
        body = p.spi_in + struct.pack("!I", seq) + iv + ciphertext
        covered = body + (struct.pack("!I", 0) if esn else b"")
        esp = body + hmac.new(p.integ_key_in, covered, "sha256").digest()[: alg.icv_size]
        assert sad_a.decapsulate_untrusted(esp) == inner
