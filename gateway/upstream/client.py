"""Pooled upstream connections, the bounded wait for one, and the mapping of transport failures.

The transport is aiohttp's client, chosen by measurement (see `bench/results/
transport.md`): per request it costs a fraction of the CPU of httpx's default
transport. One `ClientSession` per provider holds that provider's keep-alive pool;
a `ConnectionGate` in front of it bounds how many requests use the provider at
once (`pool_size`) and how long a request may wait for its turn (`pool_timeout_s`),
so that a full pool answers 503 instead of queueing a request silently.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import aiohttp

from ..errors import (
    AnswerTooLarge,
    GatewayBusy,
    GatewayError,
    StreamDeadlinePassed,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..policy.compiled import ProviderConfig
from .handler import install
from .read_timer import HeldPastDeadline
from .request import request_class

__all__ = ["ConnectionGate", "GateObserver", "at_work", "new_session", "transport_error"]


class GateObserver(Protocol):
    """Where a gate reports waits (the metrics module implements it)."""

    def waiting(self, provider: str, delta: int) -> None: ...

    def timed_out(self, provider: str) -> None: ...


class ConnectionGate:
    """At most `size` concurrent upstream exchanges; a bounded wait for the next free one.

    A stream holds its permit until it ends, so `size` is also the number of
    concurrent streams one provider can carry from one process.
    """

    __slots__ = ("_counted", "_observer", "_provider", "_semaphore", "_timeout_s")

    def __init__(self, provider: str, size: int, timeout_s: float, observer: GateObserver | None = None) -> None:
        self._provider = provider
        self._semaphore = asyncio.Semaphore(size)
        # `acquire` reads the semaphore's count and waiters where they are CPython's (`_value`, `_waiters`)
        semaphore = self._semaphore
        self._counted = isinstance(getattr(semaphore, "_value", None), int) and hasattr(semaphore, "_waiters")
        self._timeout_s = timeout_s
        self._observer = observer

    async def acquire(self) -> None:
        semaphore = self._semaphore
        if self._counted and semaphore._value > 0 and not semaphore._waiters:
            # A free permit and nobody waiting: take it as `Semaphore.acquire` would, without its
            # `locked()`, which on CPython 3.11 runs a generator over the waiters twice per call.
            semaphore._value -= 1
            return
        if not semaphore.locked():
            await semaphore.acquire()  # returns at once: no suspension, no timer
            return
        observer = self._observer
        if observer is not None:
            observer.waiting(self._provider, 1)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._semaphore.acquire()
        except TimeoutError:
            if observer is not None:
                observer.timed_out(self._provider)
            raise GatewayBusy(
                f"all {self._provider} connections are busy; try again shortly", headers={"Retry-After": "1"},
            ) from None
        finally:
            if observer is not None:
                observer.waiting(self._provider, -1)

    def release(self) -> None:
        self._semaphore.release()


def new_session(config: ProviderConfig) -> aiohttp.ClientSession:
    """A session with this provider's connect timeout; the gate, not the connector, bounds its size.

    Read timeouts are enforced by the caller, so that each phase gets its own limit: the
    first byte with an `asyncio.timeout`, the idle time between reads and the total
    deadline of a body with one `ReadTimer` (`read_timer.py`).
    """
    connector = aiohttp.TCPConnector(
        limit=0,  # bounded by the ConnectionGate, which also bounds the wait
        keepalive_timeout=config.keepalive_s,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    install(connector)  # its connections take a shorter path for a streamed body's bytes (`handler.py`)
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=config.timeouts.connect_s)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"Content-Type": "application/json", **config.headers},
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
        raise_for_status=False,
        request_class=request_class(),  # a small body goes out without a task of its own (`request.py`)
    )


def transport_error(exc: BaseException, provider: str, phase: str, answering: int | None = None) -> GatewayError:
    """Map an aiohttp/asyncio failure to what a client may see (no addresses, no internals).

    `answering`: the status of the answer's head when the failure came after it (its body cut by a stall or a
    reset), set as the error's `upstream_status`: the upstream had the request and had begun sending its answer,
    which it bills (`at_work`), however the body was cut."""
    error = _transport_error(exc, provider, phase)
    if answering is not None:
        error.upstream_status = answering
    return error


def _transport_error(exc: BaseException, provider: str, phase: str) -> GatewayError:
    if isinstance(exc, HeldPastDeadline):  # not the upstream's timeout: the gateway was held on the client's side
        return StreamDeadlinePassed(f"the exchange with upstream `{provider}` passed its deadline while the gateway "
                                    f"waited on the client, which reads too slowly ({phase})")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # (a `ServerTimeoutError`: first) nothing was sent
        return UpstreamConnectTimeout(f"upstream `{provider}` timed out ({phase}: connecting)")
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


def at_work(error: GatewayError) -> bool:
    """Whether a failed attempt left its upstream at work on the request, which the upstream then bills (and the
    gateway bills its prompt: `accounting.stage`): the answer's head had come (`upstream_status` a 2xx: its body, or
    a stream before its first content, cut by a stall or a reset: `transport_error`'s `answering`), or the gateway
    stopped waiting for it after the request went out (a plain `UpstreamTimeout`), or it was too large to read
    (`AnswerTooLarge`: generated). Not an error status the upstream answered with (its own 408 or 504 too), nor a
    connect timeout (nothing was sent), nor the alias's deadline (`ctx.upstream_sent` says whether that cut a request
    that had gone out)."""
    status = error.upstream_status
    if status is not None:
        return 200 <= status < 300
    kind = type(error)
    return kind is UpstreamTimeout or kind is AnswerTooLarge
