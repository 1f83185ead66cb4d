"""The `ike-cluster` command: `check-config PATH`, `run`/`responder`/`worker --config PATH`,
`keygen`, and the operations commands `sas` and `nodes`.

Exit status: 0 on success or graceful shutdown, 1 when the node fails at run time
(for example an address it cannot bind), 2 for bad configuration or usage, 130 when
interrupted before the node took over SIGINT.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, TextIO, TypeVar

from . import __version__
from .config import LOG_LEVELS, NodeConfig, load_config
from .errors import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # argparse uses 2 for usage errors too
EXIT_INTERRUPTED = 130
E = TypeVar("E", bound=BaseException)
# The cyclic garbage collector's thresholds for a running node (CPython's are 700, 10,
# 10). A node holds many long-lived objects per SA and makes many short-lived ones
# per datagram; with the defaults the collector rescanned the long-lived ones so often
# that it cost about 15 % of the responder's CPU per IKE SA (benchmarks/ike_setup_rate.py,
# 3000 SAs: 0.65 -> 0.55 ms). Cycles are still collected, later and in bigger batches.
GC_THRESHOLDS = (50_000, 50, 100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ike-cluster", description="A horizontally scalable IKEv2 responder."
    )
    parser.add_argument("--version", action="version", version=f"ike-cluster {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check-config", help="check a configuration file and exit")
    check.add_argument("path", metavar="PATH")

    for name, text in (
        ("run", "run a single node: responder and data plane in one process"),
        ("responder", "run a cluster responder (IKE behind the relay, state in the store)"),
        ("worker", "run a cluster worker (public addresses, relay, ESP through TUN)"),
    ):
        role = commands.add_parser(name, help=text)
        role.add_argument("--config", required=True, metavar="PATH", help="the node's TOML file")
        role.add_argument(
            "--log-level", choices=LOG_LEVELS, help="overrides [node] log_level from the file"
        )
    commands.add_parser("keygen", help="print a new cluster key (for [cluster] key)")

    for name, text in (("sas", "list the cluster's IKE and Child SAs from the shared store"),
                       ("nodes", "list the cluster's live members from the shared store")):
        ops = commands.add_parser(name, help=text)
        ops.add_argument("--config", required=True, metavar="PATH",
                         help="a node's TOML file ([cluster] store)")
        ops.add_argument("--json", action="store_true", help="JSON instead of text")
    reload = commands.add_parser(
        "reload", help="make the running node with this file's id reload it (as SIGHUP)")
    reload.add_argument("--config", required=True, metavar="PATH", help="the node's TOML file")
    redirect = commands.add_parser(
        "redirect", help="send peers to another gateway (RFC 5685)")
    redirect.add_argument("--config", required=True, metavar="PATH", help="the node's TOML file")
    where = redirect.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="GATEWAY", help="an IP address or a DNS name")
    where.add_argument("--stop", action="store_true", help="answer new IKE SAs again")
    redirect.add_argument("--existing", action="store_true",
                          help="also ask the established IKE SAs to move there")
    terminate = _sa_command(commands, "terminate",
                            "delete IKE SAs, or Child SAs of them (with a Delete to the peer)",
                            "how long to wait for the SAs to go (10)")
    terminate.add_argument("--child", metavar="NAME",
                           help="delete the Child SAs of this child instead (their IKE SAs "
                                "stay)")
    rekey = _sa_command(commands, "rekey",
                        "give IKE SAs, or Child SAs of them, new keys (swanctl --rekey)",
                        "how long to wait for the new SAs (10)")
    rekey.add_argument("--child", metavar="NAME",
                       help="rekey the Child SAs of this child instead of the IKE SAs")
    initiate = commands.add_parser(
        "initiate", help="bring up a Child SA with its connection's peer (swanctl --initiate)")
    initiate.add_argument("--config", required=True, metavar="PATH",
                          help="the single node's TOML file (its id names the node)")
    initiate.add_argument("--child", required=True, metavar="NAME",
                          help="the child to bring up (its connection's remote_addrs is "
                               "the peer)")
    initiate.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                          help="how long to wait for it (10)")
    return parser


def _sa_command(commands: Any, name: str, what: str, wait: str) -> argparse.ArgumentParser:
    """A command that acts on the IKE SAs `--ike` or `--id` name (`terminate`, `rekey`)."""
    command: argparse.ArgumentParser = commands.add_parser(name, help=what)
    command.add_argument("--config", required=True, metavar="PATH",
                         help="a node's TOML file (its [cluster] store, or a single node's id)")
    which = command.add_mutually_exclusive_group(required=True)
    which.add_argument("--ike", metavar="SPI",
                       help="the IKE SA with this SPI, or both (SPI_I/SPI_R) as `sas` shows")
    which.add_argument("--id", metavar="IDENTITY",
                       help="every IKE SA whose remote identity or EAP user this is")
    command.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help=wait)
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.path)
        if args.command in ("sas", "nodes"):
            from . import ops  # the store client only for the commands that read it

            command = ops.sas_command if args.command == "sas" else ops.nodes_command
            return command(args.config, args.json)
        if args.command == "reload":
            from . import ops

            return ops.reload_command(args.config)
        if args.command == "redirect":
            from . import ops

            return ops.redirect_command(args.config, "" if args.stop else args.to,
                                        args.existing)
        if args.command == "terminate":
            from . import ops

            return ops.terminate_command(args.config, ike=args.ike, identity=args.id,
                                         child=args.child, timeout=args.timeout)
        if args.command == "initiate":
            from . import ops

            return ops.initiate_command(args.config, args.child, args.timeout)
        if args.command == "rekey":
            from . import ops

            return ops.rekey_command(args.config, ike=args.ike, identity=args.id,
                                     child=args.child, timeout=args.timeout)
        if args.command == "keygen":
            from .store import ClusterKey

            sys.stdout.write(ClusterKey.generate().to_text())
            return EXIT_OK
        return run(args.config, args.log_level, args.command)
    except KeyboardInterrupt:  # Ctrl-C before the node handles signals: no traceback
        return EXIT_INTERRUPTED


def _load(path: str) -> NodeConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def check_config(path: str) -> int:
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    print(f"{path}: OK ({len(config.policy.connections)} connections)")
    return EXIT_OK


class LineFormatter(logging.Formatter):
    """LOG_FORMAT, with the date and time formatted once per second instead of once per
    line (each costs a localtime(), which may stat /etc/localtime; a line per SA is on
    the setup path)."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"  # logging's default_msec_format


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """`warnings.showwarning` for the node: one line of the logger "py.warnings"."""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message,
                                             filename, lineno)


def configure_logging(level: str) -> None:
    """Log lines to stderr; the node is meant to run under a supervisor that keeps them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library warnings (e.g. cryptography's about an odd name in a peer's certificate)
    # become log lines instead of bare two-line text on stderr.
    warnings.showwarning = _log_warning
    # The format uses none of these; skipping them makes each record cheaper (the
    # logging HOWTO's "Optimization" section). A line per SA is on the setup path.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None


def tune_gc() -> None:
    """Leave what start-up built (modules, configuration) out of every collection and
    collect the rest less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(config_path: str, log_level: str | None = None, role: str = "run") -> int:
    config = _load(config_path)
    if config is None:
        return EXIT_CONFIG

    # Imported here so check-config works without the runtime (and its start-up cost).
    import trio

    from . import roles
    from .single_node import single_node

    if role != "run":
        try:
            roles.cluster_settings(config)  # the key is read before anything starts
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return EXIT_CONFIG
    configure_logging(log_level or config.log_level)
    main_task = {"run": single_node, "responder": roles.run_responder,
                 "worker": roles.run_worker}[role]
    status = EXIT_OK
    tune_gc()
    try:
        trio.run(main_task, config)
    except* ConfigError as group:
        for error in _leaves(group):
            print(error, file=sys.stderr)
        status = EXIT_CONFIG
    except* KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except* OSError as group:
        # Bind failures and the like: one line each, not a traceback.
        for failure in _leaves(group):
            logging.getLogger("cluster").error("%s", failure)
        status = EXIT_FAILURE
    return status


def _leaves(group: BaseExceptionGroup[E]) -> list[E]:
    leaves: list[E] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves
