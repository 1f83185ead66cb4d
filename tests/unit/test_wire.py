"""The byte cursor: short input raises only ParseError; pull_block enforces its length."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import ParseError
from cluster.wire import Buffer

PULLS: list[tuple[str, Callable[[Buffer], object], int]] = [
    ("uint8", Buffer.pull_uint8, 1),
    ("uint16", Buffer.pull_uint16, 2),
    ("uint32", Buffer.pull_uint32, 4),
    ("uint64", Buffer.pull_uint64, 8),
    ("bytes(5)", lambda b: b.pull_bytes(5), 5),
]


@pytest.mark.parametrize(("name", "pull", "size"), PULLS, ids=[p[0] for p in PULLS])
def test_every_pull_on_short_input_raises_parse_error(
    name: str, pull: Callable[[Buffer], object], size: int
) -> None:
    for available in range(size):
        buf = Buffer(bytes(range(available)))
        with pytest.raises(ParseError):
            pull(buf)
        assert buf.position == 0, f"{name}: a failed pull must not move the cursor"


def test_pulls_decode_big_endian_and_advance() -> None:
    buf = Buffer(bytes.fromhex("01" "0203" "04050607" "08090a0b0c0d0e0f" "aabb"))
    assert buf.pull_uint8() == 0x01
    assert buf.pull_uint16() == 0x0203
    assert buf.pull_uint32() == 0x04050607
    assert buf.pull_uint64() == 0x08090A0B0C0D0E0F
    assert buf.remaining == 2
    assert buf.pull_rest() == b"\xaa\xbb"
    assert buf.eof()
    with pytest.raises(ParseError):
        buf.pull_uint8()


def test_negative_length_is_a_parse_error() -> None:
    buf = Buffer(b"abc")
    with pytest.raises(ParseError):
        buf.pull_bytes(-1)
    with pytest.raises(ParseError), buf.pull_block(-1):
        pass


def test_pull_block_limits_reads_to_its_length() -> None:
    buf = Buffer(b"\x00\x01\x02\x03")
    with pytest.raises(ParseError), buf.pull_block(2):
        buf.pull_uint8()
        buf.pull_uint8()
        buf.pull_uint8()  # third byte lies outside the block


def test_pull_block_requires_full_consumption() -> None:
    buf = Buffer(b"\x00\x01\x02\x03")
    with pytest.raises(ParseError, match="trailing"), buf.pull_block(3):
        buf.pull_uint8()


def test_pull_block_longer_than_buffer_is_refused() -> None:
    buf = Buffer(b"\x00\x01")
    with pytest.raises(ParseError), buf.pull_block(3):
        pass


def test_pull_block_restores_the_outer_end() -> None:
    buf = Buffer(b"\x00\x01\x02\x03")
    with buf.pull_block(2):
        assert buf.remaining == 2
        buf.pull_uint16()
    assert buf.remaining == 2
    assert buf.pull_uint16() == 0x0203


def test_nested_blocks() -> None:
    buf = Buffer(bytes(range(6)))
    with buf.pull_block(5):
        buf.pull_uint8()
        with buf.pull_block(3):
            assert buf.pull_bytes(3) == b"\x01\x02\x03"
        assert buf.pull_uint8() == 4
    assert buf.pull_uint8() == 5


def test_push_and_patch_round_trip() -> None:
    out = Buffer()
    out.push_uint8(1)
    out.push_uint16(0)
    out.push_uint32(0xDEADBEEF)
    out.push_uint64(2**64 - 1)
    out.push_bytes(b"xy")
    out.patch_uint16(1, 0xBEEF)
    assert out.written() == 1 + 2 + 4 + 8 + 2
    back = Buffer(out.data())
    assert back.pull_uint8() == 1
    assert back.pull_uint16() == 0xBEEF
    assert back.pull_uint32() == 0xDEADBEEF
    assert back.pull_uint64() == 2**64 - 1
    assert back.pull_rest() == b"xy"


_OPS = st.lists(st.sampled_from(["u8", "u16", "u32", "u64", "bytes", "block", "rest"]),
                max_size=12)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.binary(max_size=24), ops=_OPS, sizes=st.lists(st.integers(-2, 30), min_size=12,
                                                             max_size=12))
def test_random_pulls_raise_only_parse_error(data: bytes, ops: list[str],
                                             sizes: list[int]) -> None:
    buf = Buffer(data)
    try:
        for op, n in zip(ops, sizes, strict=False):
            if op == "u8":
                buf.pull_uint8()
            elif op == "u16":
                buf.pull_uint16()
            elif op == "u32":
                buf.pull_uint32()
            elif op == "u64":
                buf.pull_uint64()
            elif op == "bytes":
                buf.pull_bytes(n)
            elif op == "rest":
                buf.pull_rest()
            else:
                with buf.pull_block(n):
                    buf.pull_bytes(max(n, 0))
    except ParseError:
        pass
    assert 0 <= buf.position <= len(data)
