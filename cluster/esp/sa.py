"""One Child SA in the data plane: both halves, shared counters, lifetime state."""

from __future__ import annotations

import functools
from collections.abc import Callable

from ..wire import packed_address
from .ciphers import (
    check_keys,
    make_aead,
    make_cbc_decryptor,
    make_cbc_encryptor,
    make_hmac,
)
from .counters import SaCounters
from .events import EspEvent, SaHardExpired, SaSequenceExhausted, SaSoftExpired
from .inbound import AeadInbound, CbcInbound, InboundSa
from .outbound import AeadOutbound, CbcOutbound, OutboundSa
from .params import ChildSaParams
from .selector import Selector, SelectorSet


def _ignore_event(event: EspEvent) -> None:
    pass


def _no_detach(child: ChildSa) -> None:
    pass


# Many Child SAs share selectors (one subnet): compiled once each, not once per SA
# (an install is on the IKE setup path).
@functools.lru_cache(maxsize=1024)
def _selector_set(selectors: tuple[Selector, ...]) -> SelectorSet:
    return SelectorSet(selectors)  # immutable once built: shared by the SAs that use it


class ChildSa:
    """Built from ChildSaParams; raises ValueError when they cannot work.

    `emit` receives the SA's events (the SAD queues them); `detach` is called when a
    hard lifetime removes the SA, so the SAD forgets it.
    """

    __slots__ = ("_detach", "_emit", "address_only", "counters", "inbound", "local_selectors",
                 "outbound",
                 "params", "remote_selectors", "removed", "retiring", "soft_expired")

    def __init__(self, params: ChildSaParams,
                 emit: Callable[[EspEvent], None] = _ignore_event,
                 detach: Callable[[ChildSa], None] = _no_detach) -> None:
        if params.mode not in ("tunnel", "transport"):
            raise ValueError(f"unknown mode {params.mode!r}")
        if len(params.spi_in) != 4 or len(params.spi_out) != 4:
            raise ValueError("ESP SPIs are 4 bytes")
        if params.initial_seq < 0:
            raise ValueError("initial_seq is negative")
        check_keys(params.encr, params.integ, params.encr_key_in, params.integ_key_in)
        check_keys(params.encr, params.integ, params.encr_key_out, params.integ_key_out)
        local_ip = packed_address(params.local[0])
        remote_ip = packed_address(params.remote[0])
        if len(local_ip) != len(remote_ip):
            raise ValueError("local and remote addresses are of different families")
        if params.mode == "tunnel":
            if not params.local_ts or not params.remote_ts:
                raise ValueError("a tunnel-mode SA needs local and remote selectors")
            local = _selector_set(params.local_ts)
            remote = _selector_set(params.remote_ts)
        else:
            # transport mode: the packets carry the SA's own addresses, whatever private
            # addresses the selectors name behind a NAT; keep their protocol and ports
            local = _on_host(params.local_ts, local_ip)
            remote = _on_host(params.remote_ts, remote_ip)

        self.params = params
        self.counters = SaCounters()
        self.soft_expired = False
        self.retiring = False  # replaced by a rekey: receives, sends nothing new
        self.removed = False
        self._emit = emit
        self._detach = detach
        self.inbound: InboundSa
        self.outbound: OutboundSa
        encr, integ = params.encr, params.integ
        if encr.aead:
            aead, salt = make_aead(encr, params.encr_key_in)
            self.inbound = AeadInbound(self, params, local_ip, remote_ip, local, remote,
                                       aead, salt)
            aead, salt = make_aead(encr, params.encr_key_out)
            self.outbound = AeadOutbound(self, params, local_ip, remote_ip, aead, salt)
        else:
            assert integ is not None  # check_keys
            key_len = encr.key_bits // 8
            self.inbound = CbcInbound(
                self, params, local_ip, remote_ip, local, remote,
                make_cbc_decryptor(encr, params.encr_key_in[:key_len]),
                make_hmac(integ, params.integ_key_in), integ.icv_size)
            self.outbound = CbcOutbound(
                self, params, local_ip, remote_ip,
                make_cbc_encryptor(encr, params.encr_key_out[:key_len]),
                make_hmac(integ, params.integ_key_out), integ.icv_size)
        # what outbound packets must match (transport mode: on the SA's own addresses)
        self.local_selectors = local
        self.remote_selectors = remote
        self.address_only = local.address_only and remote.address_only

    @property
    def spi_in(self) -> bytes:
        return self.params.spi_in

    @property
    def spi_out(self) -> bytes:
        return self.params.spi_out

    def covers_outbound(self, version: int, src: bytes, dst: bytes, protocol: int,
                        sport: int, dport: int) -> bool:
        return (self.remote_selectors.covers(version, dst, protocol, dport)
                and self.local_selectors.covers(version, src, protocol, sport))

    # --- lifetime events (called by the halves, off the fast path) ---------------------

    def soft_expire(self, reason: str) -> None:
        if self.soft_expired:
            return
        self.soft_expired = True
        if not (self.retiring or self.removed):
            self._emit(SaSoftExpired(self.spi_in, self.spi_out, reason))
        self.inbound.rearm()
        self.outbound.rearm()

    def hard_expire(self, reason: str) -> None:
        if self.removed:
            return
        self.close()
        self._emit(SaHardExpired(self.spi_in, self.spi_out, reason))
        self._detach(self)

    def sequence_exhausted(self) -> None:
        self._emit(SaSequenceExhausted(self.spi_in, self.spi_out))

    def close(self) -> None:
        """Both halves refuse every packet from now on."""
        self.removed = True
        self.inbound.close()
        self.outbound.close()


def _on_host(selectors: tuple[Selector, ...], address: bytes) -> SelectorSet:
    if not selectors:
        return SelectorSet([Selector.from_range(address, address)])
    version = 4 if len(address) == 4 else 6
    same_family = [s.with_address(address) for s in selectors if s.version == version]
    if not same_family:
        raise ValueError("no transport-mode selector matches the SA's address family")
    return SelectorSet(same_family)
