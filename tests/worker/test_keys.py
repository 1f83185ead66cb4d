"""From a Child SA's install request to the data plane's limits: swanctl's per-child
volume limits (rekey_bytes, life_bytes, rekey_packets, life_packets, with the random
part rand_bytes / rand_packets) with [worker]'s lifetime_bytes / lifetime_packets, the
lower of each winning."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.ike.events import TFC_MTU, ChildSaEstablished
from cluster.ike.policy import VolumeLimits
from cluster.worker.keys import Limits, params_from_event
from tests.ike.sessions import child, drain, psk_connection, psk_pair, run_handshake


def established(volume: VolumeLimits) -> ChildSaEstablished:
    """The gateway's install request for a Child SA of a child with `volume`."""
    client, gateway = psk_pair(psk_connection(children=(replace(child(), volume=volume),)))
    run_handshake(client, gateway)
    (event,) = [e for e in drain(gateway) if isinstance(e, ChildSaEstablished)]
    return event


@pytest.mark.parametrize(("volume", "limits", "expected"), [
    # (soft, hard) bytes, then packets
    (VolumeLimits(), Limits(), (None, None, None, None)),
    (VolumeLimits(), Limits(hard_bytes=1000, hard_packets=50), (900, 1000, 45, 50)),
    (VolumeLimits(5000, 5500, 200, 0), Limits(), (5000, 5500, 200, None)),
    (VolumeLimits(0, 700, 0, 0), Limits(), (None, 700, None, None)),
    # the lower of each, and a soft limit kept below the hard one
    (VolumeLimits(5000, 5500), Limits(hard_bytes=1000), (900, 1000, None, None)),
    (VolumeLimits(800, 20000), Limits(hard_bytes=1000), (800, 1000, None, None)),
    (VolumeLimits(0, 600), Limits(hard_bytes=1000), (540, 600, None, None)),
])
def test_the_childs_volume_limits_and_the_workers_give_the_lower_of_each(
        volume: VolumeLimits, limits: Limits, expected: tuple[int | None, ...]) -> None:
    event = established(volume)
    assert event.volume == volume.for_child(0.0)  # no rand_*: nothing random
    params = params_from_event(event, limits)
    assert (params.soft_bytes, params.hard_bytes, params.soft_packets,
            params.hard_packets) == expected


def test_the_childs_replay_window_wins_over_the_workers() -> None:
    client, gateway = psk_pair(psk_connection(children=(replace(child(), replay_window=64),)))
    run_handshake(client, gateway)
    (event,) = [e for e in drain(gateway) if isinstance(e, ChildSaEstablished)]
    assert event.replay_window == 64
    assert params_from_event(event, Limits(replay_window=4096)).replay_window == 64
    unset = replace(event, replay_window=0)
    assert params_from_event(unset, Limits(replay_window=4096)).replay_window == 4096


def test_tfc_padding_mtu_is_the_data_planes_mtu() -> None:
    client, gateway = psk_pair(psk_connection(children=(replace(child(), tfc_padding=TFC_MTU),)))
    run_handshake(client, gateway)
    (event,) = [e for e in drain(gateway) if isinstance(e, ChildSaEstablished)]
    assert params_from_event(event, Limits(mtu=1300)).tfc_padding == 1300
    assert params_from_event(replace(event, tfc_padding=900)).tfc_padding == 900


def test_each_child_sa_rekeys_a_random_part_of_rand_earlier() -> None:
    """swanctl's rand_bytes / rand_packets: each Child SA's rekey limits lose their own
    random part of them (taken from its SPI, so the same whenever its install request is
    made again); the life limits stay."""
    volume = VolumeLimits(1_000_000, 1_100_000, 5000, 6000, 100_000, 1000)
    events = [established(volume) for _ in range(6)]
    for event in events:
        rekey_bytes, life_bytes, rekey_packets, life_packets = event.volume
        part = int.from_bytes(event.spi_in, "big") / 2**32
        assert rekey_bytes == 1_000_000 - int(100_000 * part)
        assert rekey_packets == 5000 - int(1000 * part)
        assert (life_bytes, life_packets) == (1_100_000, 6000)
        params = params_from_event(event, Limits())
        assert (params.soft_bytes, params.hard_bytes) == (rekey_bytes, 1_100_000)
    assert len({event.volume for event in events}) > 1
