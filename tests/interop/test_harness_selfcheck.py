"""The interop harness checked with strongSwan on both sides (no product code involved)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.interop.certs import Pki
from tests.interop.lab import (
    INITIATOR_ID,
    INITIATOR_INNER_V4,
    RESPONDER_ID,
    RESPONDER_INNER_V4,
    Lab,
    conn_pair,
)
from tests.interop.sa_checks import algorithm, assert_initiated, child_sa

pytestmark = pytest.mark.interop


# A TCP connect to a closed port is refused (RST) only if the peer is reachable.
PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=3)
except ConnectionRefusedError:
    print("reachable")
"""


def test_lab_namespaces_are_addressed_and_removed() -> None:
    with Lab() as lab:
        names = (lab.initiator.name, lab.responder.name)
        for address in ("10.99.0.2", "fd99::2"):
            probe = lab.initiator.run([sys.executable, "-c", PROBE, address], check=False)
            assert probe.stdout.strip() == "reachable", f"{address}: {probe.stderr}"
        assert f"{INITIATOR_INNER_V4}/32" in lab.initiator.ip("addr", "show", "dev", "lo")
        assert f"{RESPONDER_INNER_V4}/32" in lab.responder.ip("addr", "show", "dev", "lo")
        charon = lab.charon("responder")
        pid = charon.proc.pid if charon.proc else -1
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    assert charon.proc is not None and charon.proc.poll() is not None, f"charon {pid} still runs"


def test_strongswan_to_strongswan_psk(lab: Lab) -> None:
    initiator_conn, responder_conn = conn_pair()
    responder = lab.charon("responder")
    responder.load(responder_conn)
    initiator = lab.charon("initiator")
    initiator.load(initiator_conn)

    sa = assert_initiated(initiator.initiate("net"), initiator)

    assert sa["name"] == "rw"
    assert sa["local-id"] == INITIATOR_ID
    assert sa["remote-id"] == RESPONDER_ID
    assert sa["initiator"] == "yes"
    assert sa["dh-group"] == "CURVE_25519"
    assert algorithm(sa) == "AES_GCM_16-256"
    assert len(sa["initiator-spi"]) == 16 and len(sa["responder-spi"]) == 16
    child = child_sa(sa)
    assert child["state"] == "INSTALLED"
    assert child["mode"] == "TUNNEL"
    assert algorithm(child) == "AES_GCM_16-256"
    assert child["local-ts"] == ["10.99.1.0/24"]
    assert child["remote-ts"] == ["10.99.2.0/24"]
    # Both ends agree on the SPIs: the parse is not reading one side twice.
    (peer,) = responder.list_sas()
    assert peer["initiator-spi"] == sa["initiator-spi"]
    assert child_sa(peer)["spi-in"] == child["spi-out"]

    assert initiator.terminate_ike("rw").returncode == 0
    assert initiator.list_sas() == []


def test_strongswan_to_strongswan_ecdsa_certificates(lab: Lab, pki: Pki) -> None:
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa
    )
    responder = lab.charon("responder")
    responder.load(responder_conn)
    initiator = lab.charon("initiator")
    initiator.load(initiator_conn)

    sa = assert_initiated(initiator.initiate("net"), initiator)

    assert sa["remote-id"] == RESPONDER_ID
    assert child_sa(sa)["state"] == "INSTALLED"
    assert "authentication of 'gw.example.test' with ECDSA" in initiator.log_text()
