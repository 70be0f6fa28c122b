"""Every metric the gateway exports, in one place, with bounded labels.

Labels take values from closed sets only: endpoint names, policy aliases (or
"unknown"), provider names, and the HTTP statuses the gateway emits. Never
client text, never keys or tenants' secrets.

With several worker processes, prometheus_client's multiprocess mode is used
(`PROMETHEUS_MULTIPROC_DIR`, set by `gateway serve --workers N`), so that any
worker's `/metrics` shows the sum over all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

__all__ = ["CONTENT_TYPE", "HTTP_REFUSED", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

# The HTTP server belongs to the process, not to one gateway: what it refuses before a request
# exists (oversized or slow heads, floods) is counted once per process, here. With several
# workers the multiprocess collector adds it up like every other metric.
_SERVER_REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REFUSED = Counter(
    "gateway_http_refused", "Connections and requests the HTTP server refused before the app saw them, by reason.",
    ("reason",), registry=_SERVER_REGISTRY,
)


@dataclass(frozen=True, slots=True)
class _Series:
    """The labelled children one (endpoint, model, status, provider) touches, looked up once."""

    requests: Counter
    duration: Histogram
    upstream: Histogram | None
    overhead: Histogram
    first_chunk: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter


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
            "gateway_request_duration_seconds", "Time from request arrival to the last byte sent.",
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
        self.first_chunk = Histogram(
            "gateway_time_to_first_chunk_seconds", "Streams: time from arrival to the first chunk sent.",
            ("model",), buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being handled now (streams until their end).",
            registry=registry, multiprocess_mode="livesum",
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens reported by upstreams, by model alias and kind (prompt, completion).",
            ("model", "kind"), registry=registry,
        )
        self.reloads = Counter(
            "gateway_policy_reload", "Policy reloads, by result (ok, invalid, failed, unchanged).",
            ("result",), registry=registry,
        )
        self.policy_info = Gauge(
            "gateway_policy_info", "The policy version being served (1) and the ones before it (0).",
            ("version",), registry=registry, multiprocess_mode="livemax",
        )
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
        self._series: dict[tuple[str, str, int, str | None], _Series] = {}
        self._versions: set[str] = set()

    # ConnectionGate's observer (upstream/client.py)
    def waiting(self, provider: str, delta: int) -> None:
        self.pool_waiting.labels(provider).inc(delta)

    def timed_out(self, provider: str) -> None:
        self.pool_timeouts.labels(provider).inc()

    def serving(self, version: str) -> None:
        """Mark `version` as the policy being served; earlier versions drop to 0 (a bounded set)."""
        for old in self._versions - {version}:
            self.policy_info.labels(old).set(0)
        if len(self._versions) > 16:  # keep the series count bounded over many reloads
            for old in list(self._versions - {version})[: len(self._versions) - 16]:
                self.policy_info.remove(old)
                self._versions.discard(old)
        self._versions.add(version)
        self.policy_info.labels(version).set(1)

    def render(self) -> bytes:
        if self.multiprocess:  # the server's counter is in the shared files already
            return generate_latest(self.registry)
        return generate_latest(self.registry) + generate_latest(_SERVER_REGISTRY)

    def record(
        self, endpoint: str, model: str, status: int, total: float, provider: str | None, upstream: float,
        first_chunk: float | None, prompt_tokens: int, completion_tokens: int,
    ) -> None:
        """Everything about one finished request, in one call (cached label children)."""
        key = (endpoint, model, status, provider)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(
                self.requests.labels(endpoint, model, str(status)),
                self.duration.labels(endpoint, model),
                self.upstream_duration.labels(provider) if provider else None,
                self.overhead.labels(endpoint),
                self.first_chunk.labels(model),
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
            )
        series.requests.inc()
        series.duration.observe(total)
        if series.upstream is not None:
            series.upstream.observe(upstream)
            series.overhead.observe(max(0.0, total - upstream))
        if first_chunk is not None:
            series.first_chunk.observe(first_chunk)
        if prompt_tokens:
            series.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            series.completion_tokens.inc(completion_tokens)
