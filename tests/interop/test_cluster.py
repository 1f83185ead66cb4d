"""The cluster with a real peer (issue 5): strongSwan initiates through a worker to three
responders sharing Redis; responders die and SAs carry on.

The topology is docker/compose.yml's, as processes in namespaces (tests/interop/cluster_lab.py).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cluster.rendezvous import choose
from tests.interop.certs import Pki
from tests.interop.charon import Charon
from tests.interop.cluster_lab import NET, REDIS_HOST, ClusterLab, metric
from tests.interop.freeradius import FreeRadius
from tests.interop.lab import (
    INITIATOR_INNER_V4,
    INITIATOR_V4,
    RESPONDER_INNER_V4,
    VETH,
    End,
    Lab,
    conn_pair,
    updown_recorder,
    updown_runs,
)
from tests.interop.sa_checks import assert_initiated, child_sa, established
from tests.interop.spec import Conn
from tests.interop.test_dataplane import (
    ESP_IN_UDP_IN,
    source_nat,
    wait_for_charon_log,
    wait_for_log,
)
from tests.interop.test_lifecycle import (
    OUR_DPD,
    QUIET_DPD_DELAY,
    QUIET_WATCH,
    BackgroundPing,
    ping,
    report,
)

pytestmark = pytest.mark.interop


def _owner(cluster: ClusterLab, spi_r: str, timeout: float = 10.0) -> int:
    """Which responder (1-based) logged the SA's establishment (the line may come a
    moment after strongSwan has the SA)."""
    deadline = time.monotonic() + timeout
    while True:
        for n, node in enumerate(cluster.responders, 1):
            if re.search(rf"IKE SA established: .* spi_r={spi_r}", node.log_text()):
                return n
        assert time.monotonic() < deadline, \
            f"no responder established {spi_r}:\n{cluster.logs()}"
        time.sleep(0.05)


def _connect(lab: Lab, cluster: ClusterLab, initiator: Conn, responder: Conn, *,
             log_levels: dict[str, int] | None = None,
             settings: dict[str, str] | None = None,
             **start: Any) -> tuple[Charon, dict[str, Any]]:
    """The cluster started with `responder` (`start`: ClusterLab.start's extras), strongSwan
    (its strongswan.conf `settings` added) initiating `initiator` through the worker; its
    one ESTABLISHED IKE SA."""
    cluster.start([responder], **start)
    charon = lab.charon("initiator", log_levels=log_levels, settings=settings)
    charon.load(initiator)
    return charon, assert_initiated(charon.initiate("net"), charon)


def _installed_child(charon: Charon, other_than: str = "", timeout: float = 15.0) -> str:
    """The inbound SPI of strongSwan's Child SA in use (rekeyed ones linger a while), once
    it is another than `other_than`."""
    deadline = time.monotonic() + timeout
    while True:
        sas = established(charon)
        children = sas[0].get("child-sas", {}).values() if sas else ()
        spi = next((c["spi-in"] for c in children if c["state"] == "INSTALLED"), "")
        if spi and spi != other_than:
            return spi
        assert time.monotonic() < deadline, charon.list_sas()
        time.sleep(0.1)


def _rekey_ike(charon: Charon, sa: dict[str, Any], cluster: ClusterLab) -> dict[str, Any]:
    """Have strongSwan rekey the IKE SA; the IKE SA that replaced `sa`."""
    charon.rekey(ike=sa["name"])
    deadline = time.monotonic() + 15
    while True:
        now = established(charon)
        if len(now) == 1 and now[0]["initiator-spi"] != sa["initiator-spi"]:
            return now[0]
        assert time.monotonic() < deadline, f"{charon.list_sas()}\n{cluster.logs()}"
        time.sleep(0.3)


def test_strongswan_sa_survives_the_death_of_its_responder(tmp_path: object) -> None:
    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        initiator = replace(initiator, dpd_delay="2s")
        # our side checks no liveness itself, or strongSwan would never need to
        charon, sa = _connect(lab, cluster, initiator, responder)
        spi_i, spi_r = sa["initiator-spi"], sa["responder-spi"]
        assert child_sa(sa)["state"] == "INSTALLED"
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"ping through the cluster lost packets:\n{out}\n{cluster.logs()}"
        owner = _owner(cluster, spi_r)
        report("cluster", f"SA {spi_i}_i/{spi_r}_r owned by responder-{owner}")

        pinging = BackgroundPing.start(lab, 16.0)
        time.sleep(1.0)
        log_before = len(charon.log_text())
        cluster.responders[owner - 1].kill()
        time.sleep(8.0)  # membership (2 s) and the lease run out; strongSwan's DPD carries on
        charon.rekey(child="net")
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
        after = charon.log_text()[log_before:]
        # no new IKE_AUTH: the same IKE SA, continued by a survivor
        assert "IKE_AUTH" not in after
        # idle now: strongSwan's DPD (dpd_delay 2 s) is answered by the survivor
        time.sleep(6.0)
        after = charon.log_text()[log_before:]
        dpd_answered = len(re.findall(r"parsed INFORMATIONAL response \d+ \[ \]", after))
        assert dpd_answered >= 2, f"strongSwan's DPD not answered after the kill:\n{after}"
        assert established(charon) and established(charon)[0]["responder-spi"] == spi_r
        # the Child SA rekey went through a survivor: new SPIs, installed
        rekeyed = child_sa(now)
        assert rekeyed["state"] == "INSTALLED"
        assert rekeyed["spi-in"] != child_sa(sa)["spi-in"], (sa, now)
        assert re.search(r"parsed CREATE_CHILD_SA response \d+ \[ SA No TSi TSr \]", after)
        takeovers = sum(
            metric(node.metrics(), "ike_cluster_takeovers_total") for node in survivors)
        assert takeovers >= 1
        report("cluster", f"after kill -9: {summary}; DPD answered {dpd_answered} times; "
                          f"Child SA rekeyed to {rekeyed['spi-in']}; takeovers {takeovers}")


QUIET_CHILD_REKEY = 12.0  # our side's rekey_time; strongSwan's is an hour, no DPD


def test_a_quiet_peers_child_sa_is_rekeyed_by_the_survivor_after_its_owner_died() -> None:
    """strongSwan sends nothing after IKE_AUTH (no DPD, no rekey of its own for an hour),
    and the responder owning its SA is killed at once. The survivor rendezvous gives the
    SA to loads it without waiting for a datagram, so our side's Child SA rekey comes on
    time from there: strongSwan installs the new Child SA, and a ping crosses the
    worker on it. (Before, nothing loaded the SA until strongSwan spoke.)"""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        initiator = replace(initiator, extra={"mobike": "no"}).with_child(rekey_time="1h")
        responder = responder.with_child(rekey_time=f"{QUIET_CHILD_REKEY:g}s")
        charon, sa = _connect(lab, cluster, initiator, responder)
        first = child_sa(sa)["spi-in"]
        started = time.monotonic()
        owner = _owner(cluster, sa["responder-spi"])
        log_before = len(charon.log_text())
        cluster.responders[owner - 1].kill()
        survivor = cluster.responders[2 - owner]
        rekeyed = _installed_child(charon, other_than=first, timeout=QUIET_CHILD_REKEY + 15)
        took = time.monotonic() - started
        log = charon.log_text()[log_before:]
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        report("cluster", f"quiet peer, owner killed: Child SA rekeyed by the survivor "
                          f"after {took:.1f} s ({first} -> {rekeyed}); ping {received}/{sent}")
        assert "took over IKE SA" in survivor.log_text(), cluster.logs()
        # strongSwan sent no request of its own: only answers to the survivor's
        assert not re.search(r"generating \S+ request", log), log
        assert re.search(r"parsed CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\)", log), log
        assert received == sent, f"{out}\n{cluster.logs()}"
        now = established(charon)
        assert now and now[0]["responder-spi"] == sa["responder-spi"], charon.list_sas()


def test_the_responder_checks_liveness_only_while_the_worker_sees_no_esp() -> None:
    """RFC 7296 2.4, as a single node does it: with dpd_delay = 6 s on our side alone,
    the responder sends strongSwan no liveness check during 20 s of ping through the
    worker (the worker tells it which Child SAs receive ESP), and checks again every
    6 s once the ping stops."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        responder = replace(responder, dpd_delay=f"{QUIET_DPD_DELAY:g}s",
                            node_extra={"mobike": False})
        charon, _ = _connect(lab, cluster, initiator, responder)
        pinging = BackgroundPing.start(lab, QUIET_WATCH)
        before = len(re.findall(OUR_DPD, charon.log_text()))
        while pinging.running():
            time.sleep(0.25)
        sent, received, summary = pinging.result()
        during = len(re.findall(OUR_DPD, charon.log_text())) - before
        time.sleep(QUIET_WATCH + 5)
        after = len(re.findall(OUR_DPD, charon.log_text())) - before - during
        report("cluster", f"liveness checks during {QUIET_WATCH:g} s of ping: {during}; in "
                          f"{QUIET_WATCH + 5:g} s without traffic: {after}; ping: {summary}")
        assert received == sent, f"{summary}\n{cluster.logs()}"
        assert during <= 1, charon.log_text()  # (one may be due as the ping starts)
        assert after >= QUIET_WATCH // QUIET_DPD_DELAY, charon.log_text()
        assert len(established(charon)) == 1


def test_a_nat_rebinding_reaches_the_worker_and_survives_the_owners_death() -> None:
    """strongSwan behind a real source NAT whose mapping changes (tests/interop/
    test_dataplane.py has the single-node case): the owning responder follows it on
    strongSwan's next authenticated message, and the worker's ESP follows through the
    store's "move" message. Then the owner is killed: the survivor that takes the SA
    over (on strongSwan's liveness check, from the new mapping) sends its own checks
    there, strongSwan answers them, and ESP still crosses."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        # ours checks liveness sooner, so strongSwan's own checks start only when the
        # owner is dead (and bring the SA to a survivor)
        initiator = replace(initiator, dpd_delay="3s")
        responder = replace(responder, dpd_delay="1s")
        source_nat(lab, "10.99.0.9", 40500, 44500)
        charon, sa = _connect(lab, cluster, initiator, responder)
        assert sa.get("nat-local") == "yes" and "nat-fake" not in sa, sa
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        owner = _owner(cluster, sa["responder-spi"])

        source_nat(lab, "10.99.0.10", 40501, 44501)
        deadline = time.monotonic() + 20
        moved = r"IKE SA moved: .* peer=10\.99\.0\.10:44501 "
        while not re.search(moved, cluster.responders[owner - 1].log_text()):
            assert time.monotonic() < deadline, f"no move:\n{cluster.logs()}"
            time.sleep(0.3)
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"ESP did not follow the new mapping:\n{out}\n{cluster.logs()}"

        log_before = len(charon.log_text())
        cluster.responders[owner - 1].kill()
        survivor = cluster.responders[2 - owner]
        deadline = time.monotonic() + 30
        while not ("took over IKE SA" in survivor.log_text() and re.search(
                r"parsed INFORMATIONAL request \d+ \[ \]", charon.log_text()[log_before:])):
            assert time.monotonic() < deadline, f"{charon.log_text()[log_before:]}\n" \
                                                f"{cluster.logs()}"
            time.sleep(0.5)
        assert established(charon)[0]["responder-spi"] == sa["responder-spi"]
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        report("cluster", "NAT rebinding followed by the owner and the worker; the survivor's "
                          "liveness checks reach the new mapping")


def test_a_mobike_roam_moves_the_sa_in_the_cluster_and_the_workers_esp() -> None:
    """strongSwan loses its address and roams to another with MOBIKE: the owning
    responder answers its UPDATE_SA_ADDRESSES through the worker's relay, the store's
    "move" message takes the worker's ESP to the new address, and pings cross again on
    the same IKE SA."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        charon, sa = _connect(lab, cluster, initiator, responder)
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        owner = cluster.responders[_owner(cluster, sa["responder-spi"]) - 1]

        roamed = "10.99.0.11"
        lab.initiator.run(["sysctl", "-qw", f"net.ipv4.conf.{VETH}.promote_secondaries=1"])
        lab.initiator.run(["ip", "addr", "add", f"{roamed}/24", "dev", VETH])
        lab.initiator.run(["ip", "addr", "del", f"{INITIATOR_V4}/24", "dev", VETH])
        deadline = time.monotonic() + 20
        while not re.search(rf"IKE SA moved: .* peer={re.escape(roamed)}:4500 ",
                            owner.log_text()):
            assert time.monotonic() < deadline, f"no move:\n{cluster.logs()}"
            time.sleep(0.3)
        assert re.search(r"parsed INFORMATIONAL response \d+ \[ N\(NATD_S_IP\) N\(NATD_D_IP\) "
                         r"N\(COOKIE2\) \]", charon.log_text()), charon.log_text()
        deadline = time.monotonic() + 20
        while True:  # strongSwan's libipsec rekeys its Child SA after the move
            sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
            if received == sent:
                break
            assert time.monotonic() < deadline, f"{out}\n{cluster.logs()}"
        (now,) = established(charon)
        assert (now["responder-spi"], now.get("local-host")) == (sa["responder-spi"], roamed)
        report("cluster", "MOBIKE roam followed by the owner and the worker")


def test_an_eap_user_through_the_cluster_and_in_its_sa_list(pki: Pki) -> None:
    """An EAP-MSCHAPv2 user (the gateway on its certificate) logs in through the worker's
    relay: the four IKE_AUTH round trips reach the one responder holding the half-open
    SA, traffic crosses, and `ike-cluster sas` names the user."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair(ca=pki.ca, initiator_cred=pki.client_ecdsa,
                                         responder_cred=pki.gw_ecdsa)
        user = ("alice", "Alice's passw0rd")
        initiator = replace(initiator, eap_users=(user,),
                            local=End("eap-mschapv2", "client.example.test", eap_id="alice"))
        responder = replace(responder, eap_users=(user,),
                            remote=End("eap-mschapv2", "%any", eap_id="%any"))
        _, sa = _connect(lab, cluster, initiator, responder)
        owner = cluster.responders[_owner(cluster, sa["responder-spi"]) - 1]
        owner.logged(r"IKE SA established: rw .* eap_id=alice")
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        deadline = time.monotonic() + 10
        while True:  # the snapshot is written a moment after the SA came up
            listing = owner.ns.run([sys.executable, "-m", "cluster", "sas", "--config",
                                    str(owner.config_path)]).stdout
            if "  remote EAP identity: 'alice'" in listing:
                break
            assert time.monotonic() < deadline, listing
            time.sleep(0.3)
        report("cluster", "EAP-MSCHAPv2 user through the relay, listed by ike-cluster sas")


def test_an_eap_radius_user_through_the_cluster_with_accounting(pki: Pki, tmp_path: Path
                                                               ) -> None:
    """eap-radius in a cluster: the responder holding the half-open SA relays strongSwan's
    EAP-MSCHAPv2 to FreeRADIUS (on the compose network, every responder its client),
    the SA comes up, traffic crosses, and FreeRADIUS records the responder's accounting
    Start with the user and the session id `sas` shows, then, a minute in, an
    Interim-Update with the pings' packets, which the worker told while the Child SA
    was up (CHILD_USAGE). The owner is killed; the other
    responder takes the SA over (strongSwan's DPD) without a new login or a new Start;
    a CoA-Request with a Session-Timeout to it (RFC 5176) reaches strongSwan as a new
    AUTH_LIFETIME (RFC 4478), and a Disconnect-Request to it is answered with an ACK, the
    SA is deleted, and
    the survivor's accounting Stop closes the same session (Admin-Reset) with the pings'
    packets both ways, which the worker reported as it removed the Child SA."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        assert cluster.compose is not None
        radius = FreeRadius(cluster.compose, tmp_path / "radius", address=REDIS_HOST,
                            client=f"{NET}.0/24", secret="radius-shared-secret",
                            users={"alice": "Alice's passw0rd"}).start()
        initiator, responder = conn_pair(ca=pki.ca, initiator_cred=pki.client_ecdsa,
                                         responder_cred=pki.gw_ecdsa)
        initiator = replace(initiator, eap_users=(("alice", "Alice's passw0rd"),),
                            local=End("eap-mschapv2", "client.example.test", eap_id="alice"),
                            dpd_delay="2s")
        responder = replace(responder, remote=End("eap-radius", "%any", eap_id="%any"))
        # (one configuration for every role, as in compose: the worker checks it too)
        extra = {"radius": {"accounting": True, "accounting_interval": "60s",
                            "servers": {"compose": {
            "address": REDIS_HOST, "secret": "radius-shared-secret"}},
            "dae": {"listen": "0.0.0.0", "secret": "dae-secret"}}}
        charon, sa = _connect(lab, cluster, initiator, responder, responder_extra=extra,
                              worker_extra=extra)
        owner = cluster.responders[_owner(cluster, sa["responder-spi"]) - 1]
        owner.logged(r"IKE SA established: rw .* eap_id=alice")
        assert "Login OK: [alice]" in radius.log_text(), radius.log_text()
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        deadline = time.monotonic() + 10
        while "Acct-Status-Type = Start" not in radius.accounting():
            assert time.monotonic() < deadline, radius.log_text()
            time.sleep(0.2)
        session = f"{sa['initiator-spi']}{sa['responder-spi']}"
        assert f'Acct-Session-Id = "{session}"' in radius.accounting(), radius.accounting()
        assert 'User-Name = "alice"' in radius.accounting()
        # RFC 2869's shortest interval; the worker tells the usage every half minute
        deadline = time.monotonic() + 90
        while not radius.records("Acct-Status-Type = Interim-Update"):
            assert time.monotonic() < deadline, radius.accounting() + cluster.logs()
            time.sleep(0.5)
        [interim] = radius.records("Acct-Status-Type = Interim-Update")
        assert int(interim["Acct-Input-Packets"]) == int(interim["Acct-Output-Packets"]) \
            == sent, interim
        assert interim["Acct-Session-Id"] == f'"{session}"', interim
        owner.kill()
        survivor = cluster.responders[2 - _owner(cluster, sa["responder-spi"])]
        deadline = time.monotonic() + 30
        while "took over IKE SA" not in survivor.log_text():  # after strongSwan's DPD
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.3)
        other = 3 - _owner(cluster, sa["responder-spi"])

        def radclient(attributes: str, kind: str) -> str:
            done = cluster.compose.run(  # type: ignore[union-attr]
                ["sh", "-c", f"echo '{attributes}' | radclient -r 2 -t 2 -x "
                             f"{cluster.responder_host(other)}:3799 {kind} dae-secret"],
                check=False)
            return done.stdout

        # a CoA-Request's Session-Timeout (through the channel, as a disconnect goes)
        answer = radclient('User-Name = "alice", Session-Timeout = 3000', "coa")
        assert "Received CoA-ACK" in answer, answer
        deadline = time.monotonic() + 15
        while "received AUTH_LIFETIME of 2700s, scheduling" not in charon.log_text():
            assert time.monotonic() < deadline, charon.log_text() + cluster.logs()
            time.sleep(0.2)
        answer = radclient('User-Name = "alice"', "disconnect")
        assert "Received Disconnect-ACK" in answer, answer
        deadline = time.monotonic() + 15
        while established(charon):
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        survivor.logged(r"IKE SA deleted: .*terminated by an operator")
        deadline = time.monotonic() + 10
        while "Acct-Status-Type = Stop" not in radius.accounting():
            assert time.monotonic() < deadline, radius.accounting() + cluster.logs()
            time.sleep(0.2)
        accounting = radius.accounting()
        [stop] = radius.records("Acct-Status-Type = Stop")
        assert int(stop["Acct-Input-Packets"]) == int(stop["Acct-Output-Packets"]) == sent, stop
        assert int(stop["Acct-Input-Octets"]) == 84 * sent, stop
        assert accounting.count("Acct-Status-Type = Start") == 1, accounting
        assert all(record["Acct-Session-Id"] == f'"{session}"'
                   for record in radius.records("Acct-Status-Type")), accounting
        assert "Acct-Terminate-Cause = Admin-Reset" in accounting, accounting
        assert radius.log_text().count("Login OK: [alice]") == 1  # no new login
        report("cluster", "eap-radius user through a responder, accounting Start recorded; "
                          "owner killed, survivor took over, DAE ended it, survivor's Stop")


def test_virtual_ips_from_a_pool_the_responders_share() -> None:
    """Two road warriors (one strongSwan, two identities) get distinct addresses from the
    pool, whichever responders own their SAs: the store hands them out. The owner of one
    is killed: the survivor that takes its SA over keeps its address (pings from it
    cross), and when strongSwan ends that SA the survivor frees the address in the store;
    when it comes back it gets the same address."""
    pools = {"pools.rw": {"addrs": "10.99.3.0/28"}}
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        pairs = [conn_pair(initiator_id=f"client{n}.example.test") for n in (1, 2)]
        initiators = [replace(i, name=f"rw{n}", dpd_delay="2s", extra={"vips": "0.0.0.0"}
                              ).with_child(local_ts=()) for n, (i, _) in enumerate(pairs, 1)]
        responder = replace(pairs[0][1], node_extra={"pools": ["rw"]}).with_child(
            remote_ts=())
        cluster.start([responder], worker_extra=pools, responder_extra=pools)
        charon = lab.charon("initiator", settings={"install_virtual_ip": "yes"})
        charon.load(*initiators)
        vips = {}
        for conn in initiators:
            result = charon.initiate("net", ike=conn.name)
            assert result.returncode == 0, result.stdout + result.stderr
        for sa in established(charon):
            vips[sa["name"]] = (sa["local-vips"][0], sa["responder-spi"])
        assert sorted(v for v, _ in vips.values()) == ["10.99.3.1", "10.99.3.2"], vips
        for vip, _ in vips.values():
            sent, received, out = ping(lab.initiator, vip, RESPONDER_INNER_V4)
            assert received == sent, f"{out}\n{cluster.logs()}"

        vip, spi_r = vips["rw1"]
        owner = _owner(cluster, spi_r)
        node = cluster.responders[owner - 1]
        deadline = time.monotonic() + 10
        while True:  # `ike-cluster sas` names each SA's address
            listing = node.ns.run([sys.executable, "-m", "cluster", "sas", "--config",
                                   str(node.config_path)]).stdout
            if all(f"  remote virtual IPs: {v}" in listing for v, _ in vips.values()):
                break
            assert time.monotonic() < deadline, listing
            time.sleep(0.3)
        cluster.responders[owner - 1].kill()
        survivor = cluster.responders[2 - owner]
        deadline = time.monotonic() + 30
        while "took over IKE SA" not in survivor.log_text():
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.3)
        sent, received, out = ping(lab.initiator, vip, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        held = cluster.redis_cli("--scan", "--pattern", "ikec:pool:{rw}:[0-9]*").split()
        assert sorted(held) == ["ikec:pool:{rw}:0", "ikec:pool:{rw}:1"], held
        charon.terminate_ike("rw1")
        deadline = time.monotonic() + 10
        offset = f"ikec:pool:{{rw}}:{int(vip.rsplit('.', 1)[1]) - 1}"
        while offset in cluster.redis_cli("--scan", "--pattern", "ikec:pool:{rw}:[0-9]*"):
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.3)
        # the client comes back (to whichever responder): its address again
        result = charon.initiate("net", ike="rw1")
        assert result.returncode == 0, result.stdout + result.stderr
        (back,) = [sa for sa in established(charon) if sa["name"] == "rw1"]
        assert back["local-vips"] == [vip], back
        report("cluster", f"shared pool: {sorted(v for v, _ in vips.values())}; {vip} kept "
                          "through a takeover, freed at its end, the same again on return")


def _keys_from_log(log: str) -> list[bytes]:
    """Every IKE and Child SA key strongSwan dumped at log level 4."""
    from tests.vectors.record_strongswan import (
        CHILD_KEY_NAMES,
        IKE_KEY_NAMES,
        key_sets,
        parse_dumps,
    )

    dumps = parse_dumps(log)
    keys = [v for s in key_sets(dumps, IKE_KEY_NAMES, "Sk_d secret") for k, v in s.items()
            if k.startswith("sk_")]
    keys += [v for s in key_sets(dumps, CHILD_KEY_NAMES, "encryption initiator key")
             for k, v in s.items() if k != "seed"]
    return [k for k in keys if len(k) >= 16]


def test_store_holds_no_key_forged_relay_is_dropped_retransmission_crosses_failover() -> None:
    """Three proofs in one cluster: the Redis dump has none of the SA's key bytes; an
    envelope sealed with another key is dropped and counted; a retransmitted request that
    crossed the failover is answered byte for byte by the survivor."""
    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        charon, _ = _connect(lab, cluster, initiator, responder,
                             log_levels={"ike": 4, "chd": 4})
        time.sleep(0.5)  # the snapshot and the Child SA records are written by now

        # 0. the cluster's metrics, scraped over HTTP: names, types, values that moved
        scrapes = {n.node_id: n.metrics() for n in [*cluster.responders, *cluster.workers]}
        for text in scrapes.values():
            assert "# TYPE ike_cluster_members gauge" in text
            assert "# TYPE ike_cluster_relay_datagrams_total counter" in text
            assert "# TYPE ike_cluster_store_round_trips_total counter" in text
            assert metric(text, "ike_cluster_members", role="responder") == 3
            assert metric(text, "ike_cluster_members", role="worker") == 1
        responders = [scrapes[n.node_id] for n in cluster.responders]
        assert sum(metric(t, "ike_cluster_ike_sas_established_total", connection="rw")
                   for t in responders) == 1
        assert sum(metric(t, "ike_cluster_ike_sas") for t in responders) == 1
        assert sum(metric(t, "ike_cluster_store_operations_total") for t in responders) > 0
        sent = metric(scrapes["worker-1"], "ike_cluster_relay_datagrams_total", direction="sent")
        assert sent >= 2  # IKE_SA_INIT and IKE_AUTH relayed

        # 1. a scan of every Redis key: no key of the SA, raw or hex
        keys = _keys_from_log(charon.log_text())
        assert len(keys) >= 7, "strongSwan did not log SK_d, SK_e*, SK_p* and the ESP keys"
        dump = cluster.redis_dump()
        assert dump, "nothing in Redis"
        stored = [k for k in dump] + [v for values in dump.values() for v in values]
        leaks = [key.hex() for key in keys for blob in stored
                 if key in blob or key.hex().encode() in blob.lower()]
        assert not leaks, f"key bytes found in Redis: {leaks}"
        assert any(b"sa:" in k for k in dump), sorted(dump)
        report("cluster", f"{len(dump)} Redis keys scanned, {len(keys)} SA keys absent")

        # 2. a forged envelope (another cluster key) and garbage at a responder's relay port
        target = cluster.responders[0]
        before = metric(target.metrics(), "ike_cluster_relay_dropped_total")
        before_mac = metric(target.metrics(), "ike_cluster_relay_dropped_total", reason="bad_mac")
        forge = (
            "import socket;from cluster.relay import RelayCodec, Kind;"
            "c=RelayCodec(bytes(32), 'worker-1');"
            "d=c.encode(Kind.IKE_FROM_PEER, 'responder-1', data=bytes(28), "
            "local=('10.99.0.2', 500), remote=('10.99.0.1', 500));"
            "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
            f"s.sendto(d, ({target.host!r}, 4800)); s.sendto(b'x' * 64, ({target.host!r}, 4800))"
        )
        lab.responder.run([sys.executable, "-c", forge])
        deadline = time.monotonic() + 5
        while (after := metric(target.metrics(), "ike_cluster_relay_dropped_total")) < before + 2:
            assert time.monotonic() < deadline, f"forged envelopes not counted: {after}"
            time.sleep(0.3)
        assert metric(target.metrics(), "ike_cluster_relay_dropped_total",
                      reason="bad_mac") == before_mac + 1  # the forged envelope
        assert target.running()
        # the relay's own latency: responders PING the workers every heartbeat round
        assert metric(target.metrics(), "ike_cluster_relay_pings_total") > 0

        # 3. our probe: an SA, a liveness request answered; kill its owner; retransmit
        probe = lab.initiator.run([sys.executable, "-m", "tests.interop.ike_probe",
                                   "establish", "10.99.0.1", "10.99.0.2"], timeout=60)
        first = json.loads(probe.stdout)
        owner = _owner(cluster, first["spi_r"])
        cluster.responders[owner - 1].kill()
        retry = lab.initiator.run([sys.executable, "-m", "tests.interop.ike_probe", "resend",
                                   "10.99.0.1", "10.99.0.2", first["request"], "30"],
                                  timeout=60)
        assert retry.stdout.strip() == first["response"], (
            f"the survivor's answer differs:\n{retry.stdout}\n{first}\n{cluster.logs()}")
        label = f"{first['spi_i']}_i/{first['spi_r']}_r"
        assert any(f"took over IKE SA {label}" in node.log_text()
                   for node in cluster.responders if node.running()), cluster.logs()
        report("cluster", f"retransmission across the failover answered byte for byte "
                          f"({len(first['response']) // 2} bytes)")


def test_dead_peer_sas_leave_the_store_and_the_worker() -> None:
    """Issue 4's DPD proof, checked in the store: strongSwan is killed, the responder's
    liveness checks give up, and the SA's snapshot and its Child SA's keys leave Redis and
    the worker (its route into the TUN goes too)."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        initiator = replace(initiator, dpd_delay="2s")
        responder = replace(responder, dpd_delay="2s")
        charon, sa = _connect(lab, cluster, initiator, responder, responder_extra={
            "ike": {"retransmit_timeout": 1.0, "retransmit_tries": 2}})
        sa_name = f"sa:{{{sa['initiator-spi']}{sa['responder-spi']}}}".encode()
        child_spi = bytes.fromhex(child_sa(sa)["spi-out"])  # ours: strongSwan sends with it

        def stored() -> tuple[bool, bool]:
            dump = cluster.redis_dump()
            sa_there = any(key.endswith(sa_name) for key in dump)
            sad = [values for key, values in dump.items() if b"sad:{worker-1}" in key]
            child_there = any(child_spi in values[0::2] for values in sad)
            return sa_there, child_there

        time.sleep(1.0)
        assert stored() == (True, True), sorted(cluster.redis_dump())
        routes = lab.responder.ip("route", "show", "table", "1450")
        assert "10.99.1.0/24" in routes
        time.sleep(5.0)  # DPD both ways while strongSwan lives
        assert charon.proc is not None
        charon.proc.kill()
        charon.proc.wait(5)
        deadline = time.monotonic() + 30
        while stored() != (False, False):
            assert time.monotonic() < deadline, f"still stored: {stored()}\n{cluster.logs()}"
            time.sleep(0.5)
        gone_after = 30 - (deadline - time.monotonic())
        assert "10.99.1.0/24" not in lab.responder.ip("route", "show", "table", "1450")
        assert any(re.search(r"IKE SA deleted: .*reason=peer not responding",
                             n.log_text(), re.I) for n in cluster.responders), cluster.logs()
        report("cluster", f"dead peer's SA and keys gone from Redis and the worker "
                          f"{gone_after:.1f} s after kill -9")


def test_initial_contact_ends_the_old_sa_on_the_other_responder() -> None:
    """strongSwan is killed (no Delete) and comes back: its new IKE SA, with INITIAL_CONTACT
    (RFC 7296 2.4), is owned by the other responder (it is tried again until rendezvous
    puts it there), which announces it; the old SA's responder drops it quietly, so its
    record and its Child SA's keys leave Redis and the worker keeps only the new SA's."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        charon, sa = _connect(lab, cluster, initiator, responder)
        old_owner = _owner(cluster, sa["responder-spi"])
        tries = 0
        while True:  # each try lands on either responder with even odds
            tries += 1
            assert tries <= 12, cluster.logs()
            assert charon.proc is not None
            charon.proc.kill()
            charon.proc.wait(5)
            charon = lab.charon("initiator")
            charon.load(initiator)
            new = assert_initiated(charon.initiate("net"), charon)
            new_owner = _owner(cluster, new["responder-spi"])
            if new_owner != old_owner:
                break
            # the same responder: it dropped the older SA itself; go again from this one
            sa, old_owner = new, new_owner

        def stored() -> tuple[set[str], int]:
            dump = cluster.redis_dump()
            sas = {key.decode().rsplit("{", 1)[1].rstrip("}") for key in dump
                   if b":sa:{" in key}
            sad = [values for key, values in dump.items() if b"sad:{worker-1}" in key]
            return sas, sum(len(spi) == 4 for v in sad for spi in v[0::2])

        new_key = new["initiator-spi"] + new["responder-spi"]
        deadline = time.monotonic() + 15
        while stored() != ({new_key}, 1):  # one IKE SA, one Child SA's inbound keys
            assert time.monotonic() < deadline, f"{stored()}\n{cluster.logs()}"
            time.sleep(0.3)
        log = cluster.responders[old_owner - 1].log_text()
        assert re.search(rf"IKE SA deleted: .*spi_r={sa['responder-spi']}.*replaced "
                         r"\(INITIAL_CONTACT\)", log), log
        assert f"established IKE SA {new['responder-spi']} (initial_contact)" in log, log
        announcements = metric(cluster.responders[new_owner - 1].metrics(),
                               "ike_cluster_identity_announcements_total", event="sent")
        assert announcements >= 1
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        report("cluster", f"INITIAL_CONTACT on responder {new_owner} ended the old SA on "
                          f"responder {old_owner} (try {tries}); store holds only the new SA")


SECOND_HOST = "10.99.0.11"  # strongSwan's second address: another login, not a reauth


def test_unique_keep_refuses_a_second_sa_on_the_other_responder() -> None:
    """swanctl's `unique = keep` across the cluster: strongSwan sets up a second IKE SA
    of the same identity from a second address (a second login; from the first SA's
    address and port it would be taken for a reauthentication), tried until rendezvous
    puts it on the other responder; that responder announces it, the first SA's
    responder answers that it holds an older one, and the second SA is deleted; the
    first stays and carries traffic."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        responder = replace(responder, node_extra={"unique": "keep"})
        cluster.start([responder])
        lab.initiator.ip("addr", "add", f"{SECOND_HOST}/24", "dev", VETH)
        charon = lab.charon("initiator")
        charon.load(initiator, replace(initiator, name="rw2", local_addrs=(SECOND_HOST,)))
        first = assert_initiated(charon.initiate("net", ike="rw"), charon)
        first_owner = _owner(cluster, first["responder-spi"])
        other = cluster.responders[2 - first_owner]
        tries = 0
        while "holds an older one (unique = keep)" not in other.log_text():
            # each try lands on either responder with even odds; on the first SA's own
            # responder it is refused there
            tries += 1
            assert tries <= 12, f"never on the other responder:\n{cluster.logs()}"
            result = charon.initiate("net", ike="rw2")
            assert result.returncode == 0, result.stdout + result.stderr
            deadline = time.monotonic() + 15
            while True:  # the second SA comes up, then is deleted (here or by the other)
                sas = established(charon)
                if [sa["responder-spi"] for sa in sas] == [first["responder-spi"]]:
                    break
                assert time.monotonic() < deadline, f"{sas}\n{cluster.logs()}"
                time.sleep(0.2)
        other.logged(r"IKE SA deleted: .*refused \(unique = keep\)")
        assert "received DELETE for IKE_SA rw2" in charon.log_text()
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        report("cluster", f"unique = keep: the second SA refused across responders (try "
                          f"{tries}); the first carries traffic")


def test_unique_keep_lets_a_reauthentication_on_the_other_responder_stay() -> None:
    """strongSwan reauthenticates make-before-break every 4 s (its default from 6.0)
    under `unique = keep`: each new IKE SA comes from the old one's address and port
    without INITIAL_CONTACT, and rendezvous puts it on either responder. Where it lands
    on the other one, the announcement names the peer, the old SA's responder does not
    refuse it, strongSwan deletes the old SA, and a ping across all of it loses
    nothing. Before, that new SA was refused and the client was left with none."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        initiator = replace(initiator, extra={"reauth_time": "4s", "over_time": "10s",
                                              "rand_time": "1s"})
        responder = replace(responder, node_extra={"unique": "keep"})
        charon, first = _connect(lab, cluster, initiator, responder,
                                 settings={"make_before_break": "yes"})
        seen = [first["responder-spi"]]
        owners = [_owner(cluster, seen[0])]
        pinging = BackgroundPing.start(lab, 120.0)
        deadline = time.monotonic() + 60  # a move has even odds at each reauthentication

        def moved_and_replaced() -> bool:  # an SA on the other responder, and one after it
            return any(owners[i] != owners[i - 1] for i in range(1, len(owners) - 1))

        while not moved_and_replaced():
            assert time.monotonic() < deadline, f"{owners}\n{cluster.logs()}"
            time.sleep(0.5)
            for sa in established(charon):
                if sa["responder-spi"] not in seen:
                    seen.append(sa["responder-spi"])
                    owners.append(_owner(cluster, seen[-1]))
        pinging.proc.send_signal(signal.SIGINT)  # ping prints its summary and ends
        sent, received, summary = pinging.result()
        logs = cluster.logs()
        assert "refused (unique = keep)" not in logs, logs
        assert "suspected reauthentication" in logs, logs
        assert received >= sent - 1, summary  # (the last request may be cut short)
        report("cluster", f"unique = keep: {len(owners)} IKE SAs on responders {owners}, "
                          f"none refused; ping: {summary}")


def test_terminate_deletes_an_sa_from_its_owner_or_after_the_owner_died() -> None:
    """`ike-cluster terminate` (swanctl's --terminate for the cluster): by identity, the
    owner deletes strongSwan's SA with a Delete; by SPI after kill -9 of the owner, the
    survivor loads the SA from the store and deletes it the same way. `ike-cluster rekey`
    goes the same way first: the Child SA, then the IKE SA, get new SPIs; then
    `terminate --child` deletes the Child SA alone."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        charon, sa = _connect(lab, cluster, initiator, responder)

        def terminate(node: Any, *args: str) -> Any:
            return node.ns.run([sys.executable, "-m", "cluster", "terminate", "--config",
                                str(node.config_path), *args], check=False)

        def deleted(count: int) -> None:
            deadline = time.monotonic() + 10
            while charon.log_text().count("received DELETE for IKE_SA") < count \
                    or established(charon):
                assert time.monotonic() < deadline, f"{charon.log_text()}\n{cluster.logs()}"
                time.sleep(0.2)

        # `ike-cluster rekey` travels the same way: the owner rekeys the Child SA, then
        # the IKE SA, and the command sees the new SPIs in the store
        rekey = [sys.executable, "-m", "cluster", "rekey", "--config",
                 str(cluster.responders[0].config_path), "--id", "client.example.test"]
        result = cluster.responders[0].ns.run([*rekey, "--child", "net"], check=False)
        assert result.returncode == 0, result.stdout + result.stderr + cluster.logs()
        assert result.stdout.startswith(f"rekeyed CHILD SA net {child_sa(sa)['spi-out']} (in)")
        result = cluster.responders[0].ns.run(rekey, check=False)
        assert result.returncode == 0, result.stdout + result.stderr + cluster.logs()
        deadline = time.monotonic() + 10
        while (now := established(charon)) and now[0]["initiator-spi"] == sa["initiator-spi"]:
            assert time.monotonic() < deadline, charon.list_sas()
            time.sleep(0.1)
        assert f"now {now[0]['initiator-spi']}_i/{now[0]['responder-spi']}_r" in result.stdout
        assert sum(metric(r.metrics(), "ike_cluster_operator_rekeys_total")
                   for r in cluster.responders) == 2

        # `terminate --child` too: the owner deletes the Child SA alone, the IKE SA stays
        child_deletes = charon.log_text().count("received DELETE for ESP CHILD_SA")
        result = terminate(cluster.responders[0], "--id", "client.example.test",
                           "--child", "net")
        assert result.returncode == 0, result.stdout + result.stderr + cluster.logs()
        spis = f"{now[0]['initiator-spi']}_i/{now[0]['responder-spi']}_r"
        assert re.fullmatch(rf"terminated CHILD SA net [0-9a-f]{{8}} \(in\) of IKE SA {spis}\n",
                            result.stdout), result.stdout
        deadline = time.monotonic() + 10
        while (now := established(charon)) and any(
                c["state"] == "INSTALLED" for c in now[0].get("child-sas", {}).values()):
            assert time.monotonic() < deadline, charon.list_sas()
            time.sleep(0.1)
        assert now and f"{now[0]['initiator-spi']}_i/{now[0]['responder-spi']}_r" == spis
        assert charon.log_text().count("received DELETE for ESP CHILD_SA") == child_deletes + 1

        result = terminate(cluster.responders[0], "--id", "client.example.test")
        assert result.returncode == 0, result.stdout + result.stderr + cluster.logs()
        assert f"terminated IKE SA rw {now[0]['initiator-spi']}_i/{now[0]['responder-spi']}_r" \
            in result.stdout, result.stdout
        deleted(1)
        missing = terminate(cluster.responders[0], "--id", "client.example.test")
        assert missing.returncode == 1 and "no IKE SA" in missing.stderr, missing.stderr

        sa = assert_initiated(charon.initiate("net"), charon)
        owner = _owner(cluster, sa["responder-spi"])
        dead = cluster.responders[owner - 1]
        survivor = cluster.responders[2 - owner]
        dead.kill()
        deadline = time.monotonic() + 15
        while True:  # the survivor sees the owner gone: rendezvous gives it the SA
            views = re.findall(r"members: (.*)", survivor.log_text())
            if views and dead.node_id not in views[-1]:
                break
            assert time.monotonic() < deadline, survivor.log_text()
            time.sleep(0.2)
        spis = f"{sa['initiator-spi']}_i/{sa['responder-spi']}_r"
        result = terminate(survivor, "--ike", spis)
        assert result.returncode == 0, result.stdout + result.stderr + cluster.logs()
        deleted(2)
        assert "took over IKE SA" in survivor.log_text()
        assert metric(survivor.metrics(), "ike_cluster_terminations_total") >= 1
        report("cluster", "ike-cluster terminate: by identity from the owner, by SPI from "
                          "the survivor after the owner's kill -9; strongSwan got a Delete "
                          "each time")


def test_an_sa_a_responder_rekeyed_lives_on_where_its_new_spi_leads() -> None:
    """An IKE rekey our responder starts makes it the new SA's initiator (RFC 7296 2.18):
    the SPI that routes the SA is then ours, and rendezvous hashing may give it to the
    other responder, which takes it over. strongSwan's messages on it carry the responder
    flag; that responder must load the SA for them and answer: here strongSwan rekeys
    its Child SA there, and a ping crosses the new one."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        charon, sa = _connect(lab, cluster, initiator, responder)
        ids = sorted(r.node_id for r in cluster.responders)
        owner = cluster.responders[_owner(cluster, sa["responder-spi"]) - 1].node_id
        rekey = [sys.executable, "-m", "cluster", "rekey", "--config",
                 str(cluster.responders[0].config_path), "--id", "client.example.test"]
        for _ in range(20):  # each rekey's new SPI hashes to either responder
            result = cluster.responders[0].ns.run(rekey, check=False)
            assert result.returncode == 0, result.stdout + result.stderr + cluster.logs()
            deadline = time.monotonic() + 10
            while (now := established(charon)) and now[0]["initiator-spi"] == \
                    sa["initiator-spi"]:
                assert time.monotonic() < deadline, charon.list_sas()
                time.sleep(0.1)
            sa = now[0]
            if choose(bytes.fromhex(sa["initiator-spi"]), ids) != owner:
                break
        else:
            raise AssertionError("20 rekeys and no new SPI hashed to the other responder")
        taker = next(r for r in cluster.responders if r.node_id != owner)
        old_child = _installed_child(charon)
        charon.rekey(child="net")
        _installed_child(charon, other_than=old_child)
        assert f"took over IKE SA {sa['initiator-spi']}_i/{sa['responder-spi']}_r" in \
            taker.log_text(), cluster.logs()
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, f"{out}\n{cluster.logs()}"
        report("cluster", f"an SA rekeyed by {owner} went to {taker.node_id}, which answered "
                          "strongSwan's Child SA rekey on it")


def test_redirect_sends_the_clusters_peers_to_another_gateway() -> None:
    """`ike-cluster redirect` with a cluster's configuration reaches every responder
    through the store: strongSwan's established SA (whichever responder owns it) moves
    to a single node at another address, and a new connection to the cluster comes up
    there too; after --stop the cluster answers again."""
    other = "10.99.0.3"
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        charon, _ = _connect(lab, cluster, initiator, responder)
        lab.responder.ip("addr", "add", f"{other}/24", "dev", VETH)
        node_b = lab.node([responder], addresses=(other,), node_id="gw2")
        charon.load(initiator, replace(initiator, name="second"))
        node = cluster.responders[0]

        def command(*args: str) -> Any:
            return node.ns.run([sys.executable, "-m", "cluster", "redirect", "--config",
                                str(node.config_path), *args], check=False)

        result = command("--to", other, "--existing")
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.monotonic() + 15
        while {s["name"]: s for s in established(charon)}.get("rw", {}).get(
                "remote-host") != other:
            assert time.monotonic() < deadline, f"{charon.list_sas()}\n{cluster.logs()}"
            time.sleep(0.2)
        charon.terminate_ike("rw")
        second = charon.initiate("net", ike="second")
        assert second.returncode == 0, second.stdout
        sas = {s["name"]: s for s in established(charon)}
        assert sas["second"]["remote-host"] == other, sas
        assert node_b.log_text().count("IKE SA established") == 2, node_b.log_text()
        assert command("--stop").returncode == 0
        charon.terminate_ike("second")
        again = charon.initiate("net", ike="second")
        assert again.returncode == 0, again.stdout
        sas = {s["name"]: s for s in established(charon)}
        assert sas["second"]["remote-host"] == "10.99.0.2", sas
        report("cluster", "ike-cluster redirect moved the cluster's SA and a new one to "
                          "another gateway; --stop ended it")


def test_a_workers_packet_limit_makes_the_responder_rekey_the_child_sa() -> None:
    """The worker's soft lifetime (90 % of lifetime_packets) travels to the responder that
    owns the IKE SA, which rekeys the Child SA with strongSwan; a ping loses nothing. The
    IKE SA is rekeyed first, so the Child SA's IKE SA has new SPIs (and likely a new
    owner): the worker must have learnt them."""
    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        charon, sa = _connect(lab, cluster, initiator, responder,
                              worker_extra={"worker": {"lifetime_packets": 200}})
        first_spi = child_sa(sa)["spi-in"]
        _rekey_ike(charon, sa, cluster)
        time.sleep(2.0)  # the hand-over to the new SPIs' owner, if it is another node
        proc = lab.initiator.run(["ping", "-n", "-c", "250", "-i", "0.02", "-W", "2", "-I",
                                  INITIATOR_INNER_V4, RESPONDER_INNER_V4], check=False,
                                 timeout=60)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", proc.stdout)
        assert match and match[1] == match[2], proc.stdout + cluster.logs()
        log = charon.log_text()
        # the rekey came from our side: strongSwan parsed the request
        assert re.search(r"parsed CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No TSi TSr \]",
                         log), cluster.logs()
        installed = [c for c in established(charon)[0]["child-sas"].values()
                     if c["state"] == "INSTALLED"]
        assert len(installed) == 1 and installed[0]["spi-in"] != first_spi, installed
        assert "reached its soft limit" in cluster.workers[0].log_text()
        report("cluster", f"worker's packet limit -> responder rekey: {match[0]}, Child SA "
                          f"{first_spi} -> {installed[0]['spi-in']}")


def test_a_child_sa_at_its_hard_packet_limit_at_the_worker_is_created_again() -> None:
    """The child's life_packets alone (no rekey first): the worker's data plane drops
    the SA at the limit and asks the responder owning its IKE SA to expire it, which
    tells strongSwan and creates the child again. (Before, the worker asked nothing once
    the SA was gone, and the tunnel stayed without one until the time-based rekey.)"""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        responder = responder.with_child(volume=(("life_packets", 100),))
        charon, sa = _connect(lab, cluster, initiator, responder)
        first_spi = child_sa(sa)["spi-in"]
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4, 60)
        assert received == sent, f"{out}\n{cluster.logs()}"  # 60 each way: within the limit
        proc = lab.initiator.run(["ping", "-n", "-c", "80", "-i", "0.05", "-W", "2", "-I",
                                  INITIATOR_INNER_V4, RESPONDER_INNER_V4], check=False,
                                 timeout=60)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", proc.stdout)
        assert match, proc.stdout
        worker = cluster.workers[0].log_text()
        assert re.search(r"reached its hard limit \(packets_\w+\); asking its responder "
                         r"to expire it", worker), cluster.logs()
        new_spi = _installed_child(charon, other_than=first_spi)
        created = re.findall(r"parsed CREATE_CHILD_SA request \d+ \[ (.*) \]",
                             charon.log_text())
        assert created and not any("REKEY_SA" in c for c in created), created
        assert any(re.search(r"CHILD SA deleted: net .* reason=expired", n.log_text())
                   for n in cluster.responders), cluster.logs()
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        report("cluster", f"hard packet limit at the worker: {match[0]} across it; Child SA "
                          f"{first_spi} -> {new_spi}; ping after {received}/{sent}")
        assert received == sent, f"{out}\n{cluster.logs()}"
        assert int(match[2]) >= int(match[1]) - 5, proc.stdout


def test_a_child_sa_idle_at_the_worker_is_deleted_by_its_responder() -> None:
    """swanctl's `inactivity` in a cluster: the worker, which carries the traffic, sees the
    Child SA idle for the timeout and asks the responder owning its IKE SA to delete it,
    which does so with a Delete strongSwan receives; the IKE SA stays."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        charon, sa = _connect(lab, cluster, initiator, responder.with_child(inactivity="3s"))
        sent, received, out = ping(lab.initiator, INITIATOR_INNER_V4, RESPONDER_INNER_V4)
        assert received == sent, out + cluster.logs()
        ours = child_sa(sa)["spi-out"]  # our inbound SPI
        wait_for_charon_log(charon, f"received DELETE for ESP CHILD_SA with SPI {ours}")
        worker = cluster.workers[0].log_text()
        assert re.search(rf"Child SA {ours} reached its hard limit \(inactivity, \d+ s\)",
                         worker), worker
        (now,) = established(charon)
        assert now["initiator-spi"] == sa["initiator-spi"] and not now.get("child-sas"), now
        report("cluster", f"Child SA {ours} idle at the worker -> deleted by its responder")


def test_updown_runs_on_the_worker_where_the_child_sa_is() -> None:
    """A child's `updown` in a cluster runs on the worker, which holds the Child SA (its
    key table says when it comes and goes, with its IKE SA's identities), not on the
    responders. A Child SA rekey runs nothing; strongSwan's Delete runs "down"."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        script, record = updown_recorder(lab.dir)
        initiator, responder = conn_pair()
        charon, sa = _connect(lab, cluster, initiator, responder.with_child(updown=str(script)))
        (up,) = updown_runs(record, 1)
        assert (up["PLUTO_VERB"], up["PLUTO_CONNECTION"]) == ("up-client", "net"), up
        assert (up["PLUTO_MY_ID"], up["PLUTO_PEER_ID"]) == ("gw.example.test",
                                                             "client.example.test"), up
        assert (up["PLUTO_MY_CLIENT"], up["PLUTO_PEER_CLIENT"]) == ("10.99.2.0/24",
                                                                    "10.99.1.0/24"), up
        assert up["PLUTO_PEER"] == INITIATOR_V4, up
        charon.rekey(child="net")
        _installed_child(charon, other_than=child_sa(sa)["spi-in"])
        charon.terminate_ike()
        up_again, down = updown_runs(record, 2)
        assert up_again == up and down == {**up, "PLUTO_VERB": "down-client"}, down
        assert "updown: firewall opened for None" in cluster.workers[0].log_text()
        assert not any("updown:" in r.log_text() for r in cluster.responders)
        report("cluster", "updown ran on the worker: up-client, nothing at the Child SA "
                          "rekey, down-client at the Delete")


@pytest.mark.parametrize("copied", [True, False])
def test_the_worker_gives_the_esp_it_sends_the_dscp_and_ecn_of_what_it_carries(
        copied: bool) -> None:
    """copy_dscp and copy_ecn in a cluster: the child's settings reach the worker with
    the Child SA's keys, and the worker's ESP carries each packet's DSCP and ECN field
    (answers to EF + ECT(0) pings cross the wire as EF + ECT(0), the others as CS0 +
    Not-ECT; all as CS0 + Not-ECT with copy_dscp = "no" and copy_ecn = false), counted
    on strongSwan's veth."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        if not copied:
            responder = responder.with_child(copy_dscp="no", copy_ecn=False)
        wire = lab.wire_counters("initiator", {
            "esp_in_ef": ("in", f"{ESP_IN_UDP_IN} ip dscp ef"),
            "esp_in_cs0": ("in", f"{ESP_IN_UDP_IN} ip dscp cs0"),
            "esp_in_ect0": ("in", f"{ESP_IN_UDP_IN} ip ecn ect0"),
        })
        _connect(lab, cluster, initiator, responder)
        before = wire.read()
        for marks in (["-Q", "0xba"], []):
            proc = lab.initiator.run(["ping", "-n", "-c", "10", "-i", "0.05", "-W", "2",
                                      *marks, "-I", INITIATOR_INNER_V4, RESPONDER_INNER_V4],
                                     check=False)
            assert "10 received" in proc.stdout, proc.stdout + cluster.logs()
        seen = wire.since(before)
        assert seen == ({"esp_in_ef": 10, "esp_in_cs0": 10, "esp_in_ect0": 10} if copied else
                        {"esp_in_ef": 0, "esp_in_cs0": 20, "esp_in_ect0": 0}), seen
        report("cluster", f"the worker's ESP by DSCP and ECN: {seen}")


BLOCK_TABLE = "ikc_block"


def _block_ike_to_the_initiator(lab: Lab) -> None:
    """IKE from the worker (UDP 4500, zero non-ESP marker) stops reaching strongSwan."""
    lab.initiator.run(["nft", "add", "table", "inet", BLOCK_TABLE])
    lab.initiator.run(["nft", "add", "chain", "inet", BLOCK_TABLE, "in",
                       "{ type filter hook input priority -5; }"])
    lab.initiator.run(["nft", "add", "rule", "inet", BLOCK_TABLE, "in", "udp", "sport",
                       "4500", "@th,64,32", "==", "0", "drop"])


def _unblock(lab: Lab) -> None:
    lab.initiator.run(["nft", "delete", "table", "inet", BLOCK_TABLE])


def _owner_killed(lab: Lab, cluster: ClusterLab, charon: Charon, owner: int,
                  after: float) -> int:
    """`after` seconds more of the block (the owner's request is on the wire, lost), then
    the owner is killed and the block lifted; where strongSwan's log stands then."""
    time.sleep(after)
    cluster.responders[owner - 1].kill()
    _unblock(lab)
    return len(charon.log_text())


def _resent_by_survivor(cluster: ClusterLab) -> str:
    """The takeover line of the survivor that sends the owner's request again."""
    deadline = time.monotonic() + 40
    while True:
        for node in cluster.responders:
            found = re.search(r"took over IKE SA [^\n]*; our request \d+ in flight goes "
                              r"again", node.log_text())
            if found:
                return found[0]
        assert time.monotonic() < deadline, f"no request sent again:\n{cluster.logs()}"
        time.sleep(0.5)


def _answered_after(charon: Charon, since: int, marker: str, count: int,
                    cluster: ClusterLab) -> tuple[str, list[str]]:
    """strongSwan's log from `since` once `count` of our INFORMATIONAL requests (liveness
    checks) were answered after the line holding `marker`."""
    deadline = time.monotonic() + 40
    while True:
        log = charon.log_text()[since:]
        at = log.find(marker)
        answered = re.findall(r"parsed INFORMATIONAL request (\d+) \[ \]", log[at:]) \
            if at >= 0 else []
        if len(answered) >= count:
            return log, answered
        assert time.monotonic() < deadline, f"{log}\n{cluster.logs()}"
        time.sleep(0.5)


def test_a_liveness_check_in_flight_when_its_owner_died_goes_again_from_the_survivor() -> None:
    """strongSwan answered the owner's first liveness check; the next never reaches it
    (dropped on the wire) and the owner dies. The survivor finds that request in the
    snapshot and sends the same datagram again: a retransmission to strongSwan, answered,
    so the message IDs stay in step with no RFC 6311 sync, which strongSwan could not
    answer here (with AES-GCM its IVs count message IDs and its answer to our request 0
    used the one a response with ID 0 needs; it drops the IKE SA instead)."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        # strongSwan's own DPD (10 s) stays out of the way: the survivor takes the SA
        # over when it comes, the owner's liveness checks (every 2 s) are what matters
        initiator = replace(initiator, dpd_delay="10s", extra={"mobike": "no"})
        responder = replace(responder, dpd_delay="2s")
        charon, sa = _connect(lab, cluster, initiator, responder,
                              settings={"retransmit_tries": "6"})
        owner = _owner(cluster, sa["responder-spi"])
        wait_for_charon_log(charon, r"parsed INFORMATIONAL request 0 \[ \]")
        _block_ike_to_the_initiator(lab)
        log_before = _owner_killed(lab, cluster, charon, owner, 3.0)  # (a liveness check)
        resent = _resent_by_survivor(cluster)
        assert "our request 1 in flight" in resent, resent
        log, answered = _answered_after(charon, log_before, "", 2, cluster)
        assert "MID sync" not in log and "ignored" not in log, f"{log}\n{cluster.logs()}"
        assert answered[0] == "1", log  # the owner's request, now answered
        now = established(charon)
        assert now and now[0]["responder-spi"] == sa["responder-spi"]
        assert "IKE_AUTH" not in log
        report("cluster", f"a liveness check in flight at the owner's death: {resent}; "
                          f"strongSwan answered requests {answered}, no MID sync")


def test_a_child_sa_rekey_in_flight_when_its_owner_died_is_finished_by_the_survivor() -> None:
    """The owner's Child SA rekey (the worker's packet limit asked for it) never reaches
    strongSwan (dropped on the wire) and the owner dies. The snapshot holds the request
    with our nonce, new SPI and key exchange: the survivor sends it again and finishes
    the rekey with strongSwan's answer, no RFC 6311 sync. The survivor keeps the SA (its
    view of the responders may still list the dead owner for a moment: it must not hand
    the SA back to it), and when it dies too the third responder takes over, again
    without a sync, and its liveness checks are answered."""
    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        # without MOBIKE: an address-list update strongSwan may send when the veth's
        # link-local address settles would be lost to the block below, and strongSwan
        # would give the SA up (seen once in CI)
        initiator = replace(initiator, dpd_delay="3s", extra={"mobike": "no"})
        responder = replace(responder, dpd_delay="2s")
        # strongSwan's own DPD may fall into the block too: it must keep retrying until
        # the survivor has taken the SA over (the dead owner's lease runs out first), not
        # give up after the lab's usual two retransmits (seen once in CI)
        charon, sa = _connect(lab, cluster, initiator, responder,
                              settings={"retransmit_tries": "6"},
                              worker_extra={"worker": {"lifetime_packets": 100}})
        first_spi = child_sa(sa)["spi-in"]
        owner = _owner(cluster, sa["responder-spi"])
        _block_ike_to_the_initiator(lab)
        # 95 packets each way: past the soft limit (90), short of the hard one (100); the
        # owner's rekey request is then its first, before any liveness check (2 s)
        ping = lab.initiator.run(["ping", "-n", "-c", "95", "-i", "0.005", "-W", "2", "-I",
                                  INITIATOR_INNER_V4, RESPONDER_INNER_V4], check=False,
                                 timeout=30)
        assert " 0% packet loss" in ping.stdout, ping.stdout
        wait_for_log(cluster.workers[0], "reached its soft limit")
        log_before = _owner_killed(lab, cluster, charon, owner, 2.0)  # (the rekey request)
        resent = _resent_by_survivor(cluster)
        took_over = f"took over IKE SA {sa['initiator-spi']}_i/{sa['responder-spi']}_r"
        after, answered = _answered_after(charon, log_before, "parsed CREATE_CHILD_SA", 2,
                                          cluster)
        assert "MID sync" not in after and "ignored" not in after, (
            f"{after}\n{cluster.logs()}")
        assert re.search(r"parsed CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No", after)
        now = established(charon)
        assert now and now[0]["responder-spi"] == sa["responder-spi"]
        installed = [c for c in now[0]["child-sas"].values() if c["state"] == "INSTALLED"]
        assert len(installed) == 1 and installed[0]["spi-in"] != first_spi, installed
        (survivor,) = [n for n in cluster.responders if resent in n.log_text()]
        assert "another node acts for it now" not in survivor.log_text(), cluster.logs()

        (third,) = [n for n in cluster.responders if n.running() and n is not survivor]
        log_before = len(charon.log_text())
        survivor.kill()
        deadline = time.monotonic() + 30
        while took_over not in third.log_text():
            assert time.monotonic() < deadline, f"no second takeover:\n{cluster.logs()}"
            time.sleep(0.5)
        later, again = _answered_after(charon, log_before, "", 2, cluster)
        assert "MID sync" not in later and "ignored" not in later, (
            f"{later}\n{cluster.logs()}")
        now = established(charon)
        assert now and now[0]["responder-spi"] == sa["responder-spi"]
        report("cluster", f"a Child SA rekey in flight at the owner's death: the survivor "
                          f"finished it ({first_spi} -> {installed[0]['spi-in']}), "
                          f"{len(answered)} liveness checks answered; after a second "
                          f"takeover {len(again)} answered; no MID sync")


def test_an_ike_sa_rekey_in_flight_when_its_owner_died_is_finished_by_the_survivor() -> None:
    """The owner's IKE SA rekey (its rekey_time, 4 s) never reaches strongSwan (dropped on
    the wire) and the owner dies. The snapshot holds the request with our nonce, new SPI
    and key exchange: the survivor sends it again when strongSwan's DPD brings it the SA
    and finishes the rekey with the answer, no RFC 6311 sync."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        # strongSwan's DPD (10 s) is what reaches the survivor once the owner is gone
        initiator = replace(initiator, dpd_delay="10s", extra={"mobike": "no"})
        responder = replace(responder, rekey_time="4s",
                            node_extra={"over_time": "60s", "rand_time": "0s"})
        charon, sa = _connect(lab, cluster, initiator, responder,
                              settings={"retransmit_tries": "6"})
        owner = _owner(cluster, sa["responder-spi"])
        _block_ike_to_the_initiator(lab)
        log_before = _owner_killed(lab, cluster, charon, owner, 5.5)  # (the rekey at 4 s)
        resent = _resent_by_survivor(cluster)
        log = wait_for_charon_log(charon, r"IKE_SA rw\[\d+\] rekeyed between")[log_before:]
        assert re.search(r"parsed CREATE_CHILD_SA request \d+ \[ SA No KE \]", log), log
        assert "MID sync" not in log and "ignored" not in log, f"{log}\n{cluster.logs()}"
        now = established(charon)
        assert len(now) == 1 and now[0]["responder-spi"] != sa["responder-spi"], now
        report("cluster", f"an IKE SA rekey in flight at the owner's death: {resent}; "
                          f"strongSwan rekeyed to {now[0]['responder-spi']}, no MID sync")


def test_an_ike_sa_delete_in_flight_when_its_owner_died_is_finished_by_the_survivor() -> None:
    """`ike-cluster terminate` makes the owner send its Delete of the IKE SA, which never
    reaches strongSwan (dropped on the wire), and the owner dies. The snapshot holds the
    SA as being deleted with that request: the survivor sends the Delete again when
    strongSwan's DPD brings it the SA, strongSwan deletes the SA and answers, and the
    survivor ends it as the operator asked (the SA does not live on as if the terminate
    had never been)."""
    with Lab() as lab, ClusterLab(lab, responders=2) as cluster:
        initiator, responder = conn_pair()
        # strongSwan's DPD (10 s) is what reaches the survivor once the owner is gone
        initiator = replace(initiator, dpd_delay="10s", extra={"mobike": "no"})
        charon, sa = _connect(lab, cluster, initiator, responder,
                              settings={"retransmit_tries": "6"})
        owner = cluster.responders[_owner(cluster, sa["responder-spi"]) - 1]
        _block_ike_to_the_initiator(lab)
        spis = f"{sa['initiator-spi']}_i/{sa['responder-spi']}_r"
        owner.ns.run([sys.executable, "-m", "cluster", "terminate", "--config",
                      str(owner.config_path), "--ike", spis, "--timeout", "1"], check=False)
        log_before = _owner_killed(lab, cluster, charon, _owner(cluster, sa["responder-spi"]),
                                   0.5)
        resent = _resent_by_survivor(cluster)
        log = wait_for_charon_log(charon, r"received DELETE for IKE_SA")[log_before:]
        assert "MID sync" not in log, f"{log}\n{cluster.logs()}"
        deadline = time.monotonic() + 10
        while established(charon) or not any(
                re.search(r"IKE SA deleted: [^\n]*terminated by an operator", node.log_text())
                for node in cluster.responders if node is not owner):
            assert time.monotonic() < deadline, f"{charon.log_text()}\n{cluster.logs()}"
            time.sleep(0.2)
        report("cluster", f"an IKE SA Delete in flight at the owner's death: {resent}; "
                          "strongSwan deleted the SA and answered the survivor")


def test_ike_sa_rekey_through_the_cluster_moves_the_sa_to_its_new_owner() -> None:
    """strongSwan rekeys the IKE SA: the new SPIs may hash to another responder, which
    takes the SA over once the old owner hands it on; DPD and a Child SA rekey on the new
    IKE SA work, and a ping keeps every reply."""
    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        initiator = replace(initiator, dpd_delay="2s")
        charon, sa = _connect(lab, cluster, initiator, responder)
        pinging = BackgroundPing.start(lab, 14.0)
        for _ in range(2):  # two IKE rekeys: each new SPI pair picks its owner afresh
            time.sleep(2.0)
            sa = _rekey_ike(charon, sa, cluster)
        charon.rekey(child="net")
        while pinging.running():
            time.sleep(0.2)
        sent, received, summary = pinging.result()
        assert received == sent, f"ping lost packets across IKE rekeys: {summary}"
        time.sleep(5.0)  # idle: strongSwan's DPD on the newest IKE SA
        log = charon.log_text()
        assert "IKE_AUTH request 1" in log and log.count("IKE_AUTH request") == 1
        final = established(charon)
        assert len(final) == 1 and final[0]["initiator-spi"] == sa["initiator-spi"], final
        installed = [c for c in final[0]["child-sas"].values() if c["state"] == "INSTALLED"]
        assert len(installed) == 1, final
        tail = log[log.rindex("CREATE_CHILD_SA"):]
        assert re.search(r"parsed INFORMATIONAL response \d+ \[ \]", tail), tail
        owners = [n.node_id for n in cluster.responders
                  if f"spi_r={sa['responder-spi']}" in n.log_text()
                  or f"took over IKE SA {sa['initiator-spi']}_i/{sa['responder-spi']}_r"
                  in n.log_text()]
        moves = sum(n.log_text().count("another node acts for it now")
                    for n in cluster.responders)
        report("cluster", f"two IKE rekeys and a Child SA rekey: {summary}; hand-overs "
                          f"{moves}; the newest SA at {owners}")
