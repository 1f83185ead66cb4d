"""Routes into the TUN for Child SAs, and the policy rule that keeps our own ESP out of it.

Every route goes into one table of the worker's own (default 1450), consulted by
a rule for everything that does not carry the worker's firewall mark::

    1450:   not from all fwmark 0x1c5 lookup 1450      (IPv4 and IPv6)

- tunnel mode: the remote traffic selectors, e.g. 10.99.1.0/24, with a source hint
  (10.99.2.1) so locally originated packets leave with the inner address;
- transport mode: the peer's outer address as a host route, source hint the local
  outer address.

The ESP the worker sends (raw protocol 50, or UDP 4500) comes from marked sockets
(`sockets.mark_socket`), skips the table and follows the main table onto the wire
even when the peer's outer address is itself routed into the TUN: in transport
mode always, in tunnel mode whenever a selector covers the peer (swanctl's
default `dynamic` selectors are the outer addresses). Any other socket that must
reach such a peer in the clear, IKE's UDP 500/4500 above all, needs the mark too.
Keeping tunnel routes out of the main table also means a selector never collides
with the host's own routes there (0.0.0.0/0 against the default route).

Forwarded traffic is unmarked too, so a gateway routes its LAN's packets for a
remote selector into the TUN. Reverse-path filtering must be off or loose (0 or 2)
on the outer interface: the strict check would look the peer up in this table,
find the TUN and drop its ESP.

Routes are reference-counted per network (two Child SAs may carry the same one);
`close` removes every route and rule this object added, also after errors. Give
two workers in one namespace different tables and priorities.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import socket
from types import TracebackType

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .sockets import DEFAULT_MARK

logger = logging.getLogger(__name__)

DEFAULT_TABLE = 1450
DEFAULT_PRIORITY = 1450
FIB_RULE_INVERT = 0x2  # <linux/fib_rules.h>: "not" in `ip rule`
_RESERVED_TABLES = {0, 253, 254, 255}  # unspec, default, main, local
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
# Gone already (the TUN was closed first, taking its routes along).
_ROUTE_GONE = {errno.ESRCH, errno.ENOENT, errno.ENODEV}
_RULE_GONE = {errno.ENOENT, errno.ESRCH}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def _network(text: str) -> Network:
    """Parsed once per prefix: every Child SA of a shared subnet adds and removes it."""
    return ipaddress.ip_network(text, strict=False)


class Routes:
    """The worker's routes into one TUN (by ifindex) and its policy rules.

    Build it with `Routes.open(...)`, use it as a context manager or call `close()`.
    """

    def __init__(self, ipr: IPRoute, ifindex: int, table: int, priority: int, mark: int) -> None:
        self.ifindex = ifindex
        self.table = table
        self.priority = priority
        self.mark = mark
        self._ipr = ipr
        self._families: list[int] = []  # those whose rule is installed
        self._refs: dict[Network, int] = {}
        self._closed = False

    @classmethod
    def open(
        cls,
        ifindex: int,
        *,
        table: int = DEFAULT_TABLE,
        priority: int = DEFAULT_PRIORITY,
        mark: int = DEFAULT_MARK,
    ) -> Routes:
        """Install the "not fwmark `mark` lookup `table`" rules (IPv4 and, where the
        kernel has it, IPv6) at `priority`."""
        if not 0 < table <= 0xFFFFFFFF or table in _RESERVED_TABLES:
            raise ValueError(f"routing table {table} is reserved or out of range")
        if not 0 < priority < 32766:  # 0 is the local table's rule, 32766 main's
            raise ValueError(f"rule priority {priority} must be between 1 and 32765")
        if not 0 < mark <= 0xFFFFFFFF:
            raise ValueError(f"firewall mark {mark:#x} must be a non-zero 32-bit value")
        routes = cls(IPRoute(), ifindex, table, priority, mark)
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                routes._add_rule(family)
        except BaseException:
            routes.close()
            raise
        return routes

    @property
    def networks(self) -> dict[str, int]:
        """Routed networks and how many holders each has."""
        return {str(net): count for net, count in self._refs.items()}

    def add(self, network: str, *, src: str | None = None) -> None:
        """Route `network` (a prefix, or a bare address for a host route) into the TUN.

        `src` is the preferred source for locally originated packets; it must be a
        local address of the same family. Adding a network already routed only
        counts another holder (its first `src` stays).
        """
        net = _network(network)
        if net in self._refs:
            self._refs[net] += 1
            return
        family = _FAMILIES[net.version]
        if family not in self._families:
            raise OSError(errno.EAFNOSUPPORT, f"no IPv{net.version} policy rule for {network}")
        options: dict[str, str] = {}
        if src is not None:
            if ipaddress.ip_address(src).version != net.version:
                raise ValueError(f"source {src} and network {network} differ in family")
            options["prefsrc"] = src
        try:
            # replace, not add: the table is ours, and a route with the same key
            # can only be a leftover of an earlier run.
            self._ipr.route(
                "replace", family=family, dst=str(net), oif=self.ifindex,
                table=self.table, **options,
            )
        except NetlinkError as exc:
            raise OSError(exc.code, f"cannot route {network} into the TUN: {exc}") from None
        self._refs[net] = 1
        logger.debug("route %s into ifindex %d table %d", net, self.ifindex, self.table)

    def remove(self, network: str) -> None:
        """Drop one holder of `network`; the route goes with the last. KeyError if unknown."""
        net = _network(network)
        count = self._refs[net]
        if count > 1:
            self._refs[net] = count - 1
            return
        del self._refs[net]
        self._delete_route(net)

    def close(self) -> None:
        """Remove every route and rule this object added. Idempotent.

        Raises the first unexpected netlink failure after trying all of them.
        """
        if self._closed:
            return
        self._closed = True
        failures: list[OSError] = []
        for net in list(self._refs):
            del self._refs[net]
            try:
                self._delete_route(net)
            except OSError as exc:
                failures.append(exc)
        for family in list(self._families):
            try:
                self._ipr.rule("del", **self._rule_spec(family))
            except NetlinkError as exc:
                if exc.code not in _RULE_GONE:
                    failures.append(OSError(exc.code, f"cannot delete rule: {exc}"))
            self._families.remove(family)
        self._ipr.close()
        if failures:
            raise failures[0]

    def __enter__(self) -> Routes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _rule_spec(self, family: int) -> dict[str, int]:
        return {
            "family": family,
            "priority": self.priority,
            "table": self.table,
            "fwmark": self.mark,
            "fwmask": 0xFFFFFFFF,
            "flags": FIB_RULE_INVERT,
        }

    def _add_rule(self, family: int) -> None:
        try:
            self._ipr.rule("add", **self._rule_spec(family))
        except NetlinkError as exc:
            if exc.code == errno.EAFNOSUPPORT and family == socket.AF_INET6:
                logger.warning("IPv6 is disabled: only IPv4 networks can be routed to the TUN")
                return
            if exc.code != errno.EEXIST:
                raise OSError(exc.code, f"cannot add policy rule: {exc}") from None
            # An identical rule survives a crashed run (rules outlive the TUN):
            # adopt it, so it goes away with this object.
            logger.warning("adopting an existing rule: priority %d table %d", self.priority,
                           self.table)
        self._families.append(family)

    def _delete_route(self, net: Network) -> None:
        try:
            self._ipr.route(
                "del", family=_FAMILIES[net.version], dst=str(net), oif=self.ifindex,
                table=self.table,
            )
        except NetlinkError as exc:
            if exc.code not in _ROUTE_GONE:
                raise OSError(exc.code, f"cannot delete route {net}: {exc}") from None
