"""Cluster key loading, AES-256-GCM sealing, sealed fields and sealed snapshots."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import example, given
from hypothesis import strategies as st

from cluster.errors import ConfigError
from cluster.store import (
    ClusterKey,
    SealError,
    StoreError,
    open_fields,
    open_sealed,
    pack_snapshot,
    peek_snapshot,
    seal,
    seal_fields,
    unpack_snapshot,
)

SECRET = bytes(range(1, 33))
OTHER = bytes(range(101, 133))


def hkdf(secret: bytes, label: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, None, label).derive(secret)


# -- loading the key -----------------------------------------------------------------------


def test_hex_key_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(SECRET.hex() + "\n")
    key = ClusterKey.load(path)
    assert open_sealed(ClusterKey(SECRET), seal(key, b"x", b""), b"") == b"x"


def test_raw_key_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(SECRET)
    assert ClusterKey.from_file(path).key_id == ClusterKey(SECRET).key_id


def test_key_from_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKE_TEST_CLUSTER_KEY", SECRET.hex().upper())
    assert ClusterKey.load("env:IKE_TEST_CLUSTER_KEY").key_id == ClusterKey(SECRET).key_id
    assert ClusterKey.from_env("X", {"X": SECRET.hex()}).key_id == ClusterKey(SECRET).key_id


def test_key_file_with_a_retired_key_seals_with_the_first(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(f"# rotated 2025-06\n{OTHER.hex()}\n\n{SECRET.hex()}\n")
    ring = ClusterKey.load(path)
    old_blob = seal(ClusterKey(SECRET), b"old", b"aad")
    new_blob = seal(ring, b"new", b"aad")
    assert open_sealed(ring, old_blob, b"aad") == b"old"  # the retired key still opens
    assert open_sealed(ClusterKey(OTHER), new_blob, b"aad") == b"new"  # the first one seals
    with pytest.raises(SealError, match="unknown key id"):
        open_sealed(ClusterKey(OTHER), old_blob, b"aad")  # once retired keys are dropped
    assert ClusterKey.from_text(ring.to_text()).to_text() == ring.to_text()


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "no key found"),
    (b"# only a comment\n", "no key found"),
    (b"abcd\n", "expected 64 hex digits, got 4 characters"),
    (b"zz" * 32, "expected 64 hex digits"),
    (SECRET + b"\n", "neither 32 raw bytes nor hex text"),
    (b"00" * 32, "all zeros"),
], ids=["empty", "comment-only", "short", "not-hex", "raw-plus-newline", "zeros"])
def test_bad_key_files_fail_with_one_line(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        ClusterKey.load(path)
    message = str(info.value)
    assert reason in message and str(path) in message and "\n" not in message


def test_missing_key_file_and_unset_variable_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        ClusterKey.load(tmp_path / "absent.key")
    with pytest.raises(ConfigError, match="IKE_TEST_UNSET_VARIABLE is not set"):
        ClusterKey.from_env("IKE_TEST_UNSET_VARIABLE", {})


def test_errors_and_repr_never_show_key_material(tmp_path: Path) -> None:
    wrong = SECRET.hex()[:-2]  # one byte short
    with pytest.raises(ConfigError) as info:
        ClusterKey.from_env("K", {"K": wrong})
    assert wrong not in str(info.value)
    assert SECRET.hex() not in repr(ClusterKey(SECRET)) and "key_id" in repr(ClusterKey(SECRET))


def test_derived_subkeys_differ_by_label_and_from_the_seal_key() -> None:
    key = ClusterKey(SECRET, OTHER)
    relay = key.derive(b"ike-cluster relay v1")
    assert relay == hkdf(SECRET, b"ike-cluster relay v1", 32)
    assert relay != key.derive(b"another use") and relay != hkdf(SECRET, b"ike-cluster seal v1", 32)
    assert key.derive_each(b"r") == (hkdf(SECRET, b"r", 32), hkdf(OTHER, b"r", 32))


# -- seal / open ---------------------------------------------------------------------------


def test_sealed_blob_layout_decrypts_with_the_documented_derivation() -> None:
    key = ClusterKey(SECRET)
    blob = seal(key, b"SK_ei bytes", b"identity")
    assert len(blob) == 1 + 12 + len(b"SK_ei bytes") + 16
    assert blob[0] == key.key_id == hkdf(SECRET, b"ike-cluster key id v1", 1)[0]
    aead = AESGCM(hkdf(SECRET, b"ike-cluster seal v1", 32))
    assert aead.decrypt(blob[1:13], blob[13:], blob[:1] + b"identity") == b"SK_ei bytes"


def test_seal_uses_a_fresh_nonce_each_time() -> None:
    key = ClusterKey(SECRET)
    blobs = {seal(key, b"same", b"aad") for _ in range(50)}
    assert len(blobs) == 50 and len({b[1:13] for b in blobs}) == 50


def test_every_flipped_byte_is_detected() -> None:
    key = ClusterKey(SECRET)
    blob = seal(key, b"a secret worth protecting", b"aad")
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(SealError):
            open_sealed(key, bytes(tampered), b"aad")


def test_aad_mismatch_wrong_key_and_truncation_are_detected() -> None:
    key = ClusterKey(SECRET)
    blob = seal(key, b"secret", b"spi-a")
    with pytest.raises(SealError, match="failed authentication"):
        open_sealed(key, blob, b"spi-b")
    with pytest.raises(SealError):
        open_sealed(ClusterKey(OTHER), blob, b"spi-a")
    for cut in (0, 1, 28, len(blob) - 1):
        with pytest.raises(SealError):
            open_sealed(key, blob[:cut], b"spi-a")
    assert issubclass(SealError, StoreError)


def test_keys_sharing_an_id_are_each_tried() -> None:
    # Find two secrets whose derived ids collide (1 in 256), so the ring has to try both.
    first_id = ClusterKey(SECRET).key_id
    other = next(s for s in (os.urandom(32) for _ in range(100_000))
                 if ClusterKey(s).key_id == first_id)
    ring = ClusterKey(other, SECRET)
    assert open_sealed(ring, seal(ClusterKey(SECRET), b"x", b""), b"") == b"x"
    assert open_sealed(ring, seal(ring, b"y", b""), b"") == b"y"


# -- sealed fields -------------------------------------------------------------------------

RECORD = {
    "schema": 3,
    "spi_i": b"\x11" * 8,
    "spi_r": b"\x22" * 8,
    "message_id": 7,
    "sk_ei": b"\xa1" * 32,
    "sk_er": b"\xa2" * 32,
    "children": [{"spi_in": b"\x01\x02\x03\x04", "key_in": b"\xb1" * 36}],
}
SECRETS = {"sk_ei", "sk_er", "children"}
AAD = RECORD["spi_i"] + RECORD["spi_r"]  # type: ignore[operator]


def test_seal_fields_round_trip_and_only_secret_fields_change() -> None:
    key = ClusterKey(SECRET)
    sealed = seal_fields(RECORD, SECRETS | {"absent"}, key, AAD)
    assert {k: sealed[k] for k in RECORD if k not in SECRETS} == {
        k: RECORD[k] for k in RECORD if k not in SECRETS}
    assert all(isinstance(sealed[k], bytes) and sealed[k] != RECORD[k] for k in SECRETS)
    packed = msgpack.packb(sealed, use_bin_type=True)
    for secret in (b"\xa1" * 32, b"\xa2" * 32, b"\xb1" * 36):
        assert secret not in packed
    assert open_fields(sealed, SECRETS, key, AAD) == RECORD


def test_a_sealed_field_cannot_move_to_another_field_or_record() -> None:
    key = ClusterKey(SECRET)
    sealed = seal_fields(RECORD, SECRETS, key, AAD)
    swapped = {**sealed, "sk_ei": sealed["sk_er"], "sk_er": sealed["sk_ei"]}
    with pytest.raises(SealError):
        open_fields(swapped, SECRETS, key, AAD)
    with pytest.raises(SealError):
        open_fields(sealed, SECRETS, key, b"\x33" * 16)  # another SA's identity
    with pytest.raises(SealError, match="not sealed"):
        open_fields({**sealed, "sk_ei": 5}, SECRETS, key, AAD)


# -- sealed snapshots ----------------------------------------------------------------------


def test_snapshot_round_trip_hides_secrets_and_shows_clear_fields() -> None:
    key = ClusterKey(SECRET)
    blob = pack_snapshot(RECORD, SECRETS, key, AAD)
    assert unpack_snapshot(blob, key, AAD) == RECORD
    for secret in (b"\xa1" * 32, b"\xa2" * 32, b"\xb1" * 36):
        assert secret not in blob
    assert peek_snapshot(blob) == {k: v for k, v in RECORD.items() if k not in SECRETS}


def test_snapshot_clear_part_is_authenticated_too() -> None:
    key = ClusterKey(SECRET)
    blob = pack_snapshot(RECORD, SECRETS, key, AAD)
    version, _, sealed = msgpack.unpackb(blob)
    forged_clear = msgpack.packb({**peek_snapshot(blob), "message_id": 8}, use_bin_type=True)
    forged = msgpack.packb([version, forged_clear, sealed], use_bin_type=True)
    assert peek_snapshot(forged)["message_id"] == 8  # peek cannot tell...
    with pytest.raises(SealError):
        unpack_snapshot(forged, key, AAD)  # ...unpack can
    with pytest.raises(SealError):
        unpack_snapshot(blob, key, b"\x33" * 16)
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x40
        with pytest.raises(SealError):
            unpack_snapshot(bytes(tampered), key, AAD)


@given(st.binary(max_size=300))
@example(b"\x81\x90\x00")  # a map whose key is a list: msgpack's TypeError, not a ValueError
def test_snapshot_decoding_raises_only_seal_error(data: bytes) -> None:
    key = ClusterKey(SECRET)
    with contextlib.suppress(SealError):
        unpack_snapshot(data, key, AAD)
    with contextlib.suppress(SealError):
        peek_snapshot(data)


@given(st.lists(st.binary(max_size=40), max_size=3), st.integers(-(2**63), 2**64 - 1),
       st.binary(max_size=40))
def test_well_formed_envelopes_with_wrong_contents_raise_only_seal_error(
        parts: list[bytes], version: int, clear: bytes) -> None:
    key = ClusterKey(SECRET)
    for envelope in (parts, [version, clear, b"\x00" * 40], [1, msgpack.packb([1, 2]), b""]):
        blob = msgpack.packb(envelope, use_bin_type=True)
        with pytest.raises(SealError):
            unpack_snapshot(blob, key, AAD)
