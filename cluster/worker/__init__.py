"""The worker: the edge and data plane (layer 4, beside `cluster.runtime`, never importing it).

`tun` opens the TUN device, `routing` steers traffic into it without looping the
worker's own ESP back, `sockets` holds the raw ESP sockets. The pumps that join them
to the sans-IO ESP core live in `dataplane`.

The I/O counters live here so every module of the package can count into one object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class IoCounters:
    """Per-worker I/O counters: plain integers, cheap on the hot path, read by the metrics."""

    tun_read_packets: int = 0
    tun_read_bytes: int = 0
    tun_write_packets: int = 0
    tun_write_bytes: int = 0
    tun_write_errors: int = 0
    esp_sent_packets: int = 0
    esp_sent_bytes: int = 0
    esp_send_errors: int = 0
    esp_received_packets: int = 0
    esp_received_bytes: int = 0
    # Datagrams from a raw socket too short or not IPv4 where the kernel promised it.
    esp_receive_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
