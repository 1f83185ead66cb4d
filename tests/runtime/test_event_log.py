"""The node's one log line per IKE event: what an operator reads, never a key."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from cluster.ike.events import ChildSaEstablished, IkeSaMoved
from cluster.ike.traffic_selectors import TrafficSelector
from cluster.runtime.node import log_event
from cluster.transforms import ENCR_ALGORITHMS, INTEG_ALGORITHMS

KEYS = (b"\x11" * 16, b"\x22" * 32, b"\x33" * 16, b"\x44" * 32)


def established(encr: str, integ: str | None, *, esn: bool, encap: bool) -> ChildSaEstablished:
    return ChildSaEstablished(
        ike_spi_i=bytes(range(8)), ike_spi_r=bytes(range(8, 16)), name="net",
        mode="tunnel", spi_in=b"\xc0\x00\x00\x01", spi_out=b"\xc1\x00\x00\x02",
        encr=ENCR_ALGORITHMS[encr], integ=INTEG_ALGORITHMS[integ] if integ else None,
        esn=esn, encr_key_in=KEYS[0], integ_key_in=KEYS[1], encr_key_out=KEYS[2],
        integ_key_out=KEYS[3], encap=encap,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("encr", "integ", "esn", "encap", "tail"),
    [
        ("aes256gcm16", None, False, True, "esp=aes256gcm16 mode=tunnel encap"),
        ("aes128", "sha256", True, False, "esp=aes128-sha256-esn mode=tunnel"),
    ],
)  # fmt: skip
def test_child_sa_established_names_its_transforms_and_no_key(
    caplog: pytest.LogCaptureFixture, encr: str, integ: str | None, esn: bool, encap: bool,
    tail: str,
) -> None:
    caplog.set_level(logging.INFO)
    log_event(established(encr, integ, esn=esn, encap=encap))
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == ("CHILD SA established: net in IKE SA 0001020304050607_i/"
                    f"08090a0b0c0d0e0f_r spi_in=c0000001 spi_out=c1000002 {tail}")
    for key in KEYS:
        assert key.hex() not in line and key.hex()[:8] not in line


def test_child_sa_established_names_its_selectors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    local = (TrafficSelector.from_network("10.99.2.0/24"),
             TrafficSelector.from_network("fd99:2::/64", 6, 443, 443))
    log_event(replace(established("aes256gcm16", None, esn=False, encap=False),
                      local_ts=local, remote_ts=(TrafficSelector.for_host("10.99.3.1"),)))
    (line,) = [r.getMessage() for r in caplog.records]
    assert " spi_out=c1000002 ts=10.99.2.0/24,fd99:2::/64[6/443]===10.99.3.1/32 esp=" in line


def test_a_nat_move_names_the_peers_new_address(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log_event(IkeSaMoved(bytes(range(8)), bytes(range(8, 16)), ("10.99.0.2", 4500),
                         ("198.51.100.7", 44501)))
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == ("IKE SA moved: spi_i=0001020304050607 spi_r=08090a0b0c0d0e0f "
                    "peer=198.51.100.7:44501 local=10.99.0.2:4500 (NAT mapping changed)")
