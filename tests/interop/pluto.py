"""Libreswan's pluto as an IKE-level interop peer, run from the unpacked package in a netns.

Facts this relies on (see notes/strongswan-here.md):
- The libreswan package conflicts with strongSwan's, so `scripts/install` unpacks it into
  `.cache/libreswan` (its libraries are ordinary packages) instead of installing it.
- pluto runs its helpers (addconn) from the compiled-in /usr/libexec/ipsec: a bind mount
  inside pluto's own mount namespace (ip netns exec gives it one) puts the unpacked
  directory there, invisible to the rest of the machine.
- The kernel has no ESP: once IKE_AUTH has completed, pluto fails to install its Child
  SA ("netlink response for Add SA ... Function not implemented"), drops the IKE SA
  without notifying us and starts again. Only the IKE level can be judged here.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.interop.netns import LabError, Netns, stop_process
from tests.interop.spec import Conn

ROOT = Path(os.environ.get(
    "IKC_LIBRESWAN_ROOT", Path(__file__).resolve().parents[2] / ".cache" / "libreswan"))
LIBEXEC = ROOT / "usr" / "libexec"
PLUTO = LIBEXEC / "ipsec" / "pluto"
WHACK = LIBEXEC / "ipsec" / "whack"
ADDCONN = LIBEXEC / "ipsec" / "addconn"

# pluto's log line once IKE_AUTH has completed on its side (Libreswan 4.x)
ESTABLISHED = "initiator established IKE SA; authenticated peer"


class Pluto:
    """One pluto daemon with its own ipsec.conf, secrets, NSS database and control socket."""

    def __init__(self, ns: Netns, workdir: Path) -> None:
        if not PLUTO.exists():
            raise LabError(f"no Libreswan at {ROOT}: scripts/install unpacks it there")
        self.ns = ns
        self.dir = workdir
        self.run_dir = workdir / "run"
        self.ctl = self.run_dir / "pluto.ctl"
        self.conf_path = workdir / "ipsec.conf"
        self.secrets_path = workdir / "ipsec.secrets"
        self.log_path = workdir / "pluto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        (self.dir / "nss").mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        subprocess.run(["certutil", "-N", "-d", f"sql:{self.dir / 'nss'}", "--empty-password"],
                       check=True, capture_output=True)
        self.conf_path.write_text(self._setup())
        self.secrets_path.write_text("")
        self.proc = self.ns.spawn(
            ["/bin/sh", "-c", 'mount --bind "$0" /usr/libexec && shift && exec "$@"',
             str(LIBEXEC), "pluto", str(PLUTO), "--nofork", "--config", str(self.conf_path),
             "--secretsfile", str(self.secrets_path), "--nssdir", str(self.dir / "nss"),
             "--rundir", str(self.run_dir), "--ipsecdir", str(self.dir)],
            output=self.dir / "pluto.out",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.ctl.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"pluto did not open {self.ctl}:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def _setup(self) -> str:
        return f"config setup\n    logfile={self.log_path}\n    logtime=yes\n\n"

    def load(self, conn: Conn, *, ike: str, esp: str, extra: tuple[str, ...] = ()) -> None:
        """Write ``conn`` (our test spec, seen from pluto's side) with Libreswan's
        ``ike``/``esp`` strings and ``extra`` ipsec.conf lines ("key=value"), reread the
        secrets and add the connection."""
        child = conn.child
        if not conn.local_addrs or not conn.remote_addrs:
            raise ValueError("pluto connections here need addresses on both sides")
        auth = ["    authby=secret"] if conn.psk is not None else self._import_credentials(conn)
        lines = [
            f"conn {conn.name}",
            "    ikev2=insist",
            *auth,
            f"    left={conn.local_addrs[0]}",
            f"    leftid=@{conn.local.id}",
            f"    right={conn.remote_addrs[0]}",
            f"    rightid=@{conn.remote.id}",
            f"    ike={ike}",
            f"    esp={esp}",
            f"    type={child.mode}",
            f"    encapsulation={'yes' if conn.encap else 'no'}",
            "    auto=add",
            *(f"    {line}" for line in extra),
        ]
        if child.mode == "tunnel":  # none given: pluto's default (its own address)
            if child.local_ts:
                lines.append(f"    leftsubnet={','.join(child.local_ts)}")
            if child.remote_ts:
                lines.append(f"    rightsubnet={','.join(child.remote_ts)}")
        self.conf_path.write_text(self._setup() + "\n".join(lines) + "\n")
        if conn.psk is not None:
            psk = conn.psk.replace('"', '\\"')
            self.secrets_path.write_text(f'@{conn.local.id} @{conn.remote.id} : PSK "{psk}"\n')
        else:  # pluto finds the private key in NSS through leftcert
            self.secrets_path.write_text("")
        self._whack("--rereadsecrets")
        out = self.ns.run([str(ADDCONN), "--ctlsocket", str(self.ctl), "--config",
                           str(self.conf_path), conn.name], check=False)
        if out.returncode != 0:
            raise LabError(f"addconn {conn.name} failed:\n{out.stdout}{out.stderr}\n"
                           f"{self.log_text()}")

    def _import_credentials(self, conn: Conn) -> list[str]:
        """Our certificate and key (as PKCS#12) and the peer's trust anchors into
        pluto's NSS database; returns the conn lines that use them."""
        local = conn.local
        if local.auth != "pubkey" or local.cert is None or local.key is None:
            raise ValueError("pluto connections here use a PSK or a local certificate")
        key = serialization.load_pem_private_key(local.key.read_bytes(), password=None)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise ValueError(f"{local.key}: not an ECDSA or RSA key")
        # the end entity first, then any intermediates, which pluto sends along
        cert, *chain = x509.load_pem_x509_certificates(local.cert.read_bytes())
        nickname = f"{conn.name}-local"
        p12 = self.dir / f"{nickname}.p12"
        p12.write_bytes(pkcs12.serialize_key_and_certificates(
            nickname.encode(), key, cert, chain or None, serialization.NoEncryption()))
        db = f"sql:{self.dir / 'nss'}"
        subprocess.run(["pk12util", "-i", str(p12), "-d", db, "-W", ""],
                       check=True, capture_output=True)
        for n, ca in enumerate(conn.remote.cacerts):
            subprocess.run(["certutil", "-A", "-d", db, "-n", f"{conn.name}-ca{n}", "-t", "CT,,",
                            "-a", "-i", str(ca)], check=True, capture_output=True)
        # digital signatures (RFC 7427) with the key's algorithm
        authby = "ecdsa" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsasig"
        # sendca: the intermediates go along in CERT payloads (pluto sends none by default)
        return [f"    authby={authby}", f"    leftcert={nickname}", "    sendca=all"]

    def initiate(self, name: str) -> None:
        """Start the connection (pluto goes on in the background; watch its log)."""
        self._whack("--name", name, "--initiate", "--asynchronous")

    def _whack(self, *args: str) -> None:
        out = self.ns.run([str(WHACK), "--ctlsocket", str(self.ctl), *args], check=False)
        if out.returncode != 0:
            raise LabError(f"whack {' '.join(args)} failed ({out.returncode}):\n"
                           f"{out.stdout}{out.stderr}\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (log := self.log_text()):
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"pluto exited:\n{log}")
            if time.monotonic() > deadline:
                raise LabError(f"pluto did not log {text!r} within {timeout}s:\n{log}")
            time.sleep(0.05)
        return log
