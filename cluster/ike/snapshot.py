"""An established IKE SA as a plain record, so another node can continue it.

`snapshot_of(session, now)` gives a msgpack-able dict (bytes, ints, strings, lists) with a
schema version; `SECRET_FIELDS` names the entries a store must seal (DESIGN.md: a Redis
dump reveals no key). `restore(record, policy, now)` builds a session that answers the
next request with the right message ID, replays the cached response byte for byte for a
retransmission (RFC 7296 2.1), and keeps its Child SAs, lifetimes and liveness timers.
Times are kept relative to `now`, since each node's clock is its own.
"""

from __future__ import annotations

from typing import Any

from ..errors import ParseError
from ..key_exchange import DhGroup, KeyExchange, new_key_exchange
from ..transforms import (
    ENCR_ALGORITHMS,
    INTEG_ALGORITHMS,
    PRF_ALGORITHMS,
    SHA256_96,
    Esn,
    IntegAlgorithm,
)
from .constants import IdType, TsType
from .create_child import CreateChild, RekeyChild, RekeyIke
from .events import ChildSaEstablished
from .identity import Identity
from .keymat import ChildKeys, IkeKeys
from .lifetimes import INFINITY
from .message import SkProtection
from .policy import ConnectionConfig, ResponderPolicy
from .pools import Lease
from .proposals import ChosenAlgorithms
from .sa import ChildSa, IkeSa, Outstanding
from .session import (
    AuthLifetime,
    DeleteChild,
    DeleteIke,
    IkeSession,
    Liveness,
    Redirect,
    Task,
    WallClock,
    _utc_now,
)
from .state import State, Trigger
from .traffic_selectors import TrafficSelector

SCHEMA_VERSION = 1
# Entries holding key material; a store seals these. (`request`: a rekey in flight
# holds our key exchange's private value.)
SECRET_FIELDS = frozenset({"keys", "children_keys", "request"})
CHILD_SCHEMA_VERSION = 1

Record = dict[str, Any]


def _chosen(c: ChosenAlgorithms) -> list[Any]:
    return [c.encr.name, c.integ.name if c.integ else None, c.prf.name if c.prf else None,
            int(c.dh) if c.dh is not None else None, int(c.esn) if c.esn is not None else None]


def _chosen_from(v: list[Any]) -> ChosenAlgorithms:
    encr, integ, prf, dh, esn = v
    return ChosenAlgorithms(ENCR_ALGORITHMS[encr], INTEG_ALGORITHMS[integ] if integ else None,
                            PRF_ALGORITHMS[prf] if prf else None,
                            DhGroup(dh) if dh is not None else None,
                            Esn(esn) if esn is not None else None)


def _ts(t: TrafficSelector) -> list[Any]:
    return [int(t.ts_type), t.protocol, t.start_port, t.end_port, t.start_addr, t.end_addr]


def _ts_from(v: list[Any]) -> TrafficSelector:
    return TrafficSelector(TsType(v[0]), v[1], v[2], v[3], v[4], v[5])


def _rel(t: float, now: float) -> float | None:
    return None if t == INFINITY else t - now


def _abs(t: float | None, now: float) -> float:
    return INFINITY if t is None else t + now


def _ident(i: Identity | None) -> list[Any] | None:
    return None if i is None else [int(i.id_type), i.data]


def snapshot_of(session: IkeSession, now: float) -> Record:
    """The current IKE SA of `session`; only established SAs are worth persisting (and
    those whose Delete is in flight, so that a new owner sends it again)."""
    sa = session.sa
    if sa.state not in (State.ESTABLISHED, State.DELETING):
        raise ValueError(f"only an established IKE SA has a snapshot, not {sa.state.name}")
    assert sa.keys is not None and sa.chosen is not None and sa.connection is not None
    k = sa.keys
    children = []
    child_keys = []
    for c in sa.children.values():
        children.append({
            "name": c.name, "mode": c.mode, "spi_in": c.spi_in, "spi_out": c.spi_out,
            "chosen": _chosen(c.chosen), "local_ts": [_ts(t) for t in c.local_ts],
            "remote_ts": [_ts(t) for t in c.remote_ts],
            "rekey_in": _rekey_in(c.rekeying, c.rekey_at, now),
            "expire_in": _rel(c.expire_at, now), "we_initiated": c.we_initiated,
        })
        child_keys.append([c.keys.encr_i, c.keys.integ_i, c.keys.encr_r, c.keys.integ_r])
    return {
        "v": SCHEMA_VERSION,
        "initiator": sa.is_initiator,
        "client": sa.original_initiator,
        "spi_i": sa.spi_i,
        "spi_r": sa.spi_r,
        "local": list(sa.local),
        "remote": list(sa.remote),
        "connection": sa.connection.name,
        "chosen": _chosen(sa.chosen),
        "nat": [sa.nat_local, sa.nat_remote, sa.behind_nat],
        "fragmentation": sa.fragmentation,
        "mid_sync": sa.mid_sync,
        "deleting": sa.state is State.DELETING,  # (what `sas` shows; `request` resumes it)
        "mobike": sa.mobike,
        "ppk": sa.ppk,
        "redirect": sa.redirect_supported,
        "eap_id": sa.eap_identity,
        # for RADIUS accounting wherever the SA goes on
        "auth_at": sa.authenticated_at,
        "radius": [list(sa.radius_classes), sa.radius_interim],
        # virtual IPs (shared pools): pool, offset, holder, and the address (for `sas`;
        # a RADIUS server's address is only that)
        "leases": [[lease.pool.name, lease.pool.offset_of(lease.address), lease.holder,
                    str(lease.address)] for lease in sa.leases],
        # a request of ours may not have reached the peer: our next ID may be ahead of its
        "in_flight": sa.pending is not None or sa.ids_unsure,
        "request": _request(sa),
        # Child SAs past their hard lifetime (gone above) whose Delete waits its turn
        "expired": [t.spi_in for t in sa.queue if isinstance(t, DeleteChild) and t.expired],
        "peer_hashes": sorted(sa.peer_hashes),
        "local_id": _ident(sa.local_id),
        "remote_id": _ident(sa.remote_id),
        "peer_next_id": sa.peer_next_id,
        "our_next_id": sa.our_next_id,
        "last_response": list(sa.last_response or []),
        "last_request_digest": sa.last_request_digest,
        "last_heard_ago": now - sa.last_heard,
        "rekey_in": _rekey_in(sa.rekeying, sa.rekey_at, now),
        "expire_in": _rel(sa.expire_at, now),
        "reauth_in": _rel(sa.reauth_at, now),
        "reauth_due_in": _rel(sa.reauth_due, now),
        "children": children,
        "keys": [k.sk_d, k.sk_ai, k.sk_ar, k.sk_ei, k.sk_er, k.sk_pi, k.sk_pr],
        "children_keys": child_keys,
    }


def restore(record: Record, policy: ResponderPolicy, now: float, *,
            wall_clock: WallClock = _utc_now, **kwargs: Any) -> IkeSession:
    """A session continuing the IKE SA of `record`; ParseError if it does not fit."""
    try:
        return _restore(record, policy, now, wall_clock, kwargs)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ParseError(f"unusable IKE SA snapshot: {exc!r}") from None


def _restore(record: Record, policy: ResponderPolicy, now: float, wall_clock: WallClock,
             kwargs: dict[str, Any]) -> IkeSession:
    if record["v"] != SCHEMA_VERSION:
        raise ValueError(f"snapshot schema {record['v']}, this node reads {SCHEMA_VERSION}")
    connection = next((c for c in policy.connections if c.name == record["connection"]), None)
    if connection is None:
        raise ValueError(f"connection {record['connection']!r} is not configured here")
    chosen = _chosen_from(record["chosen"])
    keys = IkeKeys(*record["keys"])
    initiator = bool(record["initiator"])
    if initiator:
        sk = SkProtection(chosen.encr, chosen.integ, keys.sk_ei, keys.sk_ai, keys.sk_er,
                          keys.sk_ar)
    else:
        sk = SkProtection(chosen.encr, chosen.integ, keys.sk_er, keys.sk_ar, keys.sk_ei,
                          keys.sk_ai)
    nat_local, nat_remote, behind_nat = record["nat"]
    local_id, remote_id = record["local_id"], record["remote_id"]
    sa = IkeSa(
        policy, initiator, record["spi_i"], record["spi_r"], tuple(record["local"]),
        tuple(record["remote"]),
        state=State.ESTABLISHED, connection=connection, chosen=chosen, keys=keys, sk=sk,
        nat_local=nat_local, nat_remote=nat_remote, behind_nat=behind_nat,
        keepalive_at=now if behind_nat else INFINITY,  # NAT keepalives go on from here
        peer_hashes=frozenset(record["peer_hashes"]),
        local_id=Identity(IdType(local_id[0]), local_id[1]) if local_id else None,
        remote_id=Identity(IdType(remote_id[0]), remote_id[1]) if remote_id else None,
        peer_next_id=record["peer_next_id"], our_next_id=record["our_next_id"],
        last_response=list(record["last_response"]) or None,
        last_request_digest=record["last_request_digest"],
        last_heard=now - record["last_heard_ago"],
        rekey_at=_abs(record["rekey_in"], now), expire_at=_abs(record["expire_in"], now),
        reauth_at=_abs(record.get("reauth_in"), now),
        reauth_due=_abs(record.get("reauth_due_in"), now),
        fragmentation=record["fragmentation"],
        mid_sync=bool(record.get("mid_sync", False)),
        ids_unsure=bool(record.get("in_flight", False)),
        mobike=bool(record.get("mobike", False)),
        ppk=bool(record.get("ppk", False)),
        redirect_supported=bool(record.get("redirect", False)),
        # (a record from before it: the SA's role now, right unless we rekeyed it)
        original_initiator=bool(record.get("client", initiator)),
        eap_identity=str(record.get("eap_id", "")),
        authenticated_at=float(record.get("auth_at", 0.0)),
        radius_classes=tuple(bytes(c) for c in record.get("radius", [[], 0])[0]),
        radius_interim=int(record.get("radius", [[], 0])[1]),
        leases=_leases(connection, record.get("leases", [])),
    )
    for c, ck in zip(record["children"], record["children_keys"], strict=True):
        child = ChildSa(c["name"], c["mode"], c["spi_in"], c["spi_out"],
                        _chosen_from(c["chosen"]), ChildKeys(*ck),
                        tuple(_ts_from(t) for t in c["local_ts"]),
                        tuple(_ts_from(t) for t in c["remote_ts"]),
                        rekey_at=_abs(c["rekey_in"], now), expire_at=_abs(c["expire_in"], now),
                        scheduled=True,
                        we_initiated=bool(c.get("we_initiated", initiator)))
        sa.children[child.spi_in] = child
    request = record.get("request")
    if request:
        _resume_request(sa, *_request_from(request), now)
    sa.queue.extend(DeleteChild(bytes(spi), expired=True) for spi in record.get("expired", ()))
    return IkeSession(sa, wall_clock=wall_clock, **kwargs)


def _resume_request(sa: IkeSa, exchange: int, message_id: int, data: list[bytes],
                    task: Task, now: float) -> None:
    """Our request in flight goes again at once: a retransmission the peer answers
    whether or not it had the old owner's (RFC 7296 2.1), so our message IDs stay in
    step. Not if it was about a Child SA that is gone since (but for one that expired).
    """
    if isinstance(task, (DeleteChild, RekeyChild)):
        child = sa.children.get(task.spi_in)
        if child is None:
            # gone since, unless it reached its hard lifetime with the request in flight:
            # the Delete still tells the peer, the rekey's answer brings an SA of its own
            if not (task.expired if isinstance(task, DeleteChild) else task.name):
                return
        elif isinstance(task, DeleteChild):
            child.deleting = True
        else:
            child.rekeying = True
    elif isinstance(task, RekeyIke):
        sa.rekeying = True
    elif isinstance(task, DeleteIke):
        sa.transition(Trigger.SEND_DELETE_IKE)
    sa.pending = Outstanding(exchange, message_id, data, now, task)
    sa.ids_unsure = False


def _rekey_in(rekeying: bool, rekey_at: float, now: float) -> float | None:
    """A rekey under way (its timer spent) is due at once on a node that takes the SA
    over, unless that node resumes our request (then it is under way there too)."""
    return 0.0 if rekeying else _rel(rekey_at, now)


def _request(sa: IkeSa) -> list[Any] | None:
    """Our request in flight, so that a new owner can complete it: the same bytes go out
    again as a retransmission, and what its answer needs (for a rekey our nonce, new SPI
    and key exchange) is here. (Only a sync is not: it is made afresh.)"""
    pending = sa.pending
    if pending is None:
        return None
    task = pending.task
    if isinstance(task, Liveness):
        what: list[Any] = ["liveness"]
    elif isinstance(task, DeleteChild):
        what = ["delete_child", task.spi_in, task.expired]
    elif isinstance(task, AuthLifetime):
        what = ["auth_lifetime", task.seconds]
    elif isinstance(task, Redirect):
        what = ["redirect", task.data]
    elif isinstance(task, RekeyChild):
        what = ["rekey_child", task.spi_in, task.new_spi, task.nonce, task.group,
                _private(task.ke), task.name]
    elif isinstance(task, CreateChild):
        what = ["create_child", task.name, task.new_spi, task.nonce, task.group,
                _private(task.ke)]
    elif isinstance(task, RekeyIke):
        what = ["rekey_ike", task.new_spi, task.nonce, task.group, _private(task.ke)]
    elif isinstance(task, DeleteIke):
        what = ["delete_ike", task.reason]
    else:
        return None
    return [pending.exchange, pending.message_id, list(pending.data), *what]


def _private(ke: KeyExchange | None) -> list[Any] | None:
    return None if ke is None else [ke.group.value, ke.private_value()]


def _exchange(stored: list[Any] | None) -> KeyExchange | None:
    return None if stored is None else new_key_exchange(int(stored[0]), bytes(stored[1]))


def _request_from(stored: list[Any]) -> tuple[int, int, list[bytes], Task]:
    exchange, message_id, data, kind, *args = stored
    task: Task
    if kind == "liveness":
        task = Liveness()
    elif kind == "delete_child":
        task = DeleteChild(bytes(args[0]), len(args) > 1 and bool(args[1]))
    elif kind == "auth_lifetime":
        task = AuthLifetime(float(args[0]))
    elif kind == "redirect":
        task = Redirect(bytes(args[0]))
    elif kind == "rekey_child":
        spi_in, new_spi, nonce, group, ke, *name = args  # (no name: an older snapshot)
        task = RekeyChild(bytes(spi_in), bytes(new_spi), bytes(nonce), _exchange(ke),
                          None if group is None else int(group), str(name[0]) if name else "")
    elif kind == "create_child":
        name, new_spi, nonce, group, ke = args
        task = CreateChild(str(name), bytes(new_spi), bytes(nonce), _exchange(ke),
                           None if group is None else int(group))
    elif kind == "rekey_ike":
        new_spi, nonce, group, ke = args
        task = RekeyIke(bytes(new_spi), bytes(nonce), _exchange(ke),
                        None if group is None else int(group))
    elif kind == "delete_ike":
        task = DeleteIke(str(args[0]))
    else:
        raise ValueError(f"in-flight request of unknown kind {kind!r}")
    return int(exchange), int(message_id), [bytes(d) for d in data], task


def child_record(event: ChildSaEstablished) -> Record:
    """A Child SA install request as a msgpack-able record (key distribution to workers).

    All of it is secret (it holds the ESP keys): the caller seals the packed record whole.
    """
    return {
        "v": CHILD_SCHEMA_VERSION,
        "ike": [event.ike_spi_i, event.ike_spi_r],
        "name": event.name, "mode": event.mode,
        "spi_in": event.spi_in, "spi_out": event.spi_out,
        "encr": event.encr.name, "integ": event.integ.name if event.integ else None,
        "esn": event.esn,
        "keys": [event.encr_key_in, event.integ_key_in, event.encr_key_out, event.integ_key_out],
        "local_ts": [_ts(t) for t in event.local_ts],
        "remote_ts": [_ts(t) for t in event.remote_ts],
        "local": list(event.local), "remote": list(event.remote), "encap": event.encap,
        "replaces": event.replaces, "we_initiated": event.we_initiated,
        "inactivity": event.inactivity, "copy_dscp": event.copy_dscp,
        "copy_ecn": event.copy_ecn, "replay_window": event.replay_window,
        "tfc_padding": event.tfc_padding,
        "volume": list(event.volume),
        "ike_sa": [event.connection, event.local_id, event.remote_id, event.eap_identity,
                   list(event.virtual_ips), list(event.own_virtual_ips)],
    }


def _integ(name: str | None) -> IntegAlgorithm | None:
    if not name:
        return None
    return SHA256_96 if name == SHA256_96.name else INTEG_ALGORITHMS[name]


def _volume(value: Any) -> tuple[int, int, int, int]:
    rekey_bytes, life_bytes, rekey_packets, life_packets = (int(v) for v in value)
    return rekey_bytes, life_bytes, rekey_packets, life_packets


def child_event(record: Record) -> ChildSaEstablished:
    """The event `child_record` was made from; ParseError if the record does not fit."""
    try:
        if record["v"] != CHILD_SCHEMA_VERSION:
            raise ValueError(f"child schema {record['v']}, this node reads "
                             f"{CHILD_SCHEMA_VERSION}")
        encr_in, integ_in, encr_out, integ_out = record["keys"]
        local, remote = record["local"], record["remote"]
        return ChildSaEstablished(
            record["ike"][0], record["ike"][1], record["name"], record["mode"],
            record["spi_in"], record["spi_out"], ENCR_ALGORITHMS[record["encr"]],
            _integ(record["integ"]), bool(record["esn"]),
            encr_in, integ_in, encr_out, integ_out,
            local_ts=tuple(_ts_from(t) for t in record["local_ts"]),
            remote_ts=tuple(_ts_from(t) for t in record["remote_ts"]),
            local=(str(local[0]), int(local[1])), remote=(str(remote[0]), int(remote[1])),
            encap=bool(record["encap"]), replaces=record["replaces"],
            we_initiated=bool(record["we_initiated"]),
            inactivity=float(record.get("inactivity", 0.0)),  # (a record before it: none)
            copy_dscp=bool(record.get("copy_dscp", True)),  # (before it: the default)
            copy_ecn=bool(record.get("copy_ecn", True)),  # (likewise)
            tfc_padding=int(record.get("tfc_padding", 0)),  # (before it: none)
            replay_window=int(record.get("replay_window", 0)),  # (before it: the worker's)
            volume=_volume(record.get("volume", (0, 0, 0, 0))),
            **_ike_context(record.get("ike_sa")),
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ParseError(f"unusable Child SA record: {exc!r}") from None


def _ike_context(stored: Any) -> dict[str, Any]:
    """ChildSaEstablished's fields about its IKE SA from a child record's "ike_sa" (none
    in a record from before them)."""
    if stored is None:
        return {}
    connection, local_id, remote_id, eap_identity, vips, own = stored
    return {"connection": str(connection), "local_id": str(local_id),
            "remote_id": str(remote_id), "eap_identity": str(eap_identity),
            "virtual_ips": tuple(str(a) for a in vips),
            "own_virtual_ips": tuple(str(a) for a in own)}


def _leases(connection: ConnectionConfig, stored: list[Any]) -> tuple[Lease, ...]:
    """The SA's virtual IPs, in this node's pools of the same names (taken over, held)."""
    pools = {pool.name: pool for pool in connection.pools}
    out: list[Lease] = []
    for name, offset, holder, *rest in stored:
        pool = pools.get(str(name))
        if pool is None:  # the configuration lost the pool: nothing to hold it in
            continue
        address = pool.address_at(int(offset), str(rest[0]) if rest else "")
        lease = Lease(pool, address, bytes(holder))
        pool.adopt(lease)
        out.append(lease)
    return tuple(out)
