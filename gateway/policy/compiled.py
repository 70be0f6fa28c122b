"""The policy as the running gateway sees it: frozen, cross-checked, secrets resolved.

Built once per load by `policy.compile`; a request reads the `Policy` it started
with and never sees a half-applied change (a reload swaps the whole object).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ..auth.keys import KeyRing
from ..store.base import StoreConfig
from ..telemetry.labels import MetricLabels
from .accounting_schema import AccountingSpec, BudgetSpec, LimitSpec, TenantSpec
from .cache_check import CachePolicy
from .guard_schema import GuardsSpec
from .keys_schema import DynamicKeysSpec
from .provider_schema import ProviderOptions
from .schema import AuthMode, BreakerSpec, PolicySpec, PriceSpec, ProviderKind, ServerSpec
from .telemetry_schema import TelemetrySpec

__all__ = [
    "ANTHROPIC_1H_WRITE_FACTOR",
    "HealthCheck",
    "Match",
    "ModelRoute",
    "Policy",
    "Price",
    "PriceTable",
    "ProviderConfig",
    "RetryPolicy",
    "Rule",
    "Target",
    "Timeouts",
]

# Anthropic bills a write to its 1-hour prompt cache (`cache_control: {ttl: "1h"}`) at twice the input price
# (https://docs.claude.com/en/docs/build-with-claude/prompt-caching#pricing): an Anthropic target's rate for them
# when its price gives none (`Price.for_kind`).
ANTHROPIC_1H_WRITE_FACTOR = 2.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: ProviderKind
    base_url: str
    headers: Mapping[str, str] = field(repr=False)  # auth header included: never print
    query: Mapping[str, str]
    timeouts: Timeouts
    pool_size: int
    pool_timeout_s: float
    keepalive_s: float
    stream_usage: bool
    chunk_delay_ms: float
    max_response_bytes: int = 64 * 1024 * 1024
    secrets: tuple[str, ...] = field(default=(), repr=False)  # credential values: scrubbed from upstream errors
    public_hosts: tuple[str, ...] = ()  # the provider's own host: may appear in its error messages
    options: ProviderOptions | None = None  # the kind's own block (policy/provider_schema.py), if any


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens, by kind. Unset kinds fall back: cached input and cache writes to input,
    reasoning to output (what OpenAI, Anthropic and Google bill them at unless they say otherwise), and writes to
    Anthropic's 1-hour cache to the cache write rate (`for_kind` sets Anthropic's own: twice the input)."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None
    reasoning_per_mtok: float | None = None
    date: str | None = None
    source: str | None = None
    cache_write_1h_per_mtok: float | None = None  # (last: the fields above keep their positions)

    @classmethod
    def of(cls, spec: PriceSpec) -> Price:
        return cls(spec.input_per_mtok, spec.output_per_mtok, spec.cached_input_per_mtok,
                   spec.cache_write_per_mtok, spec.reasoning_per_mtok, spec.date, spec.source,
                   spec.cache_write_1h_per_mtok)

    def for_kind(self, kind: ProviderKind) -> Price:
        """This price as a target of a `kind` provider pays it: an Anthropic target's 1-hour cache writes, when the
        price does not say, at Anthropic's rate for them (twice the input price, where a 5-minute write is
        1.25 times it); any other kind's at the cache write rate. Decided once, when the policy is compiled."""
        if kind != "anthropic" or self.cache_write_1h_per_mtok is not None:
            return self
        return replace(self, cache_write_1h_per_mtok=ANTHROPIC_1H_WRITE_FACTOR * self.input_per_mtok)

    @property
    def per_token(self) -> float:
        """One figure to rank targets by: input and output prices, equally weighted."""
        return (self.input_per_mtok + self.output_per_mtok) / 2_000_000

    def cost(self, prompt: int, completion: int, cached: int = 0, cache_write: int = 0, reasoning: int = 0,
             cache_write_1h: int = 0) -> float:
        """USD for one answer. `prompt` includes cached and written tokens, `completion` includes reasoning
        (as OpenAI reports them), `cache_write` the writes to a 1-hour cache (`cache_write_1h`, as Anthropic's
        `cache_creation_input_tokens` counts them); each part is billed at its own rate."""
        cached = min(max(cached, 0), prompt)
        cache_write = min(max(cache_write, 0), prompt - cached)
        cache_write_1h = min(max(cache_write_1h, 0), cache_write)
        reasoning = min(max(reasoning, 0), completion)
        cached_rate = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        write_rate = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        hour_rate = write_rate if self.cache_write_1h_per_mtok is None else self.cache_write_1h_per_mtok
        reasoning_rate = self.output_per_mtok if self.reasoning_per_mtok is None else self.reasoning_per_mtok
        micro = ((prompt - cached - cache_write) * self.input_per_mtok + cached * cached_rate
                 + (cache_write - cache_write_1h) * write_rate + cache_write_1h * hour_rate
                 + (completion - reasoning) * self.output_per_mtok + reasoning * reasoning_rate)
        return micro / 1_000_000


class PriceTable:
    """Prices of upstream models: the one place routing and accounting read them from.

    Keys are an upstream model name (`gpt-4o-mini`) or one provider's (`azure/gpt-4o-mini`, which wins).
    """

    __slots__ = ("_prices",)

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)

    def price(self, provider: str, model: str) -> Price | None:
        return self._prices.get(f"{provider}/{model}") or self._prices.get(model)

    def __len__(self) -> int:
        return len(self._prices)

    def entries(self) -> dict[str, Price]:
        """Every price by its key (a copy): what `gateway diff` compares."""
        return dict(self._prices)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # retries of the same target after its first try
    backoff_s: float
    backoff_max_s: float
    retry_after_max_s: float


@dataclass(frozen=True, slots=True)
class HealthCheck:
    interval_s: float
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream model behind an alias. `name` (`provider/model`) keys its breaker and metrics."""

    name: str
    provider: str
    upstream_model: str
    weight: float
    retry: RetryPolicy
    price: Price | None
    timeouts: Timeouts | None = None  # None: the provider's own
    extra_body: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    health_check: HealthCheck | None = None
    header: tuple[bytes, bytes] = (b"x-gateway-target", b"")  # precomputed response header


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """Where an alias (or a rule's target list) goes: its targets, and how to order them."""

    alias: str
    targets: tuple[Target, ...]
    strategy: str = "priority"
    sticky: str | None = None  # "tenant", "key", "user" or "header:<name>"
    explore: float = 0.05
    retry_on: frozenset[str] = frozenset()
    context_fallback: str | None = None
    deadline_s: float | None = None
    description: str = ""
    rules: tuple[Rule, ...] = ()  # the rules that may apply to requests for this alias, in policy order
    cumulative: tuple[float, ...] = ()  # weighted: running sums of the weights

    @property
    def provider(self) -> str:
        return self.targets[0].provider

    @property
    def upstream_model(self) -> str:
        return self.targets[0].upstream_model

    @property
    def single(self) -> bool:
        """One target, nothing to decide: the hot path skips every strategy."""
        return len(self.targets) == 1


@dataclass(frozen=True, slots=True)
class Match:
    """A rule's conditions, compiled: sets to test membership in, header names as lower-case bytes."""

    alias: frozenset[str] | None = None
    tenant: frozenset[str] | None = None
    key: frozenset[str] | None = None
    headers: tuple[tuple[bytes, frozenset[str] | None], ...] = ()  # None: present with any value
    user: frozenset[str] | None = None
    metadata: tuple[tuple[str, frozenset[str]], ...] = ()
    prompt_tokens_over: int | None = None
    prompt_tokens_under: int | None = None
    has_tools: bool | None = None
    has_images: bool | None = None
    json_response: bool | None = None

    @property
    def needs_tokens(self) -> bool:
        return self.prompt_tokens_over is not None or self.prompt_tokens_under is not None


@dataclass(frozen=True, slots=True)
class Rule:
    """First match wins: send to `alias`, to `route` (a target list), or refuse with `deny`."""

    name: str
    match: Match
    alias: str | None = None
    route: ModelRoute | None = None
    deny: str | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    source: str
    version: str  # sha256 over the policy's files, short: names this policy in headers, metrics, logs
    server: ServerSpec
    state: StoreConfig
    auth: AuthMode
    keys: KeyRing
    providers: Mapping[str, ProviderConfig]
    models: Mapping[str, ModelRoute]
    rules: tuple[Rule, ...] = ()
    prices: PriceTable = field(default_factory=lambda: PriceTable({}))
    breaker: BreakerSpec = field(default_factory=BreakerSpec)
    warnings: tuple[str, ...] = ()
    metrics_token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    guards: GuardsSpec = field(default_factory=GuardsSpec)
    dynamic_keys: DynamicKeysSpec = field(default_factory=DynamicKeysSpec)  # keys created at run time
    telemetry: TelemetrySpec = field(default_factory=TelemetrySpec)
    labels: MetricLabels = field(default_factory=MetricLabels)  # the closed sets metric labels take values from
    files: tuple[str, ...] = ()  # the policy's files, the root first (`include:`); `version` hashes them all
    watch: tuple[str, ...] = ()  # what the reload watcher polls: the files, glob folders, the shadow's files
    shadow: Policy | None = None  # `server.shadow_policy`: a candidate decided beside this one, never served
    spec: PolicySpec | None = field(default=None, repr=False)  # the merged raw structs: dry runs and diffs read them
    cache: CachePolicy = field(default_factory=CachePolicy)  # aliases with a response cache
    tenants: Mapping[str, TenantSpec] = field(default_factory=lambda: MappingProxyType({}))
    alias_limits: Mapping[str, LimitSpec] = field(default_factory=lambda: MappingProxyType({}))
    alias_budgets: Mapping[str, BudgetSpec] = field(default_factory=lambda: MappingProxyType({}))
    accounting: AccountingSpec = field(default_factory=AccountingSpec)
    accounting_on: bool = False
    tenant_names: frozenset[str] = frozenset()  # named by the policy's keys or `tenants:` (metric labels)
    key_names: frozenset[str] = frozenset()  # the policy's own keys (usage reports)

    @property
    def has_guards(self) -> bool:
        """Whether any guard is defined: without one, no guard stage is built at all."""
        g = self.guards
        return bool(g.global_ or any(g.models.values()) or any(g.tenants.values()))

    @property
    def has_accounting(self) -> bool:
        """Whether the accounting stage is built: a limit or budget somewhere, or `accounting.always`."""
        return self.accounting_on
