"""A two-namespace lab: strongSwan (or anything) as initiator, a responder opposite.

    with Lab(tmp_path) as lab:
        initiator, responder = conn_pair()
        node = lab.node([responder])            # our product in the responder netns
        charon = lab.charon("initiator")
        charon.load(initiator)
        assert charon.initiate("net").returncode == 0

Layout: namespace ``<prefix>-<pid>-<rand>-i`` (10.99.0.1/24, fd99::1/64 on veth0;
10.99.1.1/32, fd99:1::1/128 on lo) and ``...-r`` (10.99.0.2, fd99::2; 10.99.2.1,
fd99:2::1). Leaving the ``with`` block stops every process the lab started and
deletes both namespaces, also when the block raised.

Also used by benchmarks and cluster tests, so it imports nothing from pytest.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.interop.certs import Credential, TestCa
from tests.interop.charon import PLUGINS, Charon
from tests.interop.netns import (
    LabError,
    Netns,
    create_netns,
    destroy_netns,
    run_host,
    stop_process,
)
from tests.interop.node import Node, render_node_config
from tests.interop.spec import (
    INITIATOR_ID,
    INITIATOR_INNER_V4,
    INITIATOR_INNER_V6,
    INITIATOR_NETS,
    INITIATOR_V4,
    INITIATOR_V6,
    RESPONDER_ID,
    RESPONDER_INNER_V4,
    RESPONDER_INNER_V6,
    RESPONDER_NETS,
    RESPONDER_V4,
    RESPONDER_V6,
    Child,
    Conn,
    End,
)

__all__ = [
    "INITIATOR_ID",
    "INITIATOR_INNER_V4",
    "INITIATOR_INNER_V6",
    "INITIATOR_V4",
    "INITIATOR_V6",
    "RESPONDER_ID",
    "RESPONDER_INNER_V4",
    "RESPONDER_INNER_V6",
    "RESPONDER_V4",
    "RESPONDER_V6",
    "Charon",
    "Child",
    "Conn",
    "Credential",
    "End",
    "IperfResult",
    "Lab",
    "LabError",
    "Netns",
    "Node",
    "TestCa",
    "WireCounters",
    "conn_pair",
    "render_node_config",
]

Side = Literal["initiator", "responder"]
VETH = "veth0"


class Lab:
    def __init__(self, workdir: Path | None = None, *, prefix: str = "ikc") -> None:
        self._own_workdir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-lab-")) if workdir is None else workdir
        base = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.names = {"initiator": f"{base}-i", "responder": f"{base}-r"}
        self._namespaces: list[Netns] = []
        self.charons: list[Charon] = []
        self.nodes: list[Node] = []

    # -- namespaces --------------------------------------------------------------

    @property
    def initiator(self) -> Netns:
        return self._namespaces[0]

    @property
    def responder(self) -> Netns:
        return self._namespaces[1]

    def ns(self, side: Side) -> Netns:
        return self.initiator if side == "initiator" else self.responder

    def __enter__(self) -> Lab:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for side in ("initiator", "responder"):
            self._namespaces.append(create_netns(self.names[side]))
        # Create both ends inside their namespaces: no name ever appears on the host.
        run_host([
            "ip", "link", "add", VETH, "netns", self.initiator.name, "type", "veth",
            "peer", "name", VETH, "netns", self.responder.name,
        ])  # fmt: skip
        for ns, outer4, outer6, inner4, inner6 in (
            (self.initiator, INITIATOR_V4, INITIATOR_V6, INITIATOR_INNER_V4, INITIATOR_INNER_V6),
            (self.responder, RESPONDER_V4, RESPONDER_V6, RESPONDER_INNER_V4, RESPONDER_INNER_V6),
        ):
            ns.ip("addr", "add", f"{outer4}/24", "dev", VETH)
            ns.ip("-6", "addr", "add", f"{outer6}/64", "dev", VETH, "nodad")
            ns.ip("addr", "add", f"{inner4}/32", "dev", "lo")
            ns.ip("-6", "addr", "add", f"{inner6}/128", "dev", "lo")
            ns.ip("link", "set", VETH, "up")

    def teardown(self) -> None:
        for node in self.nodes:
            node.stop()
        for charon in self.charons:
            charon.stop()
        for ns in self._namespaces:
            destroy_netns(ns)
        self._namespaces.clear()
        if self._own_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- daemons -----------------------------------------------------------------

    def charon(
        self,
        side: Side = "initiator",
        *,
        log_level: int = 1,
        log_levels: dict[str, int] | None = None,
        settings: dict[str, str] | None = None,
        plugins: str = PLUGINS,
        start: bool = True,
    ) -> Charon:
        """A charon in ``side``'s namespace, working in its own subdirectory."""
        workdir = self.dir / f"charon-{side[0]}{len(self.charons)}"
        workdir.mkdir(parents=True)
        charon = Charon(
            self.ns(side), workdir, log_level=log_level, log_levels=log_levels,
            settings=settings, plugins=plugins,
        )
        self.charons.append(charon)
        if start:
            charon.start()
        return charon

    def node(
        self,
        conns: Sequence[Conn],
        *,
        addresses: Sequence[str] = (RESPONDER_V4,),
        node_id: str = "gw1",
        extra_toml: str = "",
        start: bool = True,
        side: Side = "responder",
        settings: Mapping[str, Mapping[str, object]] | None = None,
    ) -> Node:
        """Our product in ``side``'s namespace (the responder's unless told), with ``conns``;
        ``settings`` adds keys to its ``[node]`` and ``[ike]`` tables (`render_node_config`)."""
        workdir = self.dir / f"node-{side[0]}{len(self.nodes)}"
        node = Node(
            self.ns(side), workdir, conns, node_id=node_id, addresses=addresses,
            extra_toml=extra_toml, settings=settings,
        )
        self.nodes.append(node)
        if start:
            node.start()
        return node

    # -- measuring traffic ---------------------------------------------------------

    def wire_counters(
        self, side: Side, rules: Mapping[str, tuple[Direction, str]]
    ) -> WireCounters:
        """nftables counters on ``side``'s veth, installed now (see `WireCounters`)."""
        counters = WireCounters(self.ns(side), rules)
        counters.install()
        return counters

    def iperf3(
        self,
        *,
        server: Side,
        server_addr: str,
        client_addr: str,
        seconds: int = 10,
        reverse: bool = False,
        port: int = 5201,
    ) -> IperfResult:
        """One iperf3 TCP run: a one-off server on ``server_addr`` in ``server``'s
        namespace, the client in the other one bound to ``client_addr`` (``-R``: the
        server sends). Raises LabError unless the run completed."""
        server_ns = self.ns(server)
        client_ns = self.initiator if server == "responder" else self.responder
        out = self.dir / f"iperf3-{server[0]}-{port}-{secrets.token_hex(2)}.json"
        proc = server_ns.spawn(
            ["iperf3", "--server", "--one-off", "--json", "--bind", server_addr,
             "--port", str(port)],
            output=out,
        )  # fmt: skip
        deadline = time.monotonic() + 10.0
        listening = f"[{server_addr}]:{port}" if ":" in server_addr else f"{server_addr}:{port}"
        while listening not in server_ns.run(["ss", "-H", "-t", "-l", "-n"]).stdout:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise LabError(f"iperf3 server did not listen on {server_addr}:{port}:\n"
                               f"{out.read_text(errors='replace')}")
            time.sleep(0.05)
        argv = ["iperf3", "--client", server_addr, "--bind", client_addr, "--port", str(port),
                "--time", str(seconds), "--json", *(["--reverse"] if reverse else [])]
        try:
            client = client_ns.run(argv, check=False, timeout=seconds + 30)
        finally:
            stop_process(proc, timeout=10.0)
        try:
            report: dict[str, Any] = json.loads(client.stdout)
        except json.JSONDecodeError:
            report = {"error": f"no JSON report: {client.stdout}{client.stderr}"}
        if client.returncode != 0 or "error" in report:
            raise LabError(f"iperf3 {' '.join(argv)} failed ({client.returncode}): "
                           f"{report.get('error')}\nserver: {out.read_text(errors='replace')}")
        return IperfResult.from_report(report, reverse=reverse)

    def logs(self, tail: int = 200) -> str:
        """The last lines of every daemon's log, for a failure report."""
        parts = []
        for charon in self.charons:
            lines = (charon.output() + charon.log_text()).splitlines()[-tail:]
            parts.append(f"--- {charon.dir.name} ({charon.ns.name})\n" + "\n".join(lines))
        for node in self.nodes:
            lines = node.log_text().splitlines()[-tail:]
            parts.append(f"--- {node.dir.name} ({node.ns.name})\n" + "\n".join(lines))
        return "\n".join(parts)


def conn_pair(
    *,
    proposals: Sequence[str] = ("aes256gcm16-prfsha256-x25519",),
    responder_proposals: Sequence[str] | None = None,
    esp_proposals: Sequence[str] = ("aes256gcm16",),
    responder_esp_proposals: Sequence[str] = ("aes256gcm16", "aes128gcm16"),
    mode: str = "tunnel",
    family: int = 4,
    psk: str = "change-me",
    encap: bool = False,
    ca: Path | None = None,
    initiator_cred: Credential | None = None,
    responder_cred: Credential | None = None,
    initiator_id: str = INITIATOR_ID,
    responder_id: str = RESPONDER_ID,
) -> tuple[Conn, Conn]:
    """Matching (initiator, responder) connections named ``rw`` with child ``net``.

    PSK unless both credentials and ``ca`` are given, then certificates. The
    responder accepts any remote id. Change one side with ``dataclasses.replace``
    to build a mismatch.
    """
    if family not in (4, 6):
        raise ValueError("family is 4 or 6")
    i_addr, r_addr = (INITIATOR_V4, RESPONDER_V4) if family == 4 else (INITIATOR_V6, RESPONDER_V6)
    if initiator_cred and responder_cred and ca:
        i_local = End("pubkey", initiator_id, initiator_cred.cert, initiator_cred.key)
        i_remote = End("pubkey", responder_id, cacerts=(ca,))
        r_local = End("pubkey", responder_id, responder_cred.cert, responder_cred.key)
        r_remote = End("pubkey", "%any", cacerts=(ca,))
        secret: str | None = None
    elif initiator_cred or responder_cred or ca:
        raise ValueError("certificates need initiator_cred, responder_cred and ca")
    else:
        i_local, i_remote = End("psk", initiator_id), End("psk", responder_id)
        r_local, r_remote = End("psk", responder_id), End("psk", "%any")
        secret = psk
    initiator = Conn(
        local=i_local,
        remote=i_remote,
        proposals=tuple(proposals),
        children=(Child(
            mode=mode,
            local_ts=(INITIATOR_NETS[family],),
            remote_ts=(RESPONDER_NETS[family],),
            esp_proposals=tuple(esp_proposals),
        ),),
        local_addrs=(i_addr,),
        remote_addrs=(r_addr,),
        psk=secret,
        encap=encap,
    )  # fmt: skip
    responder = Conn(
        local=r_local,
        remote=r_remote,
        proposals=tuple(responder_proposals or proposals),
        children=(Child(
            mode=mode,
            local_ts=(RESPONDER_NETS[family],),
            remote_ts=(INITIATOR_NETS[family],),
            esp_proposals=tuple(responder_esp_proposals),
        ),),
        local_addrs=(r_addr,),
        psk=secret,
    )  # fmt: skip
    return initiator, responder


Direction = Literal["in", "out"]
WIRE_TABLE = "ikc_wire"


class WireCounters:
    """nftables packet counters on a namespace's veth, independent of every daemon.

    The ``netdev`` family's ingress and egress hooks see each packet as it crosses
    the interface, after whatever produced it (a TUN, a raw socket, the kernel).
    ``rules`` maps a counter name to a direction and an nft match, e.g.
    ``{"esp_udp_out": ("out", "udp dport 4500 @th,64,32 != 0")}``: UDP to 4500
    whose first payload word is non-zero, i.e. ESP in UDP, not the IKE marker.
    """

    def __init__(
        self, ns: Netns, rules: Mapping[str, tuple[Direction, str]], device: str = VETH
    ) -> None:
        self.ns = ns
        self.rules = dict(rules)
        self.device = device

    def install(self) -> None:
        chains: dict[Direction, list[str]] = {"in": [], "out": []}
        for name, (direction, match) in self.rules.items():
            chains[direction].append(f'        {match} counter name "{name}"\n')
        script = f"table netdev {WIRE_TABLE} {{\n"
        script += "".join(f"    counter {name} {{}}\n" for name in self.rules)
        for direction, hook in (("in", "ingress"), ("out", "egress")):
            script += (
                f"    chain {hook} {{\n"
                f'        type filter hook {hook} device "{self.device}" priority 0;'
                " policy accept;\n"
                + "".join(chains[direction])
                + "    }\n"
            )  # fmt: skip
        script += "}\n"
        path = Path(tempfile.mkstemp(prefix="ikc-nft-", suffix=".nft")[1])
        try:
            path.write_text(script)
            self.ns.run(["nft", "-f", str(path)])
        finally:
            path.unlink()

    def read(self) -> dict[str, int]:
        """Packets counted so far, per counter name."""
        out = self.ns.run(["nft", "-j", "list", "counters", "table", "netdev", WIRE_TABLE])
        counts = {}
        for item in json.loads(out.stdout)["nftables"]:
            counter = item.get("counter")
            if counter is not None:
                counts[counter["name"]] = int(counter["packets"])
        return counts

    def since(self, before: Mapping[str, int]) -> dict[str, int]:
        """Packets counted after ``before`` (an earlier `read`)."""
        return {name: n - before.get(name, 0) for name, n in self.read().items()}

    def read_bytes(self) -> dict[str, int]:
        """Bytes counted so far, per counter name.

        Packet counts are skbs: a UDP GSO send (the worker's ESP in UDP) crosses the
        veth as one skb carrying up to 64 datagrams, so bulk transfers are checked by
        bytes (the ESP bytes on the wire are at least the payload they carried).
        """
        out = self.ns.run(["nft", "-j", "list", "counters", "table", "netdev", WIRE_TABLE])
        counts = {}
        for item in json.loads(out.stdout)["nftables"]:
            counter = item.get("counter")
            if counter is not None:
                counts[counter["name"]] = int(counter["bytes"])
        return counts

    def bytes_since(self, before: Mapping[str, int]) -> dict[str, int]:
        """Bytes counted after ``before`` (an earlier `read_bytes`)."""
        return {name: n - before.get(name, 0) for name, n in self.read_bytes().items()}


@dataclass(frozen=True)
class IperfResult:
    """What the iperf3 client reported for one TCP run."""

    seconds: float
    sent_bytes: int
    received_bytes: int
    mbit_s: float  # as received
    reverse: bool

    @classmethod
    def from_report(cls, report: Mapping[str, Any], *, reverse: bool) -> IperfResult:
        end = report["end"]
        received = end["sum_received"]
        return cls(
            seconds=float(received["seconds"]),
            sent_bytes=int(end["sum_sent"]["bytes"]),
            received_bytes=int(received["bytes"]),
            mbit_s=float(received["bits_per_second"]) / 1e6,
            reverse=reverse,
        )

    def __str__(self) -> str:
        direction = "responder -> initiator" if self.reverse else "initiator -> responder"
        return (f"{direction}: {self.mbit_s:.1f} Mbit/s, {self.received_bytes} bytes "
                f"in {self.seconds:.1f} s")


def updown_recorder(directory: Path) -> tuple[Path, Path]:
    """A child's updown program that appends its PLUTO_* variables to a file as a JSON
    line and prints who it opened the firewall for: (the program, the file)."""
    record = directory / "updown.jsonl"
    program = directory / "updown"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, os\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps({k: v for k, v in os.environ.items()\n"
        "                        if k.startswith('PLUTO_')}) + '\\n')\n"
        "print('firewall opened for', os.environ.get('PLUTO_PEER_SOURCEIP'))\n")
    program.chmod(0o755)
    return program, record


def updown_runs(record: Path, count: int, timeout: float = 10.0) -> list[dict[str, str]]:
    """The runs `updown_recorder`'s program recorded, once there are `count` (and none
    more half a second later)."""
    deadline = time.monotonic() + timeout
    while not record.exists() or len(record.read_text().splitlines()) < count:
        assert time.monotonic() < deadline, record.read_text() if record.exists() else ""
        time.sleep(0.1)
    time.sleep(0.5)
    return [json.loads(line) for line in record.read_text().splitlines()]
