"""`python -m cluster run` in a subprocess: signals end it cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .conftest import free_port_pair, initiator_settings, write_responder_config
from .initiator_peer import InitiatorPeer

ROOT = Path(__file__).resolve().parents[2]


async def read_until(stream: trio.abc.ReceiveStream, text: bytes, log: bytearray) -> None:
    while text not in log:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended before {text!r}:\n{log.decode()}")
        log += chunk


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_the_node_gracefully(tmp_path: Path, signum: signal.Signals) -> None:
    ike_port, natt_port = free_port_pair()
    path = write_responder_config(tmp_path, ("127.0.0.1", "::1"), ike_port, natt_port)
    connection, policy = initiator_settings(tmp_path)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "cluster", "run", "--config", str(path)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    log = bytearray()
    try:
        with trio.fail_after(30):
            await read_until(proc.stderr, b"listening on", log)
        peer = await InitiatorPeer.open(("127.0.0.1", ike_port), natt_port, connection, policy)
        try:
            event = await peer.establish()
        finally:
            peer.close()
        with trio.fail_after(10):
            await read_until(proc.stderr, event.spi_r.hex().encode(), log)
        proc.send_signal(signum)
        with trio.fail_after(15):
            await read_until(proc.stderr, b"stopped", log)
            status = await proc.wait()
            while chunk := await proc.stderr.receive_some():
                log += chunk
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.decode()
    assert status == 0, text
    assert f"{signum.name} received" in text
    assert "ike_sas_established=1" in text
    assert "Traceback" not in text
    # The sockets are closed: every port binds again.
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        for port in (ike_port, natt_port):
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((host, port))


async def test_bind_failure_is_one_line_and_exit_status_1(tmp_path: Path) -> None:
    ike_port, natt_port = free_port_pair()
    path = write_responder_config(tmp_path, ("127.0.0.1",), ike_port, natt_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", natt_port))
        result = await trio.run_process(
            [sys.executable, "-m", "cluster", "run", "--config", str(path)],
            cwd=ROOT,
            capture_stderr=True,
            check=False,
        )
    text = result.stderr.decode()
    assert result.returncode == 1, text
    assert f"cannot bind UDP 127.0.0.1 port {natt_port}" in text
    assert "Traceback" not in text
