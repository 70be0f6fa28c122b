"""Decide a request under a policy without serving it: no upstream call, no side effects.

The same functions that serve traffic make each decision: the key ring authenticates,
the router's `explain` applies the rules and the strategy, the guard runtime checks the
request's text. What differs is only what is left out: nothing is sent, no breaker or
latency statistic is read or updated (an offline decider sees no traffic: breakers read
as closed, latency and load as unknown), no store is touched, and the router and guard
runtime count into metrics that record nothing (`dryrun.unrecorded`), so the live ones count
only served requests, with several workers too. One decision per kind, one function per kind,
called in pipeline order (see `dryrun.decisions` for adding one).
The routing rule that applies is found once (its facts' prompt count, past `OFF_LOOP_CHARS`,
in a thread: a shadow policy decides on the gateway's loop) and read by every kind: the
limits of the alias it sends the request to count too (`accounting.hops`: at the route, after
the guards and the cache, as the router takes them), its guards run, and a `deny` keeps the
request from the cache.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ..accounting.outright import completion_cap, reach_rates, refused_outright
from ..accounting.prompt import PromptEstimator
from ..auth.keys import VirtualKey
from ..cache.control import directives, plan
from ..errors import BudgetExceeded, GatewayError, NoRoute, RateLimited
from ..guards.base import Finding, Where
from ..guards.joined import Joined
from ..guards.runtime import GuardRuntime
from ..guards.stage import _blocked as blocked_error  # the live refusal's wording
from ..guards.texts import input_texts
from ..pipeline.dialect import Dialect
from ..pipeline.stages import authenticate, decode_body, model_not_found
from ..policy.accounting_schema import BudgetSpec, LimitSpec
from ..policy.compiled import Policy, Rule
from ..routing.explain import route_plan
from ..routing.router import Router
from ..routing.rules import Facts, first_match, reads_tokens
from ..schemas.endpoints import Endpoint
from ..telemetry.tokens import TokenCounter
from ..telemetry.usage import OFF_LOOP_CHARS
from .decisions import (
    AppliedBudget,
    AppliedLimit,
    AuthDecision,
    CacheDecision,
    Decisions,
    GuardsDecision,
    GuardVerdict,
    Kind,
    LimitsDecision,
    RouteDecision,
    Scope,
    TargetsDecision,
    Verdict,
)
from .unrecorded import UnrecordedMetrics

__all__ = ["Decider", "DecisionRequest", "decoded", "endpoint_of"]

_REWRITES = frozenset({"redact", "mask", "pseudonymize"})
_RANK = {"allow": 0, "record": 1, "redact": 2, "block": 3}
_MEMO_SIZE = 4_096
_ScopeLimits = tuple[Scope, str, LimitSpec | None, BudgetSpec | None]  # (scope, its name, its limits, its budget)
_Hop = tuple[str, str] | None  # (the rule, the alias it sends the request to) when that alias has limits of its own


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    """A request as the gateway would receive it. `key` (a record picked by name) wins over `credential`."""

    body: bytes
    endpoint: Endpoint = Endpoint.CHAT
    credential: str | None = None
    key: VirtualKey | None = None
    headers: Sequence[tuple[bytes, bytes]] = ()  # lower-case names, as the ASGI server gives them
    # A key created at run time (admin API) that the credential stands for: it is in the store, not the
    # policy, so a policy with `dynamic_keys` on accepts it as the live gateway found it.
    run_time_key: VirtualKey | None = None
    # The client's wire format when it is not OpenAI's (`/v1/messages`): `body` is decoded by it into the internal
    # request (`endpoint` CHAT), as Ingress decoded it for the live pipeline.
    dialect: Dialect | None = None


@dataclass(frozen=True, slots=True)
class _Sampling:
    """The parts of a body the cache's `cacheable` reads (as the decoded request's attributes)."""

    temperature: Any
    seed: Any


class _Refused(Exception):
    """The gateway would answer `error` here; `decision` is the refusing kind's own decision, if any."""

    def __init__(self, kind: Kind | None, error: GatewayError, decision: Any = None) -> None:
        self.kind = kind
        self.error = error
        self.decision = decision


class Decider:
    """Decides requests under one policy. Build once, `start` (guards load their analyzers), reuse."""

    def __init__(self, policy: Policy, tokens: TokenCounter | None = None) -> None:
        self.policy = policy
        self.tokens = tokens
        # Deciding counts nothing in the gateway's metrics, with several workers too (a private `Metrics()` writes
        # to the shared multiprocess files there): metrics that record nothing.
        metrics = UnrecordedMetrics()
        self.router = Router(policy, {}, None, metrics, tokens, rng=random.Random(0))
        count = tokens.count if tokens is not None else (lambda text: (len(text) + 3) // 4)
        self.guards = GuardRuntime(policy.guards, metrics, count) if policy.has_guards else None
        self._limits_memo: dict[tuple[bytes, str, _Hop], LimitsDecision] = {}  # every part comes from the policy
        self._prompts = PromptEstimator(tokens) if tokens is not None else None
        self._rates = reach_rates(policy.models)  # as the accounting stage reserves

    async def start(self) -> None:
        if self.guards is not None:
            await self.guards.start()

    async def aclose(self) -> None:
        if self.guards is not None:
            await self.guards.aclose()
        await self.router.aclose()

    async def decide(self, request: DecisionRequest, body: dict[str, Any] | None = None) -> Decisions:
        """All decisions for `request`; `body`: its body already decoded (and valid), shared by two deciders."""
        found: dict[str, Any] = {}
        alias: str | None = None
        stream = False
        try:
            found["auth"], key = self._auth(request)
            if body is None:
                body, _ = decoded(request)
            alias = body["model"]
            stream = body.get("stream") is True
            found["auth"] = self._authorize(found["auth"], key, alias)
            route = self.policy.models[alias]
            facts = Facts(body, key, request.headers, self.tokens, route.upstream_model, endpoint=request.endpoint)
            if route.rules and len(request.body) > OFF_LOOP_CHARS and reads_tokens(route.rules):
                await facts.count_in_thread()
            rule = first_match(route.rules, alias, facts) if route.rules else None
            hop = self._hop(alias, rule)
            # Serving's order: admission (the caller's and the named alias's limits), the guards, the cache, then the
            # router, which takes the limits of the alias a rule moves the request to (`Router._enter`) once it is
            # routed: a request the guards block, or the cache answers, never reaches them.
            found["limits"] = self._limits(request.endpoint, body, key, alias, hop)
            found["guards"] = await self._guards(request.endpoint, body, key, _served_alias(alias, rule))
            found["cache"] = self._cache(request.endpoint, body, request.headers, alias, rule)
            found["route"], found["targets"] = self._route(facts, alias, stream, request.endpoint)
            if hop is not None:
                self._hop_limits(found["limits"], hop)
        except _Refused as refused:
            error = refused.error
            if refused.kind is not None and refused.decision is not None:
                found[refused.kind] = refused.decision
            return Decisions(policy_version=self.policy.version, endpoint=request.endpoint.path, alias=alias,
                             stream=stream, blocked=True, status=error.status, blocked_by=refused.kind or "request",
                             error=error.message, **found)
        return Decisions(policy_version=self.policy.version, endpoint=request.endpoint.path, alias=alias,
                         stream=stream, **found)

    # -- one function per kind, in pipeline order ---------------------------------------------------

    def _auth(self, request: DecisionRequest) -> tuple[AuthDecision, VirtualKey | None]:
        if request.key is not None:
            key: VirtualKey | None = request.key
        else:
            try:
                key = authenticate(self.policy, request.credential)
            except GatewayError as exc:
                if request.run_time_key is None or not self.policy.dynamic_keys.enabled:
                    raise _Refused("auth", exc, AuthDecision(caller="refused")) from None
                key = request.run_time_key
        if key is None:
            return AuthDecision(caller="anonymous"), None
        return AuthDecision(caller="key", tenant=key.tenant, key=key.name), key

    def _authorize(self, auth: AuthDecision, key: VirtualKey | None, alias: str) -> AuthDecision:
        allowed = alias in self.policy.models and (key is None or key.allows(alias))
        decided = AuthDecision(caller=auth.caller, tenant=auth.tenant, key=auth.key, allowed=allowed)
        if not allowed:
            raise _Refused("auth", model_not_found(alias), decided) from None
        return decided

    def _hop(self, alias: str, rule: Rule | None) -> _Hop:
        """The rule and the alias it sends the request to, when that alias (not `alias`) has limits: the router
        counts the request against them too (`Router._enter`). A rule with its own targets, or a `deny`, has none."""
        if rule is None or rule.alias is None or rule.alias == alias or rule.alias not in self.policy.alias_limits:
            return None
        return rule.name, rule.alias

    def _limits(self, endpoint: Endpoint, body: dict[str, Any], key: VirtualKey | None, alias: str, hop: _Hop = None
                ) -> LimitsDecision:
        """What applies (key, tenant, alias, and the limits of `hop`'s alias), read from the accounting shapes, and
        what the request would reserve; refused when it needs more than a whole tpm window or hard budget of the
        caller or the named alias (admission's; `hop`'s alias refuses later, at the route: `_hop_limits`). Live
        counters are not read."""
        memo = (key.digest if key is not None else b"", alias, hop)
        applied = self._limits_memo.get(memo)
        if applied is None:
            if len(self._limits_memo) >= _MEMO_SIZE:
                self._limits_memo.clear()
            applied = self._limits_memo[memo] = self._applied(key, alias, hop)
        if not applied.budgets and not any(limit.tpm for limit in applied.limits):
            return applied
        route = self.policy.models[alias]
        prompt = self._prompts.estimate_body(body, route.upstream_model, endpoint) if self._prompts is not None else 0
        cap, _ = completion_cap(endpoint.streams, body, self.policy.accounting.default_max_tokens, endpoint)
        rate_in, rate_out = self._rates.get(alias, (0.0, 0.0))
        tokens, cost = prompt + cap, (prompt * rate_in + cap * rate_out) / 1_000_000
        refused = refused_outright(self._scopes(key, alias), tokens, cost)
        decided = LimitsDecision(limits=applied.limits, budgets=applied.budgets, tokens=tokens, max_usd=cost,
                                 refused=f"{refused[0]} of {refused[1]} {refused[2]}" if refused else None)
        if refused is not None:
            raise _Refused("limits", _outright(refused, tokens, cost), decided)
        return decided

    def _hop_limits(self, decided: LimitsDecision, hop: tuple[str, str]) -> None:
        """The router's check, once the request is routed: the alias a rule moved it to refuses it (429) when it needs
        more than that alias's whole tpm window (a hop takes no budget), as `Router._enter` would."""
        refused = refused_outright([("alias", hop[1], self.policy.alias_limits[hop[1]], None)], decided.tokens, 0.0)
        if refused is not None:
            raise _Refused("limits", _outright(refused, decided.tokens, decided.max_usd),
                           msgspec.structs.replace(decided, refused=f"{refused[0]} of {refused[1]} {refused[2]}"))

    def _scopes(self, key: VirtualKey | None, alias: str) -> list[_ScopeLimits]:
        """The scopes admission applies limits and budgets to, in the accounting stage's order (key, tenant,
        alias); a hop's alias adds its limits only, at the route (`_hop_limits`: a hop takes no budget,
        `accounting.hops`)."""
        spec = self.policy.spec
        scopes: list[_ScopeLimits] = []
        if key is not None:
            scopes.append(("key", key.name, key.limits, key.budget))
            tenant = spec.tenants.get(key.tenant) if spec is not None else None
            if tenant is not None:
                scopes.append(("tenant", key.tenant, tenant.limits, tenant.budget))
        model = spec.models.get(alias) if spec is not None else None
        if model is not None:
            scopes.append(("alias", alias, model.limits, model.budget))
        return scopes

    def _applied(self, key: VirtualKey | None, alias: str, hop: _Hop) -> LimitsDecision:
        scopes = self._scopes(key, alias)
        limits = tuple(AppliedLimit(scope=scope, name=name, rpm=lim.rpm, tpm=lim.tpm, concurrent=lim.concurrent)
                       for scope, name, lim, _ in scopes if lim is not None)
        if hop is not None:
            lim = self.policy.alias_limits[hop[1]]
            limits += (AppliedLimit(scope="alias", name=hop[1], rpm=lim.rpm, tpm=lim.tpm, concurrent=lim.concurrent,
                                    by_rule=hop[0]),)
        budgets = tuple(
            AppliedBudget(scope=scope, name=name, usd=b.usd, period=b.period, mode=b.mode,
                          downgrade_at=b.downgrade.at if b.downgrade else None,
                          downgrade_alias=b.downgrade.alias if b.downgrade else None)
            for scope, name, _, b in scopes if b is not None)
        return LimitsDecision(limits=limits, budgets=budgets)

    async def _guards(self, endpoint: Endpoint, body: dict[str, Any], key: VirtualKey | None, served: str
                      ) -> GuardsDecision | None:
        """Every input guard's verdict on the request's text, each guard on its own (what it would do), those of the
        alias that serves it (`served`)."""
        if self.guards is None:
            return None
        guard_set = self.guards.served(key.tenant if key is not None else "anonymous", served, self.policy.models)
        if not guard_set:
            return None
        refs = list(input_texts(endpoint, body))
        # (a message's text parts with an image between them are read as the live stage reads them: `Joined.seams`)
        texts: list[tuple[str, Where, list[int]]] = [
            (container[k], where, container.seams if type(container) is Joined else []) for container, k, where in refs]
        messages = len(body.get("messages") or ()) if endpoint is Endpoint.CHAT else len(texts)
        verdicts: list[GuardVerdict] = []
        limit_blocking: list[Finding] = []  # the findings of the first enforced limit that blocks
        for limit in guard_set.limits:
            found = limit.check_request([t for t, _, _ in texts], messages)
            verdicts.append(_verdict(limit.name, limit.mode, found))
            if not limit_blocking and limit.mode == "enforce" and any(f.action == "block" for f in found):
                limit_blocking = found
        blocking: list[Finding] = []  # the enforced input guards' findings that block
        for guard in guard_set.input:
            found = []
            for text, where, seams in texts:
                enforced, shadow = await self.guards.detect([guard], text, where, seams)
                found.extend(enforced or shadow)
                blocking.extend(f for f in enforced if f.action == "block")
            verdicts.append(_verdict(guard.name, guard.mode, found))
        enforced_verdicts = [v.verdict for v in verdicts if v.mode == "enforce"]
        verdict: Verdict = max(enforced_verdicts, key=_RANK.__getitem__, default="allow")
        decided = GuardsDecision(verdict=verdict, guards=tuple(verdicts))
        if verdict == "block":
            # The live stage's refusal, word for word: it stops at the first limit that blocks, before the guards.
            raise _Refused("guards", blocked_error("request", limit_blocking or blocking), decided)
        return decided

    def _cache(self, endpoint: Endpoint, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]], alias: str,
               rule: Rule | None) -> CacheDecision | None:
        """Whether the alias's cache would look up and store (None: the alias has no cache), decided by the
        cache stage's own `plan`; what the store holds is not read. A request a `deny` rule refuses never reaches
        the cache (the stage passes it on to the router's refusal)."""
        spec = self.policy.cache.aliases.get(alias)
        if spec is None:
            return None
        if rule is not None and rule.deny is not None:
            return CacheDecision(lookup=False, store=False, semantic=False, reason="deny")
        decided = plan(spec, endpoint, _Sampling(body.get("temperature"), body.get("seed")), directives(headers))
        return CacheDecision(lookup=decided.lookup, store=decided.store,
                             semantic=decided.lookup and spec.semantic is not None, reason=decided.reason)

    def _route(self, facts: Facts, alias: str, stream: bool, endpoint: Endpoint
               ) -> tuple[RouteDecision, TargetsDecision]:
        route = self.policy.models[alias]
        try:
            rule, plan, order = route_plan(self.router, facts, alias, stream, endpoint)
        except NoRoute as exc:
            rule_name = next((r.name for r in route.rules if r.deny == exc.message), None)
            raise _Refused("route", exc, RouteDecision(rule=rule_name, denied=exc.message)) from None
        random_draw = plan.strategy == "weighted" and (plan.sticky is None or facts.sticky_value(plan.sticky) is None)
        deterministic = plan.single or not (random_draw or plan.strategy in ("latency", "least_busy"))
        return (RouteDecision(rule=rule, route=plan.alias, strategy=plan.strategy),
                TargetsDecision(order=tuple(t.name for t in order), deterministic=deterministic))


def _outright(refused: tuple[str, str, str], tokens: int, cost: float) -> GatewayError:
    """The refusal of a request no counter could let through (`refused_outright`'s answer)."""
    what, kind, _ = refused
    if what == "tpm":
        return RateLimited(f"the request needs {tokens} tokens, more than the tokens per minute of this {kind}")
    return BudgetExceeded(f"the request may cost ${cost:.6f}, more than the {kind}'s whole budget")


def _served_alias(alias: str, rule: Rule | None) -> str:
    """The alias whose guards the guard stage runs: the one `rule` sends the request to, as `GuardStage` finds it
    (`rule_alias`; its redactions, which may move the request again, are not made here)."""
    return rule.alias if rule is not None and rule.alias is not None else alias


def decoded(request: DecisionRequest) -> tuple[dict[str, Any], msgspec.Struct]:
    """The body as the gateway decodes it (Ingress: by the request's dialect, if any); a refusal (400) when it would
    refuse it."""
    try:
        if request.dialect is not None:
            return request.dialect.decode(request.body, request.headers)
        return decode_body(request.body, request.endpoint)
    except GatewayError as exc:
        raise _Refused(None, exc) from None


def _verdict(name: str, mode: str, found: list[Finding]) -> GuardVerdict:
    verdict: Verdict
    if any(f.action == "block" for f in found):
        verdict = "block"
    elif any(f.action in _REWRITES for f in found):
        verdict = "redact"
    else:
        verdict = "record" if found else "allow"
    return GuardVerdict(guard=name, mode=mode, verdict=verdict,
                        types=tuple(sorted({f.type for f in found})))


def endpoint_of(body: Any) -> Endpoint:
    """The endpoint a request body is for: `messages` chat, `prompt` completions, `input` embeddings."""
    if isinstance(body, dict) and "messages" not in body:
        if "input" in body:
            return Endpoint.EMBEDDINGS
        if "prompt" in body:
            return Endpoint.COMPLETIONS
    return Endpoint.CHAT
