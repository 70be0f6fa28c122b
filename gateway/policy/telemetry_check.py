"""Cross-checks of the `telemetry:` section, and the label sets it caps (see `telemetry.labels`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

from ..auth.keys import VirtualKey
from ..sanitize import printable
from ..telemetry.labels import MetricLabels, capped
from .compiled import ModelRoute, Rule
from .env_credentials import credential, looks_secret, url_shown
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
    if telemetry.tracing.otlp_endpoint is not None:
        _check_endpoint(telemetry.tracing.otlp_endpoint, doc)


def _check_endpoint(endpoint: str, doc: _Located) -> None:
    """The collector's URL: http(s), and no credential in it, refused as in a provider's `base_url` (the policy file,
    its repository, `gateway diff`'s output in CI logs would hold it, and aiohttp sends user information as Basic
    auth): it belongs in `otlp_headers_env`. No message quotes a value (a parameter's name at most)."""
    field = ("telemetry", "tracing", "otlp_endpoint")
    try:
        parts = urlsplit(endpoint)
    except ValueError:  # an IPv6 address's bracket left open
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        doc.issue(field, f"{url_shown(endpoint)} is not an http(s) URL (OTLP/HTTP, e.g. "
                         "http://collector:4318/v1/traces)")
    if parts.username or parts.password:
        doc.issue(field, "credentials in otlp_endpoint are not allowed; send the collector's credential in a header "
                         "from an environment variable (otlp_headers_env, e.g. `Authorization: COLLECTOR_TOKEN`)")
    secret = [name for name, value in parse_qsl(parts.query, keep_blank_values=True) if looks_secret(name, value)]
    if secret:
        doc.issue(field, f"the query parameter `{printable(secret[0])}` looks like a credential: put secrets in "
                         "environment variables, not inline; send it in a header from one (otlp_headers_env)")


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
