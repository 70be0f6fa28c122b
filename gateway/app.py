"""Wiring: one gateway (metrics, the current runtime, reload) and the litestar app that serves it.

Everything a request needs hangs off the `Gateway` object created here, so tests
can run several gateways in one process; the few process-wide objects elsewhere are
caches and the metrics registry a process serves (`telemetry/metrics.py`), none of
them a gateway's state. Process-wide
set-up (logging, signal handlers, `gc.freeze`) is not done here but by the
entry point that owns the process (`server.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from litestar import Litestar, asgi

from .accounting.ledger import Ledger
from .accounting.stage import Accounting
from .api.admin import admin_routes
from .api.anthropic import CountTokensEndpoint, MessagesDialect
from .api.asgi import RequestIds
from .api.errors import error_handlers
from .api.feedback import feedback_routes
from .api.proxy import ProxyEndpoint
from .api.routes import ops_routes
from .api.usage import usage_routes
from .cache import CacheStage, ResponseCache
from .direct_routes import ASGIApp, DirectRoutes, install_direct_routes
from .dryrun.shadow import Shadow, ShadowStage
from .guards.runtime import GuardRuntime
from .guards.stage import GuardStage
from .pipeline.lifecycle import Lifecycle
from .pipeline.runner import Pipeline
from .pipeline.stages import Admit, Authenticate, Authorize, CallUpstream, Ingress, SelectTarget
from .policy import Policy, PolicyError, load_policy
from .providers import build_provider
from .reload import Fingerprints, Listener, fingerprints, fingerprints_as_read, serving_refusals, watch_policy_files
from .routing import Router
from .runtime import Runtime, Service
from .runtime_handover import bequeath_ledger, drop_series, dynamic_keys, show_budgets
from .schemas.endpoints import Endpoint
from .store import MemoryStore, build_store
from .telemetry.metrics import Metrics
from .telemetry.stage import Telemetry, TelemetryStages
from .telemetry.tokens import TokenCounter
from .telemetry.usage import CountTokens

__all__ = ["Gateway", "create_app", "served_app"]

log = logging.getLogger("gateway")


class Gateway:
    """One serving gateway: process-level services, and the runtime of the policy in force."""

    def __init__(self, policy: Policy, *, source: Path | None = None, tokens: TokenCounter | None = None,
                 listener: Listener | None = None, read_from: Fingerprints | None = None) -> None:
        """`read_from`: the root file's metadata taken before `policy` was read from it (`gateway serve`), so that
        the file watcher, which starts later, reloads a change written in between (else it took the changed
        file as the one loaded, and served the old policy for good)."""
        self.metrics = Metrics()
        self.tokens = tokens or TokenCounter()
        self.request_ids = RequestIds()
        self.source = source  # the policy file, for reloads (None: built from text, no reload)
        # How `gateway serve` serves this gateway (None: not served by it, e.g. in tests): a reloaded policy
        # must suit it as the first one had to, or the reload is refused.
        self.listener = listener
        self.active: set[Lifecycle] = set()
        self.runtime = self._build(policy, self._guards(policy))
        self.startup_problem: str | None = None  # why `start` failed, when the configuration is why (`start`)
        self.started = False
        self.draining = False
        self.last_reload: dict[str, Any] | None = None
        self.reload_requested: Callable[[], None] | None = None  # set by a supervised worker: tell every worker
        self._reload_lock: asyncio.Lock | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop it serves on, once started
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retiring: set[Runtime] = set()  # replaced by a reload, still finishing requests
        self._loaded_files: Fingerprints | None = None  # the policy files as the last reload read them
        if read_from is not None and source is not None:
            now = fingerprints(self._watched())  # (the included files' as they are now: read moments ago)
            self._loaded_files = (*read_from[:1], *now[1:]) if now is not None else read_from

    def _build(self, policy: Policy, guards: GuardRuntime | None, previous: Runtime | None = None) -> Runtime:
        """A runtime for `policy` with its `guards` (`_guards`: built beforehand, off the loop on a reload); after a
        reload, routing keeps what it learnt about targets that stay."""
        providers = {name: build_provider(cfg, self.tokens, self.metrics) for name, cfg in policy.providers.items()}
        # A memory store lives on across reloads that keep its settings: it holds keys, counters and spend.
        # Its byte bound for cache entries (`cache.memory_max_bytes`) is not a reason to lose them: a new one is
        # applied to the running store once this runtime is swapped in (`_reload`).
        shared = previous is not None and isinstance(previous.store, MemoryStore) and previous.store.takes(policy.state)
        store = previous.store if shared and previous is not None else build_store(policy.state)
        keys = dynamic_keys(policy, store, self.metrics, previous)
        earlier = [s for s in previous.services if isinstance(s, Router)] if previous is not None else []
        router = Router(policy, providers, store, self.metrics, self.tokens, previous=earlier[0] if earlier else None)
        observers = TelemetryStages(policy, self.metrics, self.tokens.count)  # the optional ones the policy turns on
        shadow = Shadow(policy, policy.shadow, self.metrics, self.tokens) if policy.shadow is not None else None
        earlier_cache = next((s for s in previous.services if isinstance(s, ResponseCache)), None) \
            if previous is not None else None  # (its semantic vectors stay: `ResponseCache`)
        cache = ResponseCache(policy, store, providers, self.metrics, self.tokens, earlier_cache) \
            if policy.cache.enabled else None
        metrics = self.metrics
        accounting = Accounting(policy, store, Ledger(store, metrics.accounting_pending, metrics.accounting_dropped),
                                metrics, CountTokens(self.tokens)) \
            if policy.has_accounting or keys is not None else None
        if keys is not None and accounting is not None:
            keys.on_forget = accounting.forget_key  # a revoked key's budget gauges dropped
        pipeline = Pipeline([
            Telemetry(self.metrics, observers.quality),  # the quality signals (on) run in its frame
            *observers.stages,
            CountTokens(self.tokens),
            Admit(),
            Authenticate(keys),
            Ingress(),
            *([ShadowStage(shadow)] if shadow is not None else []),  # no shadow policy: no stage
            Authorize(),
            *([accounting] if accounting is not None else []),  # limits and budgets; none: no cost at all
            *([GuardStage(guards, policy.guards.stream, self.tokens)] if guards is not None else []),  # none: no cost
            *([CacheStage(cache)] if cache is not None else []),  # only when an alias caches
            SelectTarget(router),
            CallUpstream(router),
        ])
        services: list[Service] = [router, *observers.services]
        if guards is not None:
            services.append(guards)
        if cache is not None:
            services.append(cache)
        if keys is not None:
            services.append(keys)
        if shadow is not None:
            services.append(shadow)
        if accounting is not None:
            services.append(accounting)
        return Runtime(policy, providers, store, pipeline, services, dynamic_keys=keys, owns_store=not shared)

    def _guards(self, policy: Policy) -> GuardRuntime | None:
        """The policy's guards, their regexes compiled: a deny list of thousands of terms takes a few hundred ms,
        which a reload spends in a thread (`_reload`), not on the event loop that streams the answers."""
        return GuardRuntime(policy.guards, self.metrics, self.tokens.count) if policy.has_guards else None

    def acquire_runtime(self) -> Runtime:
        return self.runtime.acquire()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._reload_lock = asyncio.Lock()
        await asyncio.to_thread(self.tokens.load)
        try:
            await self.runtime.start()
        except OSError as exc:
            # A service cannot open what the policy or the machine gives it (a file's folder, a model not
            # installed): the configuration's problem, not a bug. Its message names it; the server reports that
            # line, not a traceback (`_StartupReport`). Any other error is a bug, and keeps its traceback.
            self.startup_problem = f"the gateway cannot start: {str(exc) or type(exc).__name__}"
            raise
        self._announce(self.runtime.policy)
        interval = lambda: self.runtime.policy.server.watch_interval_s  # noqa: E731 - read per tick: reloads change it
        if self.source is not None and self.runtime.policy.server.watch_policy:
            self._spawn(watch_policy_files(self._watched, interval, lambda: self.reload("file"),
                                           lambda: self._loaded_files))
        self._spawn(self._watch_store(interval))
        self.started = True

    # After a refused reload: the version it left in force, and the files (and glob folders) that only the refused
    # version read or looked for, watched too while that version is in force (`_watch_refused`).
    _refused_files: tuple[str, tuple[Path, ...]] | None = None

    def _watched(self) -> list[Path]:
        """The files (and glob folders) of the policy in force, the root file first; after a refused reload, then
        those only the refused version names, until another version loads: a new `include` that was missing or
        wrong refused it, and its arrival or fix must reload."""
        files = self._files_in_force()
        if self._refused_files is not None and self._refused_files[0] == self.runtime.policy.version:
            files.extend(self._refused_files[1])
        return files

    def _files_in_force(self) -> list[Path]:
        assert self.source is not None
        return [self.source, *(Path(p) for p in self.runtime.policy.watch[1:])]

    def _watch_refused(self, watch: Sequence[str], missing: Collection[str] = ()) -> None:
        """After a refused reload: watch what it read or looked for (`PolicyError.watch`, bounded by the loader's
        limits) beside the policy in force's, and take it as that load read it, so that the watcher neither reloads
        it again (reporting it twice) nor misses a file it found `missing` that has appeared since."""
        in_force = set(self._files_in_force())
        only = tuple(dict.fromkeys(path for path in map(Path, watch) if path not in in_force))
        self._refused_files = (self.runtime.policy.version, only) if only else None
        self._loaded_files = fingerprints_as_read(self._loaded_files, self._watched(), set(map(Path, missing)))

    async def stop(self) -> None:
        self.draining = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(self.runtime.aclose(), *(old.aclose() for old in self._retiring))
        self._retiring.clear()
        self.metrics.flush()  # the last requests' series written now (the exit hook would, later)

    def begin_drain(self) -> None:
        self.draining = True

    def cut_all(self, runtime: Runtime | None = None) -> None:
        """The drain deadline: end every request still running (streams get an error event); with `runtime`, those
        that hold it (a retired policy's deadline)."""
        for life in list(self.active):
            if runtime is None or life.runtime is runtime:
                life.cancel("shutdown")

    async def reload(self, trigger: str) -> dict[str, Any]:
        """Load, check and start the policy file's current version; swap it in; retire the old one.

        An invalid policy changes nothing: the last good one keeps serving.
        """
        assert self._reload_lock is not None, "gateway not started"
        async with self._reload_lock:
            result = await self._reload(trigger)
        self.metrics.reloads.labels(result["result"]).inc()
        self.last_reload = result
        return result

    async def _reload(self, trigger: str) -> dict[str, Any]:
        old = self.runtime
        if self.source is None:
            return {"result": "failed", "trigger": trigger, "errors": ["this gateway was not started from a file"]}
        self._loaded_files = fingerprints(self._watched())  # what this reload reads, for the file watcher
        try:
            policy = await asyncio.to_thread(load_policy, self.source)
        except PolicyError as exc:
            self._watch_refused(exc.watch, exc.missing)
            return self._refused(trigger, [str(issue) for issue in exc.issues])
        if self.listener is not None:  # the rules `gateway serve` checked at start, which a reload cannot escape
            refusals = serving_refusals(policy, self.listener)
            if refusals:
                self._watch_refused(policy.watch)
                return self._refused(trigger, [f"{self.source}: {refusal}" for refusal in refusals])
        if policy.version == old.policy.version and _shadow_version(policy) == _shadow_version(old.policy):
            return {"result": "unchanged", "trigger": trigger, "version": policy.version}
        try:
            new = self._build(policy, await asyncio.to_thread(self._guards, policy), old)
        except Exception as exc:
            log.exception("policy %s failed to build; keeping %s", policy.version, old.policy.version)
            return {"result": "failed", "trigger": trigger, "version": old.policy.version,
                    "errors": [f"the new policy failed to build: {type(exc).__name__}"]}
        try:
            await new.start()
        except Exception as exc:
            log.exception("policy %s failed to start; keeping %s", policy.version, old.policy.version)
            await new.aclose()
            return {"result": "failed", "trigger": trigger, "version": old.policy.version,
                    "errors": [f"the new policy failed to start: {type(exc).__name__}"]}
        self.runtime = new
        if not new.owns_store:  # the memory store passes to the new runtime with everything in it
            old.owns_store, new.owns_store = False, True
            if isinstance(new.store, MemoryStore):  # only now: a policy that failed to start changed nothing
                new.store.reconfigure(policy.state)
        bequeath_ledger(old, new)
        drop_series(old, new, self.metrics)  # the gauges only the old policy set: their alerts must clear
        self._spawn(show_budgets(new))  # (a store read: off the reload's path)
        self._announce(policy)
        log.info("policy reloaded", extra={"fields": {
            "trigger": trigger, "version": policy.version, "previous": old.policy.version}})
        self._retiring.add(old)
        self._spawn(self._retire(old))
        return {"result": "ok", "trigger": trigger, "version": policy.version, "previous": old.policy.version}

    def _refused(self, trigger: str, errors: list[str]) -> dict[str, Any]:
        """A reload that changes nothing, for `errors`: the policy in force keeps serving."""
        for error in errors:
            log.error("policy reload refused: %s", error)
        return {"result": "invalid", "trigger": trigger, "version": self.runtime.policy.version, "errors": errors}

    async def _retire(self, old: Runtime) -> None:
        try:
            await old.retire(old.policy.server.drain_timeout_s, partial(self.cut_all, old))
        finally:
            self._retiring.discard(old)
            # What its last requests and its breakers' syncing wrote since the swap, dropped (or set) again.
            drop_series(old, self.runtime, self.metrics)
            if not self.draining:
                self._spawn(show_budgets(self.runtime))

    def _announce(self, policy: Policy) -> None:
        self.metrics.serving(policy.version)
        for warning in policy.warnings:
            log.warning("%s", warning)

    async def _watch_store(self, interval: Callable[[], float]) -> None:
        """Ping a remote store now and then, so that /readyz and `gateway_store_up` show its health
        even when no request has used it lately (and a recovery is noticed). No error ends it: a store's
        bug (an exception its `ping` let out) would otherwise freeze the gauge and /readyz for good."""
        while True:
            runtime = self.runtime
            backend = runtime.policy.state.backend
            try:
                if backend != "memory":
                    await runtime.store.ping()
                if runtime is self.runtime:  # a reload during the ping retired it: its backend's series is dropped
                    self.metrics.store_up.labels(backend).set(1 if runtime.store.healthy else 0)
            except Exception:  # logged; the next round pings again
                log.error("store health check failed unexpectedly", exc_info=True)
            await asyncio.sleep(interval())

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _shadow_version(policy: Policy) -> str | None:
    return policy.shadow.version if policy.shadow is not None else None


def served_app(app: Litestar) -> ASGIApp:
    """What the server runs: the direct routes in front of litestar, not inside it.

    Installed as litestar's `asgi_handler`, the direct routes are reached through litestar's own
    `__call__`, one more coroutine frame that a streamed request's task resumes through on every
    event; served in front of it, that frame is gone. Whatever they do not take (other paths, bad
    `Host` headers, lifespan) goes to litestar as before, whose inner direct routes pass it on.
    The server must be told the interface (`asgi3`): the front is not a coroutine function.
    The front also holds the gateway's `Host` and `Origin` checks without keys (`direct_routes.LoopbackGate`), on
    every request it serves: it is there, without routes, even when litestar's had none installed.
    """
    inner = getattr(app, "asgi_handler", None)
    gateway = getattr(app.state, "gateway", None)
    if not isinstance(gateway, Gateway):
        return inner.in_front_of(app) if isinstance(inner, DirectRoutes) else app
    front = _StartupReport(app, gateway)
    return (inner if isinstance(inner, DirectRoutes) else DirectRoutes({}, front)).in_front_of(front, gateway)


class _StartupReport:
    """litestar, with a start that failed on a configuration problem (`Gateway.startup_problem`) reported in one
    line: litestar sends the server its traceback, which the server logs (a bug's keeps it). Not a coroutine
    function: a request litestar serves resumes through no frame of this."""

    __slots__ = ("app", "gateway")

    def __init__(self, app: Litestar, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        if scope["type"] != "lifespan":
            return self.app(scope, receive, send)
        gateway = self.gateway

        async def report(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed" and gateway.startup_problem is not None:
                message = {**message, "message": gateway.startup_problem}
            await send(message)

        return self.app(scope, receive, report)


def _proxy_route(gateway: Gateway, endpoint: Endpoint, direct: dict[str, ASGIApp]) -> Any:
    handler = direct[f"/v1/{endpoint.path}"] = ProxyEndpoint(gateway, endpoint)

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        await handler(scope, receive, send)

    return asgi(f"/v1/{endpoint.path}", copy_scope=False, name=endpoint.label)(proxy)


def _messages_routes(gateway: Gateway, direct: dict[str, ASGIApp]) -> list[Any]:
    """Anthropic's Messages API: the chat pipeline behind Anthropic's formats, and its token count."""
    messages = direct["/v1/messages"] = ProxyEndpoint(gateway, Endpoint.CHAT, MessagesDialect())
    count = CountTokensEndpoint(gateway)

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        await messages(scope, receive, send)

    async def count_tokens(scope: Any, receive: Any, send: Any) -> None:
        await count(scope, receive, send)

    return [asgi("/v1/messages", copy_scope=False, name="messages")(proxy),
            asgi("/v1/messages/count_tokens", copy_scope=False, name="count_tokens")(count_tokens)]


def create_app(
    gateway: Gateway, *, on_startup: Sequence[Callable[[], Any]] = (), on_shutdown: Sequence[Callable[[], Any]] = (),
) -> Litestar:
    """A litestar app serving `gateway`. Extra hooks run after the gateway starts / before it stops."""
    direct: dict[str, ASGIApp] = {}
    app = Litestar(
        route_handlers=[
            *(_proxy_route(gateway, e, direct) for e in Endpoint), *_messages_routes(gateway, direct),
            *ops_routes(gateway),
            *admin_routes(gateway), *feedback_routes(gateway),
            *usage_routes(gateway),
        ],
        exception_handlers=error_handlers(gateway.request_ids),
        on_startup=[gateway.start, *on_startup],
        on_shutdown=[*on_shutdown, gateway.stop],
        openapi_config=None,
        request_max_body_size=64 * 1024,  # the litestar routes take no body worth more
        logging_config=None,
        debug=False,
    )
    app.state.gateway = gateway
    install_direct_routes(app, direct)
    return app
