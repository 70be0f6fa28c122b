"""The response cache of one runtime: reading and writing entries, the semantic indexes, their embedders.

Built only when some alias caches (`Policy.cache.enabled`). Every store failure
is a miss, never an error: with Redis down, requests are served as if there were
no cache, and the cache comes back with Redis (the store probes it by itself).

A semantic cache that embeds through an alias of the policy sends the prompt to
that alias's upstream, so the prompt must first pass what that alias's input
guards would let through for the request's tenant (`_embeddable`): a prompt they
would block or rewrite is not embedded, and its request has no semantic lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any

from ..guards.base import Where
from ..guards.runtime import GuardRuntime
from ..guards.verdict import decide
from ..pipeline.context import RequestContext
from ..policy.cache_check import default_model_dir
from ..policy.cache_schema import CacheSpec
from ..policy.compiled import Policy, Rule
from ..providers.base import Provider
from ..routing.rules import Facts, count_first, first_match, reads_tokens
from ..schemas.endpoints import Endpoint
from ..store.base import Store, StoreUnavailable
from ..store.memory import MemoryStore
from ..telemetry.metrics import Metrics
from ..telemetry.tokens import TokenCounter
from .batch import BatchedGets
from .coalesce import Flights
from .control import CacheResult
from .entry import Entry, NotAnAnswer, answer_bytes, load_entry, pack_entry
from .key import answer_basis, cache_key, semantic_scope, target_basis
from .semantic import AliasEmbedder, Embedder, LocalEmbedder, SemanticIndex, SemanticShare, TooLong, Vector

__all__ = ["ENTRY", "ResponseCache", "SemanticProbe"]

log = logging.getLogger("gateway.cache")
ENTRY = "cache:entry:"
# Decoded entries kept beside the store's bytes, so that a hit on a hot key does not inflate and decode the
# same value again: at most this many, each at most this large (stored and answer bytes alike), so at most
# 32 MiB in all, outside the memory store's own bound.
DECODED_ENTRIES = 256
DECODED_MAX_BYTES = 64 * 1024
# At close, the writes (and unlocks) still running get this long to finish: an answer that completed while the
# gateway drained is stored, not cut.
CLOSE_WAIT_S = 2.0
# Where a prompt sent to an embeddings alias stands for its input guards: an embeddings request's input.
EMBEDDING_INPUT = Where("input", "embedding_input")


class Series:
    """A labelled metric's children, resolved once per label values: `labels()` costs more than the count."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class SemanticProbe:
    """A miss's semantic state, kept to store its vector with the answer."""

    __slots__ = ("scope", "vector")

    def __init__(self, scope: str, vector: Vector | None) -> None:
        self.scope = scope
        self.vector = vector


class ResponseCache:
    """The response cache of one policy. `previous`: the cache of the policy a reload replaces, whose semantic
    indexes an alias keeps when its bound (`max_entries`) is the same: its vectors' scopes name what makes the
    answers (`key.answer_basis`) and the embedder, so a vector of a scope the new policy no longer looks up is
    never compared, and one whose entry went with the store is removed at its first match (`semantic_read`)."""

    def __init__(self, policy: Policy, store: Store, providers: Mapping[str, Provider], metrics: Metrics,
                 tokens: TokenCounter, previous: ResponseCache | None = None) -> None:
        self.policy = policy
        self.store = store
        self.metrics = metrics
        self.tokens = tokens
        self.specs: Mapping[str, CacheSpec] = policy.cache.aliases
        self.compress_min_bytes = policy.cache.settings.compress_min_bytes
        self._targets = {alias: tuple(t.name for t in policy.models[alias].targets) for alias in self.specs}
        self._bases, self._scopes = _bases(policy)
        self._counting = frozenset(alias for alias in self.specs if reads_tokens(policy.models[alias].rules))
        self._tasks: set[asyncio.Task[Any]] = set()
        self.flights = Flights(store, policy.state.backend != "memory", self.spawn)
        self.indexes: dict[str, SemanticIndex] = {}
        self.embedders: dict[str, Embedder] = {}
        self._local: dict[str, LocalEmbedder] = {}
        self._embeddings: dict[str, str] = {}  # alias: the embeddings alias its semantic cache embeds through
        for alias, spec in self.specs.items():
            semantic = spec.semantic
            if semantic is None:
                continue
            kept = previous.indexes.get(alias) if previous is not None else None
            self.indexes[alias] = kept if kept is not None and kept.max_entries == semantic.max_entries else \
                SemanticIndex(semantic.max_entries)
            if semantic.embeddings is not None:
                target = policy.models[semantic.embeddings].targets[0]
                self.embedders[alias] = AliasEmbedder(providers[target.provider], target.upstream_model)
                self._embeddings[alias] = semantic.embeddings
            else:
                model_dir = semantic.model_dir or str(default_model_dir())
                local = self._local.get(model_dir) or LocalEmbedder(model_dir)
                self._local[model_dir] = self.embedders[alias] = local
        self.share = SemanticShare(store, self.indexes) if self.indexes and policy.state.backend != "memory" else None
        # The guards of this policy's runtime, taken from it on the first semantic read that may need them
        # (`_guard_runtime`); known to be none when no alias embeds through another or the policy has no guards.
        self._guards: GuardRuntime | None = None
        self._guards_known = not (self._embeddings and policy.has_guards)
        self.requests = Series(metrics.cache_requests)  # (alias, status)
        self.saved_tokens = Series(metrics.cache_saved_tokens)  # (alias, kind)
        self.saved_usd = Series(metrics.cache_saved_usd)  # (alias,)
        self.semantic_skips = Series(metrics.cache_semantic_skips)  # (alias, reason)
        self._exact_lookup = metrics.cache_lookup.labels("exact")
        # a shared store is read in batches (one MGET per loop turn); the memory store answers at once
        self._gets = BatchedGets(store.get_many, self.spawn) if policy.state.backend != "memory" else None
        # key: (the stored value, its entry or None when it is none, the endpoint it was checked for), oldest first
        self._decoded: dict[str, tuple[bytes, Entry | None, Endpoint | None]] = {}

    async def start(self) -> None:
        for local in self._local.values():
            await local.start()
        if self.share is not None:
            await self.share.start()

    async def aclose(self) -> None:
        if self.share is not None:
            await self.share.aclose()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self._tasks and (left := deadline - time.monotonic()) > 0:  # a write may spawn an unlock: again
            await asyncio.wait(list(self._tasks), timeout=left)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- keys -------------------------------------------------------------------------------------------

    def counts_first(self, ctx: RequestContext, alias: str) -> bool:
        """Whether `rule` would count a prompt past `OFF_LOOP_CHARS` on the loop: the stage awaits `count` first."""
        return alias in self._counting and count_first(ctx)

    async def count(self, ctx: RequestContext) -> None:
        """Count the request's prompt in a thread, for `rule` and the router after it (`ctx.prompt_tokens`)."""
        await Facts.of(ctx, self.tokens).count_in_thread()

    def rule(self, ctx: RequestContext) -> Rule | None:
        """The routing rule that will apply to the request, decided as the router will (None: none, or the alias
        has no rules). Decided once per request: the key and the semantic scope both hold it, and a `deny` rule
        keeps the request from the cache altogether (`CacheStage`). The prompt's count, when a rule weighs it, is the
        request's (`Facts.of`): the guard stage's before, or the router's after."""
        route = ctx.route
        assert route is not None
        if not route.rules:
            return None
        return first_match(route.rules, route.alias, Facts.of(ctx, self.tokens))

    def key(self, ctx: RequestContext, rule: Rule | None) -> str:
        route = ctx.route
        assert route is not None
        plan = _plan(route.alias, rule)
        return cache_key(ctx.tenant, self._bases[plan], ctx.endpoint, plan, self._targets[route.alias], ctx.body)

    # -- reading ----------------------------------------------------------------------------------------

    async def read(self, key: str, max_age: float | None, alias: str, endpoint: Endpoint | None = None,
                   unavailable: bool = False) -> Entry | None:
        """The entry stored under `key`, if it is usable: it decodes, it is an answer of `endpoint` (None: any
        entry that decodes), and it is at most `max_age` old. One that is not is counted `corrupt`. A store that
        does not answer is a miss too, or, when `unavailable`, raises `StoreUnavailable` (counted all the same):
        the semantic cache must not take it for an entry that is gone."""
        started = time.perf_counter()
        try:
            gets = self._gets
            value = await (self.store.get(ENTRY + key) if gets is None else gets.get(ENTRY + key))
        except StoreUnavailable:
            self.metrics.cache_errors.labels("unavailable").inc()
            if unavailable:
                raise
            return None
        finally:
            self._exact_lookup.observe(time.perf_counter() - started)
        if value is None:
            return None
        known = self._decoded.get(key)
        if known is not None and known[2] is endpoint and (known[0] is value or known[0] == value):
            entry = known[1]  # the same bytes: decoded and checked already
        else:
            entry = await self._decode(key, value, endpoint)
        if entry is None:
            self.metrics.cache_errors.labels("corrupt").inc()
            log.warning("cache: an entry could not be decoded, or is not an answer; served as a miss",
                        extra={"fields": {"model": alias}})
            return None
        if max_age is not None and time.time() - entry.created > max_age:
            return None
        return entry

    async def _decode(self, key: str, value: bytes, endpoint: Endpoint | None) -> Entry | None:
        """The entry stored as `value` if it is an answer of `endpoint` (`load_entry`), kept to be reused while
        the same bytes come back for `key` (`read`): a hit on a hot key neither decodes nor checks it again.

        Reused only for the very same stored bytes (the memory store's own object, or equal bytes from
        Redis): a key written again with another answer is decoded afresh. One that is not an answer is kept
        too (as None), so that a cache that may not replace it (`read-only`) does not check it on every
        request. A large one is decoded and checked in a worker thread, on every hit (`load_entry`).
        """
        entry = await load_entry(value, endpoint)
        self._keep(key, value, entry, endpoint)
        return entry

    def _keep(self, key: str, value: bytes, entry: Entry | None, endpoint: Endpoint | None) -> None:
        """Keep `value`'s entry (checked for `endpoint`) decoded for `key`, if both are small."""
        if len(value) <= DECODED_MAX_BYTES and (entry is None or answer_bytes(entry) <= DECODED_MAX_BYTES):
            decoded = self._decoded
            decoded.pop(key, None)
            if len(decoded) >= DECODED_ENTRIES:
                del decoded[next(iter(decoded))]
            decoded[key] = (value, entry, endpoint)

    async def present(self, key: str, endpoint: Endpoint) -> bool:
        """Whether a usable entry is stored under `key` (a corrupt one, or one that is not an answer of `endpoint`,
        is not: its key needs a leader)."""
        value = await self.store.get(ENTRY + key)
        return value is not None and await load_entry(value, endpoint) is not None

    async def semantic_read(self, ctx: RequestContext, spec: CacheSpec, max_age: float | None, rule: Rule | None
                            ) -> tuple[Entry | None, float | None, SemanticProbe | None]:
        """The answer of the most similar stored prompt above the threshold, its similarity, and the probe (None:
        the prompt is not embedded, and its answer is stored without a vector): a prompt longer than `max_chars`, or
        than the local model reads (`TooLong`, told by the embedding's own tokenization), is not comparable."""
        semantic = spec.semantic
        route = ctx.route
        assert semantic is not None and route is not None
        plan = _plan(route.alias, rule)
        found = semantic_scope(ctx.tenant, self._scopes[plan], ctx.endpoint, plan, self._targets[route.alias],
                               ctx.body)
        if found is None or len(found[1]) > semantic.max_chars:
            return None, None, None
        scope, text = found
        guards = self._guards if self._guards_known else self._guard_runtime(ctx)
        if guards is not None and not await self._embeddable(guards, ctx.tenant, self._embeddings[route.alias], text):
            self.semantic_skips(route.alias, "guarded").inc()
            return None, None, None
        started = time.perf_counter()
        try:
            vector = await self.embedders[route.alias].embed(text)
        except TooLong:  # as past `max_chars`: no lookup, and its answer is stored for exact hits only
            return None, None, None
        probe = SemanticProbe(scope, vector)
        if vector is None:
            return None, None, probe
        index = self.indexes[route.alias]
        nearest = index.nearest(scope, vector)
        self.metrics.cache_lookup.labels("semantic").observe(time.perf_counter() - started)
        if nearest is None:
            return None, None, probe
        key, similarity = nearest
        self.metrics.cache_similarity.labels(route.alias).observe(max(0.0, similarity))
        if similarity < semantic.threshold:
            return None, similarity, probe
        try:  # (no `max_age` here: an entry too old for this request is still stored, and its vector stays)
            entry = await self.read(key, None, route.alias, ctx.endpoint, unavailable=True)
        except StoreUnavailable:  # not known to be gone: the vector stays for when the store answers again
            return None, similarity, probe
        if entry is None:  # expired (or corrupt, which the answer of this miss replaces): its vector goes
            index.remove(scope, key)
        elif max_age is not None and time.time() - entry.created > max_age:
            return None, similarity, probe
        return entry, similarity, probe

    def _guard_runtime(self, ctx: RequestContext) -> GuardRuntime | None:
        """The guards of the runtime this cache belongs to (one of its services, as the admin API finds them)."""
        self._guards = next((s for s in ctx.runtime.services if isinstance(s, GuardRuntime)), None)
        self._guards_known = True
        return self._guards

    async def _embeddable(self, guards: GuardRuntime, tenant: str, embeddings: str, text: str) -> bool:
        """Whether `text` may go to the `embeddings` alias's upstream as it is: the input guards a request of `tenant`
        to that alias would meet (`GuardRuntime.served`) neither block it nor change it. Run as the guard stage runs
        them (the pool, timeouts, `fail:`), their verdicts counted in the guard metrics, their findings kept out of
        the request's own guard session (its header, and whether its answer is stored). A text they would rewrite
        is not embedded rewritten either: its vector would stand for another prompt than the answer stored under
        it. No guard: nothing is run."""
        guard_set = guards.served(tenant, embeddings, self.policy.models)
        if not guard_set:
            return True
        for limit in guard_set.limits:
            found = await limit.check_request_off_loop([text], 1)  # (an embeddings request of one input)
            if limit.mode == "enforce" and any(f.action == "block" for f in found):
                return False
        if not guard_set.input:
            return True
        enforced, _ = await guards.detect(guard_set.input, text, EMBEDDING_INPUT)
        return decide(text, enforced, [], None).decision == "allow"

    def result(self, entry: Entry, status: str, similarity: float | None) -> CacheResult:
        usage = entry.usage
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        usd = entry.cost_usd  # what accounting charged for it (the answering target's price, every token kind)
        if usd is None:  # an entry written without its cost: the policy's price for the model that answered
            price = self.policy.prices.price(entry.provider, entry.model)
            usd = 0.0 if price is None or usage is None else price.cost(
                prompt, completion, usage.cached_tokens, usage.cache_write_tokens, usage.reasoning_tokens)
        age = max(0.0, time.time() - entry.created)
        return CacheResult("semantic-hit" if status == "semantic-hit" else "hit", age, similarity, prompt, completion,
                           usd)

    # -- writing ----------------------------------------------------------------------------------------

    async def write(self, alias: str, key: str, entry: Entry, ttl_s: float, probe: SemanticProbe | None,
                    max_bytes: int, endpoint: Endpoint | None = None) -> str:
        """Store a miss's answer; what became of it (its `gateway_cache_stores_total` outcome). An `entry` that is
        not an answer of `endpoint` (None: not checked) is not stored: `uncacheable`."""
        try:
            value = await pack_entry(entry, self.compress_min_bytes, max_bytes, endpoint)  # large: in a thread
        except NotAnAnswer:
            log.warning("cache: an upstream's answer is not one a hit could replay; not stored",
                        extra={"fields": {"model": alias}})
            return self._stored(alias, "uncacheable")
        if value is None:
            return self._stored(alias, "too_large")
        try:
            await self.store.set(ENTRY + key, value, ttl_s)
        except StoreUnavailable:
            return self._stored(alias, "unavailable")
        self.metrics.cache_stores.labels(alias, "stored").inc()
        self.metrics.cache_bytes.labels(alias).inc(len(value))
        if endpoint is not None:
            self._keep(key, value, entry, endpoint)  # checked: its first hit need not decode nor check it again
        if isinstance(self.store, MemoryStore):
            evicted = self.store.take_evictions()
            if evicted > 0:
                self.metrics.cache_evictions.inc(evicted)
        if probe is not None and probe.vector is not None:
            self.indexes[alias].add(probe.scope, key, probe.vector)
            if self.share is not None:
                await self.share.publish(alias, probe.scope, key, probe.vector)
        return "stored"

    def _stored(self, alias: str, outcome: str) -> str:
        self.metrics.cache_stores.labels(alias, outcome).inc()
        return outcome


def _bases(policy: Policy) -> tuple[dict[str, str], dict[str, str]]:
    """By plan (`_plan`) of every alias that caches, with no rule and with each rule that may apply to it: its
    `answer_basis` (the exact keys), and, for an alias with a semantic cache, that basis with its embedder (the
    semantic scopes: a vector is compared only with vectors of the same embedder, here and on other replicas)."""
    models, providers = policy.models, policy.providers
    bases: dict[str, str] = {}
    scopes: dict[str, str] = {}
    for alias, spec in policy.cache.aliases.items():
        semantic = spec.semantic
        embedder: list[Any] = []
        if semantic is not None and semantic.embeddings is not None:
            target = models[semantic.embeddings].targets[0]
            embedder = ["alias", target_basis(target, providers[target.provider])]
        elif semantic is not None:
            embedder = ["local", semantic.model_dir]
        for rule in (None, *models[alias].rules):
            if rule is not None and rule.deny is not None:
                continue  # refused: never looked up
            plan = _plan(alias, rule)
            bases[plan] = answer_basis(models, providers, alias, rule)
            if semantic is not None:
                scopes[plan] = answer_basis(models, providers, alias, rule, *embedder)
    return bases, scopes


def _plan(alias: str, rule: Rule | None) -> str:
    """The alias, and the routing rule that will apply: a rule may send the same body elsewhere."""
    return alias if rule is None else f"{alias}\x00{rule.name}"
