"""Record IKEv2 key-derivation vectors and raw exchanges from strongSwan talking to itself.

Run by hand as root from the repository root (not collected by pytest):

    .venv/bin/python -m tests.vectors.record_strongswan

For each case, two charons in the lab run a PSK handshake, a CHILD_SA rekey, an
IKE_SA rekey, DPD and a delete, with ``ike`` and ``chd`` logging at level 4 (charon
then dumps DH secrets, SKEYSEED, SK_*, PSK AUTH inputs and Child SA keys). tcpdump
in the responder namespace captures the datagrams. Output:

- ``strongswan_kdf.json``: per case the IKE_SA_INIT inputs and derived keys, the
  PSK AUTH computations, the IKE_AUTH Child SA keys, and the IKE and CHILD rekeys;
- ``exchanges/<case>-<n>-<i|r>.bin``: each IKE message as sent on the wire (non-ESP
  marker removed); ``i`` is the side that initiated the IKE SA (10.99.0.1 / fd99::1),
  ``r`` the other; ``exchanges/decrypted/`` holds the inner payload chains of
  protected messages; ``exchanges/index.json`` describes every file.

Every logged key is checked by decrypting the captured messages with it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tests.interop.charon import Charon
from tests.interop.lab import INITIATOR_V4, Lab, conn_pair
from tests.interop.netns import stop_process
from tests.vectors import ike_plain
from tests.vectors.pcap import ike_datagrams

HERE = Path(__file__).resolve().parent
PSK = "vectors-psk-0123456789"


@dataclass(frozen=True)
class Case:
    ike: str
    esp: str
    prf_hash: str  # hashlib name of the PRF's hash
    cipher: str  # SkKeys.cipher for the IKE SA
    integ_hash: str = ""
    icv_len: int = 16


CASES = (
    Case("aes256gcm16-prfsha256-x25519", "aes256gcm16", "sha256", "aes-gcm-16"),
    Case("aes128-sha256-modp2048", "aes128-sha256", "sha256", "aes-cbc", "sha256", 16),
    Case("aes256-sha384-ecp384", "aes256-sha384", "sha384", "aes-cbc", "sha384", 24),
)

# -- charon's hex dumps (format checked against strongSwan 5.9.8 logs) --------------

# "11:44:21 15[IKE] <rw|1> SKEYSEED => 32 bytes @ 0x7fd5100035a0"
DUMP_HEAD = re.compile(
    r"^\S+ (\d+)\[(\w+)\] (?:<([^>]*)> )?(.+?) => (\d+) bytes @ 0x[0-9a-fA-F]+$"
)
# "11:44:21 15[IKE] <rw|1>    0: 06 87 11 78 C1 62 95 1B D2 41 A6 71 E3 1D B4 3E  ...x.b..."
DUMP_LINE = re.compile(r"^\S+ (\d+)\[(\w+)\] (?:<[^>]*>)? *(\d+): (.*)$")


@dataclass(frozen=True)
class Dump:
    group: str
    sa: str
    name: str
    data: bytes


def parse_dumps(log: str) -> list[Dump]:
    """Every ``name => N bytes`` hex dump in a charon log, in order."""
    dumps: list[Dump] = []
    lines = log.splitlines()
    i = 0
    while i < len(lines):
        head = DUMP_HEAD.match(lines[i])
        i += 1
        if head is None:
            continue
        thread, group, sa, name, size = head.groups()
        data = bytearray()
        while len(data) < int(size) and i < len(lines):
            line = DUMP_LINE.match(lines[i])
            if line is None or line.group(1) != thread or int(line.group(3)) != len(data):
                break
            count = min(16, int(size) - len(data))
            data += bytes.fromhex("".join(line.group(4).split()[:count]))
            i += 1
        if len(data) != int(size):
            raise ValueError(f"incomplete dump of {name!r} ({len(data)}/{size} bytes)")
        dumps.append(Dump(group, sa or "", name, bytes(data)))
    return dumps


IKE_KEY_NAMES = {
    "shared Diffie Hellman secret": "g_ir",
    "SKEYSEED": "skeyseed",
    "Sk_d secret": "sk_d",
    "Sk_ai secret": "sk_ai",
    "Sk_ar secret": "sk_ar",
    "Sk_ei secret": "sk_ei",
    "Sk_er secret": "sk_er",
    "Sk_pi secret": "sk_pi",
    "Sk_pr secret": "sk_pr",
}
CHILD_KEY_NAMES = {
    "seed": "seed",
    "encryption initiator key": "encr_i",
    "encryption responder key": "encr_r",
    "integrity initiator key": "integ_i",
    "integrity responder key": "integ_r",
}


def key_sets(dumps: list[Dump], names: dict[str, str], starts_with: str) -> list[dict[str, bytes]]:
    """Group consecutive dumps into sets, each starting at a ``starts_with`` dump."""
    sets: list[dict[str, bytes]] = []
    for dump in dumps:
        if dump.name == starts_with:
            sets.append({})
        if sets and dump.name in names and names[dump.name] not in sets[-1]:
            sets[-1][names[dump.name]] = dump.data
    for keys in sets:
        for short in names.values():
            keys.setdefault(short, b"")
    return sets


def psk_auths(dumps: list[Dump]) -> list[dict[str, bytes]]:
    """The PSK AUTH computations, in the order charon made them."""
    out: list[dict[str, bytes]] = []
    for dump in dumps:
        if dump.name == "IDx'":
            out.append({"id_payload": dump.data})
        elif out and dump.name.startswith("octets = "):
            out[-1]["octets"] = dump.data
        elif out and dump.name.startswith("AUTH = "):
            out[-1]["auth"] = dump.data
    return out


# -- running a case -----------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def run_case(case: Case, workdir: Path) -> tuple[Path, str, str]:
    """Run the exchanges; return the capture and both charon logs."""
    levels = {"ike": 4, "chd": 4}
    with Lab(workdir) as lab:
        pcap = workdir / "capture.pcap"
        dump_out = workdir / "tcpdump.out"
        tcpdump = lab.responder.spawn(
            ["tcpdump", "-i", "veth0", "-n", "-U", "-w", str(pcap), "udp"], output=dump_out
        )
        wait_for("tcpdump", lambda: "listening on" in dump_out.read_text(errors="replace"))
        initiator_conn, responder_conn = conn_pair(
            proposals=(case.ike,), esp_proposals=(case.esp,),
            responder_esp_proposals=(case.esp,), psk=PSK,
        )  # fmt: skip
        responder = lab.charon("responder", log_levels=levels)
        responder.load(responder_conn)
        initiator = lab.charon("initiator", log_levels=levels)
        initiator.load(replace(initiator_conn, dpd_delay="1s"))

        result = initiator.initiate("net")
        if result.returncode != 0:
            raise RuntimeError(f"{case.ike}: initiate failed:\n{result.stdout}")
        (sa,) = initiator.list_sas()
        (first_child,) = sa["child-sas"].values()

        initiator.rekey(child="net")
        wait_for("CHILD_SA rekey", lambda: children_other_than(initiator, first_child))
        initiator.rekey(ike="rw")
        wait_for("IKE_SA rekey", lambda: ike_sas_other_than(initiator, sa))
        time.sleep(2.5)  # idle for longer than dpd_delay: DPD exchanges (empty INFORMATIONAL)
        terminated = initiator.terminate_ike("rw")
        if terminated.returncode != 0:
            raise RuntimeError(f"terminate failed:\n{terminated.stdout}")
        time.sleep(0.5)
        stop_process(tcpdump)
        return pcap, initiator.log_text(), responder.log_text()


def children_other_than(charon: Charon, child: dict[str, Any]) -> bool:
    sas = charon.list_sas()
    children = [c for sa in sas for c in sa.get("child-sas", {}).values()]
    return len(children) == 1 and children[0]["uniqueid"] != child["uniqueid"] and (
        children[0]["state"] == "INSTALLED")


def ike_sas_other_than(charon: Charon, sa: dict[str, Any]) -> bool:
    sas = charon.list_sas()
    return len(sas) == 1 and sas[0]["uniqueid"] != sa["uniqueid"] and (
        sas[0]["state"] == "ESTABLISHED")


# -- turning a run into vectors -----------------------------------------------------


def sk_keys(case: Case, keys: dict[str, bytes], side: str) -> ike_plain.SkKeys:
    return ike_plain.SkKeys(
        case.cipher, keys[f"sk_e{side}"], keys[f"sk_a{side}"], case.integ_hash, case.icv_len
    )


def build_case(case: Case, pcap: Path, log_i: str, log_r: str, out_dir: Path) -> dict[str, Any]:
    dumps = parse_dumps(log_i)
    ike_keys = key_sets(dumps, IKE_KEY_NAMES, "shared Diffie Hellman secret")
    child_keys = key_sets(
        [d for d in dumps if d.group == "CHD"], CHILD_KEY_NAMES, "seed"
    )
    # Both charons derived the same keys, or the vectors are worthless.
    dumps_r = parse_dumps(log_r)
    if key_sets(dumps_r, IKE_KEY_NAMES, "shared Diffie Hellman secret") != ike_keys:
        raise RuntimeError("initiator and responder logged different IKE keys")
    if len(ike_keys) != 2 or len(child_keys) != 2:
        raise RuntimeError(f"expected 2 IKE and 2 CHILD key sets, got {len(ike_keys)}, "
                           f"{len(child_keys)}")
    initial, rekeyed = ike_keys

    messages = ike_datagrams(pcap)
    init_req, init_resp = messages[0].payload, messages[1].payload
    hdr = ike_plain.header(init_req)
    req_chain = ike_plain.payloads(hdr.next_payload, init_req[28:])
    resp_chain = ike_plain.payloads(ike_plain.header(init_resp).next_payload, init_resp[28:])
    spi_i, spi_r = hdr.spi_i, ike_plain.header(init_resp).spi_r
    ni, nr = ike_plain.find(req_chain, ike_plain.NONCE), ike_plain.find(resp_chain, ike_plain.NONCE)
    ke_i, ke_r = ike_plain.find(req_chain, ike_plain.KE), ike_plain.find(resp_chain, ike_plain.KE)
    assert ni and nr and ke_i and ke_r
    group, kei_data = ike_plain.ke_data(ke_i)
    _, ker_data = ike_plain.ke_data(ke_r)

    sa_keys = {(spi_i, spi_r): initial}
    files, rekeys = write_exchanges(case, messages, sa_keys, rekeyed, out_dir)
    ike_rekey = rekeys["ike"]
    child_rekey = rekeys["child"]
    if child_keys[0]["seed"] != ni + nr:
        raise RuntimeError("IKE_AUTH child seed is not Ni | Nr")
    if child_keys[1]["seed"] != child_rekey["ni"] + child_rekey["nr"]:
        raise RuntimeError("CHILD rekey seed is not the CREATE_CHILD_SA nonces")

    auths = psk_auths(dumps)[:2]  # initiator's own AUTH, then its check of the responder's
    return {
        "name": case.ike,
        "ike_proposal": case.ike,
        "prf": {"sha256": "PRF_HMAC_SHA2_256", "sha384": "PRF_HMAC_SHA2_384"}[case.prf_hash],
        "dh_group": group,
        "spi_i": spi_i.hex(),
        "spi_r": spi_r.hex(),
        "ni": ni.hex(),
        "nr": nr.hex(),
        "ke_i": kei_data.hex(),
        "ke_r": ker_data.hex(),
        **{k: v.hex() for k, v in initial.items()},
        "psk": PSK,
        "psk_auth": [
            {"signer": signer, **{k: v.hex() for k, v in auth.items()}}
            for signer, auth in zip(("initiator", "responder"), auths, strict=True)
        ],
        "child": {
            "esp_proposal": case.esp,
            **{k: v.hex() for k, v in child_keys[0].items()},
        },
        "child_rekey": {
            "esp_proposal": case.esp,
            "ni": child_rekey["ni"].hex(),
            "nr": child_rekey["nr"].hex(),
            "sk_d": initial["sk_d"].hex(),
            **{k: v.hex() for k, v in child_keys[1].items()},
        },
        "ike_rekey": {
            "old_sk_d": initial["sk_d"].hex(),
            "spi_i": ike_rekey["spi_i"].hex(),
            "spi_r": ike_rekey["spi_r"].hex(),
            "ni": ike_rekey["ni"].hex(),
            "nr": ike_rekey["nr"].hex(),
            **{k: v.hex() for k, v in rekeyed.items()},
        },
        "exchanges": files,
    }


def write_exchanges(
    case: Case,
    messages: list[Any],
    sa_keys: dict[tuple[bytes, bytes], dict[str, bytes]],
    rekeyed: dict[str, bytes],
    out_dir: Path,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, bytes]]]:
    """Write every message (and its decrypted payloads); learn the rekeys on the way."""
    files: list[dict[str, Any]] = []
    rekeys: dict[str, dict[str, bytes]] = {}
    for n, msg in enumerate(messages):
        hdr = ike_plain.header(msg.payload)
        sender = "i" if msg.src in (INITIATOR_V4, "fd99::1") else "r"
        name = f"{case.ike}-{n:02d}-{sender}.bin"
        (out_dir / name).write_bytes(msg.payload)
        entry: dict[str, Any] = {
            "file": name,
            "case": case.ike,
            "seq": n,
            "sender": sender,
            "exchange": ike_plain.EXCHANGES.get(hdr.exchange, str(hdr.exchange)),
            "message_id": hdr.message_id,
            "response": hdr.is_response,
            "src": f"{msg.src}:{msg.sport}",
            "dst": f"{msg.dst}:{msg.dport}",
            "spi_i": hdr.spi_i.hex(),
            "spi_r": hdr.spi_r.hex(),
        }
        if hdr.next_payload == ike_plain.SK:
            keys = sa_keys[(hdr.spi_i, hdr.spi_r)]
            side = "i" if hdr.from_original_initiator else "r"
            first, inner = ike_plain.open_sk(msg.payload, sk_keys(case, keys, side))
            (out_dir / "decrypted" / name).write_bytes(inner)
            entry["decrypted"] = f"decrypted/{name}"
            entry["decrypted_first_payload"] = first
            chain = ike_plain.payloads(first, inner)
            entry["payloads"] = [kind for kind, _ in chain]
            if hdr.exchange == 36:
                learn_rekey(chain, hdr, rekeys)
                ike = rekeys.get("ike", {})
                if "spi_i" in ike and "spi_r" in ike:
                    # Later messages of the new IKE SA use the rekeyed keys.
                    sa_keys[(ike["spi_i"], ike["spi_r"])] = rekeyed
        files.append(entry)
    if set(rekeys) != {"ike", "child"}:
        raise RuntimeError(f"capture lacks a rekey: found {sorted(rekeys)}")
    return files, rekeys


def learn_rekey(
    chain: list[tuple[int, bytes]],
    hdr: ike_plain.Header,
    rekeys: dict[str, dict[str, bytes]],
) -> None:
    """Note the nonces (and new IKE SPIs) of a rekeying CREATE_CHILD_SA."""
    sa_body = ike_plain.find(chain, ike_plain.SA)
    nonce = ike_plain.find(chain, ike_plain.NONCE)
    if sa_body is None or nonce is None:
        return
    is_ike = sa_body[5] == 1  # proposal protocol id: IKE
    kind = "ike" if is_ike else "child"
    current = rekeys.setdefault(kind, {})
    side = "r" if hdr.is_response else "i"
    current[f"n{side}"] = nonce
    if is_ike:
        current[f"spi_{side}"] = ike_plain.first_proposal_spi(sa_body)


def main() -> int:
    out_dir = HERE / "exchanges"
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "decrypted").mkdir(parents=True)
    cases = []
    index: list[dict[str, Any]] = []
    version = ""
    for case in CASES:
        with tempfile.TemporaryDirectory(prefix="ikc-vectors-") as tmp:
            pcap, log_i, log_r = run_case(case, Path(tmp) / "lab")
            version_match = re.search(r"\(strongSwan ([\d.]+)", log_i)
            version = version_match.group(1) if version_match else "unknown"
            vector = build_case(case, pcap, log_i, log_r, out_dir)
        index += vector.pop("exchanges")
        cases.append(vector)
        print(f"{case.ike}: {sum(1 for e in index if e['case'] == case.ike)} messages")
    document = {
        "description": (
            "IKEv2 key derivation vectors from strongSwan talking to itself (PSK), "
            "recorded by tests/vectors/record_strongswan.py. Hex strings; sk_ai/sk_ar "
            "are empty for AEAD ciphers; sk_ei/sk_er and encr_* include the 4-byte "
            "salt for AES-GCM. child.seed is Ni | Nr; child keys are encr_i, integ_i, "
            "encr_r, integ_r in KEYMAT order (RFC 7296 2.17). ike_rekey keys follow "
            "RFC 7296 2.18 with old_sk_d."
        ),
        "strongswan_version": version,
        "cases": cases,
    }
    (HERE / "strongswan_kdf.json").write_text(json.dumps(document, indent=2) + "\n")
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
