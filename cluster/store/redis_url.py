"""Redis URLs to redis-py clients: what redis-py parses itself, plus Sentinel.

    redis://[[user]:password@]host[:port][/db][?option=value...]   (redis-py's own forms,
    rediss://...   TLS; options such as ssl_ca_certs=PATH              including unix://)
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?...]
    rediss+sentinel://...   TLS to the sentinels and the master

redis-py has no URL scheme for Sentinel. In ours the credentials are the master's; the
sentinels' own come from `sentinel_username`/`sentinel_password` query options.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..errors import ConfigError

SENTINEL_PORT = 26379
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # -> TLS

_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_SENTINEL_OPTIONS: dict[str, Any] = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_cert_reqs": str,
    "ssl_check_hostname": lambda text: _BOOLEANS[text.lower()],
    "sentinel_username": str,
    "sentinel_password": str,
}


def client_from_url(url: str, *, socket_timeout: float = 2.0,
                    socket_connect_timeout: float = 1.0, retries: int = 1) -> redis.Redis:
    """A redis-py client; options in the URL override the keyword defaults.

    A few quick retries reconnect through a restarted server; many slow ones would hold a
    caller for seconds during an outage, so the defaults are small.
    """
    defaults: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries),
    }
    scheme = url.partition("://")[0].lower()
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_client(url, SENTINEL_SCHEMES[scheme], defaults)
    if scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(f"Redis URL scheme {scheme!r} is not one of redis, rediss, unix, "
                          "redis+sentinel, rediss+sentinel")
    try:
        return redis.Redis.from_url(url, decode_responses=False, **defaults)
    except ValueError as exc:
        raise ConfigError(f"Redis URL: {exc}") from None


def parse_sentinel_url(url: str) -> dict[str, Any]:
    """The parts of a Sentinel URL: hosts, service, db, username, password, tls, options."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        raise ConfigError(f"not a Sentinel URL (scheme {scheme!r})")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise ConfigError("Sentinel URL: write ':password@' (or 'user:password@')")
        username, password = unquote(user) or None, unquote(secret)
    hosts = [_host_port(item) for item in hostlist.split(",")]
    parts = [unquote(p) for p in path.split("/")] if path else []
    if not parts or not parts[0] or len(parts) > 2:
        raise ConfigError("Sentinel URL: the path must be /service_name or /service_name/db")
    db = 0
    if len(parts) == 2 and parts[1]:
        if not parts[1].isdigit():
            raise ConfigError(f"Sentinel URL: database {parts[1]!r} is not a number")
        db = int(parts[1])
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        parser = _SENTINEL_OPTIONS.get(name)
        if parser is None:
            raise ConfigError(f"Sentinel URL: unknown option {name!r} (known: "
                              f"{', '.join(sorted(_SENTINEL_OPTIONS))})")
        try:
            options[name] = parser(value)
        except (ValueError, KeyError):
            raise ConfigError(f"Sentinel URL: option {name}={value!r} is invalid") from None
    return {"hosts": hosts, "service": parts[0], "db": db, "username": username,
            "password": password, "tls": SENTINEL_SCHEMES[scheme.lower()], "options": options}


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [v6]:port
        host, _, tail = item[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else tail
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ConfigError(f"Sentinel URL: host {item!r} is empty")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"Sentinel URL: port in {item!r} is not a port number")
    return host, int(port_text)


def _sentinel_client(url: str, tls: bool, defaults: dict[str, Any]) -> redis.Redis:
    parsed = parse_sentinel_url(url)
    options = dict(parsed["options"])
    connection: dict[str, Any] = {**defaults}
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in options:
            connection[name] = options.pop(name)
    sentinel_auth = {"username": options.pop("sentinel_username", None),
                     "password": options.pop("sentinel_password", None)}
    if options and not tls:
        raise ConfigError(f"Sentinel URL: {', '.join(sorted(options))} need rediss+sentinel://")
    tls_options = {"ssl": True, **options} if tls else {}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        parsed["hosts"],
        sentinel_kwargs={**connection, **sentinel_auth, **tls_options},
        **connection,
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed["service"], db=parsed["db"], username=parsed["username"],
        password=parsed["password"], decode_responses=False, **tls_options,
    )
    return client
