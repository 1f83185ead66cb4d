"""The anti-replay sliding window (RFC 4303 3.4.3) with ESN inference (Appendix A2).

The bitmap is a Python int: bit i stands for sequence number `top - i`. Callers check
a number before the ICV (a cheap reject) and record it only once the ICV verified.
"""

from __future__ import annotations

_MAX_SEQ = (1 << 64) - 1


class ReplayWindow:
    __slots__ = ("bitmap", "esn", "mask", "size", "top")

    def __init__(self, size: int = 1024, esn: bool = False) -> None:
        if size < 1:
            raise ValueError("the replay window holds at least one packet")
        if not esn and size > 1 << 31:
            raise ValueError("the replay window must be smaller than half the sequence space")
        self.size = size
        self.esn = esn
        self.top = 0  # the highest authenticated sequence number (0: none yet)
        self.bitmap = 0
        self.mask = (1 << size) - 1

    def infer(self, seq_low: int) -> int:
        """The full sequence number of a received low 32 bits (RFC 4303 A2.1).

        Without ESN the wire value is the number. With ESN the high half is guessed so
        the number lands in or above the window; -1 means "below anything valid".
        """
        if not self.esn:
            return seq_low
        top = self.top
        top_low = top & 0xFFFFFFFF
        top_high = top >> 32
        bottom = top_low - self.size + 1
        if bottom >= 0:
            # Case A: the window lies within one 2^32 subspace
            high = top_high if seq_low >= bottom else top_high + 1
        else:
            # Case B: the window spans two subspaces
            high = top_high - 1 if seq_low >= bottom + (1 << 32) else top_high
        if high < 0:
            return -1
        seq = (high << 32) | seq_low
        return seq if seq <= _MAX_SEQ else -1

    def check(self, seq: int) -> bool:
        """Whether `seq` is new: above the window, or inside it and not seen yet."""
        if seq < 1:
            return False  # 0 is never sent; -1 is infer's "too old"
        top = self.top
        if seq > top:
            return True
        behind = top - seq
        if behind >= self.size:
            return False  # older than the window
        return not (self.bitmap >> behind) & 1

    def update(self, seq: int) -> None:
        """Record an authenticated `seq` (which passed check)."""
        top = self.top
        if seq > top:
            shift = seq - top
            self.bitmap = ((self.bitmap << shift) | 1) & self.mask if shift < self.size else 1
            self.top = seq
        else:
            self.bitmap |= 1 << (top - seq)
