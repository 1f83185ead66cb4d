"""A private redis-server (or sentinel) for one test: its own port and directory, and only
its own pid is ever signalled."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path, *, args: tuple[str, ...] = (), port: int | None = None,
                 password: str | None = None, sentinel_conf: str | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.args = args
        self.sentinel_conf = sentinel_conf
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / f"redis-{self.port}.log"
        if self.sentinel_conf is not None:
            conf = self.directory / f"sentinel-{self.port}.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\n{self.sentinel_conf}")
            argv = ["redis-server", str(conf), "--sentinel", "--logfile", str(log)]
        else:
            argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                    "--logfile", str(log)]
            if self.password:
                argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen([*argv, *self.args], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {log.read_text(errors='replace')}")
            if self.ping():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on {self.port} did not answer")
            time.sleep(0.05)

    def ping(self) -> bool:
        if "--tls-port" in self.args:
            return _port_open(self.port)
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=0.5,
                             socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True
