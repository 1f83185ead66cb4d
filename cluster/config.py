"""Load a node's TOML configuration into the core's policy objects.

The file follows swanctl.conf's concepts (`[connections.NAME]`, `[secrets.NAME]`, children,
proposals in strongSwan's syntax). Every mistake stops start-up with one `ConfigError` line
`<file>: <dotted.key>: <reason>`; unknown keys are mistakes too, so a typo never passes
silently. Secret values never appear in an error message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import os
import re
import shlex
import shutil
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import ConfigError, ParseError
from .ike.auth import Revocation, decode_certificate_fields
from .ike.constants import ProtocolId
from .ike.events import TFC_MTU
from .ike.identity import (
    Identity,
    IdentityPattern,
    cert_matches_identity,
    parse_identity,
    parse_identity_pattern,
)
from .ike.policy import (
    ChildConfig,
    ConnectionConfig,
    Lifetime,
    LocalAuth,
    PrivateKey,
    RemoteAuth,
    ResponderPolicy,
    Retransmission,
    SharedSecret,
    VolumeLimits,
)
from .ike.pools import AddressPool, FramedPool
from .ike.proposals import ConfiguredProposal, parse_proposal
from .ike.radius import DaeSettings, RadiusServer, RadiusSettings
from .ike.traffic_selectors import TsConfig, parse_ts_config

# `default` in a proposal list stands for these, as in swanctl.conf.
DEFAULT_IKE_PROPOSALS = ("aes256gcm16-prfsha256-x25519", "aes256-sha256-modp2048")
DEFAULT_ESP_PROPOSALS = ("aes256gcm16", "aes128gcm16")
LOG_LEVELS = ("debug", "info", "warning", "error")
START_ACTIONS: tuple[Literal["none", "start", "trap"], ...] = ("none", "start", "trap")
# swanctl's one-of settings, the default first
CHILDLESS: tuple[Literal["allow", "force", "never"], ...] = ("allow", "force", "never")
SEND_CERT: tuple[Literal["always", "ifasked", "never"], ...] = ("always", "ifasked", "never")
FRAGMENTATION: tuple[Literal["yes", "accept", "no"], ...] = ("yes", "accept", "no")
REVOCATION: tuple[Revocation, ...] = ("relaxed", "ifuri", "strict")
_Choice = TypeVar("_Choice", bound=str)
MAX_REPLAY_WINDOW = 1 << 16  # packets (RFC 4303 3.4.3; our bitmap has no upper bound)
IKE_PORT = 500  # a peer's IKE port unless `remote_port` says otherwise
# Tables that later issues fill in; kept raw in `NodeConfig.extra_tables` until then.
FUTURE_TABLES: tuple[str, ...] = ()
RELAY_PORT = 4800  # [cluster] relay without a port
UNIQUE_POLICIES: tuple[Literal["no", "never", "replace", "keep"], ...] = (
    "no", "never", "replace", "keep")
STORE_SCHEMES = ("memory", "redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
DAE_PORT = 3799  # [radius.dae] listen without a port (RFC 5176)
METRICS_PORT = 9464  # [metrics] listen without a port (the OpenTelemetry exporter's port)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
IKE_REKEY_TIME = 14400.0  # swanctl's defaults: 4 h for IKE SAs, 1 h for Child SAs
CHILD_REKEY_TIME = 3600.0
DH_REUSE = 10.0
_TUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # IFNAMSIZ - 1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+(\[\d+\])?")  # an array index may follow
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


@dataclass(frozen=True)
class Initiation:
    """A connection this node initiates: at start-up (a child with `start_action = "start"`),
    or when a packet for a `"trap"` child finds no SA (`on_demand`)."""

    connection: ConnectionConfig  # a copy with the start child first: IKE_AUTH carries children[0]
    local: str  # to send from; "0.0.0.0" or "::" (a wildcard [ike] address): the route decides
    remote: str  # the one address in remote_addrs
    remote_port: int = IKE_PORT
    on_demand: bool = False

    @property
    def child(self) -> str:
        return self.connection.children[0].name


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """`[worker]`: the userspace ESP data plane (TUN device, routes, replay window)."""

    tun: str = "ikec0"  # TUN device name
    mtu: int = 1400
    queues: int = 1  # multi-queue TUN, one pump per queue
    mark: int = 0x1C5  # firewall mark on the worker's own sockets (transport mode)
    table: int = 1450  # routing table for routes into the TUN
    priority: int = 1450  # of the policy rule that selects that table
    replay_window: int = 1024  # packets (RFC 4303 3.4.3)
    lifetime_bytes: int | None = None  # hard limits per Child SA; soft at 90 %
    lifetime_packets: int | None = None


@dataclass(frozen=True, kw_only=True)
class DosConfig:
    """`[ike]` limits on unauthenticated peers, named and defaulted as in strongSwan."""

    cookie_threshold: int = 30  # half-open IKE SAs from which IKE_SA_INIT needs a cookie; 0: never
    block_threshold: int = 5  # half-open IKE SAs one peer address may hold; 0: no limit
    init_limit_half_open: int = 0  # half-open IKE SAs in all; 0: no limit
    notify_rate: float = 50.0  # unauthenticated notifies per second to one address; 0: no limit


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """`[metrics]`: where Prometheus scrapes this node, and how fresh the values are."""

    host: str = "127.0.0.1"  # an IPv4 or IPv6 address, without brackets
    port: int = METRICS_PORT  # 0 picks a free one
    interval: float = 1.0  # seconds a scrape may reuse the last values read from the runtime

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """`[cluster]`: the shared store, the cluster key, this node's relay socket, membership."""

    store: str | None = None  # a Redis URL as redis-py takes it; None: the in-memory store
    key: str | None = None  # the cluster key: a file path or "env:NAME" (ClusterKey.load)
    relay_host: str = "0.0.0.0"
    relay_port: int = RELAY_PORT
    advertise: str | None = None  # "host:port" others reach the relay at; None: derived
    membership_ttl: float = 5.0  # a member silent this long is gone; heartbeats at a third

    @property
    def relay(self) -> str:
        host = self.relay_host
        return f"[{host}]:{self.relay_port}" if ":" in host else f"{host}:{self.relay_port}"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    node_id: str  # [node] id
    addresses: tuple[str, ...]  # [ike] addresses; UDP ike_port and natt_port bound on each
    policy: ResponderPolicy
    source: str  # the path the configuration was loaded from
    ike_port: int = 500  # [ike] port
    natt_port: int = 4500  # [ike] port_nat_t
    log_level: str = "info"  # [node] log_level
    control: bool = True  # [node] control: the control socket (cluster/control.py)
    initiations: tuple[Initiation, ...] = ()  # in the order of the connections
    # `ike-cluster initiate`: each connection's peer (a copy of the connection inside),
    # or why it has none to initiate to
    initiable: Mapping[str, Initiation | str] = field(default_factory=dict)
    worker: WorkerConfig | None = None  # None: no data plane in this process
    dos: DosConfig = field(default_factory=DosConfig)  # [ike] cookie and half-open limits
    metrics: MetricsConfig | None = None  # None: no metrics endpoint
    cluster: ClusterConfig | None = None  # None: no [cluster] table (single node, memory)
    extra_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # [ike] dh_reuse: seconds one DH value of ours may serve several IKE_SA_INIT exchanges
    # (RFC 7296 2.12; forgotten when any SA that used it ends); 0: a fresh one each time
    dh_reuse: float = DH_REUSE
    # [ike] crl_refresh: seconds between downloads of each CRL URI (sooner when the CRL
    # says its next update comes sooner)
    crl_refresh: float = 3600.0
    # [ike] crl_from_certificates: fetch the CRLs peers' certificates point to (strongSwan's)
    crl_from_certificates: bool = True
    ocsp: bool = True  # [ike] ocsp: ask the OCSP responders certificates name (RFC 6960)


CRL_REFRESH = 3600.0  # [ike] crl_refresh's default: an hour


def load_config(path: str | Path) -> NodeConfig:
    """Read and check the configuration at `path`; raise `ConfigError` on any mistake."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {_describe_toml_error(str(exc))}") from None
    return _Loader(source, Path(path).resolve().parent).load(document)


def _describe_toml_error(message: str) -> str:
    message = " ".join(message.split())
    position = _TOML_POSITION.search(message)
    if position is None:
        return f"invalid TOML: {message}"
    reason = message[: position.start()]
    return f"line {position[1]}: {reason} (column {position[2]})"


def _join(prefix: str, name: str) -> str:
    shown = name if _BARE_KEY.fullmatch(name) else '"' + name.replace('"', '\\"') + '"'
    return f"{prefix}.{shown}" if prefix else shown


def _type_name(value: object) -> str:
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    ):
        if isinstance(value, kind):
            return name
    return "a date/time"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _Loader:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.framed_pool = FramedPool()  # pools = ["radius"], one for all connections

    def fail(self, key: str, reason: str) -> NoReturn:
        location = f"{self.source}: {key}" if key else self.source
        raise ConfigError(f"{location}: {_one_line(reason)}")

    def table(self, key: str, value: object, allowed: Iterable[str]) -> _Table:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {_type_name(value)}")
        return _Table(self, key, value, tuple(allowed))

    def resolve(self, text: str) -> Path:
        return self.base_dir / Path(text).expanduser()

    # --- the document ---------------------------------------------------------

    def load(self, document: dict[str, Any]) -> NodeConfig:
        root = self.table(
            "", document,
            ("node", "ike", "connections", "secrets", "pools", "worker", "metrics", "cluster",
             "radius", *FUTURE_TABLES),
        )
        node = root.table("node", ("id", "log_level", "control"), required=True)
        node_id = node.required_string("id")
        if node_id == "%hostname":  # one file for every replica of a scaled service
            node_id = _hostname_id()
        if not _NAME.fullmatch(node_id):
            node.fail("id", f"{node_id!r} is not a valid node id (letters, digits, '_', '-')")
        control = node.boolean("control", True)
        log_level = node.string("log_level", "info")
        if log_level not in LOG_LEVELS:
            node.fail("log_level", f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}")

        ike = root.table(
            "ike",
            (
                "addresses", "port", "port_nat_t", "legacy_algorithms", "half_open_timeout",
                "cookie_threshold", "block_threshold", "init_limit_half_open", "notify_rate",
                "retransmit_timeout", "retransmit_base", "retransmit_tries", "dh_reuse",
                "keep_alive", "crl_refresh", "crl_from_certificates", "ocsp",
            ),
            required=True,
        )  # fmt: skip
        addresses = self.addresses(ike)
        ike_port = ike.port("port", 500)
        natt_port = ike.port("port_nat_t", 4500)
        if ike_port == natt_port and ike_port != 0:
            ike.fail("port_nat_t", f"must differ from port ({ike_port})")
        legacy = ike.boolean("legacy_algorithms", False)
        half_open_timeout = ike.number("half_open_timeout", 30.0)
        if half_open_timeout <= 0:
            ike.fail("half_open_timeout", "must be a positive number of seconds")
        dos = self.dos(ike)
        dh_reuse = self.duration(ike, "dh_reuse", DH_REUSE)
        if dh_reuse > 3600:
            ike.fail("dh_reuse", "at most an hour (0: a fresh DH value for every IKE SA)")

        secrets = tuple(
            self.secret(_join("secrets", name), value)
            for name, value in root.named_tables("secrets").items()
        )
        pools = {
            name: self.pool(name, _join("pools", name), value)
            for name, value in root.named_tables("pools").items()
        }
        loaded = [
            self.connection(name, _join("connections", name), value, legacy, addresses, pools)
            for name, value in root.named_tables("connections").items()
        ]
        connections = tuple(conn for conn, _, _ in loaded)
        initiations = tuple(initiation for _, initiation, _ in loaded if initiation is not None)
        initiable = {conn.name: manual for conn, _, manual in loaded}
        if not connections:
            root.fail("connections", "no connections defined")
        policy = ResponderPolicy(
            connections=connections,
            secrets=secrets,
            legacy_algorithms=legacy,
            half_open_timeout=half_open_timeout,
            retransmission=self.retransmission(ike),
            keep_alive=self.keep_alive(ike),
            radius=self.radius(root) if "radius" in root else None,
        )
        self.check_radius(policy)
        self.check_psk_secrets(policy, addresses)
        self.check_ppks(policy)
        extra = {name: root.raw_table(name) for name in FUTURE_TABLES if name in root}
        worker = self.worker(root) if "worker" in root else None
        for initiation in initiations:
            if initiation.on_demand and worker is None:
                conn = initiation.connection
                self.fail(_join(_join(_join(_join("connections", conn.name), "children"),
                                      initiation.child), "start_action"),
                          '"trap" needs the [worker] data plane (its packets start the SA)')
        metrics = self.metrics(root) if "metrics" in root else None
        cluster = self.cluster(root) if "cluster" in root else None
        return NodeConfig(
            node_id=node_id,
            addresses=addresses,
            policy=policy,
            source=self.source,
            ike_port=ike_port,
            natt_port=natt_port,
            log_level=log_level,
            control=control,
            initiations=initiations,
            initiable=initiable,
            worker=worker,
            dos=dos,
            metrics=metrics,
            cluster=cluster,
            extra_tables=extra,
            dh_reuse=dh_reuse,
            crl_refresh=self.crl_refresh(ike),
            crl_from_certificates=ike.boolean("crl_from_certificates", True),
            ocsp=ike.boolean("ocsp", True),
        )

    def dos(self, ike: _Table) -> DosConfig:
        def count(name: str, default: int, what: str) -> int:
            value = ike.integer(name, default)
            if value < 0:
                ike.fail(name, f"must not be negative ({what})")
            return value

        notify_rate = ike.number("notify_rate", DosConfig.notify_rate)
        if notify_rate < 0 or notify_rate != notify_rate:  # NaN compares unequal
            ike.fail("notify_rate", "must be a non-negative number per second (0: no limit)")
        return DosConfig(
            cookie_threshold=count(
                "cookie_threshold", DosConfig.cookie_threshold, "0: never ask for cookies"
            ),
            block_threshold=count(
                "block_threshold", DosConfig.block_threshold, "0: no limit per peer"
            ),
            init_limit_half_open=count(
                "init_limit_half_open", DosConfig.init_limit_half_open, "0: no limit"
            ),
            notify_rate=notify_rate,
        )

    def crl_refresh(self, ike: _Table) -> float:
        seconds = self.duration(ike, "crl_refresh", CRL_REFRESH)
        if not 1 <= seconds <= 7 * 86400:
            ike.fail("crl_refresh", "between a second and a week")
        return seconds

    def keep_alive(self, ike: _Table) -> float:
        interval = self.duration(ike, "keep_alive", 20.0)
        if interval > 3600:
            ike.fail("keep_alive", "at most an hour (0: no NAT keepalives)")
        return interval

    def retransmission(self, ike: _Table) -> Retransmission:
        return Retransmission(*self.retransmit_keys(ike, 4.0, 1.8, 5, min_tries=0))

    def retransmit_keys(self, table: _Table, timeout: float, base: float, tries: int, *,
                        min_tries: int) -> tuple[float, float, int]:
        """strongSwan's retransmit_timeout, retransmit_base and retransmit_tries."""
        seconds = self.duration(table, "retransmit_timeout", timeout)
        if seconds <= 0:
            table.fail("retransmit_timeout", "must be positive")
        factor = table.number("retransmit_base", base)
        if not 1.0 <= factor <= 10.0:
            table.fail("retransmit_base", "must be between 1 and 10")
        count = table.integer("retransmit_tries", tries)
        if not min_tries <= count <= 20:
            table.fail("retransmit_tries", f"must be between {min_tries} and 20")
        return seconds, factor, count

    def worker(self, root: _Table) -> WorkerConfig:
        table = root.table("worker", ("tun", "mtu", "queues", "mark", "table", "priority",
                                      "replay_window", "lifetime_bytes", "lifetime_packets"))
        tun = table.string("tun", "ikec0")
        if not _TUN_NAME.fullmatch(tun):
            table.fail("tun", f"{tun!r} is not a valid interface name (1-15 characters)")

        def bounded(name: str, default: int, low: int, high: int) -> int:
            value = table.integer(name, default)
            if not low <= value <= high:
                table.fail(name, f"must be between {low} and {high}")
            return value

        def limit(name: str) -> int | None:
            value = table.integer(name, 0)
            if value < 0:
                table.fail(name, "must not be negative (0 or absent: unlimited)")
            return value or None

        routing_table = bounded("table", 1450, 1, 0xFFFFFFFF)
        if routing_table in (253, 254, 255):
            table.fail("table", "253-255 are the kernel's default, main and local tables")
        return WorkerConfig(
            tun=tun,
            mtu=bounded("mtu", 1400, 576, 65535),
            queues=bounded("queues", 1, 1, 64),
            mark=bounded("mark", 0x1C5, 1, 0xFFFFFFFF),
            table=routing_table,
            priority=bounded("priority", 1450, 1, 32765),
            replay_window=bounded("replay_window", 1024, 1, MAX_REPLAY_WINDOW),
            lifetime_bytes=limit("lifetime_bytes"),
            lifetime_packets=limit("lifetime_packets"),
        )

    def metrics(self, root: _Table) -> MetricsConfig:
        table = root.table("metrics", ("listen", "interval"))
        host, port = MetricsConfig.host, MetricsConfig.port
        listen = table.optional_string("listen")
        if listen is not None:
            host, port = _parse_listen(listen, lambda reason: table.fail("listen", reason))
        interval = self.duration(table, "interval", MetricsConfig.interval)
        if not 0.01 <= interval <= 3600:
            table.fail("interval", "must be between 0.01 s and 1 h")
        return MetricsConfig(host=host, port=port, interval=interval)

    def cluster(self, root: _Table) -> ClusterConfig:
        table = root.table("cluster", ("store", "key", "relay", "advertise", "membership_ttl"))
        store = table.optional_string("store") or None
        if store is not None:
            scheme = store.partition("://")[0].lower()
            if "://" not in store or scheme not in STORE_SCHEMES:
                table.fail("store", f"{store.partition('://')[0]!r} is not one of "
                           f"{', '.join(s + '://' for s in STORE_SCHEMES)}")
        key = table.optional_string("key") or None
        if key is not None and not key.startswith("env:"):
            key = str(self.resolve(key))
        if store is not None and store.partition("://")[0].lower() != "memory" and key is None:
            table.fail("key", "a shared store needs the cluster key (a file or env:NAME)")
        host, port = ClusterConfig.relay_host, ClusterConfig.relay_port
        relay = table.optional_string("relay")
        if relay is not None:
            host, port = _parse_listen(relay, lambda reason: table.fail("relay", reason),
                                       default_port=RELAY_PORT)
        advertise = table.optional_string("advertise") or None
        if advertise is not None:
            a_host, a_port = _parse_listen(advertise,
                                           lambda reason: table.fail("advertise", reason),
                                           default_port=port)
            if a_port == 0 or ipaddress.ip_address(a_host).is_unspecified:
                table.fail("advertise", "must be an address and port others can send to")
            advertise = f"[{a_host}]:{a_port}" if ":" in a_host else f"{a_host}:{a_port}"
        ttl = self.duration(table, "membership_ttl", ClusterConfig.membership_ttl)
        if not 0.5 <= ttl <= 3600:
            table.fail("membership_ttl", "must be between 0.5 s and 1 h")
        return ClusterConfig(store=store, key=key, relay_host=host, relay_port=port,
                             advertise=advertise, membership_ttl=ttl)

    def addresses(self, ike: _Table) -> tuple[str, ...]:
        texts = ike.strings("addresses", required=True)
        if not texts:
            ike.fail("addresses", "needs at least one address")
        result: list[str] = []
        for index, text in enumerate(texts):
            try:
                address = str(ipaddress.ip_address(text))
            except ValueError:
                ike.fail(f"addresses[{index}]", f"{text!r} is not an IPv4 or IPv6 address")
            if address in result:
                ike.fail(f"addresses[{index}]", f"{text!r} is listed twice")
            result.append(address)
        return tuple(result)

    # --- connections ----------------------------------------------------------

    def connection(
        self, name: str, key: str, value: object, legacy: bool, addresses: tuple[str, ...],
        pools: dict[str, AddressPool],
    ) -> tuple[ConnectionConfig, Initiation | None, Initiation | str]:
        conn = self.table(
            key,
            value,
            (
                "version",
                "proposals",
                "local",
                "remote",
                "children",
                "encap",
                "local_addrs",
                "remote_addrs",
                "remote_port",
                "rekey_time",
                "over_time",
                "life_time",
                "rand_time",
                "dpd_delay",
                "dpd_action",
                "pools",
                "mobike",
                "unique",
                "reauth_time",
                "vips",
                "ppk_id",
                "ppk_required",
                "childless",
                "send_cert",
                "send_certreq",
                "fragmentation",
                "keyingtries",
            ),
        )
        version = conn.integer("version", 2)
        if version == 1:
            conn.fail("version", "IKEv1 is not supported yet")
        if version != 2:
            conn.fail("version", f"must be 2 (IKEv2), got {version}")
        proposals = self.proposals(conn, "proposals", DEFAULT_IKE_PROPOSALS, ProtocolId.IKE, legacy)
        local = self.local_auth(conn)
        remote = self.remote_auth(conn)
        children = tuple(
            self.child(child_name, _join(_join(key, "children"), child_name), child, legacy)
            for child_name, child in conn.named_tables("children").items()
        )
        if not children:
            conn.fail("children", "needs at least one child ([connections.NAME.children.CHILD])")
        remote_port = conn.integer("remote_port", IKE_PORT)
        if not 1 <= remote_port <= 65535:
            conn.fail("remote_port", f"{remote_port} is not a UDP port (1-65535)")
        connection = ConnectionConfig(
            name=name,
            version=version,
            proposals=proposals,
            local=local,
            remote=remote,
            children=children,
            encap=conn.boolean("encap", False),
            local_addrs=self.peer_addrs(conn, "local_addrs"),
            remote_addrs=self.peer_addrs(conn, "remote_addrs"),
            lifetime=self.lifetime(conn, IKE_REKEY_TIME, over_time=True),
            dpd_delay=self.duration(conn, "dpd_delay", 0.0),
            dpd_action=self.dpd_action(conn, children),
            pools=self.connection_pools(conn, pools, remote),
            mobike=conn.boolean("mobike", True),
            unique=self.unique(conn),
            reauth_time=self.reauth_time(conn),
            vips=self.vips(conn),
            ppk_id=self.ppk_id(conn),
            ppk_required=conn.boolean("ppk_required", False),
            childless=conn.choice("childless", CHILDLESS),
            send_cert=conn.choice("send_cert", SEND_CERT),
            send_certreq=conn.boolean("send_certreq", True),
            # "force" is IKEv1's (fragment from the first message): "yes" for IKEv2
            fragmentation=conn.choice("fragmentation", FRAGMENTATION, aliases={"force": "yes"}),
            keyingtries=self.keyingtries(conn),
        )
        return (connection, self.initiation(conn, connection, remote_port, addresses),
                self.manual_initiation(conn, connection, remote_port, addresses))

    def ppk_id(self, conn: _Table) -> bytes | None:
        text = conn.string("ppk_id", "")
        if not text:
            return None
        try:  # strongSwan sends the identity's encoding (the text, for a name)
            return parse_identity(text).data
        except ValueError as exc:
            conn.fail("ppk_id", str(exc))

    def duration(self, table: _Table, name: str, default: float) -> float:
        """Seconds, as a number or swanctl's text ("30s", "10m", "4h", "1d")."""
        value = table.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            table.fail(name, f"expected a duration, got {_type_name(value)}")
        if isinstance(value, str):
            match = _DURATION.fullmatch(value.strip())
            if match is None:
                table.fail(name, f"{value!r} is not a duration (e.g. 30, \"30s\", \"10m\", \"4h\")")
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
        else:
            seconds = float(value)
        if not seconds >= 0 or seconds == float("inf"):
            table.fail(name, "must be a non-negative number of seconds")
        return seconds

    def lifetime(self, table: _Table, default_rekey: float, *, over_time: bool = False) -> Lifetime:
        """strongSwan's rekey_time / life_time (or over_time for IKE) / rand_time."""
        rekey = self.duration(table, "rekey_time", default_rekey)
        life: float | None = None
        if "life_time" in table:
            life = self.duration(table, "life_time", 0.0)
        elif over_time and "over_time" in table:
            life = rekey + self.duration(table, "over_time", 0.0)
        rand = self.duration(table, "rand_time", 0.0) if "rand_time" in table else None
        lifetime = Lifetime(rekey, life, rand)
        if rekey and life is not None and life <= rekey:
            table.fail("life_time", f"must exceed rekey_time ({rekey:g} s)")
        if rekey and rand is not None and rand >= rekey:
            table.fail("rand_time", f"must be below rekey_time ({rekey:g} s)")
        return lifetime

    def dpd_action(self, table: _Table, children: tuple[ChildConfig, ...]
                   ) -> Literal["clear", "restart", "trap"]:
        """swanctl's values, on the connection or (swanctl's place) on a child. "restart"
        and "trap" concern what we initiate, so they need a child with start_action
        "start" or "trap"; "trap" keeps an on-demand connection's trap after the SA times
        out (as it does anyway: swanctl calls that redundant)."""
        key = _join(table.key, "dpd_action")
        action = table.string("dpd_action", "clear")
        for child in children:
            if child.dpd_action is None:
                continue
            child_key = _join(_join(_join(table.key, "children"), child.name), "dpd_action")
            if "dpd_action" in table:
                self.fail(key, f"also given in {child_key}: give it once")
            key, action = child_key, child.dpd_action
        if action == "clear":
            return "clear"
        if action not in ("restart", "trap"):
            self.fail(key, f'{action!r} is not one of "clear", "restart", "trap"')
        starts = {c.start_action for c in children} - {"none"}
        if not starts:
            self.fail(key, f'"{action}" needs a child with start_action = "start" or "trap" '
                           "(this node initiates only those)")
        if action == "trap" and "trap" not in starts:
            self.fail(key, '"trap" needs the child\'s start_action = "trap" (a "start" '
                           "connection is always initiated again)")
        return "restart" if action == "restart" else "trap"

    def initiation(
        self,
        conn: _Table,
        connection: ConnectionConfig,
        remote_port: int,
        addresses: tuple[str, ...],
    ) -> Initiation | None:
        """What to initiate for a connection with a `start_action = "start"` or `"trap"`
        child, if any."""
        starting = [c for c in connection.children if c.start_action != "none"]
        if not starting:
            if connection.vips:
                conn.fail("vips", "only for a connection this node initiates (a child with "
                                  'start_action = "start")')
            return None
        child = starting[0]
        if connection.vips and child.start_action == "trap":
            conn.fail("vips", 'not with start_action = "trap" yet (its routes need the '
                              "address before it is assigned)")
        if len(starting) > 1 and any(c.start_action == "trap" for c in starting):
            # IKE_AUTH carries the first Child SA, CREATE_CHILD_SA the others (RFC 7296
            # 1.3.1): fine for children started together, not for one trapped
            trapped = next(c for c in starting if c.start_action == "trap")
            other = next(c for c in starting if c is not trapped)
            self.fail(
                _join(_join(_join(conn.key, "children"), trapped.name), "start_action"),
                f'"trap" needs a connection of its own: children.{other.name} has '
                f'start_action "{other.start_action}"',
            )
        why = f'start_action = "{child.start_action}" in children.{child.name}'
        local, remote = self.initiation_addresses(conn, addresses, why)
        others = tuple(c for c in connection.children if c is not child)
        return Initiation(
            connection=replace(connection, children=(child, *others)),
            local=local,
            remote=remote,
            remote_port=remote_port,
            on_demand=child.start_action == "trap",
        )

    def manual_initiation(
        self,
        conn: _Table,
        connection: ConnectionConfig,
        remote_port: int,
        addresses: tuple[str, ...],
    ) -> Initiation | str:
        """What `ike-cluster initiate` starts for the connection, or why it cannot (one
        only responded to may name no single peer address, and that is no mistake)."""
        try:
            local, remote = self.initiation_addresses(conn, addresses, "to initiate it")
        except ConfigError as exc:
            return str(exc)
        return Initiation(connection=connection, local=local, remote=remote,
                          remote_port=remote_port)

    def initiation_addresses(
        self, conn: _Table, addresses: tuple[str, ...], why: str
    ) -> tuple[str, str]:
        """(local, remote) to initiate from and to: the one address of remote_addrs."""
        remote_texts = conn.strings("remote_addrs", ())
        if len(remote_texts) != 1:
            conn.fail(
                "remote_addrs",
                f"{why} needs exactly one peer address to initiate to, "
                f"{len(remote_texts)} given",
            )
        remote_text = remote_texts[0]
        if remote_text == "%any" or "/" in remote_text:
            conn.fail(
                "remote_addrs[0]",
                f"{why} needs a concrete peer address to initiate to, not {remote_text!r}",
            )
        remote = ipaddress.ip_address(remote_text)  # peer_addrs checked it
        if remote.is_unspecified:
            conn.fail("remote_addrs[0]", f"{why}: {remote_text!r} is not a peer address")
        return self.initiation_source(conn, remote, addresses, why), str(remote)

    def initiation_source(
        self,
        conn: _Table,
        remote: ipaddress.IPv4Address | ipaddress.IPv6Address,
        addresses: tuple[str, ...],
        why: str,
    ) -> str:
        """The first concrete local_addrs entry of the peer's family, else the first [ike] one."""
        family = f"IPv{remote.version}"
        bound = [ipaddress.ip_address(a) for a in addresses]
        texts = conn.strings("local_addrs", ())
        if texts and "%any" not in texts:
            for index, text in enumerate(texts):
                if "/" in text:
                    continue
                address = ipaddress.ip_address(text)
                if address.version != remote.version:
                    continue
                if address not in bound and not any(
                    b.is_unspecified and b.version == address.version for b in bound
                ):
                    conn.fail(
                        f"local_addrs[{index}]",
                        f"{why}: {text!r} is not one of the [ike] addresses, "
                        "so the node cannot send from it",
                    )
                return str(address)
            conn.fail(
                "local_addrs", f"{why} needs an {family} address here to initiate from"
            )
        for address in bound:
            if address.version == remote.version:
                return str(address)
        conn.fail(
            "remote_addrs[0]",
            f"{why}: the peer is {family} but no [ike] address is",
        )

    def proposals(
        self,
        table: _Table,
        name: str,
        default: tuple[str, ...],
        protocol: ProtocolId,
        legacy: bool,
    ) -> tuple[ConfiguredProposal, ...]:
        texts = table.strings(name, default)
        if not texts:
            table.fail(name, "needs at least one proposal (or \"default\")")
        result: list[ConfiguredProposal] = []
        for index, text in enumerate(texts):
            # swanctl: the keyword `default` stands for the built-in proposals
            expanded = default if text == "default" else (text,)
            for item in expanded:
                try:
                    result.append(parse_proposal(item, protocol, legacy))
                except ValueError as exc:
                    table.fail(f"{name}[{index}]", str(exc))
        return tuple(result)

    def peer_addrs(self, conn: _Table, name: str) -> tuple[str, ...]:
        result: list[str] = []
        for index, text in enumerate(conn.strings(name, ())):
            if text == "%any":
                return ()
            try:
                if "/" in text:
                    result.append(str(ipaddress.ip_network(text, strict=False)))
                else:
                    result.append(str(ipaddress.ip_address(text)))
            except ValueError:
                conn.fail(
                    f"{name}[{index}]",
                    f"{text!r} is not an IP address, a subnet (CIDR) or %any",
                )
        return tuple(result)

    def local_auth(self, conn: _Table) -> LocalAuth:
        local = conn.table("local", ("auth", "id", "cert", "key"), required=True)
        method = self.auth_method(local)
        id_text = local.optional_string("id")
        identity = None if id_text is None else self.identity(local, "id", id_text)
        if method == "psk":
            for name in ("cert", "key"):
                if name in local:
                    local.fail(name, 'only used with auth = "pubkey"')
            return LocalAuth(method="psk", identity=identity)
        chain = self.certificates(local, "cert", local.required_string("cert"))
        cert, intermediates = chain[0], tuple(chain[1:])
        key = self.private_key(local, "key", local.required_string("key"))
        if _spki(key.public_key()) != _spki(cert.public_key()):
            local.fail("key", "does not belong to the certificate in cert")
        if identity is not None and not cert_matches_identity(cert, identity):
            local.fail("id", f"{id_text!r} is not contained in the certificate in cert")
        return LocalAuth(
            method="pubkey", identity=identity, cert=cert, key=key, intermediates=intermediates
        )

    def remote_auth(self, conn: _Table) -> RemoteAuth:
        remote = conn.table("remote", ("auth", "id", "cacerts", "crls", "eap_id", "groups",
                                       "certs", "revocation"), required=True)
        method = remote.string("auth", "pubkey")
        if "certs" in remote and method != "pubkey":
            remote.fail("certs", 'only used with auth = "pubkey"')
        if "groups" in remote and method != "eap-radius":
            remote.fail("groups", "group memberships come from a RADIUS server's Class "
                                  'attributes: only with auth = "eap-radius"')
        if method == "eap-mschapv2":
            return self.eap_remote(conn, remote, "eap-mschapv2")
        if method == "eap-radius":
            return self.eap_remote(conn, remote, "eap-radius")
        if method == "eap-tls":
            return self.eap_remote(conn, remote, "eap-tls")
        if "eap_id" in remote:
            remote.fail("eap_id", 'only used with auth = "eap-mschapv2", "eap-tls" or '
                                  '"eap-radius"')
        method = self.auth_method(remote)
        id_text = remote.string("id", "%any")
        try:
            pattern = parse_identity_pattern(id_text)
        except ValueError as exc:
            remote.fail("id", str(exc))
        if method == "psk":
            _only_for_pubkey(remote)
            return RemoteAuth(method="psk", identity=pattern)
        pinned: list[x509.Certificate] = []
        for index, text in enumerate(remote.strings("certs")):
            pinned.extend(self.certificates(remote, f"certs[{index}]", text)[:1])
        if "certs" in remote and not pinned:
            remote.fail("certs", "needs at least one certificate file")
        if pinned and "cacerts" not in remote:  # trusted as they are: nothing to chain to
            for name in ("crls", "revocation"):
                if name in remote:
                    remote.fail(name, "only used with cacerts (certs are trusted as they are)")
            return RemoteAuth(method="pubkey", identity=pattern, certs=tuple(pinned))
        cacerts, crls, uris = self.trust(remote)
        return RemoteAuth(method="pubkey", identity=pattern, cacerts=cacerts, crls=crls,
                          crl_uris=uris, certs=tuple(pinned),
                          revocation=remote.choice("revocation", REVOCATION))

    def tfc_padding(self, child: _Table) -> int:
        """swanctl's tfc_padding: bytes (0: none, at most 65535) or "mtu"."""
        value = child.raw("tfc_padding")
        if value is None:
            return 0
        if value == "mtu":
            return TFC_MTU
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            child.fail("tfc_padding", 'must be a number of bytes (0-65535) or "mtu"')
        return value

    def replay_window(self, child: _Table) -> int:
        """swanctl's replay_window on a child; absent: the data plane's ([worker])."""
        value = child.integer("replay_window", 0)
        if "replay_window" in child and not 1 <= value <= MAX_REPLAY_WINDOW:
            child.fail("replay_window", f"must be between 1 and {MAX_REPLAY_WINDOW} (packets; "
                                        "anti-replay cannot be turned off)")
        return value

    def keyingtries(self, conn: _Table) -> int:
        """swanctl's keyingtries: attempts in a row before giving up; 0: never."""
        value = conn.integer("keyingtries", 0)
        if not 0 <= value < 1 << 31:
            conn.fail("keyingtries", "must be 0 (never give up) or more")
        return value


    def trust(self, remote: _Table) -> tuple[tuple[x509.Certificate, ...],
                                             tuple[x509.CertificateRevocationList, ...],
                                             tuple[str, ...]]:
        """The CAs a peer's certificate must chain to, and the CRLs (files, and URIs
        fetched at run time by runtime/crl_fetch.py)."""
        paths = remote.strings("cacerts", required=True)
        if not paths:
            remote.fail("cacerts", "needs at least one CA certificate file")
        cacerts: list[x509.Certificate] = []
        for index, text in enumerate(paths):
            cacerts.extend(self.certificates(remote, f"cacerts[{index}]", text))
        crls, uris = [], []
        for index, text in enumerate(remote.strings("crls")):
            if text.partition("://")[0].lower() in ("http", "https"):
                uris.append(text)
            else:
                crls.append(self.crl(remote, f"crls[{index}]", text))
        return tuple(cacerts), tuple(crls), tuple(uris)

    def eap_remote(self, conn: _Table, remote: _Table,
                   method: Literal["eap-mschapv2", "eap-tls", "eap-radius"]) -> RemoteAuth:
        """EAP users (RFC 7296 2.16): EAP-MSCHAPv2 against our [secrets.eap-NAME],
        EAP-TLS with a certificate from `cacerts`, or any EAP method through the
        [radius] servers; we authenticate with a certificate (EAP-TLS's server one)."""
        local = conn.raw("local")
        if not isinstance(local, dict) or local.get("auth", "pubkey") != "pubkey":
            conn.fail("local", 'EAP peers need the gateway to authenticate with a certificate '
                               '(auth = "pubkey")')
        if method == "eap-tls":
            cacerts, crls, uris = self.trust(remote)
        else:
            _only_for_pubkey(remote)
            cacerts, crls, uris = (), (), ()
        patterns = []
        for name, default in (("id", "%any"), ("eap_id", "%any")):
            try:
                patterns.append(parse_identity_pattern(remote.string(name, default)))
            except ValueError as exc:
                remote.fail(name, str(exc))
        groups = remote.strings("groups")
        if any(not group for group in groups):
            remote.fail("groups", "a group name is empty")
        return RemoteAuth(method=method, identity=patterns[0], eap_id=patterns[1],
                          cacerts=cacerts, crls=crls, crl_uris=uris, groups=tuple(groups),
                          revocation=remote.choice("revocation", REVOCATION))

    def crl(self, table: _Table, name: str, text: str) -> x509.CertificateRevocationList:
        """A CRL file, PEM or DER (strongSwan's x509crl directory holds either)."""
        data = self.read_file(table, name, text)
        try:
            if b"-----BEGIN" in data:
                return x509.load_pem_x509_crl(data)
            return x509.load_der_x509_crl(data)
        except ValueError as exc:
            table.fail(name, f"{text!r} holds no valid CRL: {exc}")

    def auth_method(self, table: _Table) -> Literal["psk", "pubkey"]:
        # swanctl's default is pubkey
        method = table.string("auth", "pubkey")
        if method == "psk":
            return "psk"
        if method == "pubkey":
            return "pubkey"
        table.fail("auth", f"{method!r} is not supported (use \"psk\" or \"pubkey\")")

    def identity(self, table: _Table, name: str, text: str) -> Identity:
        try:
            return parse_identity(text)
        except ValueError as exc:
            table.fail(name, str(exc))

    def read_file(self, table: _Table, name: str, text: str) -> bytes:
        try:
            return self.resolve(text).read_bytes()
        except OSError as exc:
            table.fail(name, f"cannot read {text!r}: {exc.strerror or exc}")

    def certificates(self, table: _Table, name: str, text: str) -> list[x509.Certificate]:
        """All certificates in a PEM file (a chain, leaf first) or the one in a DER file."""
        data = self.read_file(table, name, text)
        try:
            if b"-----BEGIN" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
            for cert in certs:
                decode_certificate_fields(cert)
        except (ValueError, ParseError) as exc:
            table.fail(name, f"{text!r} holds no valid certificate: {exc}")
        return certs

    def private_key(self, table: _Table, name: str, text: str) -> PrivateKey:
        data = self.read_file(table, name, text)
        try:
            if b"-----BEGIN" in data:
                key = serialization.load_pem_private_key(data, password=None)
            else:
                key = serialization.load_der_private_key(data, password=None)
        except TypeError:
            table.fail(name, f"{text!r} is encrypted; only unencrypted keys are supported")
        except (ValueError, binascii.Error) as exc:
            table.fail(name, f"{text!r} holds no valid private key: {exc}")
        if not isinstance(
            key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        ):
            table.fail(name, f"{text!r}: only RSA, ECDSA and Ed25519 keys are supported")
        return key

    # --- children -------------------------------------------------------------

    def vips(self, conn: _Table) -> tuple[int, ...]:
        """swanctl's vips, as the families to ask an address of: "0.0.0.0" and/or "::"."""
        families: list[int] = []
        for index, text in enumerate(conn.strings("vips")):
            if text not in ("0.0.0.0", "::"):
                conn.fail(f"vips[{index}]", f'{text!r}: only "0.0.0.0" and "::" (any address '
                                            "of that version) can be asked for")
            family = 4 if text == "0.0.0.0" else 6
            if family not in families:
                families.append(family)
        return tuple(families)

    def reauth_time(self, conn: _Table) -> float:
        seconds = self.duration(conn, "reauth_time", 0.0)
        if seconds and not 1 <= seconds < 2**32:  # RFC 4478: whole seconds, 32 bits
            conn.fail("reauth_time", "between a second and 136 years (0: never)")
        return seconds

    def unique(self, conn: _Table) -> Literal["no", "never", "replace", "keep"]:
        return conn.choice("unique", UNIQUE_POLICIES)

    def connection_pools(self, conn: _Table, pools: dict[str, AddressPool],
                         remote: RemoteAuth) -> tuple[AddressPool, ...]:
        names = conn.strings("pools")
        pools = dict(pools)
        for index, name in enumerate(names):
            if name == FramedPool.NAME:  # strongSwan's: the address the server assigns
                if remote.method != "eap-radius":
                    conn.fail(f"pools[{index}]", '"radius" (the RADIUS server\'s '
                              'Framed-IP-Address) needs remote auth = "eap-radius"')
                pools[name] = self.framed_pool
            elif name not in pools:
                known = ", ".join(sorted(pools)) or "none defined"
                conn.fail(f"pools[{index}]", f"no pool {name!r} ([pools.NAME]: {known})")
        return tuple(pools[name] for name in names)

    def pool(self, name: str, key: str, value: object) -> AddressPool:
        """`[pools.NAME]`: swanctl's pools (`addrs`: a subnet, a range or one address)."""
        table = self.table(key, value, ("addrs", "dns"))
        if name == FramedPool.NAME:
            self.fail(key, '"radius" names the addresses a RADIUS server assigns; '
                           "choose another name")
        addrs = table.required_string("addrs")
        dns = table.strings("dns")
        for index, text in enumerate(dns):
            try:
                ipaddress.ip_address(text)
            except ValueError:
                table.fail(f"dns[{index}]", f"{text!r} is not an IP address")
        try:
            return AddressPool.parse(name, addrs, dns)
        except ValueError as exc:
            table.fail("addrs", f"{addrs!r}: {exc} (a subnet, a range a-b or one address)")

    def child(self, name: str, key: str, value: object, legacy: bool) -> ChildConfig:
        child = self.table(
            key, value, ("mode", "local_ts", "remote_ts", "esp_proposals", "start_action",
                         "rekey_time", "life_time", "rand_time", "dpd_action", "updown",
                         "inactivity", "copy_dscp", "copy_ecn", "rekey_bytes", "life_bytes",
                         "rekey_packets", "life_packets", "rand_bytes", "rand_packets",
                         "close_action", "replay_window", "hostaccess", "tfc_padding",
                         "sha256_96")
        )
        mode = child.string("mode", "tunnel")
        if mode not in ("tunnel", "transport"):
            child.fail("mode", f"{mode!r} is not supported (use \"tunnel\" or \"transport\")")
        start_action = child.choice("start_action", START_ACTIONS)
        close_action = child.choice("close_action", START_ACTIONS)
        if close_action == "trap" and start_action != "trap":
            child.fail("close_action", '"trap" only with start_action = "trap" (its trap '
                                       "brings the Child SA back on the next packet)")
        return ChildConfig(
            name=name,
            mode="tunnel" if mode == "tunnel" else "transport",
            local_ts=self.traffic_selectors(child, "local_ts"),
            remote_ts=self.traffic_selectors(child, "remote_ts"),
            esp_proposals=self.proposals(
                child, "esp_proposals", DEFAULT_ESP_PROPOSALS, ProtocolId.ESP, legacy
            ),
            start_action=start_action,
            close_action=close_action,
            lifetime=self.lifetime(child, CHILD_REKEY_TIME),
            dpd_action=child.optional_string("dpd_action"),
            updown=self.updown(child),
            hostaccess=child.boolean("hostaccess", False),
            inactivity=self.inactivity(child),
            copy_dscp=self.copy_dscp(child),
            copy_ecn=child.boolean("copy_ecn", True),
            sha256_96=child.boolean("sha256_96", False),
            replay_window=self.replay_window(child),
            tfc_padding=self.tfc_padding(child),
            volume=self.volume_limits(child),
        )

    def volume_limits(self, child: _Table) -> VolumeLimits:
        rekey_bytes, life_bytes, rand_bytes = self.volume(child, "bytes")
        rekey_packets, life_packets, rand_packets = self.volume(child, "packets")
        return VolumeLimits(rekey_bytes, life_bytes, rekey_packets, life_packets,
                            rand_bytes, rand_packets)

    def volume(self, child: _Table, unit: str) -> tuple[int, int, int]:
        """swanctl's rekey_<unit>, life_<unit> (0: none) and rand_<unit>; life defaults
        to 110 % of rekey, rand to life minus rekey, as in swanctl."""
        rekey_key, life_key, rand_key = f"rekey_{unit}", f"life_{unit}", f"rand_{unit}"
        rekey, life = child.integer(rekey_key, 0), child.integer(life_key, 0)
        rand = child.integer(rand_key, 0)
        for key, value in ((rekey_key, rekey), (life_key, life), (rand_key, rand)):
            if not 0 <= value < 1 << 63:
                child.fail(key, "must be between 0 (none) and 2^63")
        if rekey and life_key not in child:
            life = rekey + rekey // 10
        if rekey and life and life <= rekey:
            child.fail(life_key, f"must be above {rekey_key} ({rekey}), or 0 for none")
        if not rekey:
            return rekey, life, 0  # nothing to take a random part off
        if rand_key not in child:
            rand = min(max(0, life - rekey), rekey - 1)
        elif rand >= rekey:
            child.fail(rand_key, f"must be below {rekey_key} ({rekey})")
        return rekey, life, rand

    def copy_dscp(self, child: _Table) -> bool:
        """swanctl's copy_dscp, the outward half: "out" (the default) or "no"."""
        value = child.string("copy_dscp", "out")
        if value in ("in", "yes"):
            child.fail("copy_dscp", f'{value!r} is not supported: the outer DSCP is not '
                                    'copied into received packets (use "out" or "no")')
        if value not in ("out", "no"):
            child.fail("copy_dscp", f'{value!r} is not one of "out", "no"')
        return value == "out"

    def inactivity(self, child: _Table) -> float:
        seconds = self.duration(child, "inactivity", 0.0)
        if seconds and not 1.0 <= seconds < 1 << 32:
            child.fail("inactivity", "between a second and 136 years (0: never)")
        return seconds

    def updown(self, child: _Table) -> str | None:
        """A shell command line whose program exists and may be run (as swanctl's updown,
        e.g. "/usr/local/sbin/vpn-updown iptables")."""
        command = child.optional_string("updown")
        if command is None:
            return None
        try:
            words = shlex.split(command)
        except ValueError as exc:
            child.fail("updown", f"{command!r}: {exc}")
        if not words:
            child.fail("updown", "an empty command")
        if "/" in words[0] and not words[0].startswith("/"):
            child.fail("updown", f"{words[0]!r}: give the program's absolute path (or a "
                       "name found in PATH)")
        program = shutil.which(words[0])
        if program is None:
            child.fail("updown", f"{words[0]!r} is not an executable file"
                       + ("" if "/" in words[0] else " in PATH"))
        return command

    def traffic_selectors(self, child: _Table, name: str) -> tuple[TsConfig, ...]:
        texts = child.strings(name, ("dynamic",))
        if not texts:
            child.fail(name, 'needs at least one traffic selector (or "dynamic")')
        result: list[TsConfig] = []
        for index, text in enumerate(texts):
            try:
                result.append(parse_ts_config(text))
            except ValueError as exc:
                child.fail(f"{name}[{index}]", str(exc))
        return tuple(result)

    # --- secrets --------------------------------------------------------------

    def secret(self, key: str, value: object) -> SharedSecret:
        entry = self.table(key, value, ("ids", "secret", "secret_env", "secret_file"))
        # swanctl's naming: secrets.eap-NAME are EAP passwords, secrets.ppk-NAME
        # post-quantum preshared keys (RFC 8784, ids are their PPK_IDs), any other an IKE PSK
        kind: Literal["ike", "eap", "ppk"] = "ike"
        if key.startswith("secrets.eap-"):
            kind = "eap"
        elif key.startswith("secrets.ppk-"):
            kind = "ppk"
        id_texts = entry.strings("ids", required=True)
        if not id_texts:
            entry.fail("ids", "needs at least one identity (\"%any\" matches every peer)")
        ids: list[IdentityPattern] = []
        for index, text in enumerate(id_texts):
            try:
                ids.append(parse_identity_pattern(text))
            except ValueError as exc:
                entry.fail(f"ids[{index}]", str(exc))
        name, text = self.secret_text(entry)
        if kind == "eap" and all(p.any for p in ids):
            entry.fail("ids", "an EAP secret needs the user's identity, not only %any")
        if kind == "ppk" and any(p.any for p in ids):
            entry.fail("ids", "a PPK is named by its PPK_IDs; %any names none")
        secret = _decode_secret(entry, name, text)
        if kind == "eap":
            try:  # MS-CHAPv2 hashes the password as text (UTF-16)
                secret.decode("utf-8")
            except UnicodeDecodeError:
                entry.fail(name, "an EAP password must be UTF-8 text")
        return SharedSecret(ids=tuple(ids), secret=secret, kind=kind)

    def secret_text(self, entry: _Table) -> tuple[str, str]:
        """The key that gave the secret (`secret`, `secret_env` or `secret_file`) and its text."""
        given = [name for name in ("secret", "secret_env", "secret_file") if name in entry]
        if len(given) != 1:
            entry.fail(
                given[1] if given else "secret",
                "give exactly one of secret, secret_env, secret_file",
            )
        name = given[0]
        # Values read here are secret: error messages name where they came from, never them.
        if name == "secret":
            text = entry.required_string("secret")
        elif name == "secret_env":
            variable = entry.required_string("secret_env")
            env_value = os.environ.get(variable)
            if env_value is None:
                entry.fail(name, f"environment variable {variable!r} is not set")
            text = env_value
        else:
            path_text = entry.required_string("secret_file")
            try:
                text = self.read_file(entry, name, path_text).decode("utf-8")
            except UnicodeDecodeError:
                entry.fail(
                    name, f"{path_text!r} is not UTF-8 text (write binary secrets as 0x<hex>)"
                )
            # `echo secret > file` leaves a line break that is not part of the secret
            text = text.rstrip("\r\n")
        return name, text

    def radius(self, root: _Table) -> RadiusSettings:
        """[radius]: the servers eap-radius connections relay EAP to (strongSwan's
        charon.plugins.eap-radius), tried in the order written."""
        table = root.table("radius", ("servers", "nas_identifier", "retransmit_timeout",
                                      "retransmit_base", "retransmit_tries", "accounting",
                                      "accounting_interval", "dae"))
        servers = []
        for name, value in table.named_tables("servers").items():
            key = _join("radius.servers", name)
            entry = self.table(key, value, ("address", "auth_port", "acct_port", "secret",
                                            "secret_env", "secret_file"))
            address = entry.required_string("address")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                entry.fail("address", f"{address!r} is not an IP address")
            secret_name, text = self.secret_text(entry)
            servers.append(RadiusServer(name, address, entry.port("auth_port", 1812),
                                        _decode_secret(entry, secret_name, text),
                                        entry.port("acct_port", 1813)))
        if not servers:
            table.fail("servers", "needs at least one [radius.servers.NAME]")
        nas_identifier = table.string("nas_identifier", "ike-cluster")
        if not 0 < len(nas_identifier.encode()) <= 253:
            table.fail("nas_identifier", "must be 1 to 253 bytes")
        timeout, base, tries = self.retransmit_keys(table, 2.0, 1.4, 4, min_tries=1)
        interval = self.duration(table, "accounting_interval", 0.0)
        if interval and not 60 <= interval <= 86400:
            table.fail("accounting_interval", "0 (none), or from a minute to a day")
        return RadiusSettings(tuple(servers), nas_identifier, timeout, base, tries,
                              table.boolean("accounting", False), interval,
                              self.dae(table) if "dae" in table else None)

    def dae(self, radius: _Table) -> DaeSettings:
        """[radius.dae]: RFC 5176 Disconnect-Requests (strongSwan's eap-radius dae)."""
        table = radius.table("dae", ("listen", "secret", "secret_env", "secret_file"))
        host, port = _parse_listen(table.required_string("listen"),
                                   lambda reason: table.fail("listen", reason), DAE_PORT)
        name, text = self.secret_text(table)
        return DaeSettings(host, port, _decode_secret(table, name, text))

    def check_radius(self, policy: ResponderPolicy) -> None:
        for conn in policy.connections:
            if conn.remote.method == "eap-radius" and policy.radius is None:
                self.fail(_join(_join(_join("connections", conn.name), "remote"), "auth"),
                          '"eap-radius" needs a [radius] table with its servers')

    def check_ppks(self, policy: ResponderPolicy) -> None:
        """A connection that names or needs a PPK must have one to use."""
        for conn in policy.connections:
            key = _join("connections", conn.name)
            if conn.ppk_id is not None and policy.find_ppk(conn.ppk_id) is None:
                self.fail(_join(key, "ppk_id"),
                          "no [secrets.ppk-NAME] entry has this PPK_ID in its ids")
            if conn.ppk_required and not policy.has_ppk:
                self.fail(_join(key, "ppk_required"),
                          "a PPK is required, but no [secrets.ppk-NAME] entry gives one")

    def check_psk_secrets(self, policy: ResponderPolicy, addresses: tuple[str, ...]) -> None:
        """A psk connection without a secret it could ever use is a mistake, not a warning."""
        for conn in policy.connections:
            if "psk" not in (conn.local.method, conn.remote.method):
                continue
            if conn.local.identity is not None:
                local_ids: tuple[Identity, ...] = (conn.local.identity,)
            else:  # our id defaults to our address, as in strongSwan
                local_ids = tuple(
                    parse_identity(a) for a in conn.local_addrs or addresses if "/" not in a
                )
            if not any(
                _secret_may_serve(entry, local_ids, conn.remote.identity)
                for entry in policy.secrets if entry.kind == "ike"
            ):
                side = "local" if conn.local.method == "psk" else "remote"
                self.fail(
                    _join(_join("connections", conn.name), side),
                    "psk authentication, but no [secrets] entry has ids that match "
                    "this connection's local or remote id",
                )


def _only_for_pubkey(remote: _Table) -> None:
    """A peer without a certificate needs no CAs or CRLs to check it with."""
    for name in ("cacerts", "crls", "revocation"):
        if name in remote:
            remote.fail(name, 'only used with auth = "pubkey" or "eap-tls"')


def _parse_listen(text: str, fail: Callable[[str], NoReturn],
                  default_port: int = METRICS_PORT) -> tuple[str, int]:
    """"host:port", "[v6]:port", or an address alone (then `default_port`)."""
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or ":" not in host or (rest and not rest.startswith(":")):
            fail(f"{text!r} is not [IPv6 address]:port")
        if rest:
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        fail(f"{text!r}: an IPv6 address goes in brackets, e.g. \"[::1]:{METRICS_PORT}\"")
    else:
        host = text
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        fail(f"{host!r} is not an IPv4 or IPv6 address")
    if port_text is None:
        return address, default_port
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        fail(f"{port_text!r} is not a TCP port (0-65535; 0 picks a free one)")
    return address, int(port_text)


def _hostname_id() -> str:
    """The host name as a node id (containers get unique ones); other characters -> '-'."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()).strip("-_") or "node"


def _secret_may_serve(
    entry: SharedSecret, local_ids: tuple[Identity, ...], remote: IdentityPattern
) -> bool:
    # ResponderPolicy.find_psk uses an entry when one of its ids matches either end. Of
    # the remote end we only know a pattern, so count an entry id that could meet it.
    for pattern in entry.ids:
        if pattern.any or remote.any:
            return True
        if any(pattern.matches(identity) for identity in local_ids):
            return True
        if remote.identity is not None and pattern.matches(remote.identity):
            return True
        if pattern.identity is not None and remote.matches(pattern.identity):
            return True
    return False


def _decode_secret(entry: _Table, name: str, text: str) -> bytes:
    """strongSwan's secret syntax: `0x` hex, `0s` base64, anything else the UTF-8 text."""
    prefix = text[:2].lower()
    try:
        if prefix == "0x":
            secret = bytes.fromhex(text[2:])
        elif prefix == "0s":
            secret = base64.b64decode(text[2:], validate=True)
        else:
            secret = text.encode("utf-8")
    except (ValueError, binascii.Error):
        encoding = "hex" if prefix == "0x" else "base64"
        entry.fail(name, f"the secret after its {prefix!r} prefix is not valid {encoding}")
    if not secret:
        entry.fail(name, "the secret is empty")
    return secret


def _spki(key: object) -> bytes:
    assert isinstance(
        key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    )
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class _Table:
    """One TOML table and its dotted key; typed getters that fail with that key."""

    def __init__(
        self, loader: _Loader, key: str, data: dict[str, Any], allowed: tuple[str, ...]
    ) -> None:
        self.loader = loader
        self.key = key
        self.data = data
        for name in data:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(name, f"unknown key{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def fail(self, name: str, reason: str) -> NoReturn:
        self.loader.fail(_join(self.key, name), reason)

    def raw(self, name: str) -> object:
        """The value as TOML gave it, or None if absent."""
        return self._get(name, False)

    def _get(self, name: str, required: bool) -> object:
        if name not in self.data:
            if required:
                self.fail(name, "missing (required)")
            return None
        return self.data[name]

    def table(self, name: str, allowed: Iterable[str], *, required: bool = False) -> _Table:
        value = self._get(name, required)
        if value is None:
            return _Table(self.loader, _join(self.key, name), {}, ())
        return self.loader.table(_join(self.key, name), value, allowed)

    def raw_table(self, name: str) -> dict[str, Any]:
        """A table whose keys a later issue will check; only its type is checked now."""
        value = self._get(name, True)
        if not isinstance(value, dict):
            self.fail(name, f"expected a table, got {_type_name(value)}")
        return value

    def named_tables(self, name: str) -> dict[str, object]:
        """`[NAME.x]`, `[NAME.y]`...: sub-tables keyed by a name the operator chose."""
        value = self._get(name, False)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(name, f"expected a table, got {_type_name(value)}")
        for sub in value:
            if not _NAME.fullmatch(sub):
                self.loader.fail(
                    _join(_join(self.key, name), sub),
                    "names may only contain letters, digits, '_' and '-'",
                )
        return dict(value)

    def string(self, name: str, default: str) -> str:
        value = self.optional_string(name)
        return default if value is None else value

    def choice(self, name: str, choices: tuple[_Choice, ...], default: _Choice | None = None,
               *, aliases: Mapping[str, _Choice] | None = None) -> _Choice:
        """One of `choices` (the first unless `default`), or one of `aliases` taken as
        the choice it maps to; anything else stops start-up naming them."""
        value = self.string(name, default or choices[0])
        for allowed in choices:
            if value == allowed:
                return allowed
        if aliases and value in aliases:
            return aliases[value]
        names = ", ".join(f'"{c}"' for c in (*choices, *(aliases or ())))
        self.fail(name, f"{value!r} is not one of {names}")

    def required_string(self, name: str) -> str:
        self._get(name, True)
        value = self.optional_string(name)
        assert value is not None
        return value

    def optional_string(self, name: str) -> str | None:
        value = self._get(name, False)
        if value is not None and not isinstance(value, str):
            self.fail(name, f"expected a string, got {_type_name(value)}")
        return value

    def strings(
        self, name: str, default: tuple[str, ...] = (), *, required: bool = False
    ) -> tuple[str, ...]:
        value = self._get(name, required)
        if value is None:
            return default
        if not isinstance(value, list):
            self.fail(name, f"expected an array of strings, got {_type_name(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{name}[{index}]", f"expected a string, got {_type_name(item)}")
        return tuple(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, f"expected true or false, got {_type_name(value)}")
        return value

    def integer(self, name: str, default: int) -> int:
        value = self._get(name, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"expected an integer, got {_type_name(value)}")
        return value

    def number(self, name: str, default: float) -> float:
        value = self._get(name, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, f"expected a number, got {_type_name(value)}")
        return float(value)

    def port(self, name: str, default: int) -> int:
        value = self.integer(name, default)
        if not 0 <= value <= 65535:
            self.fail(name, f"{value} is not a UDP port (0-65535; 0 picks a free one)")
        return value
