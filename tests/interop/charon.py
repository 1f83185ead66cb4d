"""strongSwan's charon as an interop peer, run from a private directory in a netns.

Facts this relies on (see notes/strongswan-here.md): the pid file path is compiled
in, so a private directory is bind-mounted over /run for charon alone; the kernel has
no ESP, so kernel-libipsec (listed before kernel-netlink) carries tunnel mode.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.interop.netns import LabError, Netns, stop_process
from tests.interop.spec import Conn, End
from tests.interop.swanctl_raw import parse_raw

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "/usr/sbin/swanctl"

# kernel-libipsec before kernel-netlink: the first kernel-ipsec backend wins.
# openssl first: libipsec then uses OpenSSL's AES-GCM (AES-NI), not strongSwan's own
# software AES, as a tuned deployment would (5x the throughput here)
PLUGINS = (
    "openssl random nonce drbg aes sha1 sha2 md5 hmac xcbc cmac kdf gmp mgf1 curve25519 "
    "chapoly gcm ccm ctr pem pkcs1 pkcs8 x509 pubkey constraints revocation eap-identity "
    "eap-mschapv2 "
    "kernel-libipsec kernel-netlink socket-default vici"
)

LOG_SUBSYSTEMS = (
    "dmn", "mgr", "ike", "chd", "job", "cfg", "knl", "net", "asn", "enc",
    "lib", "esp", "tls", "tnc", "imc", "imv", "pts",
)  # fmt: skip


def _q(value: str) -> str:
    """A swanctl.conf / strongswan.conf quoted string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _csv(values: tuple[str, ...]) -> str:
    return _q(",".join(values))


class Charon:
    """One charon daemon with its own strongswan.conf, vici socket and log file.

    ``log_level`` is the filelog default (-1..4); ``log_levels`` overrides single
    subsystems, e.g. ``{"ike": 4, "chd": 4}`` to see derived keys.
    """

    def __init__(
        self,
        ns: Netns,
        workdir: Path,
        *,
        log_level: int = 1,
        log_levels: dict[str, int] | None = None,
        settings: dict[str, str] | None = None,
        plugins: str = PLUGINS,
    ) -> None:
        self.ns = ns
        self.plugins = plugins
        self.dir = workdir
        self.log_path = workdir / "charon.log"
        self.stdout_path = workdir / "charon.out"
        self.vici = workdir / "charon.vici"
        self.uri = f"unix://{self.vici}"
        self.conf_path = workdir / "strongswan.conf"
        # where the resolve plugin (when a test loads it) writes the DNS servers it got
        self.resolv_conf = workdir / "resolv.conf"
        self.swanctl_dir = workdir / "swanctl"
        self.log_level = log_level
        self.log_levels = dict(log_levels or {})
        for name in self.log_levels:
            if name not in LOG_SUBSYSTEMS:
                raise ValueError(f"unknown charon log subsystem {name!r}")
        self.settings = {"install_virtual_ip": "no", **(settings or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def write_strongswan_conf(self) -> None:
        levels = "".join(f"                {k} = {v}\n" for k, v in self.log_levels.items())
        # Tests want failures within seconds, not minutes (unless a test says otherwise).
        settings = {"retransmit_timeout": "1.0", "retransmit_base": "1.4",
                    "retransmit_tries": "2", **self.settings}
        extra = "".join(f"    {k} = {v}\n" for k, v in settings.items())
        self.conf_path.write_text(
            f"""charon {{
    load = {self.plugins}
    port = 500
    port_nat_t = 4500
{extra}    filelog {{
        lab {{
            path = {self.log_path}
            time_format = %H:%M:%S
            ike_name = yes
            flush_line = yes
            append = yes
            default = {self.log_level}
{levels}        }}
    }}
    syslog {{
    }}
    plugins {{
        vici {{
            socket = {self.uri}
        }}
        kernel-libipsec {{
            allow_peer_ts = yes
        }}
        resolve {{
            file = {self.resolv_conf}
        }}
    }}
}}
"""
        )

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "STRONGSWAN_CONF": str(self.conf_path)}

    def start(self, timeout: float = 10.0) -> None:
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        for sub in ("x509", "x509ca", "x509crl", "private"):
            (self.swanctl_dir / sub).mkdir(parents=True, exist_ok=True)
        self.write_strongswan_conf()
        # /run is charon's compiled-in pid file location; ip netns exec already gave
        # us a private mount namespace, so this bind mount is invisible elsewhere.
        self.proc = self.ns.spawn(
            ["/bin/sh", "-c", 'mount --bind "$0" /run && exec "$1"', str(self.dir / "run"),
             CHARON],
            output=self.stdout_path,
            env=self.env(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"charon exited with {self.proc.returncode}:\n{self.output()}")
            if self.vici.exists() and self.swanctl("--stats", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise LabError(f"charon did not open {self.vici} within {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout)

    def __enter__(self) -> Charon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration -----------------------------------------------------------

    def _install_credentials(self, end: End) -> dict[str, str]:
        """Copy an end's files into swanctl's directories; return swanctl.conf settings."""
        out: dict[str, str] = {}
        if end.cert is not None:
            shutil.copy(end.cert, self.swanctl_dir / "x509" / end.cert.name)
            out["certs"] = _q(end.cert.name)
        if end.key is not None:
            shutil.copy(end.key, self.swanctl_dir / "private" / end.key.name)
        if end.cacerts:
            for ca in end.cacerts:
                shutil.copy(ca, self.swanctl_dir / "x509ca" / ca.name)
            out["cacerts"] = _csv(tuple(ca.name for ca in end.cacerts))
        for crl in end.crls:  # loaded from x509crl by --load-all, used by "revocation"
            shutil.copy(crl, self.swanctl_dir / "x509crl" / crl.name)
        return out

    def render_conn(self, conn: Conn) -> str:
        def end_block(name: str, end: End) -> str:
            settings = {"auth": end.auth, "id": _q(end.id), **self._install_credentials(end)}
            if end.eap_id is not None:
                settings["eap_id"] = _q(end.eap_id)
            body = "".join(f"            {k} = {v}\n" for k, v in settings.items())
            return f"        {name} {{\n{body}        }}\n"

        lines = [f"version = {conn.version}", f"proposals = {_csv(conn.proposals)}"]
        if conn.local_addrs:
            lines.append(f"local_addrs = {_csv(conn.local_addrs)}")
        if conn.remote_addrs:
            lines.append(f"remote_addrs = {_csv(conn.remote_addrs)}")
        lines.append(f"encap = {'yes' if conn.encap else 'no'}")
        if conn.rekey_time is not None:
            lines.append(f"rekey_time = {conn.rekey_time}")
        if conn.dpd_delay is not None:
            lines.append(f"dpd_delay = {conn.dpd_delay}")
        lines += [f"{k} = {v}" for k, v in conn.extra.items()]
        children = []
        for child in conn.children:
            c = [
                f"mode = {child.mode}",
                f"esp_proposals = {_csv(child.esp_proposals)}",
                f"start_action = {child.start_action}",
            ]
            if child.local_ts:
                c.append(f"local_ts = {_csv(child.local_ts)}")
            if child.remote_ts:
                c.append(f"remote_ts = {_csv(child.remote_ts)}")
            if child.rekey_time is not None:
                c.append(f"rekey_time = {child.rekey_time}")
            if child.life_time is not None:
                c.append(f"life_time = {child.life_time}")
            if child.rand_time is not None:
                c.append(f"rand_time = {child.rand_time}")
            if child.sha256_96 is not None:
                c.append(f"sha256_96 = {'yes' if child.sha256_96 else 'no'}")
            body = "".join(f"                {line}\n" for line in c)
            children.append(f"            {child.name} {{\n{body}            }}\n")
        head = "".join(f"        {line}\n" for line in lines)
        return (
            f"    {conn.name} {{\n{head}"
            + end_block("local", conn.local)
            + end_block("remote", conn.remote)
            + "        children {\n" + "".join(children) + "        }\n"
            "    }\n"
        )

    def render_secrets(self, conn: Conn) -> str:
        eap = "".join(
            f"    eap-{conn.name}-{user} {{\n        id = {_q(user)}\n"
            f"        secret = {_q(password)}\n    }}\n" for user, password in conn.eap_users)
        eap += "".join(
            f"    ppk-{conn.name}-{n} {{\n        id = {_q(ppk_id)}\n"
            f"        secret = {_q(secret)}\n    }}\n"
            for n, (ppk_id, secret) in enumerate(conn.ppks))
        if conn.psk is None:
            return eap
        return eap + (
            f"    ike-{conn.name} {{\n"
            f"        id-local = {_q(conn.local.id)}\n"
            f"        id-remote = {_q(conn.remote.id)}\n"
            f"        secret = {_q(conn.psk)}\n"
            "    }\n"
        )

    def load(self, *conns: Conn, pools: dict[str, str] | None = None) -> str:
        """Write swanctl.conf for ``conns`` (and address ``pools``: name -> addrs) and load
        it all; returns swanctl's output."""
        conf = self.swanctl_dir / "swanctl.conf"
        pool_text = "".join(f"    {name} {{\n        addrs = {addrs}\n    }}\n"
                            for name, addrs in (pools or {}).items())
        conf.write_text(
            "connections {\n" + "".join(self.render_conn(c) for c in conns) + "}\n"
            "secrets {\n" + "".join(self.render_secrets(c) for c in conns) + "}\n"
            "pools {\n" + pool_text + "}\n"
        )
        return self.swanctl("--load-all", "--clear", "--file", str(conf)).stdout

    # -- control -----------------------------------------------------------------

    def swanctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        argv = [SWANCTL, *args, "--uri", self.uri]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        if check and proc.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}")
        return proc

    def initiate(
        self, child: str = "net", *, ike: str | None = None, timeout: int = 10
    ) -> subprocess.CompletedProcess[str]:
        """``swanctl --initiate``; check ``returncode`` (0 means established)."""
        args = ["--initiate", "--child", child, "--timeout", str(timeout)]
        if ike is not None:
            args += ["--ike", ike]
        return self.swanctl(*args, check=False, timeout=timeout + 10)

    def terminate_ike(
        self, ike: str = "rw", *, timeout: int = 10
    ) -> subprocess.CompletedProcess[str]:
        return self.swanctl(
            "--terminate", "--ike", ike, "--timeout", str(timeout), check=False,
            timeout=timeout + 10,
        )

    def rekey(self, *, child: str | None = None, ike: str | None = None) -> None:
        """Start a rekey (returns before it completes; poll ``list_sas``)."""
        if (child is None) == (ike is None):
            raise ValueError("give exactly one of child= or ike=")
        self.swanctl("--rekey", *(["--child", child] if child else ["--ike", str(ike)]))

    def list_sas(self) -> list[dict[str, Any]]:
        """IKE SAs as dicts with vici's keys, plus "name"; "child-sas" maps to a dict."""
        raw = self.swanctl("--list-sas", "--raw").stdout
        sas: list[dict[str, Any]] = []
        for event in parse_raw(raw):
            for name, sa in event.items():
                if isinstance(sa, dict):
                    sas.append({"name": name, **sa})
        return sas

    # -- logs --------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output(self) -> str:
        """charon's own stdout/stderr (start-up errors land here)."""
        path = self.stdout_path
        return path.read_text(errors="replace") if path.exists() else ""
