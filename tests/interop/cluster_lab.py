"""The compose topology of docker/compose.yml as processes in network namespaces.

    with Lab() as lab, ClusterLab(lab, responders=3) as cluster:
        initiator, responder = conn_pair()
        cluster.start(responder)          # redis, 3 responders, 1 worker
        charon = lab.charon("initiator")  # strongSwan talks to the worker's public address

Namespaces (one per container, as compose makes them), all with unique names:
- ``<lab>-c``: the compose network, a bridge ``br0`` at 10.98.0.1/24; Redis runs here
  (the ``redis`` service), bound to 10.98.0.1.
- the lab's responder namespace is the worker's: public 10.99.0.2 towards strongSwan
  and 10.98.0.10 on the compose network;
- ``<lab>-r1`` ... ``-rN``: one responder each, 10.98.0.11 ... on the compose network.
Every node reaches the others and Redis only over the bridge, as containers do.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from cluster.store import ClusterKey
from tests.interop.lab import RESPONDER_V4, Lab
from tests.interop.netns import LabError, Netns, create_netns, destroy_netns, stop_process
from tests.interop.node import REPO_ROOT, logged, render_node_config
from tests.interop.spec import Conn

BRIDGE = "br0"
NET = "10.98.0"
REDIS_HOST = f"{NET}.1"
WORKER_HOST = f"{NET}.10"
RELAY_PORT = 4800
METRICS_PORT = 9464


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of family sample `name` in a Prometheus scrape whose labels
    include `labels`; AssertionError if there is none."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, rest = sample.partition("{")
        if sample_name != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"{name} {labels} not in the scrape"
    return total


class ClusterNode:
    """One `ike-cluster responder|worker` process in its namespace."""

    def __init__(self, cluster: ClusterLab, role: str, node_id: str, ns: Netns,
                 host: str, conns: Sequence[Conn], extra: dict[str, dict[str, Any]]) -> None:
        self.cluster = cluster
        self.role = role
        self.node_id = node_id
        self.ns = ns
        self.host = host
        self.dir = cluster.lab.dir / f"{role}-{node_id}"
        self.config_path = self.dir / "node.toml"
        self.log_path = self.dir / "node.log"
        self.conns = tuple(conns)
        self.extra = extra
        self.proc: Any = None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{METRICS_PORT}/metrics"

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, dict[str, Any]] = {
            "cluster": {
                "store": self.cluster.redis_url, "key": str(self.cluster.key_path),
                "relay": f"{self.host}:{RELAY_PORT}",
                "membership_ttl": self.cluster.membership_ttl,
            },
            "metrics": {"listen": f"{self.host}:{METRICS_PORT}", "interval": 0.2},
        }
        for table, values in self.extra.items():
            settings.setdefault(table, {}).update(values)
        text = render_node_config(self.conns, self.dir, node_id=self.node_id,
                                  addresses=[RESPONDER_V4], settings=settings)
        self.config_path.write_text(text)

    def start(self, timeout: float = 20.0) -> None:
        self.write_config()
        offset = len(self.log_text())  # a restarted node appends to the same log
        self.proc = self.ns.spawn(
            [sys.executable, "-m", "cluster", self.role, "--config", str(self.config_path)],
            output=self.log_path, env=dict(os.environ), cwd=REPO_ROOT)
        ready = "relay on" if self.role == "responder" else "worker " + self.node_id + ": IKE on"
        deadline = time.monotonic() + timeout
        while ready not in self.log_text()[offset:]:
            if self.proc.poll() is not None:
                raise LabError(f"{self.role} {self.node_id} exited with {self.proc.returncode}:"
                               f"\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.role} {self.node_id} not ready within {timeout} s:\n"
                               f"{self.log_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9: no goodbye to membership, no lease released."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> int | None:
        return None if self.proc is None else stop_process(self.proc)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged(self, pattern: str, timeout: float = 10.0) -> str:
        """The log once `pattern` (a regular expression) is in it (Node.logged)."""
        return logged(self.log_text, pattern, timeout)

    def metrics(self) -> str:
        return self.ns.run(["python3", "-c",
                            "import sys,urllib.request;"
                            f"sys.stdout.write(urllib.request.urlopen({self.metrics_url!r},"
                            "timeout=5).read().decode())"]).stdout


class ClusterLab:
    def __init__(self, lab: Lab, *, responders: int = 3, membership_ttl: str = "2s") -> None:
        self.lab = lab
        self.count = responders
        self.membership_ttl = membership_ttl
        base = lab.names["initiator"][:-2]
        self.names = {"compose": f"{base}-c",
                      **{f"r{n}": f"{base}-r{n}" for n in range(1, responders + 1)}}
        self.namespaces: list[Netns] = []
        self.compose: Netns | None = None
        self.redis: Any = None
        self.key_path = lab.dir / "cluster.key"
        self.redis_url = f"redis://{REDIS_HOST}:6379/0"
        self.responders: list[ClusterNode] = []
        self.workers: list[ClusterNode] = []

    def __enter__(self) -> ClusterLab:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        compose = self.compose = create_netns(self.names["compose"])
        self.namespaces.append(compose)
        compose.ip("link", "add", BRIDGE, "type", "bridge")
        compose.ip("addr", "add", f"{REDIS_HOST}/24", "dev", BRIDGE)
        compose.ip("link", "set", BRIDGE, "up")
        self._attach(self.lab.responder, "w", WORKER_HOST)
        for n in range(1, self.count + 1):
            ns = create_netns(self.names[f"r{n}"])
            self.namespaces.append(ns)
            self._attach(ns, f"r{n}", self.responder_host(n))
        self.key_path.write_text(ClusterKey.generate().to_text())
        self.key_path.chmod(0o600)
        self.start_redis()

    def _attach(self, ns: Netns, port: str, host: str) -> None:
        assert self.compose is not None
        self.compose.ip("link", "add", port, "type", "veth", "peer", "name", "cl0", "netns",
                        ns.name)
        self.compose.ip("link", "set", port, "master", BRIDGE)
        self.compose.ip("link", "set", port, "up")
        ns.ip("addr", "add", f"{host}/24", "dev", "cl0")
        ns.ip("link", "set", "cl0", "up")

    @staticmethod
    def responder_host(n: int) -> str:
        return f"{NET}.{10 + n}"

    # -- redis ----------------------------------------------------------------------

    def start_redis(self, timeout: float = 10.0) -> None:
        assert self.compose is not None
        log = self.lab.dir / "redis.log"
        self.redis = self.compose.spawn(
            ["redis-server", "--bind", REDIS_HOST, "--port", "6379", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.lab.dir)],
            output=log)
        deadline = time.monotonic() + timeout
        while self.redis_cli("PING", check=False).strip() != "PONG":
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"redis-server did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop_redis(self) -> None:
        if self.redis is not None:
            stop_process(self.redis)
            self.redis = None

    def redis_cli(self, *args: str, check: bool = True) -> str:
        assert self.compose is not None
        return self.compose.run(["redis-cli", "-h", REDIS_HOST, "-p", "6379", *args],
                                check=check).stdout

    def redis_dump(self) -> dict[bytes, list[bytes]]:
        """Every key and every value under it (strings, hashes, streams, sorted sets)."""
        assert self.compose is not None
        script = (
            "import redis,sys\n"
            f"r=redis.Redis(host={REDIS_HOST!r},port=6379)\n"
            "for k in r.scan_iter(count=1000):\n"
            "  t=r.type(k)\n"
            "  if t==b'string': vals=[r.get(k)]\n"
            "  elif t==b'hash': vals=[x for kv in r.hgetall(k).items() for x in kv]\n"
            "  elif t==b'stream': vals=[x for _,f in r.xrange(k) for kv in f.items() for x in kv]\n"
            "  elif t==b'zset': vals=[m for m,_ in r.zrange(k,0,-1,withscores=True)]\n"
            "  elif t==b'set': vals=list(r.smembers(k))\n"
            "  elif t==b'list': vals=r.lrange(k,0,-1)\n"
            "  else: vals=[]\n"
            "  print(k.hex(), ' '.join(v.hex() for v in vals if v is not None))\n"
        )
        out = self.compose.run([sys.executable, "-c", script]).stdout
        dump: dict[bytes, list[bytes]] = {}
        for line in out.splitlines():
            key, _, values = line.partition(" ")
            dump[bytes.fromhex(key)] = [bytes.fromhex(v) for v in values.split()]
        return dump

    # -- nodes ------------------------------------------------------------------------

    def start(self, conns: Sequence[Conn], *, worker_extra: dict[str, dict[str, Any]] | None
              = None, responder_extra: dict[str, dict[str, Any]] | None = None) -> None:
        """Redis is up; now `count` responders and one worker, as `compose up` would."""
        for n in range(1, self.count + 1):
            self.responder(n, conns, responder_extra or {})
        self.worker(conns, worker_extra or {})

    def responder(self, n: int, conns: Sequence[Conn],
                  extra: dict[str, dict[str, Any]] | None = None) -> ClusterNode:
        ns = self.namespaces[n]
        node = ClusterNode(self, "responder", f"responder-{n}", ns, self.responder_host(n),
                           conns, extra or {})
        self.responders.append(node)
        node.start()
        return node

    def worker(self, conns: Sequence[Conn], extra: dict[str, dict[str, Any]] | None = None,
               node_id: str = "worker-1") -> ClusterNode:
        settings = {"worker": {"tun": f"ikw{os.getpid() % 100000}"}}
        for table, values in (extra or {}).items():
            settings.setdefault(table, {}).update(values)
        node = ClusterNode(self, "worker", node_id, self.lab.responder, WORKER_HOST, conns,
                           settings)
        self.workers.append(node)
        node.start()
        return node

    def logs(self, tail: int = 150) -> str:
        parts = [self.lab.logs(tail)]
        for node in [*self.responders, *self.workers]:
            lines = node.log_text().splitlines()[-tail:]
            parts.append(f"--- {node.role} {node.node_id}\n" + "\n".join(lines))
        return "\n".join(parts)

    def teardown(self) -> None:
        for node in [*self.workers, *self.responders]:
            node.stop()
        self.stop_redis()
        for ns in self.namespaces:
            destroy_netns(ns)
        self.namespaces.clear()
