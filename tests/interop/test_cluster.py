"""The cluster with a real peer (issue 5): strongSwan initiates through a worker to three
responders sharing Redis; responders die and SAs carry on.

The topology is docker/compose.yml's, as processes in namespaces (tests/interop/cluster_lab.py).
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest

from tests.interop.cluster_lab import ClusterLab
from tests.interop.lab import INITIATOR_INNER_V4, RESPONDER_INNER_V4, Lab, conn_pair
from tests.interop.sa_checks import assert_initiated, child_sa
from tests.interop.test_lifecycle import BackgroundPing, ping, report

pytestmark = pytest.mark.interop


def _owner(cluster: ClusterLab, spi_r: str) -> int:
    """Which responder (1-based) logged the SA's establishment."""
    for n, node in enumerate(cluster.responders, 1):
        if re.search(rf"IKE SA established: .* spi_r={spi_r}", node.log_text()):
            return n
    raise AssertionError(f"no responder established {spi_r}:\n{cluster.logs()}")


def test_strongswan_sa_survives_the_death_of_its_responder(tmp_path: object) -> None:
    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        initiator = replace(initiator, dpd_delay="2s")
        responder = replace(responder, dpd_delay="2s")
        cluster.start([responder])
        charon = lab.charon("initiator")
        charon.load(initiator)
        sa = assert_initiated(charon.initiate("net"), charon)
        spi_i, spi_r = sa["initiator-spi"], sa["responder-spi"]
        assert child_sa(sa)["state"] == "INSTALLED"
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"ping through the cluster lost packets:\n{out}\n{cluster.logs()}"
        owner = _owner(cluster, spi_r)
        report("cluster", f"SA {spi_i}_i/{spi_r}_r owned by responder-{owner}")

        pinging = BackgroundPing.start(lab, 12.0)
        time.sleep(1.0)
        cluster.responders[owner - 1].kill()
        while pinging.running():
            time.sleep(0.2)
        sent, received, summary = pinging.result()
        # another responder took the SA over and answered strongSwan's DPD
        deadline = time.monotonic() + 20
        survivors = [n for n in cluster.responders if n.running()]
        while not any("took over IKE SA" in n.log_text() for n in survivors):
            assert time.monotonic() < deadline, f"no takeover:\n{cluster.logs()}"
            time.sleep(0.5)
        sas = charon.list_sas()
        assert len(sas) == 1, sas
        now = sas[0]
        assert now["state"] == "ESTABLISHED"
        assert (now["initiator-spi"], now["responder-spi"]) == (spi_i, spi_r)
        assert received == sent, f"ping lost packets across the failover: {summary}"
        assert charon.log_text().count("IKE_AUTH request") <= 1
        report("cluster", f"after kill -9: {summary}")
