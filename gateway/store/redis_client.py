"""Building the redis-py asyncio client (one connection pool) for a store URL.

The client never re-sends a command: redis-py's retry wraps sending a command and reading its reply as one
step, so a connection that drops after Redis ran the command but before its reply arrived would run it twice
(a counter counted twice, a compare-and-set that then fails against its own write). A dropped connection
surfaces as the store's unavailable error, "maybe applied", which callers handle under operation ids. A pooled
connection the server closed meanwhile (a Redis restart) is replaced by the standalone and Sentinel pools before
a command is sent on it; on a cluster its first command fails instead. The store's own timeout and back-off do
the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from gateway.store.base import StoreConfig
from gateway.store.redis_url import RedisTarget

__all__ = ["Client", "RedisHandle", "open_client"]

Client = Redis | RedisCluster
HEALTH_CHECK_INTERVAL_S = 30


@dataclass(slots=True)
class RedisHandle:
    """The client and, with Sentinel, the Sentinel object whose own connections must be closed too."""

    client: Client
    sentinel: Sentinel | None = None

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()


def open_client(target: RedisTarget, config: StoreConfig) -> RedisHandle:
    """A client for `target`; it connects lazily, so this never blocks and never fails on a dead server."""
    common: dict[str, Any] = {
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.connect_timeout_s + config.op_timeout_s,  # a backstop: ops have their own
        "retry": Retry(NoBackoff(), 0),  # no re-send; with a cluster, no retry at the cluster level either
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if target.mode == "standalone":
        pool = BlockingConnectionPool.from_url(
            target.url, max_connections=config.max_connections, timeout=config.op_timeout_s, **common
        )
        return RedisHandle(Redis.from_pool(pool))
    tls = _tls(target)
    if target.mode == "sentinel":
        return _sentinel(target, config, common, tls)
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    cluster = RedisCluster(
        startup_nodes=nodes,
        username=target.username,
        password=target.password,
        max_connections=config.max_connections,
        **common,
        **tls,
    )
    return RedisHandle(cluster)


def _sentinel(target: RedisTarget, config: StoreConfig, common: dict[str, Any], tls: dict[str, Any]) -> RedisHandle:
    assert target.service is not None
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.connect_timeout_s,
        "username": target.options.get("sentinel_username"),
        "password": target.options.get("sentinel_password"),
        **tls,
    }
    # (through Any: redis-py annotates `Sentinel` in some releases and not in others)
    sentinel = cast(Any, Sentinel)(list(target.nodes), sentinel_kwargs=sentinel_kwargs, **common)
    master = sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        max_connections=config.max_connections,
        **tls,
    )
    return RedisHandle(master, sentinel)


def _tls(target: RedisTarget) -> dict[str, Any]:
    if not target.ssl:
        return {}
    tls: dict[str, Any] = {"ssl": True}
    for name in ("ssl_ca_certs", "ssl_cert_reqs"):
        if name in target.options:
            tls[name] = target.options[name]
    return tls
