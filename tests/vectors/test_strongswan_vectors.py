"""The recorded strongSwan vectors are coherent (RFC 7296 2.13-2.18, 2.15).

These tests check the data, not our product: they recompute strongSwan's logged
keys from its logged inputs with an independent prf+, and check that the captured
exchanges are whole IKE messages. A product KDF test can then trust the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.vectors import ike_plain

HERE = Path(__file__).resolve().parent
DOCUMENT = json.loads((HERE / "strongswan_kdf.json").read_text())
CASES: list[dict[str, Any]] = DOCUMENT["cases"]
INDEX: list[dict[str, Any]] = json.loads((HERE / "exchanges" / "index.json").read_text())

PRF_HASH = {"PRF_HMAC_SHA2_256": "sha256", "PRF_HMAC_SHA2_384": "sha384"}
# (SK_e length incl. salt, SK_a length, prf length) per IKE proposal
IKE_KEY_SIZES = {
    "aes256gcm16-prfsha256-x25519": (36, 0, 32),
    "aes128-sha256-modp2048": (16, 32, 32),
    "aes256-sha384-ecp384": (32, 48, 48),
}
ESP_KEY_SIZES = {"aes256gcm16": (36, 0), "aes128-sha256": (16, 32), "aes256-sha384": (32, 48)}
IKE_KEY_ORDER = ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr")


def b(value: str) -> bytes:
    return bytes.fromhex(value)


def by_name(case: dict[str, Any]) -> str:
    return str(case["name"])


def test_the_three_required_cases_are_recorded() -> None:
    assert {c["name"] for c in CASES} == set(IKE_KEY_SIZES)


@pytest.mark.parametrize("case", CASES, ids=by_name)
def test_skeyseed_and_ike_keys(case: dict[str, Any]) -> None:
    h = PRF_HASH[case["prf"]]
    ni, nr = b(case["ni"]), b(case["nr"])
    # RFC 7296 2.14: SKEYSEED = prf(Ni | Nr, g^ir)
    assert ike_plain.prf_hmac(h, ni + nr, b(case["g_ir"])) == b(case["skeyseed"])
    keys = b"".join(b(case[k]) for k in IKE_KEY_ORDER)
    seed = ni + nr + b(case["spi_i"]) + b(case["spi_r"])
    assert ike_plain.prf_plus(h, b(case["skeyseed"]), seed, len(keys)) == keys
    encr, integ, prf = IKE_KEY_SIZES[case["name"]]
    sizes = [len(b(case[k])) for k in IKE_KEY_ORDER]
    assert sizes == [prf, integ, integ, encr, encr, prf, prf]


@pytest.mark.parametrize("case", CASES, ids=by_name)
def test_child_sa_keymat(case: dict[str, Any]) -> None:
    h = PRF_HASH[case["prf"]]
    for child, nonces in (
        (case["child"], b(case["ni"]) + b(case["nr"])),
        (case["child_rekey"], b(case["child_rekey"]["ni"]) + b(case["child_rekey"]["nr"])),
    ):
        assert b(child["seed"]) == nonces
        # RFC 7296 2.17: KEYMAT = prf+(SK_d, Ni | Nr); initiator-to-responder keys first.
        keymat = b"".join(b(child[k]) for k in ("encr_i", "integ_i", "encr_r", "integ_r"))
        assert ike_plain.prf_plus(h, b(case["sk_d"]), nonces, len(keymat)) == keymat
        encr, integ = ESP_KEY_SIZES[child["esp_proposal"]]
        assert (len(b(child["encr_i"])), len(b(child["integ_r"]))) == (encr, integ)


@pytest.mark.parametrize("case", CASES, ids=by_name)
def test_ike_rekey_keys(case: dict[str, Any]) -> None:
    h = PRF_HASH[case["prf"]]
    rekey = case["ike_rekey"]
    ni, nr = b(rekey["ni"]), b(rekey["nr"])
    assert b(rekey["old_sk_d"]) == b(case["sk_d"])
    # RFC 7296 2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)
    assert ike_plain.prf_hmac(h, b(case["sk_d"]), b(rekey["g_ir"]) + ni + nr) == b(
        rekey["skeyseed"])
    keys = b"".join(b(rekey[k]) for k in IKE_KEY_ORDER)
    seed = ni + nr + b(rekey["spi_i"]) + b(rekey["spi_r"])
    assert ike_plain.prf_plus(h, b(rekey["skeyseed"]), seed, len(keys)) == keys
    assert (rekey["spi_i"], rekey["spi_r"]) != (case["spi_i"], case["spi_r"])


@pytest.mark.parametrize("case", CASES, ids=by_name)
def test_psk_auth_octets(case: dict[str, Any]) -> None:
    h = PRF_HASH[case["prf"]]
    exchanges = [e for e in INDEX if e["case"] == case["name"]]
    init_request = (HERE / "exchanges" / exchanges[0]["file"]).read_bytes()
    init_response = (HERE / "exchanges" / exchanges[1]["file"]).read_bytes()
    key_pad = ike_plain.prf_hmac(h, case["psk"].encode(), b"Key Pad for IKEv2")
    expected = {
        # RFC 7296 2.15: InitiatorSignedOctets = RealMessage1 | NonceRData | MACedIDForI
        "initiator": (init_request, b(case["nr"]), b(case["sk_pi"])),
        "responder": (init_response, b(case["ni"]), b(case["sk_pr"])),
    }
    assert [a["signer"] for a in case["psk_auth"]] == ["initiator", "responder"]
    for auth in case["psk_auth"]:
        message, nonce, sk_p = expected[auth["signer"]]
        maced_id = ike_plain.prf_hmac(h, sk_p, b(auth["id_payload"]))
        assert b(auth["octets"]) == message + nonce + maced_id
        assert ike_plain.prf_hmac(h, key_pad, b(auth["octets"])) == b(auth["auth"])


@pytest.mark.parametrize("case", CASES, ids=by_name)
def test_exchanges_are_whole_ike_messages(case: dict[str, Any]) -> None:
    entries = [e for e in INDEX if e["case"] == case["name"]]
    kinds = {e["exchange"] for e in entries}
    assert {"IKE_SA_INIT", "IKE_AUTH", "CREATE_CHILD_SA", "INFORMATIONAL"} <= kinds
    assert entries[0]["spi_i"] == case["spi_i"]
    for entry in entries:
        data = (HERE / "exchanges" / entry["file"]).read_bytes()
        header = ike_plain.header(data)
        assert header.length == len(data)
        assert data[17] == 0x20  # IKEv2
        assert header.message_id == entry["message_id"]
        assert header.is_response == entry["response"]
        if "decrypted" in entry:
            inner = (HERE / "exchanges" / entry["decrypted"]).read_bytes()
            chain = ike_plain.payloads(entry["decrypted_first_payload"], inner)
            assert sum(4 + len(body) for _, body in chain) == len(inner)
            assert [kind for kind, _ in chain] == entry["payloads"]
