"""Shared set-up for the runtime tests: loopback ports and configurations."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.config import NodeConfig, load_config
from cluster.ike.policy import ConnectionConfig, ResponderPolicy

PSK = "runtime-tests-secret"


def free_port_pair() -> tuple[int, int]:
    """Two distinct UDP ports free on both 127.0.0.1 and ::1 right now."""
    ports: list[int] = []
    while len(ports) < 2:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4:
            v4.bind(("127.0.0.1", 0))
            port = v4.getsockname()[1]
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6:
                v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    v6.bind(("::1", port))
                except OSError:
                    continue
        if port not in ports:
            ports.append(port)
    return ports[0], ports[1]


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def write_responder_config(
    directory: Path,
    addresses: tuple[str, ...],
    ike_port: int,
    natt_port: int,
    half_open_timeout: float = 30.0,
) -> Path:
    path = directory / "responder.toml"
    path.write_text(
        f"""
[node]
id = "rt-test"
[ike]
addresses = {_toml_list(addresses)}
port = {ike_port}
port_nat_t = {natt_port}
half_open_timeout = {half_open_timeout}
[connections.rw]
version = 2
proposals = ["aes256gcm16-prfsha256-x25519"]
local = {{ auth = "psk", id = "gw.example.test" }}
remote = {{ auth = "psk", id = "%any" }}
[connections.rw.children.net]
mode = "tunnel"
local_ts = ["10.99.2.0/24"]
remote_ts = ["10.99.1.0/24"]
esp_proposals = ["aes256gcm16"]
[secrets.rw]
ids = ["gw.example.test", "%any"]
secret = "{PSK}"
"""
    )
    return path


def initiator_settings(directory: Path) -> tuple[ConnectionConfig, ResponderPolicy]:
    """The peer's side of `rw`, loaded through the same config code."""
    path = directory / "initiator.toml"
    path.write_text(
        f"""
[node]
id = "rt-peer"
[ike]
addresses = ["127.0.0.1"]
[connections.home]
version = 2
proposals = ["aes256gcm16-prfsha256-x25519"]
local = {{ auth = "psk", id = "client.example.test" }}
remote = {{ auth = "psk", id = "gw.example.test" }}
[connections.home.children.net]
mode = "tunnel"
local_ts = ["10.99.1.0/24"]
remote_ts = ["10.99.2.0/24"]
esp_proposals = ["aes256gcm16"]
[secrets.home]
ids = ["client.example.test", "gw.example.test"]
secret = "{PSK}"
"""
    )
    config = load_config(path)
    return config.policy.connections[0], config.policy


@dataclass(frozen=True)
class Setup:
    node_config: NodeConfig
    connection: ConnectionConfig
    initiator_policy: ResponderPolicy


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    ike_port, natt_port = free_port_pair()
    path = write_responder_config(tmp_path, ("127.0.0.1", "::1"), ike_port, natt_port)
    connection, policy = initiator_settings(tmp_path)
    return Setup(load_config(path), connection, policy)
