"""The anti-replay window (RFC 4303 3.4.3) and ESN inference (Appendix A2), on their own
and through the SA: duplicates, too old, sliding, high-bits changes, window sizes."""

from __future__ import annotations

import pytest

from cluster.esp import EspDrop, ReplayWindow, Sad
from tests.esp.pairs import pair, params, seal, trailer

INNER = bytes.fromhex("45000018000000004011") + bytes(2) + bytes([10, 99, 1, 5]) \
    + bytes([10, 99, 2, 7]) + bytes(4)


def accept(window: ReplayWindow, seq: int) -> bool:
    """Receive `seq` as the SA does: check, then (ICV fine) update."""
    if not window.check(seq):
        return False
    window.update(seq)
    return True


@pytest.mark.parametrize("size", [1, 37, 64, 1024])
def test_window_edges(size: int) -> None:
    w = ReplayWindow(size)
    assert not accept(w, 0)  # never sent
    assert accept(w, 1)
    assert not accept(w, 1)  # duplicate
    assert accept(w, 5000)
    assert not accept(w, 5000)
    assert not accept(w, 5000 - size)  # just below the window: too old
    if size > 1:
        assert accept(w, 5000 - size + 1)  # the window's lowest slot, unseen
        assert not accept(w, 5000 - size + 1)
        assert accept(w, 4999)
    else:
        assert not accept(w, 4999)  # a window of one accepts only increasing numbers
    assert accept(w, 5001)


@pytest.mark.parametrize("size", [1, 37, 1024])
def test_window_slides_and_keeps_what_it_saw(size: int) -> None:
    w = ReplayWindow(size)
    seen: set[int] = set()
    for seq in [10, 12, 11, 15, 13, 14, 20, 17, 19, 18]:
        expected = seq > (max(seen) if seen else 0) - size and seq not in seen
        assert accept(w, seq) == expected, seq
        if expected:
            seen.add(seq)
    # slide exactly by the window size: everything older falls out
    top = w.top
    assert accept(w, top + size)
    assert w.bitmap == 1
    assert not accept(w, top)
    assert w.bitmap.bit_length() <= size


def test_window_bitmap_stays_bounded_after_large_jumps() -> None:
    w = ReplayWindow(37)
    for seq in (1, 2, 3, 1 << 20, (1 << 20) + 5, (1 << 31) + 9):
        assert accept(w, seq)
        assert w.bitmap.bit_length() <= 37


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(0)


@pytest.mark.parametrize("size", [1, 37, 1024])
def test_esn_inference_case_a(size: int) -> None:
    """A2.1 case A: the window lies within one 2^32 subspace (Tl >= W - 1)."""
    w = ReplayWindow(size, esn=True)
    w.top = (7 << 32) + 5000
    bottom = 5000 - size + 1
    assert w.infer(5001) == (7 << 32) + 5001
    assert w.infer(0xFFFFFFFF) == (7 << 32) + 0xFFFFFFFF
    assert w.infer(bottom) == (7 << 32) + bottom
    # below the window the low half must have wrapped: the next subspace
    assert w.infer(bottom - 1) == (8 << 32) + bottom - 1


@pytest.mark.parametrize("size", [37, 1024])
def test_esn_inference_case_b(size: int) -> None:
    """A2.1 case B: the window reaches back into the previous subspace (Tl < W - 1)."""
    w = ReplayWindow(size, esn=True)
    w.top = (7 << 32) + 2
    wrapped_bottom = (1 << 32) + 2 - size + 1
    assert w.infer(0xFFFFFFFF) == (6 << 32) + 0xFFFFFFFF
    assert w.infer(wrapped_bottom) == (6 << 32) + wrapped_bottom
    assert w.infer(wrapped_bottom - 1) == (7 << 32) + wrapped_bottom - 1
    assert w.infer(1) == (7 << 32) + 1
    assert w.infer(2000) == (7 << 32) + 2000


def test_esn_inference_at_the_start_never_goes_below_zero() -> None:
    w = ReplayWindow(1024, esn=True)
    assert w.infer((1 << 32) - 5) == -1  # would be subspace -1
    assert not w.check(-1)
    assert w.infer(1) == 1


def test_esn_inference_never_passes_two_to_the_64() -> None:
    w = ReplayWindow(64, esn=True)
    w.top = (1 << 64) - 2
    assert w.infer(0xFFFFFFFF) == (1 << 64) - 1
    assert w.infer(5) == -1  # would be 2^64 + 5


# --- through the SA -------------------------------------------------------------------


def _sa_pair(window: int = 1024, esn: bool = False, initial_seq: int = 0) -> tuple[Sad, Sad]:
    p = params(esn=esn, initial_seq=initial_seq)
    a, b = pair(p, replay_window=window)
    receiver = b.get(p.spi_out)
    assert receiver is not None
    receiver.inbound.replay.top = initial_seq  # as if everything before had arrived
    return a, b


def _send(a: Sad, count: int) -> list[bytes]:
    sa = a.outbound_for(INNER)
    assert sa is not None
    return [sa.encapsulate(INNER) for _ in range(count)]


def _reason(b: Sad, esp: bytes) -> str:
    with pytest.raises(EspDrop) as drop:
        b.decapsulate_untrusted(esp)
    return drop.value.reason


def test_duplicate_and_too_old_are_counted_as_replays() -> None:
    a, b = _sa_pair(window=32)
    packets = _send(a, 40)
    assert b.decapsulate_untrusted(packets[0]) == INNER
    assert _reason(b, packets[0]) == "replay_drops"  # duplicate
    assert b.decapsulate_untrusted(packets[39]) == INNER  # seq 40: slides the window
    assert _reason(b, packets[1]) == "replay_drops"  # seq 2 < 40 - 32 + 1: too old
    assert b.decapsulate_untrusted(packets[8]) == INNER  # seq 9: lowest slot, unseen
    assert _reason(b, packets[8]) == "replay_drops"
    for esp in packets[9:39]:  # out of order but inside the window, each once
        assert b.decapsulate_untrusted(esp) == INNER
    totals = b.totals()
    assert totals.replay_drops == 3 and totals.packets_in == 33
    assert totals.integrity_failures == 0


def test_replay_check_comes_before_the_icv() -> None:
    """A replayed packet with a broken ICV is rejected as a replay: no crypto spent."""
    a, b = _sa_pair()
    esp = _send(a, 1)[0]
    b.decapsulate_untrusted(esp)
    broken = esp[:-1] + bytes([esp[-1] ^ 1])
    assert _reason(b, broken) == "replay_drops"
    assert b.totals().integrity_failures == 0


def test_window_moves_only_after_the_icv_verified() -> None:
    a, b = _sa_pair()
    packets = _send(a, 3000)
    forged = packets[2999][:-1] + bytes([packets[2999][-1] ^ 0x80])
    assert _reason(b, forged) == "integrity_failures"
    receiver = b.get(params().spi_out)
    assert receiver is not None and receiver.inbound.replay.top == 0
    assert b.decapsulate_untrusted(packets[0]) == INNER  # seq 1 is not "too old"
    assert b.decapsulate_untrusted(packets[2999]) == INNER


@pytest.mark.parametrize("window", [1, 37, 1024])
def test_esn_high_bits_change_across_the_32_bit_boundary(window: int) -> None:
    start = (3 << 32) - 3  # two packets before the low half wraps, six after
    a, b = _sa_pair(window=window, esn=True, initial_seq=start)
    packets = _send(a, 8)
    for esp in packets:
        assert b.decapsulate_untrusted(esp) == INNER
    receiver = b.get(params().spi_out)
    assert receiver is not None and receiver.inbound.replay.top == start + 8
    assert receiver.inbound.replay.top >> 32 == 3  # high half moved from 2 to 3
    # a window reaching back over the boundary (case B) knows every one as a replay; a
    # window of one places any low half below its top in the next subspace, where the
    # ICV then fails (A2.2): dropped either way, only the counter differs
    for esp in packets[:-1]:
        assert _reason(b, esp) == ("integrity_failures" if window == 1 else "replay_drops")
    assert _reason(b, packets[-1]) == "replay_drops"


def test_esn_late_packet_from_the_previous_subspace() -> None:
    start = (5 << 32) - 4
    a, b = _sa_pair(window=64, esn=True, initial_seq=start)
    packets = _send(a, 10)  # seq 2^32*5 - 3 .. 2^32*5 + 6
    for esp in packets[4:]:
        assert b.decapsulate_untrusted(esp) == INNER
    # the first four (high half 4) arrive late: case B infers the previous subspace
    for esp in packets[:4]:
        assert b.decapsulate_untrusted(esp) == INNER
    assert b.totals().packets_in == 10


def test_without_esn_the_window_works_near_two_to_the_32() -> None:
    start = (1 << 32) - 10
    a, b = _sa_pair(window=1024, initial_seq=start)
    packets = _send(a, 9)
    for esp in reversed(packets):
        assert b.decapsulate_untrusted(esp) == INNER


def test_crafted_sequence_zero_is_rejected() -> None:
    p = params()
    _, b = pair(p)
    esp = seal(p, 0, INNER + trailer(len(INNER), 4))
    assert _reason(b, esp) == "replay_drops"
    assert b.decapsulate_untrusted(seal(p, 1, INNER + trailer(len(INNER), 4))) == INNER
