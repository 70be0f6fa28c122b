"""Everything built from one policy, with a life of its own: start, serve, retire, close.

A `Runtime` owns the compiled policy, the provider objects and their connection
pools, the shared-state store and the pipeline. A request holds the runtime it
started with until its last byte (streams included), so a reload can build and
start a new runtime, swap it in, and close the old one's pools only after its
last request ended: nothing in flight ever sees a half-applied policy or a closed
pool.

This module sits below the pipeline and the HTTP edge: it imports neither.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from .policy import Policy
from .providers import Provider
from .store.base import Store

if TYPE_CHECKING:
    from .auth.dynamic import DynamicKeys
    from .pipeline.runner import Pipeline

__all__ = ["Runtime", "Service"]

log = logging.getLogger("gateway.runtime")
CUT_GRACE_S = 2.0  # what requests cut at a retired policy's drain deadline get to end before its pools close


class Service(Protocol):
    """Something else built from the policy with a life of its own (the router's breaker sync and
    health checks, the guards' analyzers and pool): started after the providers and the store,
    closed before them."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class Runtime:
    __slots__ = (
        "_active", "_closed", "_idle", "_retired", "created", "dynamic_keys", "owns_store", "pipeline", "policy",
        "providers", "services", "store", "version_header",
    )

    def __init__(
        self, policy: Policy, providers: Mapping[str, Provider], store: Store, pipeline: Pipeline,
        services: Sequence[Service] = (), *, dynamic_keys: DynamicKeys | None = None, owns_store: bool = True,
    ) -> None:
        self.services = tuple(services)
        self.dynamic_keys = dynamic_keys  # keys created at run time (also one of `services`), when the policy has them
        # False while a memory store is shared with the runtime this one replaces: closing must not empty it
        self.owns_store = owns_store
        self.policy = policy
        self.providers = providers
        self.store = store
        self.pipeline = pipeline
        self.created = int(time.time())
        self.version_header = (b"x-gateway-policy-version", policy.version.encode())  # on every proxied answer
        self._active = 0
        self._retired = False
        self._closed = False
        self._idle: asyncio.Event | None = None

    async def start(self) -> None:
        """Open the pools and the store. A store that cannot be reached does not stop the start:
        it reports itself unhealthy and recovers on its own (features follow `on_unavailable`)."""
        await asyncio.gather(*(provider.start() for provider in self.providers.values()))
        await self.store.start()
        for service in self.services:
            await service.start()

    def acquire(self) -> Runtime:
        self._active += 1
        return self

    def release(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle is not None:
            self._idle.set()

    @property
    def active(self) -> int:
        return self._active

    async def retire(self, timeout_s: float, cut: Callable[[], None] | None = None) -> None:
        """Wait (bounded) for the requests still holding this runtime, then close it. At the deadline, `cut` ends
        those still running (a stream gets an error event, as at shutdown), and they get `CUT_GRACE_S` to say so
        before the pools close: closed under them, a stream would hang until its idle timeout, then read as the
        upstream's timeout."""
        self._retired = True
        if self._active:
            self._idle = asyncio.Event()
            if not await self._idle_within(timeout_s) and cut is not None:
                log.warning("policy %s: cutting %d request(s) still running at its drain deadline",
                            self.policy.version, self._active)
                cut()
                await self._idle_within(CUT_GRACE_S)
            if self._active:
                log.warning("closing policy %s with %d request(s) still running", self.policy.version, self._active)
        await self.aclose()

    async def _idle_within(self, timeout_s: float) -> bool:
        assert self._idle is not None
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for service in self.services:
            try:
                await service.aclose()
            except Exception:  # closing goes on whatever one service does
                log.warning("error while closing a service of policy %s", self.policy.version, exc_info=True)
        results = await asyncio.gather(
            *(provider.close() for provider in self.providers.values()),
            *([self.store.aclose()] if self.owns_store else []),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, Exception):
                log.warning("error while closing policy %s: %s", self.policy.version, type(result).__name__)
