"""A FreeRADIUS 3 server for the eap-radius tests: its own small configuration in a
temporary directory (nothing of /etc/freeradius is used), EAP with MSCHAPv2 and MD5
against a users file, optionally EAP-TLS with the test PKI, and accounting (on the
port after the authentication port) written to a detail file."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.interop.netns import Netns

FREERADIUS = shutil.which("freeradius") or "/usr/sbin/freeradius"


@dataclass(frozen=True)
class Tls:
    """EAP-TLS: the server's certificate chain and key, and the CA clients chain to."""

    certificate: Path
    key: Path
    ca: Path


def _config(directory: Path, address: str, port: int, client: str, secret: str,
            tls: Tls | None) -> str:
    tls_section = "" if tls is None else f"""
    default_eap_type = tls
    tls-config tls-common {{
      private_key_file = {tls.key}
      certificate_file = {tls.certificate}
      ca_file = {tls.ca}
      cipher_list = "DEFAULT"
      tls_min_version = "1.2"
      tls_max_version = "1.2"
      ecdh_curve = "prime256v1"
    }}
    tls {{
      tls = tls-common
    }}"""
    return f"""
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
libdir = /usr/lib/freeradius
dictdir = /usr/share/freeradius
raddbdir = {directory}
confdir = {directory}
logdir = {directory}
run_dir = {directory}
db_dir = {directory}
radacctdir = {directory}
pidfile = {directory}/radiusd.pid
name = freeradius
max_request_time = 30
cleanup_delay = 5
max_requests = 1024
hostname_lookups = no
correct_escapes = true
log {{
  destination = stdout
  colourise = no
  auth = yes
}}
security {{
  allow_core_dumps = no
  max_attributes = 200
  reject_delay = 0
  status_server = no
}}
thread pool {{
  start_servers = 1
  max_servers = 4
  min_spare_servers = 1
  max_spare_servers = 2
  max_requests_per_server = 0
}}
client gateway {{
  ipaddr = {client}
  secret = "{secret}"
  require_message_authenticator = yes
}}
modules {{
  files {{
    filename = {directory}/users
  }}
  detail {{
    filename = {directory}/detail
    header = "%t"
  }}
  mschap {{
  }}
  eap {{
    timer_expire = 60
    ignore_unknown_eap_types = no
    max_sessions = 1024
    md5 {{
    }}
    mschapv2 {{
    }}{tls_section}
  }}
}}
server default {{
  listen {{
    type = auth
    ipaddr = {address}
    port = {port}
  }}
  listen {{
    type = acct
    ipaddr = {address}
    port = {port + 1}
  }}
  authorize {{
    eap {{
      ok = return
    }}
    files
  }}
  authenticate {{
    Auth-Type MS-CHAP {{
      mschap
    }}
    Auth-Type EAP {{
      eap
    }}
  }}
  post-auth {{
  }}
  accounting {{
    detail
  }}
}}
"""


class FreeRadius:
    """`start` runs it in `ns` (listening on address:port for the gateway at `client`),
    `users` with their passwords, `replies` ("Attribute = value") for some of them; the
    namespace's process list stops it with the lab."""

    def __init__(self, ns: Netns, directory: Path, *, address: str, port: int = 1812,
                 client: str, secret: str, users: dict[str, str], tls: Tls | None = None,
                 replies: dict[str, tuple[str, ...]] | None = None) -> None:
        self.ns, self.directory, self.address, self.port = ns, directory, address, port
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "radiusd.conf").write_text(
            _config(directory, address, port, client, secret, tls))
        replies = replies or {}  # user -> attributes of their Access-Accept
        (directory / "users").write_text("".join(
            f'"{user}"\tCleartext-Password := "{password}"\n'
            + "".join(f"\t{item},\n" for item in replies.get(user, ()))[:-2] + "\n"
            for user, password in users.items()))
        self.log = directory / "radiusd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FreeRadius:
        check = self.ns.run([FREERADIUS, "-C", "-X", "-d", str(self.directory)], check=False)
        assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
        self.proc = self.ns.spawn([FREERADIUS, "-f", "-X", "-d", str(self.directory)],
                                  output=self.log)
        deadline = time.monotonic() + 15
        while "Ready to process requests" not in self.log_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)
        return self

    def accounting(self) -> str:
        """The detail file: one block per Accounting-Request, "Attribute = value" lines."""
        detail = self.directory / "detail"
        return detail.read_text(errors="replace") if detail.exists() else ""

    def records(self, *needles: str) -> list[dict[str, str]]:
        """The detail file's records (attribute -> value as written) that contain every
        one of `needles`."""
        out = []
        for block in self.accounting().split("\n\n"):
            if block.strip() and all(needle in block for needle in needles):
                pairs = (line.strip().partition(" = ") for line in block.splitlines()[1:]
                         if " = " in line)
                out.append({name: value for name, _, value in pairs})
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
