"""Redis URLs: plain, TLS and unix URLs as redis-py reads them, plus Sentinel and Cluster forms.

    redis://[[user]:password@]host[:port][/db]               one server (rediss:// for TLS)
    unix://[[user]:password@]/path/to/redis.sock[?db=N]     one server on a unix socket
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?sentinel_password=...]
    redis+cluster://[[user]:password@]host[:port][,host[:port]...]

`rediss+sentinel://` and `rediss+cluster://` use TLS. With Sentinel, the credentials in the URL are the
master's; `sentinel_username` / `sentinel_password` query parameters authenticate to the Sentinels (default
port 26379). Cluster nodes default to port 6379 and use database 0 only. Secrets in URLs come from the
environment (the caller resolves them) and never appear in error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["RedisTarget", "parse_redis_url"]

Mode = Literal["standalone", "sentinel", "cluster"]
_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_OPTIONS = {
    "sentinel": {"sentinel_username", "sentinel_password", "ssl_ca_certs", "ssl_cert_reqs"},
    "cluster": {"ssl_ca_certs", "ssl_cert_reqs"},
}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a URL points at. For `standalone` the URL itself goes to redis-py unchanged."""

    mode: Mode
    url: str = field(repr=False)
    ssl: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, str] = field(default_factory=dict, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """Check a store URL and say what it points at; `ValueError` (without the URL's secrets) when it is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"store url scheme must be one of {', '.join(sorted(_SCHEMES))}, not {scheme!r}")
    mode, ssl = _SCHEMES[scheme.lower()]
    if mode == "standalone":
        return RedisTarget(mode, url, ssl=ssl)
    parts = urlsplit("x://" + rest)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    default_port = 26379 if mode == "sentinel" else 6379
    nodes = tuple(_node(item, default_port) for item in hostlist.split(","))
    path = [unquote(p) for p in parts.path.split("/") if p]
    options = _options(parts.query, mode)
    if mode == "sentinel":
        if not 1 <= len(path) <= 2:
            raise ValueError("a sentinel store url needs /service_name[/db] after the sentinel hosts")
        db = _db(path[1]) if len(path) == 2 else 0
        return RedisTarget(mode, url, ssl, nodes, path[0], db, username, password, options)
    if path:
        raise ValueError("a cluster store url takes no path: Redis Cluster has database 0 only")
    return RedisTarget(mode, url, ssl, nodes, None, 0, username, password, options)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, has_password, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if has_password else None)


def _node(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [ipv6]:port
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError("a store url lists an empty host")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a store url has a bad port {port!r}")
    return host, int(port)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"a store url has a bad database number {text!r}")
    return int(text)


def _options(query: str, mode: Mode) -> dict[str, str]:
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - _OPTIONS[mode])
    if unknown:
        raise ValueError(f"unknown store url parameter(s) {', '.join(unknown)} (known: {sorted(_OPTIONS[mode])})")
    return options
