"""Our product (``python -m cluster run``) as the responder in a lab namespace."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests.interop.netns import LabError, Netns, stop_process
from tests.interop.spec import RESPONDER_V4, Conn, End

REPO_ROOT = Path(__file__).resolve().parents[2]


def _toml(value: object) -> str:
    """A TOML value for the few types our configs use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # "1.0", "1.8": valid TOML floats (no inf/nan in our configs)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def _end_table(end: End, config_dir: Path) -> dict[str, object]:
    """The inline table for an end; credential files are copied next to the config."""
    table: dict[str, object] = {"auth": end.auth, "id": end.id}
    if end.eap_id is not None:
        table["eap_id"] = end.eap_id
    if end.groups:
        table["groups"] = list(end.groups)
    for pin in end.pins:
        shutil.copy(pin, config_dir / pin.name)
    if end.pins:
        table["certs"] = [pin.name for pin in end.pins]
    if end.cert is not None:
        shutil.copy(end.cert, config_dir / end.cert.name)
        table["cert"] = end.cert.name
    if end.key is not None:
        shutil.copy(end.key, config_dir / end.key.name)
        table["key"] = end.key.name
    if end.cacerts:
        for ca in end.cacerts:
            shutil.copy(ca, config_dir / ca.name)
        table["cacerts"] = [ca.name for ca in end.cacerts]
    if end.crls:
        for crl in end.crls:
            shutil.copy(crl, config_dir / crl.name)
        table["crls"] = [crl.name for crl in end.crls]
    if end.crl_uris:
        table["crls"] = [*table.get("crls", []), *end.crl_uris]  # type: ignore[list-item]
    if end.revocation is not None:
        table["revocation"] = end.revocation
    return table


def logged(read: Callable[[], str], pattern: str, timeout: float = 10.0) -> str:
    """What `read` gives (a process's log), once `pattern` (a regular expression) is in
    it; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, text := read()):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{text}"
        time.sleep(0.05)
    return text


def render_node_config(
    conns: Sequence[Conn],
    config_dir: Path,
    *,
    node_id: str,
    addresses: Sequence[str],
    settings: Mapping[str, Mapping[str, object]] | None = None,
) -> str:
    """Our TOML for ``conns`` (seen from the node's side).

    ``settings`` adds keys to the ``[node]`` and ``[ike]`` tables, e.g.
    ``{"node": {"log_level": "debug"}, "ike": {"retransmit_tries": 2}}``; other
    names become tables of their own. (``extra_toml`` cannot reach ``[node]`` or
    ``[ike]``: TOML forbids defining a table twice.)
    """
    settings = settings or {}
    node_table = {"id": node_id, **settings.get("node", {})}
    ike_table = {"addresses": list(addresses), **settings.get("ike", {})}
    tables: dict[str, Mapping[str, object]] = {"node": node_table, "ike": ike_table}
    tables.update((k, v) for k, v in settings.items() if k not in tables)
    out: list[str] = []
    for name, table in tables.items():
        out += [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items()), ""]
    for conn in conns:
        out += [
            f"[connections.{conn.name}]",
            f"version = {conn.version}",
            f"proposals = {_toml(conn.proposals)}",
        ]
        if conn.encap:
            out.append("encap = true")
        # swanctl's duration strings ("4s") are what our config reads too
        if conn.rekey_time is not None:
            out.append(f"rekey_time = {_toml(conn.rekey_time)}")
        if conn.dpd_delay is not None:
            out.append(f"dpd_delay = {_toml(conn.dpd_delay)}")
        out += [f"{k} = {_toml(v)}" for k, v in conn.node_extra.items()]
        if conn.remote_addrs:
            # only initiating connections have them (conn_pair's responder has none)
            out.append(f"remote_addrs = {_toml(conn.remote_addrs)}")
        out += [
            f"local = {_toml(_end_table(conn.local, config_dir))}",
            f"remote = {_toml(_end_table(conn.remote, config_dir))}",
            "",
        ]
        for child in conn.children:
            out += [
                f"[connections.{conn.name}.children.{child.name}]",
                f"mode = {_toml(child.mode)}",
            ]
            # none given: the node's default, "dynamic" (the outer addresses)
            if child.local_ts:
                out.append(f"local_ts = {_toml(child.local_ts)}")
            if child.remote_ts:
                out.append(f"remote_ts = {_toml(child.remote_ts)}")
            if child.start_action != "none":
                out.append(f"start_action = {_toml(child.start_action)}")
            # our node's own child settings (charon's config leaves them out)
            for key in ("updown", "inactivity", "copy_dscp", "copy_ecn", "close_action",
                        "tfc_padding", "sha256_96"):
                value = getattr(child, key)
                if value is not None:
                    out.append(f"{key} = {_toml(value)}")
            out += [f"{key} = {value}" for key, value in child.volume]
            for key, value in (("rekey_time", child.rekey_time),
                               ("life_time", child.life_time),
                               ("rand_time", child.rand_time)):
                if value is not None:
                    out.append(f"{key} = {_toml(value)}")
            out += [f"esp_proposals = {_toml(child.esp_proposals)}", ""]
        for user, password in conn.eap_users:
            out += [f"[secrets.eap-{conn.name}-{user}]", f"ids = {_toml([user])}",
                    f"secret = {_toml(password)}", ""]
        for n, (ppk_id, secret) in enumerate(conn.ppks):
            out += [f"[secrets.ppk-{conn.name}-{n}]", f"ids = {_toml([ppk_id])}",
                    f"secret = {_toml(secret)}", ""]
        if conn.psk is not None:
            out += [
                f"[secrets.{conn.name}]",
                f"ids = {_toml([conn.local.id, conn.remote.id])}",
                f"secret = {_toml(conn.psk)}",
                "",
            ]
    return "\n".join(out)


class Node:
    """One ``cluster run`` process; its stderr goes to ``log_path``.

    A responder by default; a connection with ``remote_addrs`` and a child with
    ``start_action="start"`` makes it initiate at start-up.
    """

    def __init__(
        self,
        ns: Netns,
        workdir: Path,
        conns: Sequence[Conn],
        *,
        node_id: str = "gw1",
        addresses: Sequence[str] = (RESPONDER_V4,),
        extra_toml: str = "",
        ports: Sequence[int] = (500, 4500),
        settings: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        self.ns = ns
        self.dir = workdir
        self.config_path = workdir / "node.toml"
        self.log_path = workdir / "node.log"
        self.conns = tuple(conns)
        self.node_id = node_id
        self.addresses = tuple(addresses)
        self.extra_toml = extra_toml
        self.ports = tuple(ports)
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        text = render_node_config(
            self.conns, self.dir, node_id=self.node_id, addresses=self.addresses,
            settings=self.settings,
        )
        self.config_path.write_text(text + ("\n" + self.extra_toml if self.extra_toml else ""))
        return self.config_path

    def start(self, timeout: float = 20.0) -> None:
        """Start the node and wait until its UDP ports are bound in the namespace."""
        self.write_config()
        self.proc = self.ns.spawn(
            [sys.executable, "-m", "cluster", "run", "--config", str(self.config_path)],
            output=self.log_path,
            env=dict(os.environ),
            cwd=REPO_ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(
                    f"node exited with {self.proc.returncode} before binding UDP "
                    f"{self.ports}; config {self.config_path}; log:\n{self.log_text()}"
                )
            if set(self.ports) <= self.ns.udp_ports_bound():
                return
            time.sleep(0.05)
        raise LabError(
            f"node did not bind UDP {self.ports} within {timeout}s; log:\n{self.log_text()}"
        )

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged(self, pattern: str, timeout: float = 10.0) -> str:
        """The log once `pattern` (a regular expression) is in it: a line the node writes
        after the datagram a peer reacts to may come a moment after that reaction."""
        return logged(self.log_text, pattern, timeout)

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
