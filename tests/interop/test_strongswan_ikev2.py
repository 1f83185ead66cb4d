"""strongSwan (charon, kernel-libipsec) initiates IKEv2 to our node in the lab.

The verdict is strongSwan's own: ``swanctl --list-sas`` must show the IKE SA
ESTABLISHED and, in tunnel mode, the CHILD_SA INSTALLED with the expected cipher.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.interop.certs import Credential, Pki, self_signed
from tests.interop.charon import PLUGINS, Charon
from tests.interop.freeradius import FreeRadius, Tls
from tests.interop.lab import (
    INITIATOR_V4,
    RESPONDER_INNER_V4,
    RESPONDER_NETS,
    RESPONDER_V4,
    RESPONDER_V6,
    VETH,
    Conn,
    End,
    Lab,
    conn_pair,
    updown_recorder,
    updown_runs,
)
from tests.interop.node import Node
from tests.interop.responders import Responder, StartResponder, responder_kind
from tests.interop.sa_checks import (
    algorithm,
    assert_initiated,
    assert_not_established,
    child_sa,
    established,
)

pytestmark = pytest.mark.interop

OTHER_GATEWAY = "10.99.0.3"  # a second node's address in the responder namespace


def _serve(lab: Lab, argv: list[str], port: int, log: Path) -> None:
    """Start a server in the responder's namespace and wait until it listens on `port`
    (the namespace's process list stops it with the lab)."""
    server = lab.responder.spawn(argv, output=log)
    deadline = time.monotonic() + 10
    while f":{port}" not in lab.responder.run(["ss", "-H", "-t", "-l", "-n"]).stdout:
        assert server.poll() is None and time.monotonic() < deadline, \
            log.read_text() if log.exists() else "no output"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("proposal", "encr", "integ", "prf", "group"),
    [
        ("aes256gcm16-prfsha256-x25519", "AES_GCM_16-256", None, "PRF_HMAC_SHA2_256",
         "CURVE_25519"),
        ("aes128-sha256-modp2048", "AES_CBC-128", "HMAC_SHA2_256_128", "PRF_HMAC_SHA2_256",
         "MODP_2048"),
        ("aes256-sha384-ecp384", "AES_CBC-256", "HMAC_SHA2_384_192", "PRF_HMAC_SHA2_384",
         "ECP_384"),
        ("chacha20poly1305-prfsha256-x25519", "CHACHA20_POLY1305", None, "PRF_HMAC_SHA2_256",
         "CURVE_25519"),
        ("aes128gcm16-prfsha256-ecp256", "AES_GCM_16-128", None, "PRF_HMAC_SHA2_256",
         "ECP_256"),
    ],
)  # fmt: skip
def test_psk_establishes_with_ike_proposal(
    start_responder: StartResponder,
    initiator: Charon,
    proposal: str,
    encr: str,
    integ: str | None,
    prf: str,
    group: str,
) -> None:
    initiator_conn, responder_conn = conn_pair(proposals=(proposal,))
    start_responder([responder_conn])
    initiator.load(initiator_conn)

    sa = assert_initiated(initiator.initiate("net"), initiator)

    assert algorithm(sa) == encr
    assert sa.get("integ-alg") == integ
    assert sa["prf-alg"] == prf
    assert sa["dh-group"] == group
    child = child_sa(sa)
    assert child["state"] == "INSTALLED"
    assert algorithm(child) == "AES_GCM_16-256"


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_certificate_authentication(
    start_responder: StartResponder, initiator: Charon, pki: Pki, key_type: str
) -> None:
    gw, client = (pki.gw_ecdsa, pki.client_ecdsa) if key_type == "ecdsa" else (
        pki.gw_rsa, pki.client_rsa)
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=client, responder_cred=gw
    )
    start_responder([responder_conn])
    initiator.load(initiator_conn)

    sa = assert_initiated(initiator.initiate("net"), initiator)

    assert sa["remote-id"] == "gw.example.test"
    assert child_sa(sa)["state"] == "INSTALLED"
    # strongSwan verified our AUTH payload with the certificate's key type.
    scheme = "ECDSA" if key_type == "ecdsa" else "RSA"
    assert re.search(
        rf"authentication of 'gw\.example\.test' with {scheme}\S* successful",
        initiator.log_text(),
    ), "strongSwan did not log a successful signature check of the node"


def test_a_pinned_self_signed_certificate_needs_no_ca_and_no_cert_payload(
        lab: Lab, initiator: Charon, pki: Pki, tmp_path: Path) -> None:
    """swanctl's `certs` on our remote end: strongSwan authenticates with a self-signed
    certificate our node holds (no CA). Our node asks for no certificate (no CERTREQ:
    it trusts no CA here), so strongSwan (send_cert = ifasked) sends none, and the
    pinned one checks its AUTH. Another self-signed certificate with the same name is
    refused: its AUTH does not verify with the pinned certificate's key."""
    client = self_signed(tmp_path, "client.example.test")
    initiator_conn, responder_conn = conn_pair(ca=pki.ca, initiator_cred=client,
                                               responder_cred=pki.gw_ecdsa)
    responder_conn = replace(responder_conn, remote=End("pubkey", "client.example.test",
                                                        pins=(client.cert,)))
    node = lab.node([responder_conn])
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)
    assert child_sa(sa)["state"] == "INSTALLED", sa
    request = re.search(r"generating IKE_AUTH request 1 \[([^]]*)\]", initiator.log_text())
    assert request is not None and "CERT" not in request.group(1).split(), request
    node.logged(r"IKE SA established: rw .*client\.example\.test")
    assert initiator.terminate_ike().returncode == 0

    stranger = self_signed(tmp_path, "client.example.test", name="stranger")
    initiator.load(replace(initiator_conn, local=replace(initiator_conn.local,
                                                         cert=stranger.cert, key=stranger.key)))
    result = initiator.initiate("net")
    assert_not_established(result, initiator)
    assert "received AUTHENTICATION_FAILED notify error" in result.stdout, result.stdout
    node.logged(r"IKE SA failed: .* signature does not verify")


def test_tunnel_mode_child_sa(start_responder: StartResponder, initiator: Charon) -> None:
    initiator_conn, responder_conn = conn_pair(mode="tunnel")
    start_responder([responder_conn])
    initiator.load(initiator_conn)

    sa = assert_initiated(initiator.initiate("net"), initiator)

    child = child_sa(sa)
    assert child["state"] == "INSTALLED"
    assert child["mode"] == "TUNNEL"
    assert child["protocol"] == "ESP"
    assert algorithm(child) == "AES_GCM_16-256"
    assert child["local-ts"] == ["10.99.1.0/24"]
    assert child["remote-ts"] == ["10.99.2.0/24"]
    assert len(child["spi-in"]) == 8 and len(child["spi-out"]) == 8


def test_transport_mode_is_negotiated(start_responder: StartResponder, initiator: Charon) -> None:
    if responder_kind() == "charon":
        pytest.skip("a strongSwan responder with kernel-libipsec refuses transport mode")
    initiator_conn, responder_conn = conn_pair(mode="transport")
    initiator_conn = initiator_conn.with_child(
        local_ts=("10.99.0.1/32",), remote_ts=("10.99.0.2/32",))
    responder_conn = responder_conn.with_child(
        local_ts=("10.99.0.2/32",), remote_ts=("10.99.0.1/32",))
    start_responder([responder_conn])
    initiator.load(initiator_conn)

    result = initiator.initiate("net")

    sas = [sa for sa in initiator.list_sas() if sa["state"] == "ESTABLISHED"]
    assert len(sas) == 1, f"{initiator.list_sas()}\n{result.stdout}"
    children = list(sas[0].get("child-sas", {}).values())
    if children:  # a strongSwan data plane that can install transport mode
        assert children[0]["mode"] == "TRANSPORT"
        assert children[0]["state"] == "INSTALLED"
    else:
        # kernel-libipsec only does tunnel mode (known limit, "unsupported mode"), so
        # the proof is the accepted negotiation: USE_TRANSPORT_MODE in our reply
        # (RFC 7296 2.4 / 1.3.1) next to a proposal (no NO_PROPOSAL_CHOSEN).
        log = initiator.log_text()
        reply = re.search(r"parsed IKE_AUTH response 1 \[([^\]]*)\]", log)
        assert reply is not None, log
        assert "N(USE_TRANSP)" in reply.group(1)
        assert " SA " in f" {reply.group(1)} "
        assert "IPsec SA: unsupported mode" in log


def test_forced_udp_encapsulation_moves_to_4500(
    start_responder: StartResponder, initiator: Charon
) -> None:
    initiator_conn, responder_conn = conn_pair(encap=True)
    start_responder([responder_conn])
    initiator.load(initiator_conn)

    sa = assert_initiated(initiator.initiate("net"), initiator)

    assert sa["local-port"] == "4500"
    assert sa["remote-port"] == "4500"
    assert sa.get("nat-any") == "yes"
    child = child_sa(sa)
    assert child["encap"] == "yes"
    assert child["state"] == "INSTALLED"


def test_invalid_ke_payload_round_trip(start_responder: StartResponder, initiator: Charon) -> None:
    # strongSwan's first KE is for the first group of its proposal (ECP_256); the
    # node only accepts x25519 and must answer INVALID_KE_PAYLOAD (RFC 7296 1.2).
    initiator_conn, responder_conn = conn_pair(
        proposals=("aes256gcm16-prfsha256-ecp256-x25519",),
        responder_proposals=("aes256gcm16-prfsha256-x25519",),
    )
    start_responder([responder_conn])
    initiator.load(initiator_conn)

    result = initiator.initiate("net")
    sa = assert_initiated(result, initiator)

    assert sa["dh-group"] == "CURVE_25519"
    assert "peer didn't accept DH group ECP_256, it requested CURVE_25519" in result.stdout
    assert child_sa(sa)["state"] == "INSTALLED"


def test_terminate_deletes_sa_on_node(start_responder: StartResponder, initiator: Charon) -> None:
    if responder_kind() == "charon":
        pytest.skip("checks our node's log format")
    initiator_conn, responder_conn = conn_pair()
    node = start_responder([responder_conn])
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)

    result = initiator.terminate_ike("rw")

    assert result.returncode == 0, result.stdout + result.stderr
    assert initiator.list_sas() == []
    spis = (sa["initiator-spi"].lower(), sa["responder-spi"].lower())
    lines = [
        line for line in node.log_text().lower().splitlines()
        if "deleted" in line and any(spi in line for spi in spis)
    ]  # fmt: skip
    assert lines, f"node log has no 'deleted' line with SPI {spis}:\n{node.log_text()}"
    assert node.running()


def test_psk_over_ipv6(start_responder: StartResponder, initiator: Charon) -> None:
    initiator_conn, responder_conn = conn_pair(family=6)
    start_responder([responder_conn], addresses=(RESPONDER_V6,))
    initiator.load(initiator_conn)

    sa = assert_initiated(initiator.initiate("net"), initiator)

    assert sa["remote-host"] == "fd99::2"
    child = child_sa(sa)
    assert child["state"] == "INSTALLED"
    assert child["local-ts"] == ["fd99:1::/64"]
    assert child["remote-ts"] == ["fd99:2::/64"]


# -- failures: strongSwan reports them, and the node keeps serving correct peers ------


def assert_still_serves(initiator: Charon, good_conn: Conn, responder: Responder) -> None:
    initiator.load(good_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)
    assert child_sa(sa)["state"] == "INSTALLED"
    assert responder.running()


def test_wrong_psk_is_rejected(start_responder: StartResponder, initiator: Charon) -> None:
    initiator_conn, responder_conn = conn_pair(psk="correct horse")
    responder = start_responder([responder_conn])
    initiator.load(replace(initiator_conn, psk="wrong battery"))

    result = initiator.initiate("net")

    assert_not_established(result, initiator)
    assert "AUTHENTICATION_FAILED" in result.stdout
    assert_still_serves(initiator, initiator_conn, responder)


def test_unknown_identity_is_rejected(start_responder: StartResponder, initiator: Charon) -> None:
    initiator_conn, responder_conn = conn_pair()
    responder_conn = replace(responder_conn, remote=End("psk", "client.example.test"))
    responder = start_responder([responder_conn])
    stranger = replace(initiator_conn, local=End("psk", "other.example.test"))
    initiator.load(stranger)

    result = initiator.initiate("net")

    assert_not_established(result, initiator)
    assert "AUTHENTICATION_FAILED" in result.stdout
    assert_still_serves(initiator, initiator_conn, responder)


def test_no_common_proposal_is_rejected(start_responder: StartResponder, initiator: Charon) -> None:
    initiator_conn, responder_conn = conn_pair()
    responder = start_responder([responder_conn])
    initiator.load(replace(initiator_conn, proposals=("aes128-sha1-modp2048",)))

    result = initiator.initiate("net")

    assert_not_established(result, initiator)
    assert "NO_PROPOSAL_CHOSEN" in result.stdout
    assert_still_serves(initiator, initiator_conn, responder)


def test_certificate_from_untrusted_ca_is_rejected(
    start_responder: StartResponder, initiator: Charon, pki: Pki
) -> None:
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa
    )
    responder = start_responder([responder_conn])
    untrusted = replace(
        initiator_conn,
        local=End("pubkey", "client.example.test", pki.client_from_other_ca.cert,
                  pki.client_from_other_ca.key),
    )
    initiator.load(untrusted)

    result = initiator.initiate("net")

    assert_not_established(result, initiator)
    assert "AUTHENTICATION_FAILED" in result.stdout
    assert_still_serves(initiator, initiator_conn, responder)


def test_a_revoked_certificate_is_refused_and_others_still_pass(
    start_responder: StartResponder, initiator: Charon, pki: Pki
) -> None:
    """The responder reads its CA's CRL (`crls` on the remote end): a client certificate
    listed there gets AUTHENTICATION_FAILED, another from the same CA is accepted."""
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa
    )
    responder_conn = replace(responder_conn, remote=replace(responder_conn.remote,
                                                            crls=(pki.crl,)))
    responder = start_responder([responder_conn])
    revoked = replace(initiator_conn, local=End(
        "pubkey", "client.example.test", pki.client_revoked.cert, pki.client_revoked.key))
    initiator.load(revoked)

    result = initiator.initiate("net")

    assert_not_established(result, initiator)
    assert "AUTHENTICATION_FAILED" in result.stdout
    if isinstance(responder, Node):
        responder.logged(r"CN=client\.example\.test,O=ike-cluster tests \(serial [0-9a-f]+\) "
                         r"was revoked")
    assert_still_serves(initiator, initiator_conn, responder)


def _eap_user(pki: Pki, user: str, password: str, remote: End, method: str = "eap-mschapv2"
              ) -> tuple[Conn, Conn]:
    """strongSwan as an EAP user behind the gateway's certificate; our end's `remote`."""
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa)
    local = End(method, "client.example.test", eap_id=user) if method != "eap-tls" else \
        replace(initiator_conn.local, auth=method)
    users = ((user, password),) if password else ()  # (EAP-TLS: the certificate)
    return (replace(initiator_conn, eap_users=users, local=local),
            replace(responder_conn, remote=remote))


def _assert_eap_established(result: subprocess.CompletedProcess[str], initiator: Charon,
                            method: str) -> dict[str, Any]:
    """strongSwan's SA is up and it verified the gateway's AUTH made with the MSK."""
    sa = assert_initiated(result, initiator)
    assert child_sa(sa)["state"] == "INSTALLED", sa
    assert f"EAP method {method} succeeded, MSK established" in result.stdout, result.stdout
    assert "authentication of 'gw.example.test' with EAP successful" in result.stdout, (
        result.stdout)
    return sa


def test_an_eap_mschapv2_user_gets_in_and_a_wrong_password_does_not(
    start_responder: StartResponder, initiator: Charon, pki: Pki
) -> None:
    """The road-warrior set-up of OS VPN clients (RFC 7296 2.16): the gateway proves
    itself with its certificate, the user with EAP-MSCHAPv2 (EAP-Identity, challenge,
    success), and both final AUTHs use the EAP key. A wrong password gets
    AUTHENTICATION_FAILED."""
    user = ("carol", "Carol's pa55word")
    initiator_conn, responder_conn = _eap_user(pki, *user,
                                               End("eap-mschapv2", "%any", eap_id="%any"))
    responder_conn = replace(responder_conn, eap_users=(user,))
    responder = start_responder([responder_conn])
    initiator.load(initiator_conn)

    _assert_eap_established(initiator.initiate("net"), initiator, "EAP_MSCHAPV2")
    if isinstance(responder, Node):
        log = responder.log_text()
        assert re.search(r"IKE SA established: rw .* eap_id=carol", log), log
    initiator.terminate_ike()

    initiator.load(replace(initiator_conn, eap_users=(("carol", "not her password"),)))
    result = initiator.initiate("net")
    assert_not_established(result, initiator)
    # ours ends the exchange with AUTHENTICATION_FAILED; a strongSwan responder answers
    # with an MS-CHAPv2 Failure the client gives up on
    assert re.search(r"received AUTHENTICATION_FAILED notify error|EAP-MS-CHAPv2 failed",
                     result.stdout), result.stdout
    if isinstance(responder, Node):
        assert "EAP-MSCHAPv2: wrong password for 'carol'" in responder.log_text()
    assert_still_serves(initiator, initiator_conn, responder)


def test_unique_and_pools_tell_eap_users_apart_by_their_eap_identity(lab: Lab,
                                                                     pki: Pki) -> None:
    """`unique`, INITIAL_CONTACT and address pools key an EAP user's SA by the EAP
    identity, as strongSwan does (Windows sends its IP address as IKE identity, the same
    for users behind different NATs). strongSwan logs in carol, then dave, with one IKE
    identity: under unique = replace both stay, each with a virtual IP of its own. Carol
    again replaces her older SA, not dave's, and gets her address back."""
    initiator = lab.charon("initiator", settings={"reuse_ikesa": "no",
                                                  "install_virtual_ip": "yes"})
    users = (("carol", "Carol's pa55word"), ("dave", "Dave's pa55word"))
    carol, responder_conn = _eap_user(pki, *users[0],
                                      End("eap-mschapv2", "%any", eap_id="%any"))
    responder_conn = replace(responder_conn, eap_users=users,
                             node_extra={"unique": "replace", "pools": ["rw"]}
                             ).with_child(remote_ts=())
    node = lab.node([responder_conn], extra_toml='[pools.rw]\naddrs = "10.99.3.0/28"\n')
    carol = replace(carol, extra={"vips": "0.0.0.0"}).with_child(local_ts=())

    def login(name: str, user: tuple[str, str], subnet: str) -> Conn:
        # (a part of the gateway's subnet each: strongSwan routes each into its TUN)
        return replace(carol, name=name, eap_users=(user,),
                       local=replace(carol.local, eap_id=user[0])).with_child(
                           remote_ts=(subnet,))

    dave, carol_again = login("dave", users[1], "10.99.2.128/25"), \
        login("carol2", users[0], "10.99.2.64/26")
    initiator.load(carol, dave, carol_again)
    for name in ("rw", "dave"):
        result = initiator.initiate("net", ike=name)
        assert result.returncode == 0, result.stdout
    time.sleep(1.0)  # (a replace would have deleted carol's SA by now)
    sas = {sa["name"]: sa for sa in established(initiator)}
    assert sorted(sas) == ["dave", "rw"], initiator.list_sas()
    assert "reason=replaced" not in node.log_text(), node.log_text()
    vips = {name: sa.get("local-vips") for name, sa in sas.items()}
    assert vips["rw"] and vips["dave"] and vips["rw"] != vips["dave"], vips

    result = initiator.initiate("net", ike="carol2")
    assert result.returncode == 0, result.stdout
    # (from the same address and port: taken for a reauthentication, so the older SA
    # goes after a grace of 10 s)
    deadline = time.monotonic() + 15
    while sorted(sa["name"] for sa in established(initiator)) != ["carol2", "dave"]:
        assert time.monotonic() < deadline, f"{initiator.list_sas()}\n{node.log_text()}"
        time.sleep(0.2)
    deleted = re.findall(r"IKE SA deleted: spi_i=(\w+) .*reason=replaced",
                         node.logged(r"reason=replaced"))
    assert deleted == [sas["rw"]["initiator-spi"]], node.log_text()
    again = {sa["name"]: sa.get("local-vips") for sa in established(initiator)}
    assert again == {"carol2": vips["rw"], "dave": vips["dave"]}, again


def test_updown_runs_with_strongswans_variables_as_a_road_warriors_child_sa_comes_and_goes(
        lab: Lab, pki: Pki, tmp_path: Path) -> None:
    """A child's `updown` (swanctl's) runs when its Child SA comes up and when it goes,
    with strongSwan's PLUTO_* variables: here an EAP user with a virtual IP, whose address
    a script would let through a firewall. A Child SA rekey runs nothing; the user's
    Delete runs "down"."""
    initiator = lab.charon("initiator", settings={"install_virtual_ip": "yes"})
    script, record = updown_recorder(tmp_path)
    user = ("carol", "Carol's pa55word")
    initiator_conn, responder_conn = _eap_user(pki, *user,
                                               End("eap-mschapv2", "%any", eap_id="%any"))
    responder_conn = replace(responder_conn, eap_users=(user,), node_extra={"pools": ["rw"]}
                             ).with_child(remote_ts=(), updown=f"{script} --verbose")
    node = lab.node([responder_conn], extra_toml='[pools.rw]\naddrs = "10.99.3.0/28"\n')
    initiator.load(replace(initiator_conn, extra={"vips": "0.0.0.0"}).with_child(local_ts=()))

    sa = _assert_eap_established(initiator.initiate("net"), initiator, "EAP_MSCHAPV2")
    (vip,) = sa["local-vips"]
    updown_runs(record, 1)
    initiator.rekey(child="net")
    deadline = time.monotonic() + 10
    while node.log_text().count("CHILD SA established: net ") < 2:
        assert time.monotonic() < deadline, node.log_text()
        time.sleep(0.1)
    initiator.terminate_ike()
    up, down = updown_runs(record, 2)
    assert up["PLUTO_VERB"] == "up-client" and down == {**up, "PLUTO_VERB": "down-client"}
    assert up["PLUTO_PEER_SOURCEIP"] == up["PLUTO_PEER_SOURCEIP4_1"] == vip, up
    assert up["PLUTO_PEER_CLIENT"] == f"{vip}/32", up
    assert up["PLUTO_MY_CLIENT"] == "10.99.2.0/24", up
    assert (up["PLUTO_ME"], up["PLUTO_PEER"]) == (RESPONDER_V4, INITIATOR_V4), up
    assert (up["PLUTO_MY_ID"], up["PLUTO_PEER_ID"], up["PLUTO_XAUTH_ID"]) == (
        "gw.example.test", "client.example.test", "carol"), up
    assert up["PLUTO_INTERFACE"] == VETH and up["PLUTO_CONNECTION"] == "net", up
    assert f"updown: firewall opened for {vip}" in node.log_text()


def test_unique_replace_deletes_the_older_sa_of_a_returning_peer(
    start_responder: StartResponder, lab: Lab
) -> None:
    """swanctl's `unique = replace`: strongSwan (reuse_ikesa = no) sets up a second IKE
    SA to us without INITIAL_CONTACT (it still holds the first); the responder deletes
    the first with a Delete, and the second stays. From the same address and port this
    looks like a make-before-break reauthentication, so the Delete comes after a grace
    of 10 s (strongSwan's responder waits as long)."""
    initiator = lab.charon("initiator", settings={"reuse_ikesa": "no"})
    initiator_conn, responder_conn = conn_pair()
    responder_conn = replace(responder_conn, extra={"unique": "replace"},
                             node_extra={"unique": "replace"})
    start_responder([responder_conn])
    initiator.load(initiator_conn)
    first = assert_initiated(initiator.initiate("net"), initiator)
    result = initiator.initiate("net")
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 15
    while True:
        sas = [sa for sa in initiator.list_sas() if sa.get("state") == "ESTABLISHED"]
        if len(sas) == 1 and sas[0]["responder-spi"] != first["responder-spi"]:
            break
        assert time.monotonic() < deadline, f"{sas}\n{initiator.log_text()}"
        time.sleep(0.1)
    assert re.search(r"received DELETE for IKE_SA rw\[1\]", initiator.log_text()), (
        initiator.log_text())


def test_strongswan_reauthenticates_when_told_its_auth_lifetime(
    lab: Lab, initiator: Charon
) -> None:
    """`reauth_time` on our connection reaches strongSwan as AUTH_LIFETIME (RFC 4478): it
    schedules a reauthentication and makes a new IKE SA (a new IKE_AUTH) before then.
    Always our node as the responder: the AUTH_LIFETIME checked is ours (strongSwan
    5.9.8 as the responder sent none here)."""
    initiator_conn, responder_conn = conn_pair()
    responder_conn = replace(responder_conn, node_extra={"reauth_time": "6s"})
    # strongSwan starts its reauthentication over_time before the AUTH_LIFETIME ends
    # (default: a tenth of its own rekey_time, 24 min)
    initiator_conn = replace(initiator_conn, extra={"over_time": "2s"})
    lab.node([responder_conn])
    initiator.load(initiator_conn)
    first = assert_initiated(initiator.initiate("net"), initiator)
    log = initiator.log_text()
    assert re.search(r"received AUTH_LIFETIME of 6s, scheduling reauthentication in 4s",
                     log), log
    deadline = time.monotonic() + 15
    while True:
        sas = [sa for sa in initiator.list_sas() if sa.get("state") == "ESTABLISHED"]
        if sas and sas[0]["responder-spi"] != first["responder-spi"]:
            break
        assert time.monotonic() < deadline, f"{sas}\n{initiator.log_text()}"
        time.sleep(0.2)
    assert initiator.log_text().count("IKE_AUTH request 1") >= 2, initiator.log_text()


def test_sighup_reloads_secrets_while_the_established_sa_stays(
    lab: Lab, initiator: Charon
) -> None:
    """A second strongSwan connection with a PSK our node does not know is refused; the
    secret is added to the file and the node gets SIGHUP (swanctl --load-all's job): the
    same connection now comes up, and the SA set up before the reload is still there
    with its SPIs. A file that does not load leaves everything as it was."""
    first_conn, responder_conn = conn_pair()
    second_conn, _ = conn_pair(initiator_id="second.example.test", psk="second-secret")
    second_conn = replace(second_conn, name="second")
    node = lab.node([responder_conn])
    initiator.load(first_conn, second_conn)
    first = assert_initiated(initiator.initiate("net", ike="rw"), initiator)
    refused = initiator.initiate("net", ike="second")
    assert refused.returncode != 0, refused.stdout

    def hup_and_wait(line: str) -> None:
        count = node.log_text().count(line)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while node.log_text().count(line) == count:
            assert time.monotonic() < deadline, node.log_text()
            time.sleep(0.1)

    node.extra_toml = ('[secrets.second]\nids = ["gw.example.test", "second.example.test"]\n'
                       'secret = "second-secret"\n')
    node.write_config()
    hup_and_wait("configuration reloaded from")
    result = initiator.initiate("net", ike="second")
    assert result.returncode == 0, result.stdout + node.log_text()
    sas = {sa["name"]: sa for sa in initiator.list_sas() if sa.get("state") == "ESTABLISHED"}
    assert sas["rw"]["responder-spi"] == first["responder-spi"], sas
    assert child_sa(sas["second"])["state"] == "INSTALLED", sas
    assert "second-secret" not in node.log_text()

    node.config_path.write_text(node.config_path.read_text() + "[connections.rw\n")
    hup_and_wait("configuration not reloaded")
    result = initiator.terminate_ike("second")
    assert result.returncode == 0, result.stdout + result.stderr
    result = initiator.initiate("net", ike="second")  # the secret is still known
    assert result.returncode == 0, result.stdout + node.log_text()
    assert node.running()


def test_sas_terminate_and_reload_reach_a_single_node(lab: Lab, initiator: Charon) -> None:
    """The operations commands against `ike-cluster run` (its control socket, in the
    node's network namespace): `sas` lists strongSwan's SA with strongSwan's SPIs,
    `reload` takes a new connection's secret, `rekey` gives the Child SA and then the IKE
    SA new SPIs, `terminate --child` deletes the Child SA alone, `terminate` the SA, each
    with a Delete strongSwan receives."""
    initiator_conn, responder_conn = conn_pair()
    node = lab.node([responder_conn])
    initiator.load(initiator_conn)
    sa = assert_initiated(initiator.initiate("net"), initiator)

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return node.ns.run([sys.executable, "-m", "cluster", *args, "--config",
                            str(node.config_path)], check=False)

    listing = command("sas")
    assert listing.returncode == 0, listing.stderr
    assert f"{sa['initiator-spi']}_i" in listing.stdout, listing.stdout
    assert f"{sa['responder-spi']}_r" in listing.stdout, listing.stdout
    assert "'client.example.test'" in listing.stdout, listing.stdout

    node.extra_toml = '[secrets.other]\nids = ["other.example.test"]\nsecret = "x"\n'
    node.write_config()
    reloaded = command("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert "2 secret(s)" in reloaded.stdout, reloaded.stdout

    # `rekey` (swanctl's --rekey): the Child SA, then the IKE SA, get new SPIs, which
    # strongSwan shows; the command names them
    def settled() -> dict[str, Any]:  # strongSwan's SA once the rekeyed ones are gone
        deadline = time.monotonic() + 10
        while True:
            sas = established(initiator)
            if len(sas) == 1 and len(sas[0].get("child-sas", {})) == 1:
                return sas[0]
            assert time.monotonic() < deadline, initiator.list_sas()
            time.sleep(0.1)

    old_child = child_sa(sa)
    done = command("rekey", "--id", "client.example.test", "--child", "net")
    assert done.returncode == 0, done.stdout + done.stderr
    now = settled()
    assert child_sa(now)["spi-out"] != old_child["spi-out"], now
    assert done.stdout == (
        f"rekeyed CHILD SA net {old_child['spi-out']} (in) of IKE SA "
        f"{sa['initiator-spi']}_i/{sa['responder-spi']}_r: now {child_sa(now)['spi-out']} "
        "(in)\n"), done.stdout
    done = command("rekey", "--ike", sa["initiator-spi"])
    assert done.returncode == 0, done.stdout + done.stderr
    now = settled()
    assert now["initiator-spi"] != sa["initiator-spi"], now
    assert f"{sa['initiator-spi']}_i/{sa['responder-spi']}_r, remote 'client.example.test'," \
        f" owner gw1: now {now['initiator-spi']}_i/{now['responder-spi']}_r\n" in done.stdout
    missing = command("rekey", "--id", "nobody.example.test")
    assert missing.returncode == 1 and "no IKE SA matches" in missing.stderr, missing.stderr

    # `terminate --child` (swanctl's --terminate --child): the Child SA goes, the IKE SA stays
    deletes = initiator.log_text().count("received DELETE for ESP CHILD_SA")
    done = command("terminate", "--id", "client.example.test", "--child", "net")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == (
        f"terminated CHILD SA net {child_sa(now)['spi-out']} (in) of IKE SA "
        f"{now['initiator-spi']}_i/{now['responder-spi']}_r\n"), done.stdout
    assert initiator.log_text().count("received DELETE for ESP CHILD_SA") == deletes + 1
    (left,) = established(initiator)
    assert left["initiator-spi"] == now["initiator-spi"] and not left.get("child-sas"), left

    done = command("terminate", "--id", "client.example.test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"terminated IKE SA rw {now['initiator-spi']}_i/{now['responder-spi']}_r" in \
        done.stdout, done.stdout
    assert "received DELETE for IKE_SA rw[2]" in initiator.log_text()
    assert established(initiator) == []
    assert command("sas").stdout == "no IKE SAs on node gw1\n", command("sas").stdout


def test_a_crl_fetched_from_its_uri_revokes_a_client_once_it_lists_it(
        lab: Lab, initiator: Charon, pki: Pki, tmp_path: Path) -> None:
    """`remote.crls = ["http://..."]`: our node downloads the CA's CRL (an HTTP server in
    its namespace) and again every crl_refresh. While the CRL lists nothing, strongSwan's
    certificate gets in; once the CA publishes a CRL listing it, the next download takes
    effect and the same client gets AUTHENTICATION_FAILED."""
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(pki.authority.revoke(stem="empty"), www / "ca.crl")
    _serve(lab, [sys.executable, "-m", "http.server", "8080", "--bind", RESPONDER_V4,
                 "--directory", str(www)], 8080, tmp_path / "http.log")
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_revoked, responder_cred=pki.gw_ecdsa)
    uri = f"http://{RESPONDER_V4}:8080/ca.crl"
    responder_conn = replace(responder_conn, remote=replace(responder_conn.remote,
                                                            crl_uris=(uri,)))
    node = lab.node([responder_conn], settings={"ike": {"crl_refresh": 1}})
    deadline = time.monotonic() + 15
    while f"CRL {uri} fetched" not in node.log_text():
        assert time.monotonic() < deadline, node.log_text()
        time.sleep(0.1)
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)  # nothing revoked yet

    shutil.copy(pki.authority.revoke(pki.client_revoked, stem="listing"), www / "ca.crl")
    deadline = time.monotonic() + 20
    while not re.search(rf"CRL {re.escape(uri)} fetched: .*, 1 revoked", node.log_text()):
        assert time.monotonic() < deadline, node.log_text()
        time.sleep(0.2)
    result = initiator.terminate_ike("rw")
    assert result.returncode == 0, result.stdout
    refused = initiator.initiate("net")
    assert refused.returncode != 0 and "AUTHENTICATION_FAILED" in refused.stdout, refused.stdout
    node.logged(r"\(serial [0-9a-f]+\) was revoked")


def test_redirect_sends_established_and_new_peers_to_another_gateway(
        lab: Lab, initiator: Charon) -> None:
    """RFC 5685 with strongSwan (it announces REDIRECT_SUPPORTED and follows): `ike-cluster
    redirect --to B --existing` on node A moves strongSwan's established SA to node B (a
    REDIRECT in an INFORMATIONAL; strongSwan sets up a new SA there and deletes the old),
    and a new connection to A gets a REDIRECT in the IKE_SA_INIT response and comes up on
    B. After --stop, A answers again."""
    lab.responder.ip("addr", "add", f"{OTHER_GATEWAY}/24", "dev", VETH)
    initiator_conn, responder_conn = conn_pair()
    node_a = lab.node([responder_conn])
    node_b = lab.node([responder_conn], addresses=(OTHER_GATEWAY,), node_id="gw2")
    second = replace(initiator_conn, name="second")
    initiator.load(initiator_conn, second)
    first = assert_initiated(initiator.initiate("net", ike="rw"), initiator)
    assert first["remote-host"] == RESPONDER_V4
    # node A rekeys the IKE SA first: that makes A its initiator (RFC 7296 2.18), but A
    # is still the gateway that may redirect it, and the SA still supports REDIRECT
    rekeyed = node_a.ns.run([sys.executable, "-m", "cluster", "rekey", "--config",
                             str(node_a.config_path), "--ike", first["initiator-spi"]],
                            check=False)
    assert rekeyed.returncode == 0, rekeyed.stdout + rekeyed.stderr
    (first,) = established(initiator)

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return node_a.ns.run([sys.executable, "-m", "cluster", "redirect", "--config",
                              str(node_a.config_path), *args], check=False)

    moved = command("--to", OTHER_GATEWAY, "--existing")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"asked to move: IKE SA {first['initiator-spi']}_i" in moved.stdout, moved.stdout
    deadline = time.monotonic() + 15
    while True:
        sas = {sa["name"]: sa for sa in established(initiator)}
        if sas.get("rw", {}).get("remote-host") == OTHER_GATEWAY:
            break
        assert time.monotonic() < deadline, f"{sas}\n{initiator.log_text()}"
        time.sleep(0.2)
    node_a.logged(rf"IKE SA deleted: spi_i={first['initiator-spi']} .*reason=deleted by "
                  r"peer")
    initiator.terminate_ike("rw")  # (strongSwan would not install the same selectors twice)

    result = initiator.initiate("net", ike="second")
    assert result.returncode == 0, result.stdout
    sas = {sa["name"]: sa for sa in established(initiator)}
    assert sas["second"]["remote-host"] == OTHER_GATEWAY, sas
    assert "reason=redirected to 10.99.0.3" in node_a.log_text(), node_a.log_text()
    assert node_b.log_text().count("IKE SA established") == 2, node_b.log_text()

    stopped = command("--stop")
    assert stopped.returncode == 0, stopped.stderr
    initiator.terminate_ike("second")
    result = initiator.initiate("net", ike="second")
    assert result.returncode == 0, result.stdout
    sas = {sa["name"]: sa for sa in established(initiator)}
    assert sas["second"]["remote-host"] == RESPONDER_V4, sas


def _revoked_then_good(lab: Lab, initiator: Charon, pki: Pki, revoked: Credential,
                       good: Credential) -> tuple[Node, str]:
    """strongSwan with `revoked` is refused on its first try; the node's log then; with
    `good` it gets in."""
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=revoked, responder_cred=pki.gw_ecdsa)
    node = lab.node([responder_conn])
    initiator.load(initiator_conn)
    refused = initiator.initiate("net")
    assert refused.returncode != 0 and "AUTHENTICATION_FAILED" in refused.stdout, refused.stdout
    log = node.logged(r"IKE SA failed")
    initiator.load(replace(initiator_conn, local=End(
        "pubkey", "client.example.test", good.cert, good.key)))
    assert_initiated(initiator.initiate("net"), initiator)
    return node, log


def _distribution_point(lab: Lab, pki: Pki, tmp_path: Path, stem: str, *,
                        good_name: str = "client.example.test"
                        ) -> tuple[str, Credential, Credential]:
    """Two client certificates naming a CRL distribution point in the responder's
    namespace (its URI first), whose CRL lists the first of them."""
    www = tmp_path / "www"
    www.mkdir()
    uri = f"http://{RESPONDER_V4}:8080/ca.crl"
    revoked = pki.authority.issue("client.example.test", name=f"{stem}1", crl_uri=uri)
    good = pki.authority.issue(good_name, name=f"{stem}2", crl_uri=uri)
    shutil.copy(pki.authority.revoke(revoked, stem=stem), www / "ca.crl")
    _serve(lab, [sys.executable, "-m", "http.server", "8080", "--bind", RESPONDER_V4,
                 "--directory", str(www)], 8080, tmp_path / "http.log")
    return uri, revoked, good


@pytest.mark.parametrize("fragmentation", ["yes", "no"])
def test_fragmentation_no_is_not_announced_to_strongswan(
        lab: Lab, initiator: Charon, fragmentation: str) -> None:
    """swanctl's fragmentation on our connection: with "yes" (the default) our
    IKE_SA_INIT answer echoes strongSwan's IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383 2.3),
    with "no" it does not; the SA comes up either way."""
    initiator_conn, responder_conn = conn_pair()
    lab.node([replace(responder_conn, node_extra={"fragmentation": fragmentation})])
    initiator.load(initiator_conn)
    assert_initiated(initiator.initiate("net"), initiator)
    response = re.search(r"parsed IKE_SA_INIT response 0 \[([^]]*)\]", initiator.log_text())
    assert response is not None, initiator.log_text()
    assert ("N(FRAG_SUP)" in response.group(1)) == (fragmentation == "yes"), response.group(0)


@pytest.mark.parametrize("send_cert", ["ifasked", "never"])
def test_send_cert_decides_whether_strongswan_gets_our_certificate(
        lab: Lab, initiator: Charon, pki: Pki, send_cert: str) -> None:
    """swanctl's send_cert on our connection. strongSwan sends a CERTREQ for its CA, so
    with "ifasked" our IKE_AUTH answer carries our certificate and strongSwan verifies
    it; with "never" it carries none, and strongSwan, holding only the CA, finds no key
    to check our AUTH with."""
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa)
    lab.node([replace(responder_conn, node_extra={"send_cert": send_cert})])
    initiator.load(initiator_conn)
    result = initiator.initiate("net")
    log = initiator.log_text()
    assert "sending cert request for" in log, log
    if send_cert == "ifasked":
        assert_initiated(result, initiator)
        assert re.search(r"received end entity cert .*CN=gw\.example\.test", log), log
    else:
        assert_not_established(result, initiator)
        assert "received end entity cert" not in log, log
        assert "no trusted ECDSA public key found for 'gw.example.test'" in log, log


def test_revocation_strict_refuses_a_certificate_no_crl_confirms(
        lab: Lab, initiator: Charon, pki: Pki) -> None:
    """swanctl's remote revocation = "strict": strongSwan's certificate, revoked by
    nobody, is refused while no CRL of its CA is there to confirm it; with the CA's
    (current) CRL it gets in, and the certificate that CRL lists is refused."""
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=pki.client_ecdsa, responder_cred=pki.gw_ecdsa)
    strict = replace(responder_conn.remote, revocation="strict")
    node = lab.node([replace(responder_conn, remote=strict)])
    initiator.load(initiator_conn)
    refused = initiator.initiate("net")
    assert refused.returncode != 0 and "AUTHENTICATION_FAILED" in refused.stdout, refused.stdout
    node.logged(r"IKE SA failed: .*revocation status of CN=client\.example\.test,O=ike-cluster "
                r"tests unknown: no OCSP answer and no current CRL of its issuer \(revocation "
                r"= strict\)")
    node.stop()
    node = lab.node([replace(responder_conn, remote=replace(strict, crls=(pki.crl,)))])
    assert_initiated(initiator.initiate("net"), initiator)
    initiator.terminate_ike("rw")
    initiator.load(replace(initiator_conn, local=End(
        "pubkey", "client.example.test", pki.client_revoked.cert, pki.client_revoked.key)))
    refused = initiator.initiate("net")
    assert refused.returncode != 0 and "AUTHENTICATION_FAILED" in refused.stdout, refused.stdout
    node.logged(r"\(serial [0-9a-f]+\) was revoked")


def test_a_crl_named_in_the_peers_certificate_is_fetched_before_it_is_accepted(
        lab: Lab, initiator: Charon, pki: Pki, tmp_path: Path) -> None:
    """A client certificate with a CRL distribution point (no CRL configured on our
    side): the first IKE_AUTH that shows it waits while the node downloads that CRL, so
    a revoked certificate is refused the first time already, and one the CRL does not
    list gets in, checked against the same (now cached) CRL."""
    uri, revoked, good = _distribution_point(lab, pki, tmp_path, "cdp")
    node, log = _revoked_then_good(lab, initiator, pki, revoked, good)
    assert re.search(rf"CRL {re.escape(uri)} fetched: .*, 1 revoked \(a certificate's "
                     r"distribution point\)", log), log
    assert re.search(r"\(serial [0-9a-f]+\) was revoked", log), log
    assert node.log_text().count(f"CRL {uri} fetched") == 1  # cached, not fetched again


def test_a_delta_crl_the_crl_names_revokes_what_its_base_does_not_list(
        lab: Lab, initiator: Charon, pki: Pki, tmp_path: Path) -> None:
    """RFC 5280 5.2.4/5.2.6: the certificates' distribution point serves a complete CRL
    that lists nothing and names a delta CRL (Freshest CRL); the delta lists one
    certificate. Our node fetches both before it decides: that certificate is refused
    the first time, the other gets in."""
    www = tmp_path / "www"
    www.mkdir()
    uri = f"http://{RESPONDER_V4}:8080/ca.crl"
    delta_uri = f"http://{RESPONDER_V4}:8080/delta.crl"
    revoked = pki.authority.issue("client.example.test", name="clientdelta1", crl_uri=uri)
    good = pki.authority.issue("client.example.test", name="clientdelta2", crl_uri=uri)
    shutil.copy(pki.authority.revoke(stem="base", number=7, freshest=delta_uri),
                www / "ca.crl")
    shutil.copy(pki.authority.revoke(revoked, stem="delta", number=8, delta_of=7),
                www / "delta.crl")
    _serve(lab, [sys.executable, "-m", "http.server", "8080", "--bind", RESPONDER_V4,
                 "--directory", str(www)], 8080, tmp_path / "http.log")
    _, log = _revoked_then_good(lab, initiator, pki, revoked, good)
    assert re.search(rf"CRL {re.escape(uri)} fetched: .*, 0 revoked", log), log
    assert re.search(rf"CRL {re.escape(delta_uri)} fetched: .*, 1 revoked", log), log
    assert re.search(r"\(serial [0-9a-f]+\) was revoked on .* \(delta CRL\)", log), log


def test_ocsp_answers_decide_before_any_crl(
        lab: Lab, initiator: Charon, pki: Pki, tmp_path: Path) -> None:
    """Client certificates naming an OCSP responder (OpenSSL's `openssl ocsp`, signing
    with the CA's key, in our node's namespace): the first IKE_AUTH waits for its
    answer; "revoked" is refused, "good" gets in, with no CRL anywhere."""
    uri = f"http://{RESPONDER_V4}:8888"
    revoked = pki.authority.issue("client.example.test", name="clientocsp1", ocsp_uri=uri)
    good = pki.authority.issue("client.example.test", name="clientocsp2", ocsp_uri=uri)
    index = tmp_path / "index.txt"
    index.write_text(pki.authority.ocsp_index(good=[good], revoked=[revoked]))
    ca = pki.authority
    _serve(lab, ["openssl", "ocsp", "-index", str(index), "-port", "8888",
                 "-rsigner", str(ca.cert_path), "-rkey", str(ca.key_path),
                 "-CA", str(ca.cert_path), "-nmin", "5"], 8888, tmp_path / "ocsp.log")
    node, log = _revoked_then_good(lab, initiator, pki, revoked, good)
    assert re.search(rf"OCSP {re.escape(uri)}: CN=client\.example\.test.* is revoked", log), log
    assert re.search(r"was revoked on .* \(OCSP\)", log), log
    node.logged(rf"OCSP {re.escape(uri)}: CN=client\.example\.test.* is good")


def test_eap_radius_relays_strongswans_eap_to_freeradius(
        lab: Lab, initiator: Charon, pki: Pki, tmp_path: Path) -> None:
    """`remote.auth = "eap-radius"` (strongSwan's eap-radius): our node asks strongSwan
    for its EAP identity, then relays the EAP conversation to FreeRADIUS (in the node's
    namespace), which runs EAP-MSCHAPv2 against its users file. The Access-Accept's
    MS-MPPE keys are the MSK both AUTHs are made with: strongSwan verifies ours and the
    SA is installed; its Session-Timeout (an hour) reaches strongSwan as AUTH_LIFETIME a
    tenth earlier (RFC 4478), and its User-Name names the user from then on (RFC 2865
    5.1). FreeRADIUS's radclient then sends a CoA-Request with a shorter Session-Timeout
    (RFC 5176, [radius.dae]): our node answers CoA-ACK and strongSwan receives the new
    AUTH_LIFETIME in an INFORMATIONAL exchange; then a Disconnect-Request for that name:
    our node answers Disconnect-ACK and deletes the SA (strongSwan gets the Delete). A
    wrong password is rejected by FreeRADIUS and
    strongSwan gets AUTHENTICATION_FAILED; no secret appears in our log."""
    radius = FreeRadius(lab.responder, tmp_path / "radius", address=RESPONDER_V4,
                        client=RESPONDER_V4, secret="radius-shared-secret",
                        users={"carol": "Carol's pa55word"},
                        replies={"carol": ("Session-Timeout = 3600",
                                           'User-Name := "carol@corp.example"')}).start()
    initiator_conn, responder_conn = _eap_user(pki, "carol", "Carol's pa55word",
                                               End("eap-radius", "%any", eap_id="%any"))
    node = lab.node([responder_conn], extra_toml=(
        f'[radius.servers.lab]\naddress = "{RESPONDER_V4}"\n'
        'secret = "radius-shared-secret"\n'
        f'[radius.dae]\nlisten = "{RESPONDER_V4}:3799"\nsecret = "dae-secret"\n'))
    initiator.load(initiator_conn)

    result = initiator.initiate("net")
    _assert_eap_established(result, initiator, "EAP_MSCHAPV2")
    # the Access-Accept's User-Name names the user from now on (RFC 2865 5.1)
    node.logged(r"IKE SA established: rw .* eap_id=carol@corp\.example")
    assert "Login OK: [carol]" in radius.log_text(), radius.log_text()
    assert "received AUTH_LIFETIME of 3240s" in result.stdout, result.stdout
    for attributes, kind, answer in (
            ('User-Name = "carol", Session-Timeout = 3000', "coa", "CoA-NAK"),
            ('User-Name = "carol@corp.example"', "coa", "CoA-NAK"),  # no Session-Timeout
            ('User-Name = "carol@corp.example", Session-Timeout = 3000', "coa", "CoA-ACK"),
            ('User-Name = "carol"', "disconnect", "Disconnect-NAK"),
            ('User-Name = "carol@corp.example"', "disconnect", "Disconnect-ACK")):
        disconnect = lab.responder.run(
            ["sh", "-c", f"echo '{attributes}' | radclient -r 2 -t 2 -x "
                         f"{RESPONDER_V4}:3799 {kind} dae-secret"], check=False)
        assert f"Received {answer}" in disconnect.stdout, disconnect.stdout + disconnect.stderr
        if answer == "CoA-ACK":  # RFC 4478 in an INFORMATIONAL: a tenth short of it
            deadline = time.monotonic() + 10
            while "received AUTH_LIFETIME of 2700s, scheduling" not in initiator.log_text():
                assert time.monotonic() < deadline, initiator.log_text() + node.log_text()
                time.sleep(0.1)
    deadline = time.monotonic() + 10
    while established(initiator):
        assert time.monotonic() < deadline, initiator.log_text() + node.log_text()
        time.sleep(0.1)
    assert "received DELETE for IKE_SA rw" in initiator.log_text()
    assert "dae-secret" not in node.log_text()

    initiator.load(replace(initiator_conn, eap_users=(("carol", "not her password"),)))
    result = initiator.initiate("net")
    assert_not_established(result, initiator)
    assert "received AUTHENTICATION_FAILED notify error" in result.stdout, result.stdout
    assert "RADIUS: lab rejected 'carol'" in node.log_text(), node.log_text()
    assert "Login incorrect" in radius.log_text(), radius.log_text()
    assert "radius-shared-secret" not in node.log_text()
    assert_still_serves(initiator, initiator_conn, node)


def test_radius_class_attributes_choose_among_connections_by_their_groups(
        lab: Lab, initiator: Charon, pki: Pki, tmp_path: Path) -> None:
    """swanctl's `remote.groups` with eap-radius (strongSwan's class_group and
    filter_id): connection "admins" wants group "admins" and offers the whole
    10.99.2.0/24, "staff" names no group and offers only 10.99.2.1. FreeRADIUS gives
    carol Class "admins", erin Filter-Id "admins" with Tunnel-Type ESP, dave neither.
    All start EAP on "admins"; carol and erin stay there, dave's Access-Accept moves him
    to "staff", as strongSwan switches after authentication, and strongSwan sees each
    one's traffic selectors narrowed accordingly. Without "staff", dave is refused."""
    radius = FreeRadius(lab.responder, tmp_path / "radius", address=RESPONDER_V4,
                        client=RESPONDER_V4, secret="radius-shared-secret",
                        users={"carol": "Carol's pa55word", "dave": "Dave's pa55word",
                               "erin": "Erin's pa55word"},
                        replies={"carol": ('Class := "admins"',),
                                 "erin": ("Tunnel-Type := ESP", 'Filter-Id := "admins"')}
                        ).start()
    carol, admins = _eap_user(pki, "carol", "Carol's pa55word",
                              End("eap-radius", "%any", eap_id="%any", groups=("admins",)))
    admins = replace(admins, name="admins")
    staff = replace(admins, name="staff", remote=replace(admins.remote, groups=()))
    staff = staff.with_child(local_ts=(f"{RESPONDER_INNER_V4}/32",))
    radius_toml = (f'[radius.servers.lab]\naddress = "{RESPONDER_V4}"\n'
                   'secret = "radius-shared-secret"\n')
    node = lab.node([admins, staff], extra_toml=radius_toml)
    dave = replace(carol, eap_users=(("dave", "Dave's pa55word"),),
                   local=replace(carol.local, eap_id="dave"))
    erin = replace(carol, eap_users=(("erin", "Erin's pa55word"),),
                   local=replace(carol.local, eap_id="erin"))
    for user, conn, connection, remote_ts in (
            ("carol", carol, "admins", RESPONDER_NETS[4]),
            ("erin", erin, "admins", RESPONDER_NETS[4]),
            ("dave", dave, "staff", f"{RESPONDER_INNER_V4}/32")):
        initiator.load(conn)
        sa = _assert_eap_established(initiator.initiate("net"), initiator, "EAP_MSCHAPV2")
        assert child_sa(sa)["remote-ts"] == [remote_ts], sa
        node.logged(rf"IKE SA established: {connection} .* eap_id={user}\b")
        assert initiator.terminate_ike().returncode == 0
        assert not established(initiator)
    assert "Login OK: [dave]" in radius.log_text(), radius.log_text()

    node.stop()
    node = lab.node([admins], extra_toml=radius_toml)
    initiator.load(dave)
    result = initiator.initiate("net")
    assert_not_established(result, initiator)
    assert "received AUTHENTICATION_FAILED notify error" in result.stdout, result.stdout
    node.logged(r"EAP user b'dave' is in none of the groups of connection 'admins'")


def _eap_tls_user(lab: Lab, pki: Pki, client: Credential, gateway: Credential
                  ) -> tuple[Charon, Conn, Node]:
    """strongSwan (with its eap-tls plugin) as an EAP-TLS user with `client`'s
    certificate, our node accepting any of our CA's: the charon, its loaded connection,
    the node."""
    initiator = lab.charon("initiator", plugins=PLUGINS.replace("eap-mschapv2",
                                                                "eap-mschapv2 eap-tls"))
    initiator_conn, responder_conn = conn_pair(
        ca=pki.ca, initiator_cred=client, responder_cred=gateway)
    initiator_conn = replace(initiator_conn, local=replace(initiator_conn.local,
                                                           auth="eap-tls"))
    responder_conn = replace(responder_conn, remote=End("eap-tls", "%any", eap_id="%any",
                                                        cacerts=(pki.ca,)))
    node = lab.node([responder_conn])
    initiator.load(initiator_conn)
    return initiator, initiator_conn, node


def test_an_eap_tls_user_gets_in_with_a_certificate_of_our_ca_and_a_stranger_does_not(
        lab: Lab, pki: Pki) -> None:
    """EAP-TLS in the gateway itself (RFC 5216; strongSwan's eap-tls plugin on both
    sides): strongSwan's client certificate goes inside the TLS handshake carried in EAP,
    in fragments both ways, and the MSK both derive from it makes the final AUTHs.
    A certificate from a CA the connection does not list gets AUTHENTICATION_FAILED."""
    # RSA certificates: each side's TLS flight is past the 1024 bytes of one fragment
    initiator, initiator_conn, node = _eap_tls_user(lab, pki, pki.client_rsa, pki.gw_rsa)

    result = initiator.initiate("net")
    _assert_eap_established(result, initiator, "EAP_TLS")
    node.logged(r"IKE SA established: rw .* eap_id=client\.example\.test")
    assert "negotiated TLS 1.2" in result.stdout, result.stdout
    assert "received TLS server certificate 'O=ike-cluster tests, CN=gw.example.test'" in \
        result.stdout, result.stdout
    # Start, our flight in two fragments, the acknowledgement of strongSwan's first
    # fragment, our Finished (unfragmented: Start, flight, Finished)
    assert result.stdout.count("[ EAP/REQ/TLS ]") >= 5, result.stdout
    initiator.terminate_ike()

    stranger = replace(initiator_conn, local=replace(
        initiator_conn.local, cert=pki.client_from_other_ca.cert,
        key=pki.client_from_other_ca.key))  # (charon keeps it: the last case here)
    initiator.load(stranger)
    result = initiator.initiate("net")
    assert_not_established(result, initiator)
    assert "received AUTHENTICATION_FAILED notify error" in result.stdout, result.stdout
    node.logged(r"issuer CN=untrusted test CA,[^\n]* is not a known CA")
    assert node.running()


def test_an_eap_tls_certificate_waits_for_the_crl_it_names_and_a_revoked_one_fails(
        lab: Lab, pki: Pki, tmp_path: Path) -> None:
    """EAP-TLS checks revocation as pubkey peers do: a client certificate names a CRL
    distribution point we have not fetched yet, so the IKE_AUTH that completes the TLS
    handshake waits while the node downloads it. A certificate that CRL lists is refused
    the first time already; one it does not list then gets in on the cached CRL."""
    # (another name for the good one: strongSwan's EAP-TLS picks its certificate by
    # identity, and it keeps the first one loaded)
    uri, revoked, good = _distribution_point(lab, pki, tmp_path, "tlscdp",
                                             good_name="good.example.test")
    initiator, initiator_conn, node = _eap_tls_user(lab, pki, revoked, pki.gw_ecdsa)

    refused = initiator.initiate("net")
    assert_not_established(refused, initiator)
    assert "received AUTHENTICATION_FAILED notify error" in refused.stdout, refused.stdout
    log = node.logged(r"IKE SA failed")
    assert re.search(rf"CRL {re.escape(uri)} fetched: .*, 1 revoked \(a certificate's "
                     r"distribution point\)", log), log
    assert re.search(r"\(serial [0-9a-f]+\) was revoked", log), log

    initiator.load(replace(initiator_conn, local=replace(
        initiator_conn.local, id="good.example.test", cert=good.cert, key=good.key)))
    _assert_eap_established(initiator.initiate("net"), initiator, "EAP_TLS")
    node.logged(r"IKE SA established: rw .* eap_id=good\.example\.test")
    assert node.log_text().count(f"CRL {uri} fetched") == 1  # cached, not fetched again


def test_eap_radius_carries_eap_tls_the_gateway_does_not_know(
        lab: Lab, pki: Pki, tmp_path: Path) -> None:
    """The point of a RADIUS back end: a method our node does not implement. strongSwan
    logs in with EAP-TLS (its client certificate inside EAP), FreeRADIUS runs the TLS
    handshake over a dozen relayed round trips (EAP-TLS fragments larger than a RADIUS
    attribute), and the MSK it derives arrives in the MS-MPPE keys: strongSwan accepts
    our AUTH made with it."""
    initiator = lab.charon("initiator", plugins=PLUGINS.replace("eap-mschapv2",
                                                                "eap-mschapv2 eap-tls"))
    radius = FreeRadius(lab.responder, tmp_path / "radius", address=RESPONDER_V4,
                        client=RESPONDER_V4, secret="radius-shared-secret", users={},
                        tls=Tls(pki.gw_ecdsa.cert, pki.gw_ecdsa.key, pki.ca)).start()
    initiator_conn, responder_conn = _eap_user(
        pki, "client.example.test", "", End("eap-radius", "%any", eap_id="%any"), "eap-tls")
    node = lab.node([responder_conn], extra_toml=(
        f'[radius.servers.lab]\naddress = "{RESPONDER_V4}"\n'
        'secret = "radius-shared-secret"\n'))
    initiator.load(initiator_conn)

    _assert_eap_established(initiator.initiate("net"), initiator, "EAP_TLS")
    node.logged(r"IKE SA established: rw .* eap_id=client\.example\.test")
    assert "Login OK: [client.example.test]" in radius.log_text(), radius.log_text()
