"""The policy file's raw shape (version 1), as msgspec structs.

These structs are what YAML decodes into: every field typed, unknown fields
rejected, defaults written down here once. They are checked field by field by
`policy.loader` (so that one run reports every error with its line) and then
turned into the runtime objects of `policy.compiled` by `policy.compile`.
`gateway schema` prints the JSON Schema generated from these same structs.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .accounting_schema import AccountingSpec, BudgetSpec, LimitSpec, TenantSpec
from .cache_schema import CacheSettingsSpec, CacheSpec
from .guard_schema import GuardsSpec
from .keys_schema import DynamicKeysSpec
from .provider_schema import AnthropicSpec, AzureSpec, GeminiSpec, OpenAISpec
from .telemetry_schema import TelemetrySpec

__all__ = [
    "GATEWAY_BODY_FIELDS",
    "AuthMode",
    "BreakerSpec",
    "HealthCheckSpec",
    "KeySpec",
    "MatchSpec",
    "ModelSpec",
    "PolicySpec",
    "PriceSpec",
    "ProviderKind",
    "ProviderSpec",
    "RetryOn",
    "RetrySpec",
    "RoutingSpec",
    "RuleSpec",
    "ServerSpec",
    "StateSpec",
    "Strategy",
    "TargetSpec",
    "TargetTimeoutSpec",
    "TimeoutSpec",
    "gateway_fields_in_extra_body",
    "json_schema",
]

Seconds = Annotated[float, Meta(gt=0, le=86_400, description="seconds")]
# (`(?!\n)$`: the end of the text; Python's `$` alone also matches before a final newline, and `\Z` is no JSON
# Schema regex)
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}(?!\n)$")]
EnvVarName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(?!\n)$",
                                  description="name of an environment variable")]
HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(?!\n)$")]
KeyHash = Annotated[
    str,
    Meta(pattern=r"^sha256:[0-9a-f]{64}(?!\n)$", description="output of `gateway keys hash`"),
]
ProviderKind = Literal["openai", "azure", "anthropic", "gemini", "demo"]
# The request fields a target's `extra_body` may not set, each with what the gateway does with it: merged over the
# client's request, such a field would replace the client's text or model, or change the framing of the answer the
# gateway reads (a stream where one JSON body is awaited), and the target would fail every request.
GATEWAY_BODY_FIELDS = MappingProxyType({
    "model": "the target's own `model` names the upstream's model",
    "messages": "it is the client's text", "input": "it is the client's text", "prompt": "it is the client's text",
    "stream": "the client chooses it, and the gateway reads the upstream's answer by it",
    "stream_options": "the gateway asks for the usage chunk itself (the provider's `stream_usage`)",
})
_GATEWAY_MARK = "_gateway_"  # the fields the ingress marks a request with for the providers (`translate.common`)
AuthMode = Literal["none", "keys"]
# `server.allowed_hosts`: a DNS name, or `*.` and the suffix whose names it allows (no port: any port is).
AllowedHost = Annotated[str, Meta(
    pattern=r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*(?!\n)$",
    max_length=253, description="a host name, or `*.` and a domain")]
# `server.allowed_origins`: `scheme://host[:port]`, as browsers send it in `Origin`.
AllowedOrigin = Annotated[str, Meta(
    pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?(?!\n)$",
    max_length=300, description="an origin: scheme://host[:port]")]


class _Spec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Common options: reject unknown fields, immutable."""


class ServerSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The HTTP server. `host`, `port`, `watch_policy` and the connection limits take effect at
    start; everything else is re-read on reload (on shutdown, a `drain_timeout_s` longer than the one at
    start is honoured only after a restart: the server's own deadline is set at start, so the gateway cuts
    what is left at the earlier of the two)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65_535)] = 8080
    max_body_bytes: Annotated[int, Meta(ge=1_024, le=256 * 1024 * 1024)] = 4 * 1024 * 1024
    # The bytes of request bodies that requests in flight hold together, per process (a stream's until it ends;
    # a body's bytes as they arrive, not as its Content-Length declares them); past it a request gets 503
    # (`server_overloaded`, Retry-After: 1), before its body is read when its Content-Length says so, else as it
    # is read (a body is always taken when no other is held). Decoded, a JSON
    # body takes up to about 25 times its size in memory (4 MiB of `{}` take ~100 MB; plain text about its size),
    # so request bodies can hold up to about 25 times this: size it to the process's memory.
    max_body_bytes_in_flight: Annotated[int, Meta(ge=1_024, le=64 * 1024 * 1024 * 1024)] = 256 * 1024 * 1024
    # Request line + headers; refused with 431 before they are buffered.
    max_header_bytes: Annotated[int, Meta(ge=1_024, le=1024 * 1024)] = 64 * 1024
    # A connection must send its request head within this; silent connections are closed.
    header_timeout_s: Seconds = 10.0
    # A request body that sends nothing for this long, or is not complete 4 x this after its head, is answered
    # 408 and closed.
    body_timeout_s: Seconds = 30.0
    # A connection whose client reads nothing of what waits to be sent to it (more than the socket's buffer) for this
    # long is closed, its request ended as a client that left: an answer nobody reads is not held in memory for good.
    send_timeout_s: Seconds = 60.0
    # Open connections per process; more are closed at accept.
    max_connections: Annotated[int, Meta(ge=16, le=1_000_000)] = 16_384
    # Requests in flight per process (streams count until they end); more get 503 (GET/HEAD /healthz and /metrics
    # still pass, bounded by max_connections).
    max_requests: Annotated[int, Meta(ge=1, le=1_000_000)] = 12_288
    drain_timeout_s: Seconds = 30.0
    # On SIGTERM: keep serving, with /readyz answering 503, this long before closing the
    # listening socket, so that a load balancer sees the drain (Kubernetes: 5-10).
    drain_delay_s: Annotated[float, Meta(ge=0, le=300)] = 0.0
    metrics: bool = True
    # If set, /metrics requires `Authorization: Bearer <value of this variable>`; the variable
    # must be set when the gateway starts or reloads (unset: the policy is refused).
    metrics_token_env: EnvVarName | None = None
    # If set, /admin/* is on, behind `Authorization: Bearer <value of this variable>`; the variable
    # must be set when the gateway starts or reloads (unset: the policy is refused).
    admin_token_env: EnvVarName | None = None
    access_log: bool = False
    # Reload when a policy file changes (polled; read at start only). SIGHUP and POST /admin/reload
    # reload whatever this says.
    watch_policy: bool = True
    watch_interval_s: Annotated[float, Meta(ge=0.1, le=3_600)] = 2.0
    shadow_policy: str | None = None  # a candidate policy decided beside this one (`docs/policies.md`)
    shadow_queue: Annotated[int, Meta(ge=1, le=100_000)] = 1_024  # requests waiting to be shadowed; more are dropped
    shadow_sample: Annotated[float, Meta(gt=0, le=1)] = 1.0  # the share of requests the shadow policy decides
    # `auth: none` only (no effect with `auth: keys`): host names, besides `localhost` and IP addresses, this
    # gateway answers requests for (the `Host` header, its port ignored); any other gets 403 `host_not_allowed`, a
    # defence against DNS rebinding. Exact names, or `*.example.com` for the names under it.
    allowed_hosts: Annotated[list[AllowedHost], Meta(max_length=256)] = []
    # `auth: none` only (no effect with `auth: keys`): the web origins, besides loopback ones (http or https, on
    # localhost, 127.0.0.1 or [::1], any port), whose pages may call this gateway; a request with any other `Origin`
    # header (`null` included) gets 403 `origin_not_allowed`, so that no web page can make a cross-site request
    # spend through it. Written as a browser sends it: `scheme://host[:port]`, no path, no default port.
    allowed_origins: Annotated[list[AllowedOrigin], Meta(max_length=256)] = []


class StateSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Where shared state (limits, budgets, breakers, cache) lives."""

    backend: Literal["memory", "redis"] = "memory"
    url_env: EnvVarName | None = None  # the Redis URL, from this environment variable
    key_prefix: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9:_.{}-]*(?!\n)$")] = "gw:"
    connect_timeout_s: Seconds = 2.0
    op_timeout_s: Annotated[float, Meta(gt=0, le=30)] = 0.25
    max_connections: Annotated[int, Meta(ge=1, le=10_000)] = 200
    # What features that use the store do when it cannot answer (each may override it).
    on_unavailable: Literal["open", "closed"] = "open"


class TimeoutSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    connect_s: Seconds = 5.0
    first_byte_s: Seconds = 300.0  # non-streamed: the whole generation happens before the first byte
    idle_s: Seconds = 60.0
    total_s: Seconds = 600.0


class ProviderSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    kind: ProviderKind
    base_url: str | None = None
    api_key_env: EnvVarName | None = None
    api_key_header: HeaderName | None = None  # default by kind: Authorization, api-key, x-api-key, x-goog-api-key
    headers: dict[HeaderName, str] = {}
    headers_env: dict[HeaderName, EnvVarName] = {}
    query: dict[str, str] = {}
    timeouts: TimeoutSpec = TimeoutSpec()
    # Concurrent requests to this provider from one process (a stream holds its slot until
    # it ends); the next waits at most pool_timeout_s, then gets 503.
    pool_size: Annotated[int, Meta(ge=1, le=100_000)] = 1_000
    pool_timeout_s: Seconds = 10.0
    # Idle pooled connections are closed after this long. Keep it below the upstream's own
    # idle timeout (uvicorn-based servers such as vLLM close theirs after 5 s), or a request
    # may be sent on a connection the upstream is closing and fail with a 502.
    keepalive_s: Annotated[float, Meta(gt=0, le=3_600)] = 4.0
    stream_usage: bool = True
    # A non-streamed answer larger than this is refused (502 `upstream_answer_too_large`, `x-should-retry: false`) while
    # it is read: the request asked for that much, so it is not retried nor fallen back from, is no breaker failure,
    # and is billed its prompt estimate where a limit or budget applies (the upstream generated it).
    max_response_bytes: Annotated[int, Meta(ge=1_024, le=1024 * 1024 * 1024)] = 64 * 1024 * 1024
    chunk_delay_ms: Annotated[float, Meta(ge=0, le=10_000)] = 0.0
    openai: OpenAISpec | None = None  # kind: openai (policy/provider_schema.py)
    azure: AzureSpec | None = None  # kind: azure (policy/provider_schema.py)
    anthropic: AnthropicSpec | None = None  # kind: anthropic
    gemini: GeminiSpec | None = None  # kind: gemini


Strategy = Literal["priority", "weighted", "latency", "least_busy", "cost"]
# What a failed attempt may be retried or fallen back on. Anything else (an upstream 400, 404, ...) is
# answered at once: another target would refuse the same request.
RetryOn = Literal["connect", "timeout", "rate_limit", "server_error", "context_length"]
StickyKey = Annotated[str, Meta(pattern=r"^(tenant|key|user|header:[A-Za-z0-9!#$%&'*+.^_`|~-]+)(?!\n)$",
                                description="tenant, key, user, or header:<name>")]
Price = Annotated[float, Meta(ge=0, le=1_000_000, description="USD per million tokens")]


class PriceSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A model's price, in USD per million tokens: what routing's `cost` strategy and accounting read."""

    input_per_mtok: Price
    output_per_mtok: Price
    cached_input_per_mtok: Price | None = None  # prompt tokens read from the provider's cache; default: input
    cache_write_per_mtok: Price | None = None  # prompt tokens written to the provider's cache; default: input
    # prompt tokens written to Anthropic's 1-hour cache (`ttl: "1h"`; part of the cache writes); default: 2 x input
    # for a target of an `anthropic` provider (Anthropic's rate), else the cache write price
    cache_write_1h_per_mtok: Price | None = None
    reasoning_per_mtok: Price | None = None  # reasoning (hidden) completion tokens; default: output
    date: Annotated[str, Meta(pattern=r"^\d{4}-\d{2}-\d{2}(?!\n)$")] | None = None  # when the figures were taken
    source: Annotated[str, Meta(max_length=512)] | None = None  # where from (a URL)


class RetrySpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Retries of one target before the fallback moves on: exponential backoff with full jitter."""

    attempts: Annotated[int, Meta(ge=0, le=10)] = 0  # retries after the first try
    backoff_s: Annotated[float, Meta(ge=0.001, le=60)] = 0.25  # the first backoff's ceiling
    backoff_max_s: Annotated[float, Meta(ge=0.001, le=300)] = 8.0
    retry_after_max_s: Annotated[float, Meta(ge=0, le=600)] = 10.0  # an upstream's Retry-After, honoured up to this


class TargetTimeoutSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Per-target overrides of the provider's timeouts (unset: the provider's)."""

    connect_s: Seconds | None = None
    first_byte_s: Seconds | None = None  # streams: also bounds the wait for the first content event
    idle_s: Seconds | None = None
    total_s: Seconds | None = None


class HealthCheckSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """An active check: a one-token chat request on an interval, fed to the target's breaker."""

    interval_s: Annotated[float, Meta(ge=1, le=3_600)] = 30.0
    timeout_s: Annotated[float, Meta(gt=0, le=300)] = 10.0


class TargetSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    provider: Name
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    weight: Annotated[float, Meta(ge=0, le=1_000_000)] = 1.0
    timeouts: TargetTimeoutSpec | None = None
    retry: RetrySpec | None = None  # default: the alias's, else routing.retry
    price: PriceSpec | None = None  # default: the `prices` table
    # The fields of `GATEWAY_BODY_FIELDS` are refused (`gateway_fields_in_extra_body`).
    extra_body: dict[str, Any] = {}  # fields merged into the request, but not the gateway's (model, stream...)
    health_check: HealthCheckSpec | None = None


class ModelSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """An alias: one target (`provider` and `model`), or a list of `targets` and a `strategy`."""

    provider: Name | None = None
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    targets: list[TargetSpec] = []
    strategy: Strategy = "priority"
    sticky: StickyKey | None = None  # weighted only: the same caller keeps the same target
    explore: Annotated[float, Meta(ge=0, le=1)] = 0.05  # latency only: share of requests that try another target
    retry: RetrySpec | None = None
    retry_on: list[RetryOn] | None = None  # default: routing.retry_on
    context_fallback: Name | None = None  # the alias with a larger window, on "context length exceeded"
    deadline_s: Seconds | None = None  # all attempts together; default: routing.deadline_s
    limits: LimitSpec | None = None  # for all callers of this alias together
    budget: BudgetSpec | None = None
    cache: CacheSpec | None = None  # response caching for this alias (off when absent)
    description: str = ""


class MatchSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A rule's conditions; all that are given must hold. Lists match any of their values."""

    alias: list[Name] | None = None  # the alias the client asked for
    tenant: list[str] | None = None
    key: list[str] | None = None  # key names
    header: dict[HeaderName, list[str]] | None = None  # exact values; ["*"]: present with any value
    user: list[str] | None = None  # the request's `user` field
    metadata: dict[str, list[str]] | None = None  # the request's `metadata` fields
    prompt_tokens_over: Annotated[int, Meta(ge=0)] | None = None  # the gateway's prompt estimate (tiktoken)
    prompt_tokens_under: Annotated[int, Meta(ge=1)] | None = None
    has_tools: bool | None = None
    has_images: bool | None = None
    json_response: bool | None = None  # json_object or json_schema (response_format; Responses: text.format)


class RuleSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Before the strategy, first match wins: send the request to `alias`, to `targets`, or `deny` it."""

    name: Name
    when: MatchSpec = MatchSpec()
    alias: Name | None = None
    targets: list[TargetSpec] | None = None
    strategy: Strategy = "priority"
    sticky: StickyKey | None = None
    deny: Annotated[str, Meta(min_length=1, max_length=500)] | None = None  # 400 with this message


class BreakerSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The circuit breaker of every target (keyed by provider and model, shared by aliases)."""

    enabled: bool = True
    failures: Annotated[int, Meta(ge=1, le=1_000)] = 5  # consecutive failures that open it
    failure_ratio: Annotated[float, Meta(gt=0, le=1)] = 0.5  # ... or this share of a window's requests
    min_requests: Annotated[int, Meta(ge=1, le=100_000)] = 20  # a window needs this many for the ratio
    window_s: Annotated[float, Meta(ge=1, le=3_600)] = 30.0
    cooldown_s: Annotated[float, Meta(ge=0.05, le=3_600)] = 30.0  # open this long, then one probe
    when_all_open: Literal["try_least_recent", "refuse"] = "try_least_recent"
    sync_interval_s: Annotated[float, Meta(ge=0.05, le=60)] = 1.0  # shared store: read other replicas' breakers


class RoutingSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Defaults of every alias, and the breaker."""

    retry: RetrySpec = RetrySpec()
    retry_on: list[RetryOn] = msgspec.field(
        default_factory=lambda: ["connect", "timeout", "rate_limit", "server_error", "context_length"])
    deadline_s: Seconds | None = None
    breaker: BreakerSpec = BreakerSpec()


class KeySpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    hash: KeyHash
    tenant: Name
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    name: str = ""
    limits: LimitSpec | None = None
    budget: BudgetSpec | None = None


class PolicySpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    version: Literal[1]
    include: list[str] = []  # more files of this policy, relative to this one; globs allowed (docs/policies.md)
    server: ServerSpec = ServerSpec()
    state: StateSpec = StateSpec()
    auth: AuthMode = "keys"
    keys: list[KeySpec] = []
    dynamic_keys: DynamicKeysSpec = DynamicKeysSpec()  # keys created at run time (admin API)
    tenants: dict[Name, TenantSpec] = {}  # limits and budgets per tenant (tenants are named by keys)
    providers: dict[Name, ProviderSpec]
    models: dict[Name, ModelSpec]
    routing: RoutingSpec = RoutingSpec()
    rules: list[RuleSpec] = []
    # Prices by upstream model name, or `provider/model` for one provider's (USD per million tokens).
    prices: dict[str, PriceSpec] = {}
    # relative to the policy file that names it
    prices_file: Annotated[str, Meta(min_length=1, max_length=1024)] | None = None
    accounting: AccountingSpec = AccountingSpec()  # how limits and budgets are enforced (docs/accounting.md)
    guards: GuardsSpec = GuardsSpec()
    telemetry: TelemetrySpec = TelemetrySpec()  # label caps, quality signals, feedback, payload log, tracing
    cache: CacheSettingsSpec = CacheSettingsSpec()  # gateway-wide cache settings (per alias: models.<a>.cache)


def gateway_fields_in_extra_body(spec: PolicySpec, issue: Callable[[tuple[str | int, ...], str], None]) -> None:
    """Report (`issue(path, message)`) each target's `extra_body` field that the gateway sets or reads itself."""
    targets: list[tuple[tuple[str | int, ...], TargetSpec]] = [
        (("models", alias, "targets", index), target)
        for alias, model in spec.models.items() for index, target in enumerate(model.targets)]
    targets += [(("rules", number, "targets", index), target)
                for number, rule in enumerate(spec.rules) for index, target in enumerate(rule.targets or ())]
    for path, target in targets:
        for field in target.extra_body:
            if field in GATEWAY_BODY_FIELDS or field.startswith(_GATEWAY_MARK):
                reason = GATEWAY_BODY_FIELDS.get(field, "the gateway marks requests with such fields")
                issue(path + ("extra_body", field), f"extra_body may not set `{field}`: {reason}")


def json_schema() -> dict[str, object]:
    """The policy's JSON Schema, for editors (yaml-language-server and friends)."""
    schema = msgspec.json.schema(PolicySpec)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "LLM gateway policy, version 1"
    return schema
