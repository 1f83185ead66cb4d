"""Harness pieces that need no root: swanctl raw parsing and config rendering."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

from tests.interop.certs import make_pki
from tests.interop.lab import conn_pair, render_node_config
from tests.interop.swanctl_raw import parse_raw

RAW = (
    "list-sa event {rw {uniqueid=1 version=2 state=ESTABLISHED local-host=10.99.0.1 "
    "local-id=C=CH, O=strongSwan, CN=client remote-id= initiator-spi=33ceffdbc47320f2 "
    "child-sas {net-1 {name=net state=INSTALLED local-ts=[10.99.1.0/24 10.99.3.0/24] "
    "remote-ts=[10.99.2.0/24]}}}}\n"
    "list-sas reply {}\n"
)


def test_parse_raw_reads_nested_sections_lists_and_values_with_spaces() -> None:
    (event,) = parse_raw(RAW)
    sa = event["rw"]
    assert sa["state"] == "ESTABLISHED"
    assert sa["local-id"] == "C=CH, O=strongSwan, CN=client"
    assert sa["remote-id"] == ""
    assert sa["initiator-spi"] == "33ceffdbc47320f2"
    child = sa["child-sas"]["net-1"]
    assert child["local-ts"] == ["10.99.1.0/24", "10.99.3.0/24"]
    assert child["remote-ts"] == ["10.99.2.0/24"]


def test_parse_raw_reads_selectors_with_protocols_and_ports() -> None:
    raw = ("list-sa event {rw {child-sas {net-1 {local-ts=[10.99.1.0/24[icmp] "
           "10.99.3.0/24[tcp/443]] remote-ts=[10.99.2.0/24[icmp]] state=INSTALLED}}}}\n")
    (event,) = parse_raw(raw)
    child = event["rw"]["child-sas"]["net-1"]
    assert child["local-ts"] == ["10.99.1.0/24[icmp]", "10.99.3.0/24[tcp/443]"]
    assert child["remote-ts"] == ["10.99.2.0/24[icmp]"]
    assert child["state"] == "INSTALLED"


def test_parse_raw_without_sas_is_empty() -> None:
    assert parse_raw("list-sas reply {}\n") == []


def test_node_config_psk_has_the_documented_shape(tmp_path: Path) -> None:
    _, responder = conn_pair(proposals=("aes128-sha256-modp2048",))
    text = render_node_config([responder], tmp_path, node_id="gw1", addresses=["10.99.0.2"])
    config = tomllib.loads(text)
    assert config["node"] == {"id": "gw1"}
    assert config["ike"] == {"addresses": ["10.99.0.2"]}
    conn = config["connections"]["rw"]
    assert conn["version"] == 2
    assert conn["proposals"] == ["aes128-sha256-modp2048"]
    assert conn["local"] == {"auth": "psk", "id": "gw.example.test"}
    assert conn["remote"] == {"auth": "psk", "id": "%any"}
    assert conn["children"]["net"] == {
        "mode": "tunnel",
        "local_ts": ["10.99.2.0/24"],
        "remote_ts": ["10.99.1.0/24"],
        "esp_proposals": ["aes256gcm16", "aes128gcm16"],
    }
    assert config["secrets"]["rw"] == {"ids": ["gw.example.test", "%any"], "secret": "change-me"}


def test_node_config_certificates_are_copied_and_relative(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    _, responder = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa
    )
    responder = replace(responder, encap=True)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    config = tomllib.loads(
        render_node_config([responder], node_dir, node_id="gw1", addresses=["10.99.0.2"])
    )
    conn = config["connections"]["rw"]
    assert conn["encap"] is True
    assert conn["local"] == {
        "auth": "pubkey", "id": "gw.example.test", "cert": "gw.pem", "key": "gwkey.pem",
    }  # fmt: skip
    assert conn["remote"] == {"auth": "pubkey", "id": "%any", "cacerts": ["ca.pem"]}
    for name in ("gw.pem", "gwkey.pem", "ca.pem"):
        assert (node_dir / name).read_bytes() == (tmp_path / "pki" / name).read_bytes()
    assert "secrets" not in config
