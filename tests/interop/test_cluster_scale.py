"""The cluster at scale and without its store (issue 5): 300 SAs from our own initiator
across three responders outlive one of them; Redis restarted under load costs no SA and
no packet when it comes back with its data (and, as yet, every SA when it comes back empty).

The topology is docker/compose.yml's, as processes in namespaces (tests/interop/cluster_lab.py);
the load is `tests/interop/ike_load.py`, our IKEv2 initiator, run in the initiator namespace.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.interop.cluster_lab import ClusterLab, ClusterNode, metric
from tests.interop.lab import INITIATOR_INNER_V4, RESPONDER_INNER_V4, Conn, Lab, conn_pair
from tests.interop.netns import LabError, Netns
from tests.interop.node import REPO_ROOT, render_node_config
from tests.interop.sa_checks import assert_initiated, child_sa
from tests.interop.test_lifecycle import BackgroundPing, ping, report

pytestmark = pytest.mark.interop

# One source address opens every SA: the responders' per-address limits would only slow
# the load down (cookies and the half-open block are tested elsewhere).
NO_DOS_LIMITS: dict[str, dict[str, Any]] = {
    "ike": {"cookie_threshold": 0, "block_threshold": 0, "notify_rate": 0}}
# Our initiator retransmits sooner than strongSwan's default: 1, 1.5, 2.25 ... s, 7 sends,
# about 32 s in all before it gives an SA up.
CLIENT_RETRANSMISSION = {"retransmit_timeout": "1s", "retransmit_base": 1.5,
                         "retransmit_tries": 6}


class LoadDriver:
    """`python -m tests.interop.ike_load` in a namespace, one command and reply at a time."""

    def __init__(self, ns: Netns, workdir: Path, conn: Conn, local: str,
                 port: int = 500) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "client.toml"
        self.config_path.write_text(render_node_config(
            [conn], workdir, node_id="load", addresses=[local],
            settings={"ike": CLIENT_RETRANSMISSION}))
        self.log_path = workdir / "client.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ns.exec_argv([sys.executable, "-m", "tests.interop.ike_load",
                              "--config", str(self.config_path), "--local", local,
                              "--port", str(port)]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT,
                env=dict(os.environ), start_new_session=True)
        ns.procs.append(self.proc)  # stopped with the namespace, whatever happens
        self._buffer = b""

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise LabError(f"load driver: no reply within {timeout} s (exit "
                               f"{self.proc.poll()}):\n{self.log_path.read_text()[-3000:]}")
            if select.select([fd], [], [], min(left, 0.5))[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    continue
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, command: str, timeout: float) -> dict[str, Any]:
        self.send(command)
        return self.reply(timeout)

    def establish(self, count: int, *, concurrency: int = 32,
                  timeout: float = 30.0) -> dict[str, Any]:
        return self.ask(f"establish {count} {concurrency} {timeout}", timeout + 10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            self.proc.wait(5)


def established_counts(nodes: Sequence[ClusterNode]) -> list[int]:
    return [node.log_text().count("IKE SA established:") for node in nodes]


def wait_for_responders(cluster: ClusterLab, count: int, timeout: float = 10.0) -> float:
    """Seconds until the worker's membership view holds exactly `count` responders."""
    begin = time.monotonic()
    worker = cluster.workers[0]
    while metric(worker.metrics(), "ike_cluster_members", role="responder") != count:
        assert time.monotonic() - begin < timeout, (
            f"the worker does not see {count} responders:\n{cluster.logs()}")
        time.sleep(0.2)
    return time.monotonic() - begin


def test_300_sas_outlive_one_of_three_responders() -> None:
    total = 300
    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        cluster.start([responder], responder_extra=NO_DOS_LIMITS)
        load = LoadDriver(lab.initiator, lab.dir / "load", initiator, initiator.local_addrs[0])
        try:
            up = load.establish(total, timeout=40.0)
            assert (up["established"], up["failed"]) == (total, 0), \
                f"{up['established']} of {total} SAs established:\n{cluster.logs()}"
            owners = established_counts(cluster.responders)
            report("cluster-scale", f"{total} SAs in {up['seconds']:.1f} s, per responder: "
                                    f"{owners}")
            assert sum(owners) == total
            assert all(n > 0 for n in owners), f"SAs not spread over all responders: {owners}"

            before = load.ask("liveness 20", 30)
            assert before["answered"] == total, before

            victim = max(range(len(owners)), key=lambda i: owners[i])
            survivors = [n for i, n in enumerate(cluster.responders) if i != victim]
            cluster.responders[victim].kill()
            gone = wait_for_responders(cluster, len(survivors))
            after = load.ask("liveness 30", 40)
        finally:
            load.close()
        scrapes = [n.metrics() for n in survivors]
        takeovers = [metric(s, "ike_cluster_takeovers_total") for s in scrapes]
        held = [metric(s, "ike_cluster_lease_held_dropped_total") for s in scrapes]
        report("cluster-scale",
               f"kill -9 responder-{victim + 1} ({owners[victim]} SAs); membership "
               f"dropped it after {gone:.1f} s; liveness: {after['answered']}/{after['asked']}"
               f" answered in {after['seconds']:.1f} s, {after['retransmits']} "
               f"retransmissions; takeovers per survivor: {takeovers} (datagrams dropped while "
               f"the dead owner's lease ran out: {held})")
        assert after["asked"] == total, after
        assert after["answered"] == total, f"{after}\n{cluster.logs()}"
        assert sum(takeovers) >= owners[victim] > 0, (takeovers, owners)
        assert all(n.running() for n in survivors), cluster.logs()


LOAD_PORT = 1500  # our initiator's, next to strongSwan's 500 and 4500 in the initiator netns
LOAD_INNER_V4 = "10.99.1.200/32"
LOAD_SAS = 30
OUTAGE = 5.0


def rekey_child(charon: Any, timeout: float) -> float | None:
    """Seconds until strongSwan's Child SA "net" is rekeyed (new SPI, INSTALLED); None if
    it is not within `timeout`."""
    begin = time.monotonic()
    old = child_sa(charon.list_sas()[0])["spi-in"]
    charon.rekey(child="net")
    while time.monotonic() - begin < timeout:
        sas = charon.list_sas()
        children = [c for sa in sas for c in sa.get("child-sas", {}).values()
                    if c.get("name") == "net" and c.get("state") == "INSTALLED"]
        if len(sas) == 1 and any(c["spi-in"] != old for c in children):
            return time.monotonic() - begin
        time.sleep(0.2)
    return None


# Redis back without its data: each responder's next lease renewal finds no lease, no
# record and no fence counter, takes the lease again and stores its SAs and their Child SAs
# anew (SaPersistence._reclaim); the worker sees its table lost (no incarnation mark) and
# keeps its SAD meanwhile (KeySubscriber.resync).


@pytest.mark.parametrize("data", ["kept", "lost"])
def test_redis_restart_under_load(data: str) -> None:
    """Redis stops for OUTAGE seconds under load and comes back: "kept" saves its data on
    the way down and reloads it (redis:7 in docker/compose.yml: RDB on shutdown, in its
    /data volume); "lost" comes back empty (the lab's Redis keeps nothing on disk, as after
    a crash without persistence)."""
    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        cluster.start([responder], responder_extra=NO_DOS_LIMITS)
        nodes = [*cluster.responders, *cluster.workers]
        charon = lab.charon("initiator")
        charon.load(initiator)
        sa = assert_initiated(charon.initiate("net"), charon)
        spis = (sa["initiator-spi"], sa["responder-spi"])
        assert child_sa(sa)["state"] == "INSTALLED"
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"ping through the cluster lost packets:\n{out}"
        # the load's Child SAs cover one address of its own: the worker must keep sending
        # the ping's replies into strongSwan's Child SA, not into one of these
        load_conn = initiator.with_child(local_ts=(LOAD_INNER_V4,))
        load = LoadDriver(lab.initiator, lab.dir / "load", load_conn, initiator.local_addrs[0],
                          LOAD_PORT)
        try:
            up = load.establish(LOAD_SAS)
            assert up["established"] == LOAD_SAS, f"{up}\n{cluster.logs()}"

            pinging = BackgroundPing.start(lab, 4 * OUTAGE)
            time.sleep(1.0)
            if data == "kept":
                cluster.redis_cli("SHUTDOWN", "SAVE", check=False)
            cluster.stop_redis()
            down_at = time.monotonic()
            # load while the store is gone: every exchange needs a snapshot before its
            # response may leave, so these wait (and are retransmitted) until Redis is back
            load.send("liveness 30")
            time.sleep(OUTAGE)
            crashed = [f"{n.role} {n.node_id}" for n in nodes if not n.running()]
            assert not crashed, f"without Redis these exited: {crashed}\n{cluster.logs()}"
            cluster.start_redis()
            outage = time.monotonic() - down_at
            during = load.reply(40)
            answered_after = time.monotonic() - down_at - outage
            fresh = load.establish(10, timeout=20.0)
        finally:
            load.close()
        # strongSwan's SA needs its responder too: a Child SA rekey through the cluster
        rekeyed = rekey_child(charon, 15.0)
        while pinging.running():
            time.sleep(0.2)
        sent, received, summary = pinging.result()
        scrapes = {f"{n.role} {n.node_id}": n.metrics() for n in nodes}
        errors = {name: metric(text, "ike_cluster_store_errors_total")
                  for name, text in scrapes.items()}
        responders = {name: text for name, text in scrapes.items() if name.startswith("resp")}
        withheld = {name: metric(text, "ike_cluster_persist_failures_total")
                    for name, text in responders.items()}
        takeovers = {name: metric(text, "ike_cluster_takeovers_total")
                     for name, text in responders.items()}
        report("cluster-redis",
               f"data {data}, Redis down {outage:.1f} s; strongSwan's ping: {summary}; "
               f"liveness on {LOAD_SAS} SAs sent during the outage: {during['answered']}/"
               f"{during['asked']} answered, {during['retransmits']} retransmissions, round "
               f"over {answered_after:.1f} s after Redis was back; new SAs after: "
               f"{fresh['established']}/10 in {fresh['seconds']:.1f} s; strongSwan's Child SA "
               f"rekey: {'none' if rekeyed is None else f'{rekeyed:.1f} s'}; store errors "
               f"{errors}; responses withheld {withheld}; takeovers {takeovers}")
        crashed = [f"{n.role} {n.node_id}" for n in nodes if not n.running()]
        assert not crashed, f"after the Redis restart these exited: {crashed}"
        assert received == sent, f"ping lost packets across the Redis restart: {summary}"
        assert (during["asked"], during["answered"]) == (LOAD_SAS, LOAD_SAS), \
            f"{during}\n{cluster.logs()}"
        assert rekeyed is not None, f"strongSwan's Child SA rekey failed:\n{cluster.logs()}"
        now = charon.list_sas()
        assert [(s["initiator-spi"], s["responder-spi"], s["state"]) for s in now] == \
            [(*spis, "ESTABLISHED")], now
        assert fresh["established"] == 10, f"{fresh}\n{cluster.logs()}"
        assert all(n > 0 for n in errors.values()), errors
        assert sum(withheld.values()) > 0, withheld
        if data == "lost":  # the responders stored their SAs again, the worker kept its SAD
            assert any("the store had lost it" in n.log_text() for n in cluster.responders)
            assert "lost this worker's Child SA table" in cluster.workers[0].log_text()
