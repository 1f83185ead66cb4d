"""MS-CHAPv2 (RFC 2759) and its MPPE keys (RFC 3079), the arithmetic of EAP-MSCHAPv2.

Windows, macOS, iOS and Android VPN clients authenticate users with it inside IKEv2
(RFC 7296 2.16). MD4 (for the NT password hash) is not offered by OpenSSL 3's default
provider, so it is written out here (RFC 1320); DES comes from cryptography's decrepit
TripleDES with the key repeated, which is single DES.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

# RFC 2759 8.7
_SIGN_MAGIC1 = b"Magic server to client signing constant"
_SIGN_MAGIC2 = b"Pad to make it do more than one iteration"
# RFC 3079 3.4
_KEY_MAGIC1 = b"This is the MPPE Master Key"
_KEY_MAGIC2 = (b"On the client side, this is the send key; "
               b"on the server side, it is the receive key.")
_KEY_MAGIC3 = (b"On the client side, this is the receive key; "
               b"on the server side, it is the send key.")
_SHS_PAD1 = bytes(40)
_SHS_PAD2 = b"\xf2" * 40


def _rotl(x: int, n: int) -> int:
    x &= 0xFFFFFFFF
    return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF


def md4(data: bytes) -> bytes:
    """RFC 1320."""
    length = len(data)
    data += b"\x80" + bytes((55 - length) % 64) + struct.pack("<Q", length * 8)
    a, b, c, d = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476
    for offset in range(0, len(data), 64):
        x = struct.unpack("<16I", data[offset:offset + 64])
        aa, bb, cc, dd = a, b, c, d
        for i in (0, 4, 8, 12):  # round 1: F(x, y, z) = xy v not(x) z
            a = _rotl(a + ((b & c) | (~b & d)) + x[i], 3)
            d = _rotl(d + ((a & b) | (~a & c)) + x[i + 1], 7)
            c = _rotl(c + ((d & a) | (~d & b)) + x[i + 2], 11)
            b = _rotl(b + ((c & d) | (~c & a)) + x[i + 3], 19)
        for i in (0, 1, 2, 3):  # round 2: G(x, y, z) = xy v xz v yz
            a = _rotl(a + ((b & c) | (b & d) | (c & d)) + x[i] + 0x5A827999, 3)
            d = _rotl(d + ((a & b) | (a & c) | (b & c)) + x[i + 4] + 0x5A827999, 5)
            c = _rotl(c + ((d & a) | (d & b) | (a & b)) + x[i + 8] + 0x5A827999, 9)
            b = _rotl(b + ((c & d) | (c & a) | (d & a)) + x[i + 12] + 0x5A827999, 13)
        for i in (0, 2, 1, 3):  # round 3: H(x, y, z) = x xor y xor z
            a = _rotl(a + (b ^ c ^ d) + x[i] + 0x6ED9EBA1, 3)
            d = _rotl(d + (a ^ b ^ c) + x[i + 8] + 0x6ED9EBA1, 9)
            c = _rotl(c + (d ^ a ^ b) + x[i + 4] + 0x6ED9EBA1, 11)
            b = _rotl(b + (c ^ d ^ a) + x[i + 12] + 0x6ED9EBA1, 15)
        a, b = (a + aa) & 0xFFFFFFFF, (b + bb) & 0xFFFFFFFF
        c, d = (c + cc) & 0xFFFFFFFF, (d + dd) & 0xFFFFFFFF
    return struct.pack("<4I", a, b, c, d)


def nt_password_hash(password: bytes) -> bytes:
    """RFC 2759 8.3: MD4 of the password in UTF-16LE (passwords are UTF-8 in config)."""
    return md4(password.decode("utf-8").encode("utf-16-le"))


def challenge_hash(peer_challenge: bytes, authenticator_challenge: bytes,
                   user_name: bytes) -> bytes:
    """RFC 2759 8.2 (the user name without any domain part)."""
    name = user_name.rsplit(b"\\", 1)[-1]
    return hashlib.sha1(peer_challenge + authenticator_challenge + name).digest()[:8]


def _des(key7: bytes, block: bytes) -> bytes:
    bits = int.from_bytes(key7, "big")
    key = bytes(((bits >> (49 - 7 * i)) & 0x7F) << 1 for i in range(8))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def nt_response(authenticator_challenge: bytes, peer_challenge: bytes, user_name: bytes,
                password_hash: bytes) -> bytes:
    """RFC 2759 8.1 GenerateNTResponse, from the password's NT hash."""
    challenge = challenge_hash(peer_challenge, authenticator_challenge, user_name)
    z = password_hash + bytes(5)
    return b"".join(_des(z[i:i + 7], challenge) for i in (0, 7, 14))


def authenticator_response(password_hash: bytes, response: bytes, peer_challenge: bytes,
                           authenticator_challenge: bytes, user_name: bytes) -> bytes:
    """RFC 2759 8.7: the "S=<40 hex digits>" the server proves itself with."""
    hash_hash = md4(password_hash)
    digest = hashlib.sha1(hash_hash + response + _SIGN_MAGIC1).digest()
    challenge = challenge_hash(peer_challenge, authenticator_challenge, user_name)
    digest = hashlib.sha1(digest + challenge + _SIGN_MAGIC2).digest()
    return b"S=" + digest.hex().upper().encode()


def master_key(password_hash: bytes, response: bytes) -> bytes:
    """RFC 3079 3.4 GetMasterKey."""
    return hashlib.sha1(md4(password_hash) + response + _KEY_MAGIC1).digest()[:16]


def _start_key(master: bytes, magic: bytes) -> bytes:
    return hashlib.sha1(master + _SHS_PAD1 + magic + _SHS_PAD2).digest()[:16]


def msk(password_hash: bytes, response: bytes) -> bytes:
    """The EAP-MSCHAPv2 MSK: the server's receive key, then its send key (32 bytes), as
    Windows' and strongSwan's implementations derive it."""
    master = master_key(password_hash, response)
    return _start_key(master, _KEY_MAGIC2) + _start_key(master, _KEY_MAGIC3)
