"""Libreswan 4.10 (pluto) as the initiator against our node, at the IKE level.

A second independent IKEv2 implementation next to strongSwan. Both sides must say
so: pluto logs that it established the IKE SA and authenticated our node, and our
node logs the IKE SA and the Child SA with the transforms pluto proposed. The kernel
here has no ESP, so pluto cannot install its Child SA afterwards (see pluto.py);
traffic with Libreswan cannot be checked on this machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace

import pytest

from tests.interop.certs import Pki, TestCa
from tests.interop.lab import INITIATOR_V6, RESPONDER_ID, RESPONDER_V6, Lab, Node, conn_pair
from tests.interop.pluto import ESTABLISHED, Pluto
from tests.interop.test_dataplane import report, wait_for_log

pytestmark = pytest.mark.interop

PSK = "libreswan-interop-secret"


@pytest.fixture
def pluto(lab: Lab) -> Iterator[Pluto]:
    daemon = Pluto(lab.initiator, lab.dir / "pluto")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def connect(lab: Lab, pluto: Pluto, ours: tuple[str, str], theirs: tuple[str, str], *,
            mode: str = "tunnel", encap: bool = False) -> tuple[Node, str]:
    """Our node with proposals ``ours`` (IKE, ESP), pluto initiating with ``theirs``."""
    initiator, responder = conn_pair(proposals=(ours[0],), esp_proposals=(ours[1],),
                                     responder_esp_proposals=(ours[1],), mode=mode,
                                     psk=PSK, encap=encap)
    if mode == "transport":  # our default selectors: the outer addresses ("dynamic")
        responder = responder.with_child(local_ts=(), remote_ts=())
    node = lab.node([responder])
    pluto.load(initiator, ike=theirs[0], esp=theirs[1])
    pluto.initiate(initiator.name)
    log = pluto.wait_for_log(ESTABLISHED)
    assert f"{ESTABLISHED} using authby=secret and ID_FQDN '@{RESPONDER_ID}'" in log, log
    return node, log


@pytest.mark.parametrize(
    ("ours", "theirs", "sent"),
    [
        (("aes256gcm16-prfsha256-x25519", "aes256gcm16"), ("aes_gcm256-sha2_256-dh31",
         "aes_gcm256"), "cipher=AES_GCM_16_256 integ=n/a prf=HMAC_SHA2_256 group=DH31"),
        (("aes256-sha256-modp2048", "aes128-sha256"), ("aes256-sha2_256-modp2048",
         "aes128-sha2_256"),
         "cipher=AES_CBC_256 integ=HMAC_SHA2_256_128 prf=HMAC_SHA2_256 group=MODP2048"),
        (("chacha20poly1305-prfsha512-ecp256", "chacha20poly1305"),
         ("chacha20_poly1305-sha2_512-dh19", "chacha20_poly1305"),
         "cipher=CHACHA20_POLY1305_256 integ=n/a prf=HMAC_SHA2_512 group=DH19"),
        (("aes128gcm16-prfsha384-ecp384", "aes256-sha512"),
         ("aes_gcm128-sha2_384-dh20", "aes256-sha2_512"),
         "cipher=AES_GCM_16_128 integ=n/a prf=HMAC_SHA2_384 group=DH20"),
    ],
)  # fmt: skip
def test_libreswan_establishes_with_proposal(
    lab: Lab, pluto: Pluto, ours: tuple[str, str], theirs: tuple[str, str], sent: str
) -> None:
    node, log = connect(lab, pluto, ours, theirs)
    assert f"sent IKE_AUTH request {{{sent}}}" in log, log
    wait_for_log(node, r"IKE SA established")
    line = wait_for_log(node, r"CHILD SA established: net ")[0]
    assert line.endswith(f"esp={ours[1]} mode=tunnel"), line
    assert node.running(), node.log_text()


def test_libreswan_transport_mode_with_forced_encapsulation(lab: Lab, pluto: Pluto) -> None:
    ours = ("aes256gcm16-prfsha256-x25519", "aes256gcm16")
    node, _log = connect(lab, pluto, ours, ("aes_gcm256-sha2_256-dh31", "aes_gcm256"),
                        mode="transport", encap=True)
    line = wait_for_log(node, r"CHILD SA established: net ")[0]
    assert line.endswith("esp=aes256gcm16 mode=transport encap"), line
    assert node.running(), node.log_text()


def test_libreswan_follows_invalid_ke_payload_to_our_group(lab: Lab, pluto: Pluto) -> None:
    """pluto guesses its first group (ECP-256); we accept only X25519 and answer
    INVALID_KE_PAYLOAD naming it (RFC 7296 1.2); pluto starts again with X25519."""
    node, log = connect(lab, pluto, ("aes256gcm16-prfsha256-x25519", "aes256gcm16"),
                        ("aes_gcm256-sha2_256-dh19+dh31", "aes_gcm256"))
    assert ("Received unauthenticated INVALID_KE_PAYLOAD response to DH DH19; resending "
            "with suggested DH DH31") in log, log
    assert "group=DH31}" in log, log
    wait_for_log(node, r"CHILD SA established: net ")
    assert node.running(), node.log_text()


def test_libreswan_with_a_wrong_psk_is_refused_and_the_node_serves_on(
    lab: Lab, pluto: Pluto
) -> None:
    """Our AUTHENTICATION_FAILED reaches pluto (RFC 7296 2.21.2); the node stays up and
    then accepts the same peer with the right key."""
    proposals = ("aes256gcm16-prfsha256-x25519", "aes256gcm16")
    initiator, responder = conn_pair(proposals=(proposals[0],), psk=PSK)
    node = lab.node([responder])
    theirs = {"ike": "aes_gcm256-sha2_256-dh31", "esp": "aes_gcm256"}
    pluto.load(replace(initiator, psk="not-" + PSK), **theirs)
    pluto.initiate(initiator.name)
    log = pluto.wait_for_log("IKE SA authentication request rejected by peer: "
                             "AUTHENTICATION_FAILED")
    assert ESTABLISHED not in log, log
    assert not re.search(r"IKE SA established", node.log_text()), node.log_text()
    pluto.load(initiator, **theirs)
    pluto.initiate(initiator.name)
    pluto.wait_for_log(ESTABLISHED)
    wait_for_log(node, r"CHILD SA established: net ")
    assert node.running(), node.log_text()


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_libreswan_certificate_authentication(
    lab: Lab, pluto: Pluto, pki: Pki, key_type: str
) -> None:
    """Certificates both ways (RFC 7427 signatures): pluto verifies our node's
    signature with our certificate's key, and we verify pluto's."""
    gw, client = (pki.gw_ecdsa, pki.client_ecdsa) if key_type == "ecdsa" else (
        pki.gw_rsa, pki.client_rsa)
    initiator, responder = conn_pair(ca=pki.ca, initiator_cred=client, responder_cred=gw)
    node = lab.node([responder])
    pluto.load(initiator, ike="aes_gcm256-sha2_256-dh31", esp="aes_gcm256")
    pluto.initiate(initiator.name)
    log = pluto.wait_for_log(ESTABLISHED)
    scheme = ("P-256 ECDSA with SHA2_256" if key_type == "ecdsa"
              else "2048-bit PKCS#1 1.5 RSA with SHA2_256")
    assert (f"{ESTABLISHED} '{scheme}' digital signature using peer certificate "
            f"'@{RESPONDER_ID}' issued by CA 'O=ike-cluster tests, CN=ike-cluster test CA'"
            ) in log, log
    wait_for_log(node, r"CHILD SA established: net ")
    assert node.running(), node.log_text()


def test_libreswan_certificate_from_an_untrusted_ca_is_refused(
    lab: Lab, pluto: Pluto, pki: Pki
) -> None:
    _, responder = conn_pair(ca=pki.ca, initiator_cred=pki.client_ecdsa,
                             responder_cred=pki.gw_ecdsa)
    initiator, _ = conn_pair(ca=pki.ca, initiator_cred=pki.client_from_other_ca,
                             responder_cred=pki.gw_ecdsa)
    node = lab.node([responder])
    pluto.load(initiator, ike="aes_gcm256-sha2_256-dh31", esp="aes_gcm256")
    pluto.initiate(initiator.name)
    log = pluto.wait_for_log("IKE SA authentication request rejected by peer: "
                             "AUTHENTICATION_FAILED")
    assert ESTABLISHED not in log, log
    assert "IKE SA established" not in node.log_text(), node.log_text()
    assert node.running(), node.log_text()


def test_libreswan_rsa4096_chain_through_fragmented_ike_auth(lab: Lab, pluto: Pluto) -> None:
    """RSA-4096 leaf and intermediate each way: our IKE_AUTH response does not fit one
    datagram and goes in RFC 7383 fragments, which pluto reassembles; no IKE datagram
    on the wire exceeds 1280 bytes."""
    pki = lab.dir / "pki"
    root = TestCa(pki, stem="root", common_name="libreswan root", key_type="rsa",
                  key_size=4096)
    intermediate = root.intermediate("inter", "libreswan intermediate", key_type="rsa",
                                     key_size=4096)
    gw, client = (intermediate.issue(f"{name}.example.test", key_type="rsa", key_size=4096,
                                     name=name, with_chain=True)
                  for name in ("gw", "client"))  # fmt: skip
    initiator, responder = conn_pair(ca=root.cert_path, initiator_cred=client,
                                     responder_cred=gw)
    node = lab.node([responder])
    wire = lab.wire_counters("initiator", {
        "ike_out": ("out", "udp dport { 500, 4500 }"),
        "ike_in": ("in", "udp sport { 500, 4500 }"),
        "ike_big_out": ("out", "udp dport { 500, 4500 } ip length > 1280"),
        "ike_big_in": ("in", "udp sport { 500, 4500 } ip length > 1280"),
    })  # fmt: skip
    pluto.load(initiator, ike="aes_gcm256-sha2_256-dh31", esp="aes_gcm256")
    pluto.initiate(initiator.name)
    log = pluto.wait_for_log(ESTABLISHED)
    assert (f"{ESTABLISHED} '4096-bit PKCS#1 1.5 RSA with SHA2_256' digital signature using "
            f"peer certificate '@{RESPONDER_ID}' issued by CA 'O=ike-cluster tests, "
            "CN=libreswan intermediate'") in log, log
    wait_for_log(node, r"CHILD SA established: net ")
    seen = wire.read()
    report("libreswan fragmentation", f"IKE datagrams {seen}")
    assert seen["ike_big_out"] == seen["ike_big_in"] == 0, seen
    assert seen["ike_in"] >= 3, seen  # IKE_SA_INIT and at least two IKE_AUTH fragments
    assert node.running(), node.log_text()


def test_libreswan_over_ipv6(lab: Lab, pluto: Pluto) -> None:
    initiator, responder = conn_pair(family=6, psk=PSK)
    node = lab.node([responder], addresses=(RESPONDER_V6,))
    pluto.load(initiator, ike="aes_gcm256-sha2_256-dh31", esp="aes_gcm256")
    pluto.initiate(initiator.name)
    pluto.wait_for_log(ESTABLISHED)
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert f"peer=[{INITIATOR_V6}]:500" in line, line
    wait_for_log(node, r"CHILD SA established: net ")
    assert node.running(), node.log_text()


def test_libreswan_gets_a_virtual_ip_from_our_pool(lab: Lab, pluto: Pluto) -> None:
    """Libreswan as a modecfg client (leftmodecfgclient) asks for an address in IKE_AUTH;
    our node leases one from the pool and narrows the Child SA to it, and pluto takes
    the address and the DNS server from our CFG_REPLY."""
    initiator, responder = conn_pair(psk=PSK)
    responder = replace(responder, node_extra={"pools": ["rw"]}).with_child(remote_ts=())
    node = lab.node([responder], extra_toml=(
        '[pools.rw]\naddrs = "10.99.3.0/28"\ndns = ["10.99.2.53"]\n'))
    pluto.load(initiator.with_child(local_ts=("0.0.0.0/0",)), ike="aes_gcm256-sha2_256-dh31",
               esp="aes_gcm256", extra=("leftmodecfgclient=yes", "narrowing=yes"))
    pluto.initiate(initiator.name)
    log = pluto.wait_for_log(ESTABLISHED)
    assert re.search(r"received INTERNAL_IP4_ADDRESS 10\.99\.3\.1\b", log), log
    assert re.search(r"received INTERNAL_IP4_DNS 10\.99\.2\.53\b", log), log
    line = wait_for_log(node, r"IKE SA established: rw ")[0]
    assert " vip=10.99.3.1" in line, line
    line = wait_for_log(node, r"CHILD SA established: net ")[0]
    assert "===10.99.3.1/32 " in line, line
    report("libreswan", "virtual IP 10.99.3.1 leased and taken")
