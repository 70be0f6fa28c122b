"""Pooled upstream connections, and the mapping of transport failures to gateway errors.

The transport is aiohttp's client, chosen by measurement (see `bench/results/
transport.md`): per request it costs a fraction of the CPU of httpx's default
transport. One `ClientSession` per provider holds that provider's keep-alive pool.
"""

from __future__ import annotations

import asyncio

import aiohttp

from ..errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from ..policy.compiled import ProviderConfig

__all__ = ["new_session", "transport_error"]


def new_session(config: ProviderConfig) -> aiohttp.ClientSession:
    """A session with this provider's pool size and connect timeout.

    Read timeouts (first byte, idle, total) are enforced by the caller with one
    rescheduled `asyncio.Timeout`, so that each phase gets its own limit.
    """
    connector = aiohttp.TCPConnector(
        limit=config.pool_size,
        limit_per_host=config.pool_size,
        keepalive_timeout=config.keepalive_s,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=config.timeouts.connect_s)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"Content-Type": "application/json", **config.headers},
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
        raise_for_status=False,
    )


def transport_error(exc: BaseException, provider: str, phase: str) -> GatewayError:
    """Map an aiohttp/asyncio failure to what a client may see (no addresses, no internals)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"upstream `{provider}` timed out ({phase})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"could not connect to upstream `{provider}`")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamError(f"upstream `{provider}` closed the connection ({phase})")
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ClientOSError, ConnectionError)):
        return UpstreamError(f"upstream `{provider}` connection failed ({phase})")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamError(f"upstream `{provider}` sent an invalid response ({phase})")
    return UpstreamError(f"upstream `{provider}` request failed ({phase})")
