"""Our codecs and SK protection on the messages strongSwan 5.9.8 exchanged with itself
(tests/vectors/exchanges, keys from tests/vectors/strongswan_kdf.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.ike.constants import ProtocolId
from cluster.ike.keymat import IkeKeys, derive_ike_keys, rekey_skeyseed, skeyseed
from cluster.ike.message import Message, SkProtection, decode_untrusted, encode_plain
from cluster.ike.payloads import encode_payloads, pull_payloads_untrusted, type_of
from cluster.ike.proposals import parse_proposal
from cluster.wire import Buffer

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
EXCHANGES = VECTORS / "exchanges"
INDEX: list[dict[str, Any]] = (
    json.loads((EXCHANGES / "index.json").read_text()) if (EXCHANGES / "index.json").exists()
    else []
)
CASES: dict[str, dict[str, Any]] = (
    {c["name"]: c for c in json.loads((VECTORS / "strongswan_kdf.json").read_text())["cases"]}
    if (VECTORS / "strongswan_kdf.json").exists() else {}
)


def test_recordings_are_present() -> None:
    assert len(INDEX) > 50 and len(CASES) >= 3


def _keys(case: dict[str, Any], spi_i: str) -> IkeKeys:
    """The IKE SA keys for the SA these SPIs name: the first SA or its rekeyed successor."""
    conf = parse_proposal(case["ike_proposal"], ProtocolId.IKE, False)
    prf, encr = conf.prf[0], conf.encr[0]
    integ = conf.integ[0] if conf.integ else None
    if spi_i == case["spi_i"]:
        ni, nr = bytes.fromhex(case["ni"]), bytes.fromhex(case["nr"])
        seed = skeyseed(prf, ni, nr, bytes.fromhex(case["g_ir"]))
        spis = (case["spi_i"], case["spi_r"])
    else:
        rekey = case["ike_rekey"]
        assert spi_i == rekey["spi_i"]
        ni, nr = bytes.fromhex(rekey["ni"]), bytes.fromhex(rekey["nr"])
        seed = rekey_skeyseed(prf, bytes.fromhex(rekey["old_sk_d"]),
                              bytes.fromhex(rekey["g_ir"]), ni, nr)
        spis = (rekey["spi_i"], rekey["spi_r"])
    return derive_ike_keys(prf, encr, integ, seed, ni, nr, bytes.fromhex(spis[0]),
                           bytes.fromhex(spis[1]))


@pytest.mark.parametrize("entry", [e for e in INDEX if e["exchange"] == "IKE_SA_INIT"],
                         ids=lambda e: str(e["file"]))
def test_strongswan_ike_sa_init_decodes_and_re_encodes_identically(entry: dict[str, Any]
                                                                    ) -> None:
    data = (EXCHANGES / entry["file"]).read_bytes()
    decoded = decode_untrusted(data)
    assert decoded.sk_offset == 0
    assert decoded.header.spi_i.hex() == entry["spi_i"]
    assert decoded.header.is_response == entry["response"]
    msg = Message(decoded.header.spi_i, decoded.header.spi_r, decoded.header.exchange,
                  decoded.header.message_id, decoded.header.is_response,
                  decoded.header.is_initiator, decoded.payloads)
    assert encode_plain(msg) == data


@pytest.mark.parametrize("entry", [e for e in INDEX if "decrypted" in e],
                         ids=lambda e: str(e["file"]))
def test_strongswan_sk_payloads_open_with_our_keys(entry: dict[str, Any]) -> None:
    case = CASES[entry["case"]]
    data = (EXCHANGES / entry["file"]).read_bytes()
    decoded = decode_untrusted(data)
    assert decoded.sk_offset, "protected exchange without an SK payload"
    assert decoded.sk_first == entry["decrypted_first_payload"]
    keys = _keys(case, entry["spi_i"])
    conf = parse_proposal(case["ike_proposal"], ProtocolId.IKE, False)
    encr, integ = conf.encr[0], (conf.integ[0] if conf.integ else None)
    if entry["sender"] == "i":  # we play the responder
        sk = SkProtection(encr, integ, keys.sk_er, keys.sk_ar, keys.sk_ei, keys.sk_ai)
    else:
        sk = SkProtection(encr, integ, keys.sk_ei, keys.sk_ai, keys.sk_er, keys.sk_ar)
    inner = sk.unprotect_untrusted(data, decoded)
    assert inner is not None, "integrity check failed on strongSwan's message"
    assert [type_of(p) for p in inner] == entry["payloads"]
    plain = (EXCHANGES / entry["decrypted"]).read_bytes()
    if inner:
        expected, _ = pull_payloads_untrusted(Buffer(plain), entry["decrypted_first_payload"])
        assert inner == expected
        assert encode_payloads(inner) == plain  # our encoder writes what strongSwan wrote
    # a flipped bit anywhere in the SK payload makes it fail closed
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    assert sk.unprotect_untrusted(bytes(tampered), decoded) is None
