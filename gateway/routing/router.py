"""The router: rules and strategy pick the candidates (`select`), the fallback walks them (`call`).

One `Router` per runtime (so per policy version), built with its providers and store.
`select` runs in the `SelectTarget` stage and `call` in `CallUpstream`, after
`Authorize`, so a cache can sit between the key's rights and the choice of target.

The walk: for each candidate in order, skip it while its breaker is open; try it,
retrying the same target on a retryable failure (backoff with full jitter, or the
upstream's Retry-After up to a cap) for as long as its breaker allows it (a retry asks
again: not once it opened, not beside another request's probe); on a failure `retry_on`
does not list, answer at once; on "context length exceeded", go on with the alias's
`context_fallback` if the key may use it (else that 400); otherwise fall back to the next candidate (of an
alias whose targets' providers serve different endpoints, those that serve the request's). An alias with
limits that a request reaches without naming it (a rule, a downgrade, a context fallback) counts it against
them, or refuses it (`accounting.hops`). A deadline bounds the whole walk:
a retry whose wait would outlast it gives way to the next candidate, and the walk stops
once it has passed (an attempt it cuts short says nothing about the target's health).
Each attempt builds its upstream body from the client's original request. A stream may
fall back until its first content event; after that its errors reach the client, and its
breaker verdict and its count as an attempt wait for its end (`verdicts`). A walk that ends
without an answer after an attempt that failed with its upstream at work on the request (a
timeout waiting for the answer, an answer cut) leaves `ctx.upstream_sent` set, whatever the
attempts after it met: the accounting stage bills its prompt (`_left_at_work`).

A single-target alias costs one dictionary merge (the body, as before routing) and
two counter increments: everything else is precomputed at load. Rules that weigh a prompt past
`OFF_LOOP_CHARS` have it counted in a thread (`call` chooses), unless a stage before did (`ctx.prompt_tokens`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from ..accounting.hops import HOP
from ..errors import GatewayError, NoRoute
from ..pipeline.context import Reply, RequestContext
from ..pipeline.streams import ReplyStream
from ..policy.compiled import ModelRoute, Policy, Target
from ..providers import ENDPOINTS_BY_KIND
from ..providers.base import Call, Provider
from ..schemas.endpoints import Endpoint
from ..store.base import Store
from ..telemetry.metrics import Metrics
from ..telemetry.series import loop_child, loop_value
from ..telemetry.tokens import TokenCounter
from ..upstream.client import at_work
from ..upstream.retry_after import wait_headers
from .attempts import (
    NEXT_AT_ONCE,
    NOT_SENT,
    DeadlineExceeded,
    TargetsUnavailable,
    aggregate,
    backoff,
    breaker_verdict,
    classify,
    final,
)
from .breaker import OPEN, Breakers
from .exchange import exchange, within
from .rules import Facts, count_first, first_match, reads_tokens
from .stats import TargetStats
from .strategies import order_targets, reads_stats
from .verdicts import StreamVerdicts, check_health

__all__ = ["DeadlineExceeded", "Router", "TargetsUnavailable", "all_targets"]

log = logging.getLogger("gateway.routing")
_MAX_ROUTES = 8  # context fallbacks followed per request (cycles are refused at load; this is a backstop)


def _left_at_work(ctx: RequestContext, failures: Sequence[tuple[Target, GatewayError, str]]) -> None:
    """A walk that ends without an answer (its error, or the request cancelled: the client gone, during a backoff
    too) after an attempt that failed with its upstream at work on the request (`upstream.client.at_work`: it timed
    out waiting for the answer, or the answer was cut or too large): `upstream_sent`, which the accounting stage
    bills the prompt for, whatever the attempts after it met (an upstream's own 504, a connect timeout, a 5xx)."""
    if any(at_work(error) for _, error, _ in failures):
        ctx.upstream_sent = True


def _reopens_in(seconds: float) -> dict[str, str]:
    """The wait a 503 `targets_unavailable` tells: until the first breaker may be probed, rounded up, in
    `Retry-After` (a second at least) and `retry-after-ms` (which the SDKs read first: `upstream.retry_after`), so a
    client that waits it finds the cooldown over; a second when it is already over (half-open, another request's probe
    in flight: nothing says when that ends)."""
    return wait_headers(seconds if seconds > 0 else 1.0)


def _routes(policy: Policy) -> list[ModelRoute]:
    return [*policy.models.values(), *(r.route for r in policy.rules if r.route is not None)]


def all_targets(policy: Policy) -> dict[str, Target]:
    """Every target the policy names (aliases and rules), once per `provider/model`: its first listing, in order, or
    its first with a `health_check` when one gives it (the check runs with that listing's `extra_body` and `timeouts`,
    whichever alias comes first; two listings cannot give different checks: `policy.compile`). Only the names and
    that check are read from it: each request is sent with its own alias's listing."""
    found: dict[str, Target] = {}
    for target in (target for route in _routes(policy) for target in route.targets):
        known = found.get(target.name)
        if known is None or (known.health_check is None and target.health_check is not None):
            found[target.name] = target
    return found


class Router:
    def __init__(
        self, policy: Policy, providers: Mapping[str, Provider], store: Store | None, metrics: Metrics,
        tokens: TokenCounter | None = None, rng: random.Random | None = None, previous: Router | None = None,
    ) -> None:
        self.policy = policy
        self.providers = providers
        self.metrics = metrics
        self.tokens = tokens
        self.targets = all_targets(policy)
        # Routes whose providers serve different endpoints (OpenAI's and Anthropic's): candidates by endpoint.
        self._endpoints = {name: providers[name].endpoints if name in providers else ENDPOINTS_BY_KIND.get(
            config.kind, frozenset()) for name, config in policy.providers.items()}
        self._mixed = {id(route) for route in _routes(policy)
                       if len({self._endpoints.get(target.provider) for target in route.targets}) > 1}
        # After a reload, targets that stay keep their measurements and breakers (the same objects, so
        # requests still running on the old policy go on updating them); a reload must not let a
        # target that is down be hammered again.
        kept: dict[str, TargetStats] = previous.stats if previous is not None else {}
        self.stats: dict[str, TargetStats] = {name: kept.get(name) or TargetStats() for name in self.targets}
        shared = store if store is not None and policy.state.backend != "memory" else None
        earlier: Breakers | None = previous.breakers if previous is not None else None
        self.breakers: Breakers = Breakers(policy.breaker, self.targets, shared, on_change=self._breaker_changed,
                                           previous=earlier)
        self._shared, self.rng, self._tasks = shared, rng or random.Random(), set[asyncio.Task[None]]()
        self._counters: dict[tuple[Any, ...], Any] = {}
        self._answers: dict[tuple[str, str], tuple[Any, Any]] = {}  # the success path's two counters' values
        self._verdicts = StreamVerdicts(self.breakers, metrics.attempts)  # a stream's, at its end
        # Aliases whose rules weigh the prompt, and those with limits (hops): empty, and free, in most policies.
        self._counting = frozenset(id(route) for route in policy.models.values() if reads_tokens(route.rules))
        self._limited = frozenset(policy.alias_limits)

    # -- life ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        # The targets whose measurements a strategy reads (`latency`, `least_busy`): only their lone streams pay for
        # keeping them (`exchange`). Set here, as this policy starts serving (the objects outlive a reload).
        read = {target.name for route in _routes(self.policy) if reads_stats(route) for target in route.targets}
        for name, stats in self.stats.items():
            stats.read = name in read
        self.breakers.start()
        for name in self.targets:
            self.metrics.breaker_state.labels(name).set(self.breakers.state(name))
        if self._shared is not None:
            self._spawn(self.breakers.sync_forever())
        for target in self.targets.values():
            if target.health_check is not None:
                self._spawn(check_health(target, self.providers[target.provider], self.breakers,
                                         self.metrics.attempts))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.breakers.aclose()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- choosing -----------------------------------------------------------------------------------

    def select(self, ctx: RequestContext) -> None:
        """Rules, then the strategy: set `ctx.plan` and `ctx.candidates` (or refuse with 400); left to `call` for a
        body past `OFF_LOOP_CHARS` that a rule weighs, not counted yet (then in a thread; no stage between reads it)."""
        route = ctx.route
        assert route is not None
        if self._counting and id(route) in self._counting and count_first(ctx):
            return
        self._choose(ctx, route, None)

    def _choose(self, ctx: RequestContext, route: ModelRoute, facts: Facts | None) -> None:
        if facts is None and (route.rules or route.sticky is not None):
            facts = Facts.of(ctx, self.tokens)  # (`route` is `ctx.route`)
        if route.rules:
            assert facts is not None
            rule = first_match(route.rules, route.alias, facts)
            if rule is not None:
                ctx.rule = rule.name
                if rule.deny is not None:
                    raise NoRoute(rule.deny)
                route = rule.route if rule.route is not None else self.policy.models[rule.alias or route.alias]
        ctx.plan = route
        ctx.candidates = order_targets(route, facts, self.stats, ctx.stream, self.rng)
        if id(route) in self._mixed:
            ctx.candidates = self.serving(ctx.endpoint, ctx.candidates)
        ctx.provider = self.providers[ctx.candidates[0].provider]

    def serving(self, endpoint: Endpoint, candidates: Sequence[Target]) -> Sequence[Target]:
        """The candidates whose provider serves the request's endpoint, in order; all if none does (each refuses it
        unsent: 400 `unsupported_endpoint`). A fallback to one that could not made an upstream's 5xx a 400."""
        serving = [target for target in candidates if endpoint in self._endpoints.get(target.provider, ())]
        return serving or candidates

    # -- calling ------------------------------------------------------------------------------------

    async def call(self, ctx: RequestContext) -> Reply:
        route = ctx.plan
        if route is None:  # left by `select`: a large prompt its alias's rules weigh, counted in a thread first
            route = ctx.route
            assert route is not None
            counted = Facts.of(ctx, self.tokens)
            await counted.count_in_thread()
            self._choose(ctx, route, counted)
            route = ctx.plan
            assert route is not None
        if self._limited and route.alias in self._limited:
            await self._enter(ctx, route)
        deadline = asyncio.get_running_loop().time() + route.deadline_s if route.deadline_s is not None else None
        failures: list[tuple[Target, GatewayError, str]] = []
        candidates = ctx.candidates
        ctx.upstream_sent = False  # (the walk's own requests: not a stage's before it, a semantic cache's embedding)
        try:
            for _ in range(_MAX_ROUTES):
                reply, fallback = await self._walk(ctx, route, candidates, deadline, failures)
                if reply is not None:
                    return reply
                if fallback is None:
                    break
                self._fallback(ctx, "context_length")
                route = fallback
                if self._limited and route.alias in self._limited:
                    await self._enter(ctx, route)
                facts = Facts(ctx.body, ctx.key, ctx.head.raw_headers, self.tokens) if route.sticky else None
                candidates = order_targets(route, facts, self.stats, ctx.stream, self.rng)
                if id(route) in self._mixed:
                    candidates = self.serving(ctx.endpoint, candidates)
            if not failures and deadline is not None and asyncio.get_running_loop().time() >= deadline:
                # The deadline passed before any target was tried (a tiny `deadline_s`): the deadline's own 504.
                raise self._tagged(ctx, DeadlineExceeded(f"`{ctx.alias_label}` found no answer within its deadline "
                                                         "(it passed before any target was tried)"))
            raise self._tagged(ctx, aggregate(ctx.alias_label, failures), failures)
        except BaseException:
            if failures and not ctx.upstream_sent:
                _left_at_work(ctx, failures)
            raise

    async def _enter(self, ctx: RequestContext, route: ModelRoute) -> None:
        """About to be served by an alias with limits of its own, which it reached by a hop (a rule, a budget
        downgrade, a context fallback), not by its name (whose limits admission took): counted against them, or
        refused (429; no `x-should-retry: false`, whatever failed before: the window clears) (`accounting.hops`)."""
        hop = HOP.get()
        if hop is not None and route.alias not in hop.entered and self.policy.models.get(route.alias) is route:
            try:
                await hop.enter(ctx, route.alias)
            except GatewayError as exc:
                raise self._tagged(ctx, exc) from None

    async def _walk(
        self, ctx: RequestContext, route: ModelRoute, candidates: Sequence[Target], deadline: float | None,
        failures: list[tuple[Target, GatewayError, str]],
    ) -> tuple[Reply | None, ModelRoute | None]:
        """Try the candidates in order. Returns a reply, or the context fallback's route, or (None, None)."""
        tried = False
        skipped = 0  # candidates passed over, their circuit open: fallbacks once a later one is tried
        for target in candidates:
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                return None, None  # no time left for another target
            if not self.breakers.allow(target.name):
                skipped += 1
                continue
            if skipped:  # (counted only now: with none left to try, the forced try below is no fallback)
                self._count(self.metrics.fallbacks, ctx.alias_label, "breaker_open").inc(skipped)
                if ctx.fallback_reason is None:
                    ctx.fallback_reason = "breaker_open"
                skipped = 0
            if tried:
                self._fallback(ctx, failures[-1][2] if failures else "breaker_open")
            tried = True
            outcome = await self._target(ctx, route, target, deadline, failures)
            if isinstance(outcome, Reply):
                return outcome, None
            if outcome == "context":
                return None, self.policy.models[route.context_fallback] if route.context_fallback else None
            if outcome == "stop":
                return None, None
        if tried or not candidates:
            return None, None
        names = [t.name for t in candidates]
        if self.policy.breaker.when_all_open == "refuse":
            raise self._tagged(ctx, TargetsUnavailable(
                f"every target of `{ctx.alias_label}` is failing (circuit open); retry later",
                headers=_reopens_in(self.breakers.retry_in(names))))
        forced = self.breakers.least_recently_failed(names)
        target = next(t for t in candidates if t.name == forced)
        outcome = await self._target(ctx, route, target, deadline, failures)
        if isinstance(outcome, Reply):
            return outcome, None
        if outcome == "context" and route.context_fallback:
            return None, self.policy.models[route.context_fallback]
        return None, None

    async def _target(
        self, ctx: RequestContext, route: ModelRoute, target: Target, deadline: float | None,
        failures: list[tuple[Target, GatewayError, str]],
    ) -> Reply | str:
        """One target, with its retries: a reply, or "next", "context" or "stop" (the deadline)."""
        retry = 0
        while True:
            started = time.perf_counter()
            try:
                reply = await self._attempt(ctx, route, target, deadline)
            except GatewayError as exc:
                kind = classify(exc)
                self._failed(ctx, target, exc, kind, time.perf_counter() - started, failures)
                if isinstance(exc, DeadlineExceeded):
                    return "stop"
                if kind in NOT_SENT:  # no attempt made (the access log lists it): the next target may take it
                    ctx.attempt_count -= 1
                    return "next"
                if kind not in route.retry_on and kind not in NEXT_AT_ONCE:  # a full pool, a refused key: the next
                    raise self._tagged(ctx, exc, failures) from None
                if kind == "context_length":
                    fallback = route.context_fallback
                    if fallback is None or (ctx.key is not None and not ctx.key.allows(fallback)):
                        raise self._tagged(ctx, exc, failures) from None  # never an alias the key may not use
                    return "context"
                if retry >= target.retry.attempts or kind in NEXT_AT_ONCE or self.breakers.state(target.name) == OPEN:
                    return "next"  # (open: this failure or another request's opened it; `breaker` says why)
                delay = backoff(target.retry, retry, exc, self.rng)
                if deadline is not None and asyncio.get_running_loop().time() + delay >= deadline:
                    return "next"  # the wait would outlast the deadline: the next target instead (if time is left)
                await asyncio.sleep(delay)
                if not self.breakers.allow(target.name):  # opened meanwhile, or half-open with another's probe
                    return "next"
                self._count(self.metrics.retries, target.name, kind).inc()
                retry += 1
            except BaseException:
                self.breakers.release(target.name)  # cancelled (client gone, shutdown): no verdict
                raise
            else:
                self._answered(ctx, target, time.perf_counter() - started, reply.stream)
                return reply

    def _attempt(self, ctx: RequestContext, route: ModelRoute, target: Target, deadline: float | None
                 ) -> Awaitable[Reply]:
        """One call of `target`: its exchange itself when the route has no deadline (not a coroutine, so that
        the request's task resumes through one frame fewer), else the exchange within the deadline."""
        provider = self.providers[target.provider]
        body = ctx.body
        body = {**body, **target.extra_body, "model": target.upstream_model} if target.extra_body else {
            **body, "model": target.upstream_model}
        call = Call(ctx.endpoint, body, ctx.stream, ctx.request_id, target.timeouts, ctx.traceparent, ctx.read_choices,
                    ctx.tracestate)
        ctx.provider = provider
        ctx.target = target
        ctx.attempt_count += 1
        if not ctx.upstream_started:
            ctx.upstream_started = time.perf_counter()
        stats = self.stats[target.name]
        if deadline is None:
            return exchange(ctx, route, target, provider, call, stats)
        return within(deadline, ctx, route, target, provider, call, stats)

    # -- recording ----------------------------------------------------------------------------------

    def _answered(self, ctx: RequestContext, target: Target, seconds: float, stream: ReplyStream | None) -> None:
        key = (ctx.alias_label, target.name)
        children = self._answers.get(key)
        if children is None:  # added to in line, on the loop's thread (`telemetry.series.loop_value`)
            children = self._answers[key] = (loop_value(loop_child(self.metrics.attempts.labels(target.name, "ok"))),
                                             loop_value(loop_child(self.metrics.routed.labels(*key))))
        if stream is None:
            self.breakers.success(target.name)
            children[0]._value += 1
        else:  # judged, and counted as an attempt, by its whole stream once it ends (`verdicts.StreamVerdicts`)
            self.breakers.opened(target.name)
            stream.add(self._verdicts)
        children[1]._value += 1
        if ctx.attempts is not None:
            ctx.attempts.append((target.name, "ok", round(seconds * 1000, 2)))

    def _failed(
        self, ctx: RequestContext, target: Target, error: GatewayError, kind: str, seconds: float,
        failures: list[tuple[Target, GatewayError, str]],
    ) -> None:
        failures.append((target, error, kind))
        if not isinstance(error, DeadlineExceeded):  # (cut short by the deadline: see below)
            # Failed: a request ending from now on leaves no upstream at work, unless an attempt's failure did (it
            # timed out waiting, its answer was cut): `upstream_sent` again once the walk ends (`_left_at_work`).
            ctx.upstream_sent = False
            self.stats[target.name].failed(kind, ctx.stream, seconds)  # a slow sample for `latency`
        if isinstance(error, DeadlineExceeded):
            # The alias's own deadline ran out, not the target's timeouts: no verdict on its health (as for a
            # cancelled request), or one strict alias would open the breaker every other alias shares; no sample of
            # its speed. `upstream_sent` stays: an attempt already sent leaves its upstream at work, and the request
            # is billed its prompt (`accounting.stage`), as when it times out waiting; one still connecting, nothing
            # (but for an earlier attempt's upstream left at work: `_left_at_work`).
            self.breakers.release(target.name)
        elif (failed := breaker_verdict(kind, error)) is None:
            self.breakers.release(target.name)
        elif failed:
            self.breakers.failure(target.name)
        else:
            self.breakers.success(target.name)  # it answered: alive
        self._count(self.metrics.attempts, target.name, kind).inc()
        if ctx.attempts is None:
            ctx.attempts = []
        ctx.attempts.append((target.name, kind, round(seconds * 1000, 2)))
        usage = error.usage
        if usage is not None and usage.usable():  # an answer refused, billed upstream: the request's cost counts it
            if ctx.rejected is None:
                ctx.rejected = []
            ctx.rejected.append((target, usage))

    def _fallback(self, ctx: RequestContext, reason: str) -> None:
        """Count a hop by its reason; the request's `fallback_reason` (header, log) stays why the first was left."""
        if ctx.fallback_reason is None:
            ctx.fallback_reason = reason
        self._count(self.metrics.fallbacks, ctx.alias_label, reason).inc()

    def _tagged(self, ctx: RequestContext, error: GatewayError,
                failures: Sequence[tuple[Target, GatewayError, str]] = ()) -> GatewayError:
        """The error the client gets, with the routing headers, and `x-should-retry: false` when the walk's
        `failures` say a retry would meet it again (`attempts.final`)."""
        error.headers = {**error.headers, "x-gateway-attempts": str(ctx.attempt_count)}
        if final(failures):
            error.headers["x-should-retry"] = "false"
        if ctx.target is not None:
            error.headers["x-gateway-target"] = ctx.target.header[1].decode("latin-1")
        if ctx.fallback_reason is not None:
            error.headers["x-gateway-fallback-reason"] = ctx.fallback_reason
        return error

    def _count(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = metric.labels(*labels)
        return child

    def _breaker_changed(self, target: str, state: int) -> None:
        self.metrics.breaker_state.labels(target).set(state)
