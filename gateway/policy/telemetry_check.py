"""Cross-checks of the `telemetry:` section, and the label sets it caps (see `telemetry.labels`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from ..auth.keys import VirtualKey
from ..telemetry.labels import MetricLabels, capped
from .compiled import ModelRoute, Rule
from .env_credentials import credential
from .guard_check import _check_guard
from .loader import _Located
from .schema import PolicySpec

__all__ = ["metric_labels"]


def metric_labels(
    spec: PolicySpec, doc: _Located, models: Mapping[str, ModelRoute], rules: Iterable[Rule],
    keys: Iterable[VirtualKey], env: Mapping[str, str], require_env: bool, warnings: list[str],
) -> MetricLabels:
    _check(spec, doc, require_env, warnings)
    _check_collector_headers(spec, doc, env, require_env, warnings)
    caps = spec.telemetry.labels
    keys = list(keys)
    targets = {t.name for route in models.values() for t in route.targets}
    targets |= {t.name for rule in rules if rule.route is not None for t in rule.route.targets}
    tenants = {key.tenant for key in keys} | set(spec.tenants)
    return MetricLabels(
        aliases=capped(models, caps.aliases),
        targets=capped(targets, caps.targets),
        tenants=capped(tenants, caps.tenants),
        keys=capped((key.name for key in keys), caps.keys),
    )


def _check(spec: PolicySpec, doc: _Located, require_env: bool, warnings: list[str]) -> None:
    telemetry = spec.telemetry
    if telemetry.payload_log.enabled and telemetry.payload_log.sink == "redis" and spec.state.backend != "redis":
        doc.issue(("telemetry", "payload_log", "sink"),
                  "a `redis` payload log writes to the shared store: set `state.backend: redis`")
    if "\0" in telemetry.payload_log.path:  # (`open` raises ValueError, at start)
        doc.issue(("telemetry", "payload_log", "path"), "a file name cannot hold a NUL character (`\\0`)")
    for name, guard in telemetry.payload_log.redact.items():
        _check_guard(guard, doc, ("telemetry", "payload_log", "redact", name), require_env, warnings)
    endpoint = telemetry.tracing.otlp_endpoint
    if endpoint is not None:
        try:
            parts = urlsplit(endpoint)
        except ValueError:  # an IPv6 address's bracket left open
            parts = urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            doc.issue(("telemetry", "tracing", "otlp_endpoint"),
                      f"`{endpoint[:100]}` is not an http(s) URL (OTLP/HTTP, e.g. http://collector:4318/v1/traces)")


def _check_collector_headers(
    spec: PolicySpec, doc: _Located, env: Mapping[str, str], require_env: bool, warnings: list[str],
) -> None:
    """The variables `otlp_headers_env` names, checked at load as a provider's `headers_env` are (an issue, or a
    warning for `gateway check`): unset or unusable, the exporter could only post without the header (the
    collector's credential, usually), every export refused."""
    tracing = spec.telemetry.tracing
    if not tracing.enabled or tracing.otlp_endpoint is None:  # (no exporter: nothing sends them)
        return
    for header, var in tracing.otlp_headers_env.items():
        credential(env.get(var), var, ("telemetry", "tracing", "otlp_headers_env", header), doc, require_env, warnings)
