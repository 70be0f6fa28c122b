"""Building the redis-py asyncio clients for a store URL: one for operations, one for subscriptions.

Operations share one pool of at most `max_connections` connections. A subscription holds its connection for as
long as it lives, so subscriptions get connections of their own, from another pool (one each): taken from the
operations' pool, they left a small `max_connections` none, and every operation waited for one and failed as an
outage while Redis was healthy. An operation that finds every pooled connection busy for `POOL_WAIT_SHARE` of
its time raises `MaxConnectionsError` (as the Sentinel and Cluster pools do at once): this process is short of
connections, which says nothing about Redis.

The client never re-sends a command: redis-py's retry wraps sending a command and reading its reply as one
step, so a connection that drops after Redis ran the command but before its reply arrived would run it twice
(a counter counted twice, a compare-and-set that then fails against its own write). A dropped connection
surfaces as the store's unavailable error, "maybe applied", which callers handle under operation ids. A pooled
connection the server closed meanwhile (a Redis restart) is replaced by the standalone and Sentinel pools before
a command is sent on it; on a cluster its first command fails instead. The store's own timeout and back-off do
the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisClusterException, RedisError

from gateway.store.base import StoreConfig
from gateway.store.redis_url import RedisTarget

__all__ = ["ERRORS", "Client", "RedisHandle", "open_client", "warn_short_of_connections"]

log = logging.getLogger(__name__)

Client = Redis | RedisCluster
ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
"""What a call of either client raises when Redis cannot serve it. The cluster client's own errors are no `RedisError`:
`RedisClusterUnreachableError` (no node answers), `SlotNotCoveredError`, a topology refresh that failed; caught as
`RedisError` only, one escaped and killed the store's probe, and a cluster blip became an outage for good."""
HEALTH_CHECK_INTERVAL_S = 30
POOL_WAIT_SHARE = 0.5
"""The share of `op_timeout_s` an operation waits for a free pooled connection; the rest is for Redis to answer."""
SHORT_WARNING_EVERY_S = 10.0
_short_warned = -SHORT_WARNING_EVERY_S


@dataclass(slots=True)
class RedisHandle:
    """The operations' client, the subscriptions' client (its own connections, outside the operations' pool) and,
    with Sentinel, the Sentinel object whose own connections must be closed too."""

    client: Client
    subscriber: Client
    sentinel: Sentinel | None = None

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.subscriber.aclose()
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
        pool = _OperationsPool.from_url(target.url, max_connections=config.max_connections,
                                        timeout=config.op_timeout_s * POOL_WAIT_SHARE, **common)
        # unbounded: each subscription holds at most one connection at a time (`RedisChannel`)
        subscriptions = ConnectionPool.from_url(target.url, **common)
        return RedisHandle(Redis.from_pool(pool), Redis.from_pool(subscriptions))
    tls = _tls(target)
    if target.mode == "sentinel":
        return _sentinel(target, config, common, tls)
    operations = _cluster(target, {**common, **tls, "max_connections": config.max_connections})
    return RedisHandle(operations, _cluster(target, {**common, **tls}))


class _OperationsPool(BlockingConnectionPool):
    """The pool of operations: its wait for a free connection that ends in nothing raises `MaxConnectionsError`
    (redis-py's `ConnectionError`, which is also what a dead server raises, told apart by the wait it comes from:
    its cause is the wait's timeout, and nothing was sent)."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            return cast(AbstractConnection, await cast(Any, super()).get_connection(*args, **kwargs))
        except RedisConnectionError as exc:
            if type(exc) is RedisConnectionError and isinstance(exc.__cause__, asyncio.TimeoutError):
                raise MaxConnectionsError(f"no free connection of {self.max_connections} within {self.timeout} s "
                                          "(state.max_connections)") from exc
            raise


def warn_short_of_connections(exc: MaxConnectionsError) -> None:
    """At most one warning per `SHORT_WARNING_EVERY_S` (per process): a short pool fails many operations at once."""
    global _short_warned
    now = time.monotonic()
    if now - _short_warned >= SHORT_WARNING_EVERY_S:
        _short_warned = now
        log.warning("store: an operation found no free redis connection (%s); raise state.max_connections", exc)


def _cluster(target: RedisTarget, options: dict[str, Any]) -> RedisCluster:
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    return RedisCluster(startup_nodes=nodes, username=target.username, password=target.password, **options)


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
    master = {"service_name": target.service, "db": target.db, "username": target.username,
              "password": target.password, **tls}
    operations = sentinel.master_for(**master, max_connections=config.max_connections)
    return RedisHandle(operations, sentinel.master_for(**master), sentinel)  # each its own pool


def _tls(target: RedisTarget) -> dict[str, Any]:
    if not target.ssl:
        return {}
    tls: dict[str, Any] = {"ssl": True}
    for name in ("ssl_ca_certs", "ssl_cert_reqs"):
        if name in target.options:
            tls[name] = target.options[name]
    return tls
