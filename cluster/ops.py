"""The operations commands `ike-cluster sas`, `nodes`, `terminate`, `rekey` (the store).

`sas` lists every IKE SA the cluster has persisted, with its Child SAs, the way
`swanctl --list-sas` does for one host. It reads only the clear part of each snapshot
(`peek_snapshot`: no cluster key needed) and copies named fields out of it, so sealed key
material never reaches the output even if a record carried more than it should. The clear
part is unauthenticated here: it is shown, never trusted, and a record that does not
decode is listed as unreadable instead of stopping the listing.

Rows are plain JSON-ready dicts (bytes as hex); `format_*` renders them as text, with
anything a store could smuggle into a terminal (control characters) escaped.

`terminate` picks SAs from that listing and asks the responders, on their channel
(runtime/channel.py), to delete them; it reports each as terminated once its record has
left the store. `rekey` asks the same way for new keys and reports each SA once the
listing shows its successor.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from .config import load_config
from .control import Answer, ControlError, Handler, Request, request
from .errors import ConfigError
from .ike.constants import IdType, TsType
from .ike.identity import Identity
from .ike.ike_init import redirect_data
from .ike.session import IkeSession
from .ike.snapshot import SCHEMA_VERSION, snapshot_of
from .ike.traffic_selectors import TrafficSelector
from .key_exchange import DH_NAMES
from .runtime.actor import Session
from .runtime.channel import (
    CLI_ORIGIN,
    RESPONDERS_CHANNEL,
    encode_redirect,
    encode_rekey,
    encode_terminate,
    store_redirect,
)
from .runtime.node import Initiated, InitiateError, ResponderFactory, redirect_node
from .runtime.radius_dae import Disconnect
from .runtime.reload import ReloadResult
from .runtime.supervisor import Supervisor
from .store import StateStore, StoredSa, StoreError, open_store, peek_snapshot
from .transforms import Esn

Row = dict[str, Any]
# the listing of the SAs an operator's command watches, and its request for one of them
# (an IKE SA's row, a Child SA's inbound SPI or b"")
Listing = Callable[[], Awaitable[list[Row]]]
Ask = Callable[[Row, bytes], Awaitable[None]]
_T = TypeVar("_T")
logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1  # the store could not be read; terminate: not (all) terminated
EXIT_CONFIG = 2  # bad configuration, or no shared store named in it
# seconds a node's control socket gets to answer, beyond the `--timeout` it was given
ANSWER_WITHIN = 30.0

# the first strongSwan keyword of each group ("x25519", not "curve25519")
_DH_KEYWORDS: dict[int, str] = {}
for _keyword, _group in DH_NAMES.items():
    _DH_KEYWORDS.setdefault(int(_group), _keyword)


# --- IKE and Child SAs -------------------------------------------------------------------


async def list_sas(store: StateStore) -> list[Row]:
    """Every stored IKE SA as a row: readable ones by connection, owner and SPI, then the
    unreadable ones (with their store key and the reason) by key."""
    readable: list[Row] = []
    unreadable: list[Row] = []
    async for key, stored in store.scan_sas():
        row = sa_row(key, stored)
        (unreadable if "unreadable" in row else readable).append(row)
    readable.sort(key=lambda r: (r["connection"], r["owner"], r["spi_i"], r["spi_r"]))
    unreadable.sort(key=lambda r: r["key"])
    return readable + unreadable


def sa_row(key: bytes, stored: StoredSa) -> Row:
    """One stored SA as a row; {"key", "owner", "fence", "unreadable": reason} when its
    clear fields do not decode as a snapshot this version writes."""
    head: Row = {"key": key.hex(), "owner": stored.owner, "fence": stored.fence}
    try:
        record = peek_snapshot(stored.snapshot)
        if record.get("v") != SCHEMA_VERSION:
            return {**head, "unreadable": f"snapshot schema {record.get('v')!r}, this "
                                          f"version reads {SCHEMA_VERSION}"}
        return {**head, **_ike_fields(record)}
    except StoreError as exc:  # SealError: not a snapshot envelope
        return {**head, "unreadable": str(exc)}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        return {**head, "unreadable": f"unexpected snapshot contents ({type(exc).__name__})"}


def _ike_fields(record: Mapping[str, Any]) -> Row:
    """The displayable fields, copied by name: never "keys" or "children_keys"."""
    nat_local, nat_remote, _ = record["nat"]
    return {
        "connection": _text(record["connection"]),
        # only established SAs are persisted, and those whose Delete is in flight
        "state": "DELETING" if record.get("deleting") else "ESTABLISHED",
        "version": 2,
        "initiator": bool(record["initiator"]),
        "spi_i": _bytes(record["spi_i"]).hex(),
        "spi_r": _bytes(record["spi_r"]).hex(),
        "local": _endpoint(record["local"]),
        "remote": _endpoint(record["remote"]),
        "local_id": _identity(record["local_id"]),
        "remote_id": _identity(record["remote_id"]),
        "remote_eap_id": _text(record.get("eap_id", "")) or None,
        "ppk": bool(record.get("ppk", False)),  # RFC 8784: a PPK is mixed into its keys
        "remote_vips": [_text(lease[3]) for lease in record.get("leases", [])],
        "algorithms": _algorithms(record["chosen"]),
        "nat": {"local": bool(nat_local), "remote": bool(nat_remote)},
        "peer_next_id": int(record["peer_next_id"]),
        "our_next_id": int(record["our_next_id"]),
        "rekey_in": _seconds(record["rekey_in"]),
        "expire_in": _seconds(record["expire_in"]),
        "last_heard_ago": _seconds(record["last_heard_ago"]),
        "children": [_child_fields(c) for c in record["children"]],
    }


def _child_fields(child: Mapping[str, Any]) -> Row:
    return {
        "name": _text(child["name"]),
        "state": "INSTALLED",
        "mode": _text(child["mode"]),
        "protocol": "ESP",
        "spi_in": _bytes(child["spi_in"]).hex(),
        "spi_out": _bytes(child["spi_out"]).hex(),
        "algorithms": _algorithms(child["chosen"]),
        "local_ts": [_traffic_selector(t) for t in child["local_ts"]],
        "remote_ts": [_traffic_selector(t) for t in child["remote_ts"]],
        "rekey_in": _seconds(child["rekey_in"]),
        "expire_in": _seconds(child["expire_in"]),
    }


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("expected bytes")
    return value


def _seconds(value: Any) -> float | None:
    """Seconds relative to when the snapshot was written; None for never."""
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError("expected a number of seconds")
    return round(float(value), 3)


def _endpoint(value: Any) -> Row:
    host, port = value
    return {"address": _text(host), "port": int(port)}


def _identity(value: Any) -> Row | None:
    if value is None:
        return None
    id_type, data = int(value[0]), _bytes(value[1])
    try:
        kind = IdType(id_type)
    except ValueError:
        return {"type": str(id_type), "data": data.hex(), "text": f"type{id_type}:#{data.hex()}"}
    return {"type": kind.name, "data": data.hex(), "text": str(Identity(kind, data))}


def _algorithms(chosen: Any) -> Row:
    encr, integ, prf, dh, esn = chosen
    return {
        "encryption": _text(encr),
        "integrity": None if integ is None else _text(integ),
        "prf": None if prf is None else _text(prf),
        "dh": None if dh is None else _DH_KEYWORDS.get(int(dh), f"group{int(dh)}"),
        "esn": None if esn is None else Esn(int(esn)) is Esn.ESN,
    }


def _traffic_selector(value: Any) -> str:
    ts_type, protocol, start_port, end_port, start, end = value
    return str(TrafficSelector(TsType(int(ts_type)), int(protocol), int(start_port),
                               int(end_port), _bytes(start), _bytes(end)))


def format_sas(rows: Sequence[Row], empty: str = "no IKE SAs in the store") -> str:
    """`swanctl --list-sas`-like text; times are as of the snapshot's last write."""
    if not rows:
        return empty
    lines: list[str] = []
    for row in rows:
        if "unreadable" in row:
            lines.append(f"unreadable snapshot {row['key']}: {_safe(row['unreadable'])}"
                         f" (owner {_safe(row['owner'])}, fence {row['fence']})")
            continue
        ours_i, ours_r = ("*", "") if row["initiator"] else ("", "*")
        lines.append(f"{_safe(row['connection'])}: #{_safe(row['owner'])}, {row['state']}, "
                     f"IKEv{row['version']}, {row['spi_i']}_i{ours_i} {row['spi_r']}_r{ours_r}")
        for side in ("local", "remote"):
            nat = " (behind NAT)" if row["nat"][side] else ""
            lines.append(f"  {side:<6} {_identity_text(row[side + '_id'])} @ "
                         f"{_endpoint_text(row[side])}{nat}")
        if row["remote_eap_id"] is not None:
            lines.append(f"  remote EAP identity: '{_safe(row['remote_eap_id'])}'")
        if row["remote_vips"]:
            lines.append(f"  remote virtual IPs: {', '.join(map(_safe, row['remote_vips']))}")
        lines.append(f"  {_algorithms_text(row['algorithms'])}"
                     + (", post-quantum preshared key" if row.get("ppk") else ""))
        lines.append(f"  message IDs: next request from the peer {row['peer_next_id']}, "
                     f"next request of ours {row['our_next_id']}")
        lines.append(f"  at the last snapshot: {_lifetimes_text(row)}, "
                     f"peer last heard {_duration(row['last_heard_ago'])} before")
        lines.append(f"  owner {_safe(row['owner'])}, fence {row['fence']}")
        for child in row["children"]:
            lines.append(f"  {_safe(child['name'])}: {child['state']}, "
                         f"{_safe(child['mode']).upper()}, {child['protocol']} SPIs: "
                         f"{child['spi_in']}_i {child['spi_out']}_o")
            lines.append(f"    {_algorithms_text(child['algorithms'])}, {_lifetimes_text(child)}")
            lines.append(f"    {', '.join(child['local_ts'])} === {', '.join(child['remote_ts'])}")
    return "\n".join(lines)


def _identity_text(identity: Row | None) -> str:
    return "(none)" if identity is None else "'" + _safe(identity["text"]) + "'"


def _endpoint_text(endpoint: Row) -> str:
    host = _safe(endpoint["address"])
    return f"{host}[{endpoint['port']}]"


def _algorithms_text(algorithms: Row) -> str:
    names = [algorithms[k] for k in ("encryption", "integrity", "prf", "dh") if algorithms[k]]
    if algorithms["esn"]:
        names.append("esn")
    return "/".join(_safe(n) for n in names)


def _lifetimes_text(row: Row) -> str:
    rekey, expire = row["rekey_in"], row["expire_in"]
    return (f"rekeying in {_duration(rekey) if rekey is not None else 'never'}, "
            f"expires in {_duration(expire) if expire is not None else 'never'}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 0:
        return "-" + _duration(-seconds)
    whole = int(seconds)
    if whole < 120:
        return f"{seconds:.0f}s" if whole >= 10 else f"{seconds:.1f}s"
    hours, rest = divmod(whole, 3600)
    return f"{hours}h {rest // 60}m" if hours else f"{rest // 60}m {rest % 60}s"


def _safe(value: Any) -> str:
    """Text from the store, with control characters escaped (no terminal escapes, no lines
    that look like another SA)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# --- members -----------------------------------------------------------------------------


async def list_nodes(store: StateStore) -> list[Row]:
    """Live members by node id: role, last heartbeat (store clock), its age, and info."""
    return [{"node": m.node, "role": m.role, "last_seen": round(m.last_seen, 3),
             "age": round(m.age, 3), "info": _json_safe(m.info)} for m in await store.members()]


def format_nodes(rows: Sequence[Row]) -> str:
    if not rows:
        return "no live members"
    table = [("NODE", "ROLE", "LAST HEARTBEAT", "INFO")]
    for row in rows:
        info = ", ".join(f"{_safe(k)}={_safe(_info_text(v))}" for k, v in row["info"].items())
        table.append((_safe(row["node"]), _safe(row["role"]), f"{row['age']:.1f}s ago", info))
    widths = [*(max(len(r[i]) for r in table) for i in range(3)), 0]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True))
                     .rstrip() for r in table)


def _info_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _json_safe(value: Any) -> Any:
    """msgpack values as JSON: bytes as hex, map keys as strings."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# --- the commands ------------------------------------------------------------------------


def sas_command(config_path: str, as_json: bool = False) -> int:
    """`ike-cluster sas --config PATH [--json]`; returns the exit status."""
    return _command(config_path, as_json, list_sas, format_sas)


def nodes_command(config_path: str, as_json: bool = False) -> int:
    """`ike-cluster nodes --config PATH [--json]`; returns the exit status."""
    return _command(config_path, as_json, list_nodes, format_nodes)


def terminate_command(config_path: str, *, ike: str | None = None,
                      identity: str | None = None, child: str | None = None,
                      timeout: float = 10.0) -> int:
    """`ike-cluster terminate --config PATH (--ike SPI | --id ID) [--child NAME]
    [--timeout S]`: through the store in a cluster, through the node's control socket
    otherwise."""
    picked = _pick(config_path, ike, identity)
    if isinstance(picked, int):
        return picked
    chosen, target = picked
    if child is not None:
        return _terminate_children(target, chosen, ike, identity, child, timeout)
    if isinstance(target, str):  # a single node
        answer = _ask(target, "terminate", ike=ike, id=identity, timeout=timeout)
        if answer is None:
            return EXIT_FAILURE
        gone, left = answer["terminated"], answer["left"]
    else:
        store = target
        outcome = _on_store(store, lambda: terminate(store, chosen, timeout))
        if isinstance(outcome, int):
            return outcome
        gone, left = outcome
    return _report([f"terminated {_sa_text(row)}" for row in gone],
                   [_sa_text(row) for row in left], "no IKE SA matches",
                   f"still there after {timeout:g} s")


def _report(done: Sequence[str], left: Sequence[str], nothing: str, late: str) -> int:
    """Print what an operator's command did, and on stderr what it did not (`late`
    before each) or `nothing` when it found nothing to act on; the exit status."""
    if not done and not left:
        print(nothing, file=sys.stderr)
        return EXIT_FAILURE
    for line in done:
        print(line)
    for line in left:
        print(f"{late}: {line}", file=sys.stderr)
    return EXIT_FAILURE if left else EXIT_OK


def _terminate_children(target: StateStore | str, chosen: Callable[[Row], bool],
                        ike: str | None, identity: str | None, child: str,
                        timeout: float) -> int:
    """`terminate --child NAME`: the chosen IKE SAs' Child SAs of that child go (with a
    Delete to the peer), the IKE SAs stay, as with `swanctl --terminate --child`."""
    outcome = _on_sas(
        target, "terminate", "terminated", {"ike": ike, "id": identity, "child": child,
                                            "timeout": timeout},
        lambda row, spi_in: encode_terminate(CLI_ORIGIN, bytes.fromhex(row["spi_i"]),
                                             bytes.fromhex(row["spi_r"]), child=spi_in),
        lambda rows, ask: terminate_children(rows, ask, chosen, child, timeout))
    if isinstance(outcome, int):
        return outcome
    gone, left = outcome
    return _report([f"terminated {line}" for line in gone], left,
                   f"no CHILD SA {_safe(child)} in the IKE SAs that match",
                   f"still there after {timeout:g} s")


def _on_sas(target: StateStore | str, command: str, done_key: str, fields: dict[str, Any],
            encode: Callable[[Row, bytes], bytes],
            watch: Callable[[Listing, Ask], Awaitable[tuple[list[str], list[str]]]]
            ) -> tuple[list[str], list[str]] | int:
    """An operator's command on SAs (`rekey`, `terminate --child`): a single node does it
    as its control socket's `command` and answers what was done (under `done_key`) and
    what was left; in a cluster the channel asks the owners (`encode`: the message for an
    IKE SA's row and a Child SA's inbound SPI, b"" for none) while `watch` follows the
    store's listing. Or the exit status after saying why neither answered."""
    if isinstance(target, str):  # a single node
        answer = _ask(target, command, **fields)
        if answer is None:
            return EXIT_FAILURE
        if "error" in answer:
            print(f"node {target}: {answer['error']}", file=sys.stderr)
            return EXIT_FAILURE
        return answer[done_key], answer["left"]
    store = target

    async def ask(row: Row, spi_in: bytes) -> None:
        await store.publish(RESPONDERS_CHANNEL, encode(row, spi_in))

    return _on_store(store, lambda: watch(lambda: list_sas(store), ask))


async def terminate_children(rows: Listing, ask: Ask, chosen: Callable[[Row], bool],
                             child: str, timeout: float,
                             poll: float = 0.2) -> tuple[list[str], list[str]]:
    """Ask for the Child SAs of `child` in the IKE SAs `chosen` picks to be deleted
    (`ask(row, spi_in)`) and watch `rows` until none of them is listed: (those gone,
    those still there after `timeout` seconds)."""
    asked = [(row, c) for row in await rows() if chosen(row)
             for c in row["children"] if c["name"] == child]
    for row, installed in asked:
        await ask(row, bytes.fromhex(installed["spi_in"]))
    left = list(range(len(asked)))
    with trio.move_on_after(timeout):
        while left:
            listed = {c["spi_in"] for row in await rows() for c in row["children"]}
            left = [n for n in left if asked[n][1]["spi_in"] in listed]
            if left:
                await trio.sleep(poll)
    return ([_child_text(*asked[n]) for n in range(len(asked)) if n not in left],
            [_child_text(*asked[n]) for n in left])


def _on_store(store: StateStore, work: Callable[[], Awaitable[_T]]) -> _T | int:
    """`work`'s result, the store closed after it; or the exit status after saying the
    store failed."""
    async def run() -> _T:
        try:
            return await work()
        finally:
            await store.aclose()

    try:
        return trio.run(run)
    except StoreError as exc:
        print(f"the cluster store failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _pick(config_path: str, ike: str | None, identity: str | None
          ) -> tuple[Callable[[Row], bool], StateStore | str] | int:
    """What `terminate` and `rekey` act on: the chooser of the SAs `--ike`/`--id` name, and
    the store or single node's id `_open` gives; or the exit status after saying why not."""
    if ike is not None and _spis(ike) is None:
        print(f"--ike {_safe(ike)}: not an IKE SPI (16 hex digits), nor both (SPI_I/SPI_R)",
              file=sys.stderr)
        return EXIT_CONFIG
    chosen = _chooser(ike, identity)
    assert chosen is not None  # argparse asks for one of the two
    target = _open(config_path)
    if isinstance(target, int):
        return target
    return chosen, target


def rekey_command(config_path: str, *, ike: str | None = None, identity: str | None = None,
                  child: str | None = None, timeout: float = 10.0) -> int:
    """`ike-cluster rekey --config PATH (--ike SPI | --id ID) [--child NAME] [--timeout S]`
    (swanctl's `--rekey`): the IKE SAs chosen, or their Child SAs named `child`, get new
    keys and SPIs; through the store in a cluster, the node's control socket otherwise."""
    picked = _pick(config_path, ike, identity)
    if isinstance(picked, int):
        return picked
    chosen, target = picked
    outcome = _on_sas(
        target, "rekey", "rekeyed", {"ike": ike, "id": identity, "child": child,
                                     "timeout": timeout},
        lambda row, spi_in: encode_rekey(CLI_ORIGIN, bytes.fromhex(row["spi_i"]),
                                         bytes.fromhex(row["spi_r"]), spi_in),
        lambda rows, ask: rekey(rows, ask, chosen, child, timeout))
    if isinstance(outcome, int):
        return outcome
    done, left = outcome
    return _report(done, left, "no IKE SA matches" if child is None else
                   f"no CHILD SA {_safe(child)} in the IKE SAs that match",
                   f"not rekeyed after {timeout:g} s")


def initiate_command(config_path: str, child: str, timeout: float = 10.0) -> int:
    """`ike-cluster initiate --config PATH --child NAME [--timeout S]` (swanctl's
    `--initiate --child`): the single node brings the child up with its connection's
    peer, on the IKE SA it has with that peer or a new one."""
    target = _open(config_path)
    if isinstance(target, int):
        return target
    if not isinstance(target, str):
        print(f"{config_path}: [cluster] store: a cluster's responders only respond; "
              "initiate from a single node (`ike-cluster run`)", file=sys.stderr)
        return EXIT_CONFIG
    answer = _ask(target, "initiate", child=child, timeout=timeout)
    if answer is None:
        return EXIT_FAILURE
    if "error" in answer or "failed" in answer:
        print(f"initiate failed: {answer.get('error') or answer['failed']}", file=sys.stderr)
        return EXIT_FAILURE
    up = answer["initiated"]
    print(f"{'already up' if up['already'] else 'initiated'}: CHILD SA {_safe(up['child'])} "
          f"{up['spi_in']} (in) {up['spi_out']} (out) in IKE SA {_safe(up['connection'])} "
          f"{up['spi_i']}_i/{up['spi_r']}_r with {_safe(str(up['peer'][0]))}")
    return EXIT_OK


async def rekey(rows: Listing, ask: Ask, chosen: Callable[[Row], bool],
                child: str | None, timeout: float, poll: float = 0.2
                ) -> tuple[list[str], list[str]]:
    """Ask for the rekeys (`ask(row, b"")` for an IKE SA, `ask(row, spi_in)` for a Child
    SA) and watch the listing `rows` gives until each is done: (what was rekeyed, with
    its new SPIs; what was not within `timeout` seconds)."""
    listed = await rows()
    known = {row["key"] for row in listed}  # (a successor may be listed by the next look)
    before = [row for row in listed if chosen(row)]
    asked: list[tuple[Row, Row | None]] = []
    for row in before:
        if child is None:
            asked.append((row, None))
        else:
            asked += [(row, c) for c in row["children"] if c["name"] == child]
    for row, old in asked:
        await ask(row, b"" if old is None else bytes.fromhex(old["spi_in"]))
    done: dict[int, str] = {}
    with trio.move_on_after(timeout):
        while len(done) < len(asked):
            now = await rows()
            for n, (row, old) in enumerate(asked):
                if n not in done and (text := _rekeyed(row, old, now, known)) is not None:
                    done[n] = text
            if len(done) < len(asked):
                await trio.sleep(poll)
    left = [_sa_text(row) if old is None else _child_text(row, old)
            for n, (row, old) in enumerate(asked) if n not in done]
    return [done[n] for n in sorted(done)], left


def _rekeyed(row: Row, old: Row | None, now: Sequence[Row], known: set[str]) -> str | None:
    """What to say once the IKE SA of `row` (or its Child SA `old`) has new SPIs; None
    while it has not."""
    if old is None:
        if any(r["key"] == row["key"] for r in now):
            return None
        # its successor: a new record holding its Child SAs (or, childless, of the same
        # connection and peer)
        ours = {c["spi_in"] for c in row["children"]}
        new = [r for r in now if r["key"] not in known
               and (ours & {c["spi_in"] for c in r["children"]} if ours else
                    (r["connection"], r["remote_id"]) == (row["connection"], row["remote_id"]))]
        if not new:
            return None
        return f"rekeyed {_sa_text(row)}: now {new[0]['spi_i']}_i/{new[0]['spi_r']}_r"
    holders = [r for r in now if any(c["spi_in"] == old["spi_in"] for c in r["children"])]
    if holders:
        return None
    ours = {c["spi_in"] for c in row["children"]}
    new = [c for r in now if r["key"] == row["key"] for c in r["children"]
           if c["name"] == old["name"] and c["spi_in"] not in ours]
    if not new:
        return None
    return f"rekeyed {_child_text(row, old)}: now {new[0]['spi_in']} (in)"


def _child_text(row: Row, child: Row) -> str:
    return (f"CHILD SA {_safe(child['name'])} {child['spi_in']} (in) of IKE SA "
            f"{row['spi_i']}_i/{row['spi_r']}_r")


def reload_command(config_path: str) -> int:
    """`ike-cluster reload --config PATH`: the node with that file's id reloads it."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:  # checked here first: the node would refuse it too
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    answer = _ask(config.node_id, "reload")
    if answer is None:
        return EXIT_FAILURE
    if not answer["reloaded"]:
        print(f"not reloaded: {answer['error']}", file=sys.stderr)
        return EXIT_CONFIG
    print(answer["summary"])
    for name in answer["restart"]:
        print(f"{name} changed: takes effect after a restart")
    return EXIT_OK


def redirect_command(config_path: str, gateway: str, existing: bool) -> int:
    """`ike-cluster redirect --config PATH (--to GATEWAY [--existing] | --stop)`."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    if gateway:
        try:
            redirect_data(gateway)
        except ValueError as exc:
            print(f"--to: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    store = _open(config_path)
    if isinstance(store, int):
        return store
    if not isinstance(store, str):  # a cluster: every responder, through their channel
        return _redirect_cluster(store, gateway, existing)
    answer = _ask(config.node_id, "redirect", to=gateway, existing=existing)
    if answer is None:
        return EXIT_FAILURE
    if "error" in answer:
        print(f"not redirecting: {answer['error']}", file=sys.stderr)
        return EXIT_CONFIG
    if not gateway:
        print("new IKE SAs are answered again")
        return EXIT_OK
    print(f"new IKE SAs go to {_safe(gateway)}")
    for row in answer["asked"]:
        print(f"asked to move: IKE SA {row['spi_i']}_i/{row['spi_r']}_r")
    for row in answer["unsupported"]:
        print(f"cannot be moved (no REDIRECT_SUPPORTED): IKE SA {row['spi_i']}_i/"
              f"{row['spi_r']}_r")
    return EXIT_OK


def _redirect_cluster(store: StateStore, gateway: str, existing: bool) -> int:
    async def publish() -> None:
        try:
            await store_redirect(store, gateway)  # (responders that start later)
            await store.publish(RESPONDERS_CHANNEL,
                                encode_redirect(CLI_ORIGIN, gateway, existing))
        finally:
            await store.aclose()

    try:
        trio.run(publish)
    except StoreError as exc:
        print(f"the cluster store failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if gateway:
        print(f"asked every responder: new IKE SAs go to {_safe(gateway)}"
              + ("; established ones are asked to move" if existing else ""))
    else:
        print("asked every responder: new IKE SAs are answered again")
    return EXIT_OK


def _ask(node_id: str, command: str, **fields: Any) -> Answer | None:
    """The node's answer, or None after saying why there is none. A `timeout` field is
    how long the node may work on it; the answer is waited for a little longer."""
    answer_within = ANSWER_WITHIN + float(fields.get("timeout", 0.0))
    try:
        return request(node_id, command, answer_within=answer_within, **fields)
    except ControlError as exc:
        print(f"node {node_id}: {exc}", file=sys.stderr)
        return None


async def terminate(store: StateStore, chosen: Callable[[Row], bool], timeout: float,
                    poll: float = 0.2) -> tuple[list[Row], list[Row]]:
    """Ask the responders to delete the stored SAs `chosen` picks; (those whose records
    left the store within `timeout` seconds, those still there)."""
    rows = [row for row in await list_sas(store) if chosen(row)]
    await _ask_to_terminate(store, rows, CLI_ORIGIN)
    left = rows
    with trio.move_on_after(timeout):
        while left:
            stored = {row["key"] for row in await list_sas(store)}
            left = [row for row in left if row["key"] in stored]
            if left:
                await trio.sleep(poll)
    return [row for row in rows if row not in left], left


async def _ask_to_terminate(store: StateStore, rows: Sequence[Row], origin: str,
                            limit: int | None = None) -> None:
    """The responders' channel asks whichever responder holds each SA to delete it (or,
    with `limit`, to end its service that many seconds from now)."""
    for row in rows:
        message = encode_terminate(origin, bytes.fromhex(row["spi_i"]),
                                   bytes.fromhex(row["spi_r"]), limit)
        await store.publish(RESPONDERS_CHANNEL, message)


# --- RADIUS Disconnect-Requests (runtime/radius_dae.py) ---------------------------------


def _disconnect_chooser(user: bytes | None, session_id: bytes | None
                        ) -> Callable[[Row], bool]:
    """The SAs a Disconnect-Request names: its User-Name (as `terminate --id` matches:
    the remote identity or EAP user) and its Acct-Session-Id (our accounting's: both
    SPIs in hex), each where given."""
    by_user = _chooser(None, user.decode(errors="replace")) if user is not None else None

    def chosen(row: Row) -> bool:
        if "unreadable" in row or (by_user is not None and not by_user(row)):
            return False
        return session_id is None or \
            session_id.decode(errors="replace") == row["spi_i"] + row["spi_r"]
    return chosen


def local_disconnect(node_id: str, supervisor: Supervisor) -> Disconnect:
    """A single node's SAs: deleted with a Delete to the peer (or given a new
    Session-Timeout)."""
    async def disconnect(user: bytes | None, session_id: bytes | None, limit: int | None
                         ) -> int:
        chosen = _disconnect_chooser(user, session_id)
        rows = session_rows(supervisor.established_sessions(), node_id, trio.current_time())
        found = 0
        for row in rows:
            if chosen(row):
                spi_i, spi_r = bytes.fromhex(row["spi_i"]), bytes.fromhex(row["spi_r"])
                found += supervisor.delete_ike(spi_i, spi_r) if limit is None else \
                    supervisor.limit_session(spi_i, spi_r, limit)
        return found
    return disconnect


def cluster_disconnect(store: StateStore, node_id: str) -> Disconnect:
    """A cluster's SAs: the store's records say which exist, the responders' channel asks
    whichever responder holds each to delete it (as `ike-cluster terminate` does) or to
    give it a new Session-Timeout."""
    async def disconnect(user: bytes | None, session_id: bytes | None, limit: int | None
                         ) -> int:
        chosen = _disconnect_chooser(user, session_id)
        try:
            rows = [row for row in await list_sas(store) if chosen(row)]
            await _ask_to_terminate(store, rows, node_id, limit)
        except StoreError as exc:
            logger.warning("RADIUS Dynamic Authorization: the store failed: %s", exc)
            return 0
        return len(rows)
    return disconnect


# --- a running node, through its control socket (control.py) ---------------------------


def session_rows(sessions: Sequence[Session], owner: str, now: float) -> list[Row]:
    """The rows `sas` shows for SAs a node holds in memory (a single node)."""
    rows = []
    for session in sessions:
        if not isinstance(session, IkeSession):
            continue
        try:
            record = snapshot_of(session, now)
        except ValueError:  # being deleted or rekeyed away right now
            continue
        key = record["spi_i"] + record["spi_r"]
        rows.append({"key": key.hex(), "owner": owner, "fence": 0, **_ike_fields(record)})
    rows.sort(key=lambda r: (r["connection"], r["spi_i"], r["spi_r"]))
    return rows


def control_handlers(node_id: str, supervisor: Supervisor,
                     reload: Callable[[], ReloadResult] | None,
                     factory: ResponderFactory | None = None,
                     initiate: Callable[[str, float], Awaitable[Initiated]] | None = None,
                     ) -> dict[str, Handler]:
    """What a node's control socket answers: "sas", "terminate" and, given `reload`,
    "reload", given the supervisor's `factory`, "redirect", given `initiate`
    (`Node.initiate`), "initiate"."""

    def rows() -> list[Row]:
        return session_rows(supervisor.established_sessions(), node_id, trio.current_time())

    async def listing() -> list[Row]:
        return rows()

    async def sas(request: Request) -> Answer:
        return {"sas": rows()}

    async def terminate(request: Request) -> Answer:
        chosen = _chooser(request.get("ike"), request.get("id"))
        child = request.get("child")
        if chosen is None or not isinstance(child, str | None):
            return {"error": "name an IKE SA by SPI or identity (and a child by name)"}
        if child is not None:
            async def ask(row: Row, spi_in: bytes) -> None:
                supervisor.delete_child_of(bytes.fromhex(row["spi_i"]),
                                           bytes.fromhex(row["spi_r"]), spi_in)

            done, still = await terminate_children(listing, ask, chosen, child, float(
                request.get("timeout", 10.0)), poll=0.05)
            return {"terminated": done, "left": still}
        picked = [row for row in rows() if chosen(row)]
        for row in picked:
            supervisor.delete_ike(bytes.fromhex(row["spi_i"]), bytes.fromhex(row["spi_r"]))

        def held(row: Row) -> bool:
            return supervisor.holder_of(bytes.fromhex(row["spi_i"]),
                                        bytes.fromhex(row["spi_r"])) is not None

        left = picked
        with trio.move_on_after(float(request.get("timeout", 10.0))):
            while left := [row for row in left if held(row)]:
                await trio.sleep(0.05)
        return {"terminated": [r for r in picked if r not in left], "left": left}

    async def rekey_here(request: Request) -> Answer:
        chosen = _chooser(request.get("ike"), request.get("id"))
        child = request.get("child")
        if chosen is None or not isinstance(child, str | None):
            return {"error": "name an IKE SA by SPI or identity (and a child by name)"}

        async def ask(row: Row, spi_in: bytes) -> None:
            supervisor.rekey(bytes.fromhex(row["spi_i"]), bytes.fromhex(row["spi_r"]), spi_in)

        done, left = await rekey(listing, ask, chosen, child,
                                 float(request.get("timeout", 10.0)), poll=0.05)
        return {"rekeyed": done, "left": left}

    async def redirect(request: Request) -> Answer:
        gateway = request.get("to")
        if not isinstance(gateway, str):
            return {"error": "name the gateway to redirect to"}
        assert factory is not None
        try:
            moved, unable = redirect_node(supervisor, factory, gateway,
                                          bool(request.get("existing")))
        except ValueError as exc:
            return {"error": str(exc)}
        return {"redirecting": gateway, "asked": moved, "unsupported": unable}

    async def initiate_here(request: Request) -> Answer:
        child = request.get("child")
        if not isinstance(child, str):
            return {"error": "name the child to initiate"}
        assert initiate is not None
        try:
            up = await initiate(child, float(request.get("timeout", 10.0)))
        except InitiateError as exc:
            return {"failed": str(exc)}
        return {"initiated": {
            "connection": up.connection, "peer": list(up.peer), "spi_i": up.spi_i.hex(),
            "spi_r": up.spi_r.hex(), "child": up.child, "spi_in": up.spi_in.hex(),
            "spi_out": up.spi_out.hex(), "already": up.already}}

    handlers: dict[str, Handler] = {"sas": sas, "terminate": terminate, "rekey": rekey_here}
    if initiate is not None:
        handlers["initiate"] = initiate_here
    if reload is not None:
        handlers["reload"] = reload_handler(reload)
    if factory is not None:
        handlers["redirect"] = redirect
    return handlers


def reload_handler(reload: Callable[[], ReloadResult]) -> Handler:
    """The control socket's "reload" (a cluster responder has only this one)."""
    async def reloaded(request: Request) -> Answer:
        result = reload()
        return {"reloaded": bool(result), "error": result.error,
                "restart": list(result.restart), "summary": result.summary}

    return reloaded


def _chooser(ike: Any, identity: Any) -> Callable[[Row], bool] | None:
    """Which rows `terminate` means: `ike` one or two SPIs (text), or `identity` a remote
    identity or EAP user; None when neither is usable."""
    spis = _spis(ike) if isinstance(ike, str) else None
    if spis is None and not isinstance(identity, str):
        return None

    def chosen(row: Row) -> bool:
        if "unreadable" in row:
            return False
        if spis is not None:
            return all(spi in (row["spi_i"], row["spi_r"]) for spi in spis) and \
                (len(spis) == 1 or spis == (row["spi_i"], row["spi_r"]))
        remote = row["remote_id"]
        return identity in ((remote or {}).get("text"), row["remote_eap_id"])

    return chosen


def _spis(text: str) -> tuple[str, ...] | None:
    """One SPI or both, as `ike-cluster sas` and the log print them (`..._i/..._r`)."""
    parts = [p.strip().lower().removesuffix("_i").removesuffix("_r")
             for p in text.replace("/", " ").split()]
    if len(parts) == 1 and len(parts[0]) == 32:
        parts = [parts[0][:16], parts[0][16:]]
    if not 1 <= len(parts) <= 2 or any(len(p) != 16 for p in parts):
        return None
    try:
        for part in parts:
            bytes.fromhex(part)
    except ValueError:
        return None
    return tuple(parts)


def _sa_text(row: Row) -> str:
    return (f"IKE SA {_safe(row['connection'])} {row['spi_i']}_i/{row['spi_r']}_r, remote "
            f"{_identity_text(row['remote_id'])}, owner {_safe(row['owner'])}")


def _open(config_path: str) -> StateStore | str | int:
    """The store `[cluster] store` names; without one the node id (a single node, asked
    through its control socket); or the exit status after saying why neither."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    url = config.cluster.store if config.cluster is not None else None
    if not url or url.partition("://")[0].lower() == "memory":
        return config.node_id
    try:
        return open_store(url)
    except (ConfigError, ValueError) as exc:
        print(f"{config_path}: cluster.store: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _command(config_path: str, as_json: bool,
             read: Callable[[StateStore], Awaitable[list[Row]]],
             render: Callable[[Sequence[Row]], str]) -> int:
    store = _open(config_path)
    if isinstance(store, int):
        return store
    if isinstance(store, str):  # a single node: its SAs, through its control socket
        if read is not list_sas:
            print(f"{config_path}: no [cluster] store: a single node has no members to list",
                  file=sys.stderr)
            return EXIT_CONFIG
        answer = _ask(store, "sas")
        if answer is None:
            return EXIT_FAILURE
        rows: list[Row] = answer["sas"]
        print(json.dumps(rows, indent=2) if as_json
              else format_sas(rows, f"no IKE SAs on node {store}"))
        return EXIT_OK

    async def read_and_close() -> list[Row]:
        try:
            return await read(store)
        finally:
            await store.aclose()

    try:
        rows = trio.run(read_and_close)
    except StoreError as exc:  # the URL is not repeated: it may hold a password
        print(f"reading the cluster store failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(rows, indent=2) if as_json else render(rows))
    return EXIT_OK
