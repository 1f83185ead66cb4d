"""From the responder's Child SA events to the data plane's install requests.

This is the explicit key-install interface between control and data plane: the
single node calls it in-process; the cluster issue carries the same requests over Redis.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..esp import ChildSaParams, Selector
from ..ike.events import TFC_MTU, ChildSaEstablished
from ..ike.traffic_selectors import TrafficSelector


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-SA lifetime limits the worker applies (hard; soft at 90 %)."""

    replay_window: int = 1024
    hard_bytes: int | None = None
    hard_packets: int | None = None
    mtu: int = 1400  # the TUN's: what tfc_padding = "mtu" pads to


@functools.lru_cache(maxsize=1024)  # SAs of one subnet share their selectors
def _selector(ts: TrafficSelector) -> Selector:
    return Selector.from_range(ts.start_addr, ts.end_addr, ts.protocol, ts.start_port,
                               ts.end_port)


def selectors(ts: tuple[TrafficSelector, ...]) -> tuple[Selector, ...]:
    """The data plane's form of traffic selectors."""
    return tuple(_selector(t) for t in ts)


def _soft(limit: int | None) -> int | None:
    return None if limit is None else limit - limit // 10


def _limits(worker_hard: int | None, rekey: int, life: int) -> tuple[int | None, int | None]:
    """(soft, hard) from the worker's hard limit (soft at 90 %) and the child's rekey_*
    and life_* (0: none): the lower of each; a soft limit never at or above the hard one."""
    hard = min((v for v in (worker_hard, life or None) if v is not None), default=None)
    soft = min((v for v in (_soft(worker_hard), rekey or None) if v is not None), default=None)
    if soft is not None and hard is not None and soft >= hard:
        soft = _soft(hard)
    return soft, hard


def params_from_event(event: ChildSaEstablished, limits: Limits = Limits()) -> ChildSaParams:
    rekey_bytes, life_bytes, rekey_packets, life_packets = event.volume
    soft_bytes, hard_bytes = _limits(limits.hard_bytes, rekey_bytes, life_bytes)
    soft_packets, hard_packets = _limits(limits.hard_packets, rekey_packets, life_packets)
    return ChildSaParams(
        spi_in=event.spi_in,
        spi_out=event.spi_out,
        encr=event.encr,
        integ=event.integ,
        esn=event.esn,
        encr_key_in=event.encr_key_in,
        integ_key_in=event.integ_key_in,
        encr_key_out=event.encr_key_out,
        integ_key_out=event.integ_key_out,
        mode=event.mode,
        local=event.local,
        remote=event.remote,
        encap=event.encap,
        copy_dscp=event.copy_dscp,
        copy_ecn=event.copy_ecn,
        tfc_padding=limits.mtu if event.tfc_padding == TFC_MTU else event.tfc_padding,
        local_ts=selectors(event.local_ts),
        remote_ts=selectors(event.remote_ts),
        replay_window=event.replay_window or limits.replay_window,
        soft_bytes=soft_bytes,
        hard_bytes=hard_bytes,
        soft_packets=soft_packets,
        hard_packets=hard_packets,
    )
