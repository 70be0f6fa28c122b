"""Every metric the gateway exports, in one place, with bounded labels (the list: docs/metrics.md).

Labels take values from closed sets only: endpoint names, HTTP statuses, the
gateway's own error codes, and the policy's aliases, targets, tenants and key
names, each capped with an `other` bucket (`telemetry.labels`, see
`telemetry.labels.MetricLabels`). Never client text, never keys or secrets.

Names follow Prometheus's conventions (`gateway_` prefix, base units, `_seconds`,
counters `_total`) and, where one exists, the OpenTelemetry GenAI semantic
conventions' metric (`gen_ai.client.token.usage` -> `gateway_gen_ai_client_token_usage`,
with the conventions' advised buckets). The gateway is a server to its clients
and a client of its upstreams: what the client sees (time to first token, time
per output token) takes the `server` names, what the upstream call costs
(operation duration, token usage) the `client` names.

With several worker processes, prometheus_client's multiprocess mode is used
(`PROMETHEUS_MULTIPROC_DIR`, set by `gateway serve --workers N`), so that any
worker's `/metrics` shows the sum over all of them; each gauge says how its
workers' values combine (`multiprocess_mode`). prometheus_client has no native
histograms, so every histogram has explicit buckets chosen for LLM latencies.

A finished request's series are written in batches (`telemetry.batches`): `render` writes what waits
first, so one process's exposition is exact; another worker's requests show up to
`batches.APPLY_AFTER_S` (0.1 s) late.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from .batches import Batches, request_series
from .policy_info import PolicyVersions
from .series import Children, RequestSeries, loop_child

__all__ = ["CONTENT_TYPE", "HTTP_REFUSED", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Whole requests: a cached answer in milliseconds to a long generation in minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The gateway's own time: tenths of a millisecond to a slow guard.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# First token: interactive targets answer in 0.1-2 s; reasoning models take tens of seconds.
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60, 120)
# The GenAI conventions' advised buckets (operation duration; time per output token; token usage).
_OPERATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 300)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
_SCORE_BUCKETS = (0, 0.25, 0.5, 0.75, 1)  # non-negative: prometheus_client drops `_sum` otherwise

# The HTTP server belongs to the process, not to one gateway: what it refuses before a request
# exists (oversized or slow heads, floods) is counted once per process, here. With several
# workers the multiprocess collector adds it up like every other metric.
_SERVER_REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REFUSED = Counter(
    "gateway_http_refused", "Connections and requests the HTTP server refused before the app saw them, by reason.",
    ("reason",), registry=_SERVER_REGISTRY,
)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        registry = None if self.multiprocess else self.registry
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.requests = Counter(
            "gateway_requests", "Requests answered, by endpoint, model alias and HTTP status.",
            ("endpoint", "model", "status"), registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request arrival to the answer being ready (complete answers and errors) or the stream's end.",
            ("endpoint", "model"), buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds", "Time spent waiting on and reading from the upstream.",
            ("provider",), buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds", "The gateway's own time: total minus upstream time.",
            ("endpoint",), buckets=_OVERHEAD_BUCKETS, registry=registry,
        )
        self.first_chunk = Histogram(  # GenAI: gen_ai.server.time_to_first_token
            "gateway_gen_ai_server_time_to_first_token_seconds",
            "Streams: time from the request's arrival to its first chunk sent (guards' hold included).",
            ("model", "target"), buckets=_TTFT_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being handled now (streams until their end).",
            registry=registry, multiprocess_mode="livesum",
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens by model alias and kind (prompt, cached_prompt, completion, reasoning): the "
            "upstream's count, else the gateway's estimate.",
            ("model", "kind"), registry=registry,
        )
        self.reloads = Counter(
            "gateway_policy_reload", "Policy reloads, by result (ok, invalid, failed, unchanged).",
            ("result",), registry=registry,
        )
        for result in ("ok", "invalid", "failed", "unchanged"):  # exported at 0 from the start: `increase()` sees
            self.reloads.labels(result)  # the first refused reload (a series born at 1 has no sample before it)
        self.policy_info = PolicyVersions(self.registry)  # its own collector, in either mode (`policy_info.py`)
        self.store_up = Gauge(
            "gateway_store_up", "Whether the shared-state store answered its last operations (1) or not (0).",
            ("backend",), registry=registry, multiprocess_mode="livemin",
        )
        self.pool_waiting = Gauge(
            "gateway_upstream_pool_waiting", "Requests waiting for a free upstream connection slot.",
            ("provider",), registry=registry, multiprocess_mode="livesum",
        )
        self.pool_timeouts = Counter(
            "gateway_upstream_pool_timeouts", "Requests refused (503) after waiting pool_timeout_s for a slot.",
            ("provider",), registry=registry,
        )
        self.attempts = Counter(
            "gateway_upstream_attempts", "Attempts against a target (`provider/model`), by outcome.",
            ("target", "outcome"), registry=registry,
        )
        self.retries = Counter(
            "gateway_upstream_retries", "Retries of the same target, by the failure that caused them.",
            ("target", "reason"), registry=registry,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks", "Moves to the next target (or the context fallback alias), by reason.",
            ("model", "reason"), registry=registry,
        )
        self.breaker_state = Gauge(
            "gateway_breaker_state", "Circuit breaker per target: 0 closed, 1 half-open, 2 open.",
            ("target",), registry=registry, multiprocess_mode="livemax",
        )
        self.routed = Counter(
            "gateway_routed_requests", "Requests answered, by the alias asked for and the target that answered.",
            ("model", "target"), registry=registry,
        )
        # Guards: labels are guard names and entity types from the policy, actions, modes and places:
        # closed sets. The text of a finding never becomes a label (nor a log line).
        self.guard_findings = Counter(
            "gateway_guard_findings", "Guard findings, by guard, entity type, action, mode and place.",
            ("guard", "entity", "action", "mode", "place"), registry=registry,
        )
        self.guard_verdicts = Counter(
            "gateway_guard_verdicts", "Guard verdicts per checked text (allow, redact, block).",
            ("guard", "verdict", "mode", "place"), registry=registry,
        )
        self.guard_failures = Counter(
            "gateway_guard_failures", "Guards that raised, timed out or found their queue full, and what `fail` did.",
            ("guard", "reason", "fail"), registry=registry,
        )
        self.guard_duration = Histogram(
            "gateway_guard_duration_seconds", "Time one guard took on one text (queueing on the pool included).",
            ("guard", "place"), buckets=_OVERHEAD_BUCKETS + (0.25, 0.5, 1, 2.5), registry=registry,
        )
        # The guards write these per text and per finding, on the event loop's thread only (pool workers count
        # nothing): their children looked up once, written without their lock (`loop_child`).
        self.guard_findings_of = Children(self.guard_findings, loop_only=True)
        self.guard_verdicts_of = Children(self.guard_verdicts, loop_only=True)
        self.guard_duration_of = Children(self.guard_duration, loop_only=True)
        self.guard_stream_delay = Histogram(
            "gateway_guard_stream_delay_seconds",
            "Streams: time the first text was held by output guards (time to first token added).",
            ("model",), buckets=_OVERHEAD_BUCKETS + (0.25, 0.5, 1, 2.5, 5), registry=registry,
        )
        # Keys created at run time (`auth.dynamic`, the admin API): results and operations, never key ids.
        self.key_lookups = Counter(
            "gateway_key_lookups", "Look-ups of keys created at run time: cached, cached_unknown, found, unknown, "
            "malformed (not a generated key's shape: no store call), stale (cached, served while the store was "
            "down), unavailable (503).", ("result",), registry=registry,
        )
        self.admin_key_operations = Counter(
            "gateway_admin_key_operations", "Admin API key operations (create, list, get, revoke, rotate), by status.",
            ("operation", "status"), registry=registry,
        )
        # Telemetry (issue 12): who asked, what the upstream call cost, answer quality, feedback, tracing.
        # Tenants and keys are labels only as `MetricLabels` caps them (policy names, else `other`).
        self.tenant_requests = Counter(
            "gateway_tenant_requests", "Requests answered, by tenant, key name, model alias and HTTP status.",
            ("tenant", "key", "model", "status"), registry=registry,
        )
        self.errors = Counter(
            "gateway_errors", "Error answers, by model alias and the gateway's error code (limits, guards...).",
            ("model", "code"), registry=registry,
        )
        self.operation_duration = Histogram(  # GenAI: gen_ai.client.operation.duration
            "gateway_gen_ai_client_operation_duration_seconds",
            "Time the upstream call took (all attempts), by operation, model alias, target and error type.",
            ("operation", "model", "target", "error_type"), buckets=_OPERATION_BUCKETS, registry=registry,
        )
        self.token_usage = Histogram(  # GenAI: gen_ai.client.token.usage
            "gateway_gen_ai_client_token_usage",
            "Tokens per request, by operation, model alias, target and token type (input, output).",
            ("operation", "model", "target", "token_type"), buckets=_TOKEN_BUCKETS, registry=registry,
        )
        self.time_per_output_token = Histogram(  # GenAI: gen_ai.server.time_per_output_token
            "gateway_gen_ai_server_time_per_output_token_seconds",
            "Streams: time per output token after the first ((total - first token) / (tokens - 1)).",
            ("model", "target"), buckets=_TPOT_BUCKETS, registry=registry,
        )
        self.finish_reasons = Counter(
            "gateway_quality_finish_reasons", "Answers by finish reason (stop, length, tool_calls, content_filter...).",
            ("model", "target", "reason"), registry=registry,
        )
        self.quality_checked = Counter(
            "gateway_quality_checked", "Answers whose quality signals were checked (the signals' denominator).",
            ("model", "target"), registry=registry,
        )
        self.quality_signals = Counter(
            "gateway_quality_signals",
            "Answers with a quality problem: refusal, empty, truncated, invalid_json, schema_violation, "
            "malformed_tool_call.",
            ("model", "target", "signal"), registry=registry,
        )
        self.feedback_score = Histogram(
            "gateway_feedback_score", "Scores sent to POST /v1/feedback (0 to 1), by model alias and target.",
            ("model", "target"), buckets=_SCORE_BUCKETS, registry=registry,
        )
        self.feedback = Counter(
            "gateway_feedback", "Feedback received, by model alias, target and label (policy labels, else other).",
            ("model", "target", "label"), registry=registry,
        )
        self.telemetry_dropped = Counter(
            "gateway_telemetry_dropped",
            "Log lines, payload log entries and spans dropped (queue full, sink failing, not written at close).",
            ("sink", "reason"), registry=registry,
        )
        self.spans_exported = Counter(
            "gateway_spans_exported", "Spans sent to the OTLP endpoint, by result (ok, failed).",
            ("result",), registry=registry,
        )
        # Cache: labels are policy aliases, fixed results and outcomes; never keys or prompt text.
        self.cache_requests = Counter(
            "gateway_cache_lookups", "Cacheable-alias requests by alias and result (hit, semantic-hit, miss, bypass).",
            ("model", "result"), registry=registry,
        )
        self.cache_stores = Counter(
            "gateway_cache_stores", "Misses' answers by what the cache did with them "
            "(stored, too_large, uncacheable, unavailable).", ("model", "outcome"), registry=registry,
        )
        self.cache_bytes = Counter(
            "gateway_cache_stored_bytes", "Bytes written to the cache (after compression).", ("model",),
            registry=registry,
        )
        self.cache_evictions = Counter(
            "gateway_cache_evictions", "Entries the memory store evicted to stay within its bounds.", registry=registry,
        )
        self.cache_lookup = Histogram(
            "gateway_cache_lookup_seconds", "Time of one cache lookup, by kind (exact, semantic: embedding included).",
            ("kind",), buckets=_OVERHEAD_BUCKETS + (0.25, 0.5, 1), registry=registry,
        )
        self.cache_similarity = Histogram(
            "gateway_cache_similarity", "Semantic lookups: similarity of the nearest stored prompt.", ("model",),
            buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0), registry=registry,
        )
        self.cache_saved_tokens = Counter(
            "gateway_cache_saved_tokens", "Tokens hits did not spend upstream, by alias and kind (prompt, completion).",
            ("model", "kind"), registry=registry,
        )
        self.cache_saved_usd = Counter(
            "gateway_cache_saved_usd", "USD hits did not spend upstream (at the policy's prices).", ("model",),
            registry=registry,
        )
        self.cache_errors = Counter(
            "gateway_cache_errors", "Cache reads served as misses: store unavailable, or a corrupt entry.",
            ("reason",), registry=registry,
        )
        # A skip is the policy at work, not a fault: counted apart, so that an alert on the errors never fires
        # for a guard doing its job.
        self.cache_semantic_skips = Counter(
            "gateway_cache_semantic_skips", "Semantic lookups not made, by alias and reason (guarded: the "
            "embeddings alias's input guards would block or change the prompt, so it is not embedded).",
            ("model", "reason"), registry=registry,
        )
        # Accounting (gateway/accounting/): scopes are key, tenant, model; names come from the policy
        # (aliases, tenants, named keys) and past `accounting.label_cap` distinct ones read `other`.
        self.cost = Counter(
            "gateway_cost_usd", "Spend in USD from upstream usage and the price table, by model alias and tenant.",
            ("model", "tenant"), registry=registry,
        )
        self.cost_unpriced = Counter(
            "gateway_cost_unpriced", "Answers whose target has no price (counted as costing 0), by model alias.",
            ("model",), registry=registry,
        )
        self.budget_remaining = Gauge(
            "gateway_budget_remaining_usd", "USD left in the current period of a budget, as last seen here.",
            ("scope", "name"), registry=registry, multiprocess_mode="livemostrecent",
        )
        self.budget_remaining_ratio = Gauge(
            "gateway_budget_remaining_ratio", "Share (0 to 1) of a budget's current period left, as last seen here.",
            ("scope", "name"), registry=registry, multiprocess_mode="livemostrecent",
        )
        self.limit_rejections = Counter(
            "gateway_limit_rejections", "Requests refused by the gateway's own limits, by kind and scope.",
            ("kind", "scope"), registry=registry,
        )
        self.budget_soft_exceeded = Counter(
            "gateway_budget_soft_exceeded", "Requests served past a soft budget, by scope.",
            ("scope",), registry=registry,
        )
        self.reservation_drift = Histogram(
            "gateway_reservation_drift_ratio", "Actual cost over the cost reserved before the call.",
            ("model",), buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 2, 5), registry=registry,
        )
        self.token_estimate_drift = Histogram(
            "gateway_token_estimate_drift_ratio", "The gateway's prompt token estimate over the upstream's figure.",
            ("model",), buckets=(0.5, 0.8, 0.9, 0.95, 0.99, 1.01, 1.05, 1.1, 1.25, 1.5, 2), registry=registry,
        )
        self.accounting_store_errors = Counter(
            "gateway_accounting_store_errors", "Store failures met by limits and budgets, by what was done.",
            ("action",), registry=registry,
        )
        self.accounting_dropped = Counter(
            "gateway_accounting_dropped", "Spend or usage writes the ledger gave up, by kind (`accounting/ledger.py`).",
            ("kind",), registry=registry,
        )
        self.accounting_pending = Gauge(
            "gateway_accounting_pending_counters",
            "Budget counters with spend the store has not taken yet, and operations in doubt.",
            registry=registry, multiprocess_mode="livesum",
        )
        self._series: dict[tuple[str, str, int, str | None, str, str, str, str | None], RequestSeries] = {}
        self._batches = Batches()  # the finished requests' values `_series` have not written yet
        self._shadow_metrics(registry)

    # ConnectionGate's observer (upstream/client.py)
    def waiting(self, provider: str, delta: int) -> None:
        self.pool_waiting.labels(provider).inc(delta)

    def timed_out(self, provider: str) -> None:
        self.pool_timeouts.labels(provider).inc()

    def serving(self, version: str) -> None:
        """Mark `version` as the policy being served (`gateway_policy_info`)."""
        self.policy_info.serving(version)

    def render(self) -> bytes:
        """The exposition, after every batch of finished requests waiting in this process is written."""
        self._batches.apply()
        if self.multiprocess:  # the server's counter is in the shared files already
            return generate_latest(self.registry)
        return generate_latest(self.registry) + generate_latest(_SERVER_REGISTRY)

    def flush(self) -> None:
        """Every finished request this process recorded written to its series (at shutdown; `render` and an
        exit hook do it too): in multiprocess mode, the other workers see them now rather than up to
        `batches.APPLY_AFTER_S` later."""
        self._batches.apply()

    def series(self, endpoint: str, model: str, status: int, provider: str | None, target: str, tenant: str,
               key: str, error: str | None) -> RequestSeries:
        """The children a finished request with these label values (already bounded) writes; `provider` None:
        no upstream was called, `error`: the gateway's error code of an error answer."""
        named = (endpoint, model, status, provider, target, tenant, key, error)
        found = self._series.get(named)
        if found is None:
            found = self._series[named] = self._children(*named)
        return found

    def _children(self, endpoint: str, model: str, status: int, provider: str | None, target: str, tenant: str,
                  key: str, error: str | None) -> RequestSeries:
        operation = _OPERATIONS.get(endpoint, endpoint)
        error_type = error or ("_OTHER" if status >= 400 else "")
        upstream = provider is not None
        observe = inc = loop_child  # written by the telemetry stage, on the loop only
        children = (
            inc(self.requests.labels(endpoint, model, str(status))),
            observe(self.duration.labels(endpoint, model)),
            observe(self.upstream_duration.labels(provider)) if upstream else None,
            observe(self.overhead.labels(endpoint)),
            observe(self.first_chunk.labels(model, target)),
            inc(self.tokens.labels(model, "prompt")),
            inc(self.tokens.labels(model, "completion")),
            inc(self.tenant_requests.labels(tenant, key, model, str(status))),
            observe(self.operation_duration.labels(operation, model, target, error_type)) if upstream else None,
            observe(self.token_usage.labels(operation, model, target, "input")),
            observe(self.token_usage.labels(operation, model, target, "output")),
            observe(self.time_per_output_token.labels(model, target)),
            inc(self.errors.labels(model, error)) if error is not None else None,
        )
        return request_series(children, self._batches)

    # -- shadow policies (dryrun.shadow) --------------------------------------------------------------
    def _shadow_metrics(self, registry: CollectorRegistry | None) -> None:
        self.shadow_requests = Counter(
            "gateway_shadow_requests", "Requests offered to the shadow policy, by result: compared, dropped "
            "(its queue was full), failed.", ("result",), registry=registry,
        )
        self.shadow_disagreements = Counter(
            "gateway_shadow_disagreements", "Compared requests the shadow policy decided differently from the live "
            "one, by kind of decision (outcome, auth, limits, guards, cache, route, targets).", ("kind",),
            registry=registry,
        )


# The GenAI conventions' `gen_ai.operation.name` for each endpoint label.
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
