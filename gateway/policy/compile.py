"""Turn a decoded `PolicySpec` into a frozen `Policy`, checking what types cannot.

Cross-checks (an alias names a provider that exists, a key names aliases that
exist, an `openai` provider has a usable base URL...) are reported like decoding
errors, with file, line and field, all at once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from ..auth.keys import KeyRing, VirtualKey
from ..store.base import StoreConfig
from .accounting_check import check_accounting, load_prices_file, uses_accounting
from .compiled import Policy, ProviderConfig, Timeouts
from .guard_check import check_guards
from .loader import PolicyError, PolicyIssue, _Located, parse_spec
from .routes import compile_routing
from .schema import PolicySpec, ProviderSpec, StateSpec
from .telemetry_check import metric_labels

__all__ = ["PolicyError", "compile_policy", "is_loopback", "load_policy", "open_to_network"]

DEMO_BASE_URL = "demo://in-process"
_INTERNAL_SUFFIXES = (".internal", ".local", ".lan", ".svc", ".cluster.local", ".localdomain", ".home.arpa")


def load_policy(path: str | Path, env: Mapping[str, str] | None = None, *, require_env: bool = True) -> Policy:
    """Read, validate and compile a policy file. Raises `PolicyError` with every issue."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([PolicyIssue(file, 1, "", f"cannot read the policy file: {exc}")]) from exc
    return compile_text(text, file, env, require_env=require_env)


def compile_text(
    text: str, file: str = "<policy>", env: Mapping[str, str] | None = None, *, require_env: bool = True
) -> Policy:
    spec, doc = parse_spec(text, file)
    version = hashlib.sha256(text.encode()).hexdigest()[:16]
    return compile_policy(spec, doc, os.environ if env is None else env, version, require_env=require_env)


def compile_policy(
    spec: PolicySpec, doc: _Located, env: Mapping[str, str], version: str, *, require_env: bool = True
) -> Policy:
    warnings: list[str] = []
    providers = {
        name: _provider(name, provider, doc, env, require_env, warnings) for name, provider in spec.providers.items()
    }
    models, rules, prices = compile_routing(spec, doc, providers, load_prices_file(spec, doc))
    check_accounting(spec, doc, models, warnings)
    keys = _keys(spec, doc)
    check_guards(spec.guards, doc, set(models), {key.tenant for key in keys.values()})
    labels = metric_labels(spec, doc, models, rules, keys.values())  # and checks the telemetry section
    state = _state(spec.state, doc, env, require_env, warnings)
    metrics_token = _token(spec.server.metrics_token_env, ("server", "metrics_token_env"), doc, env, require_env,
                           warnings, "/metrics refuses every request until it is set")
    admin_token = _token(spec.server.admin_token_env, ("server", "admin_token_env"), doc, env, require_env,
                         warnings, "the admin API stays off until it is set")
    if not is_loopback(spec.server.host) and spec.auth == "none" and _spends(spec):
        warnings.append(
            f"{doc.file}:{doc.line_of(('server', 'host'))}: server.host: SECURITY: `{spec.server.host}` serves the "
            "network with `auth: none`: anyone who reaches it can spend your providers' credit "
            "(`gateway serve` refuses this without --allow-open)"
        )
    if spec.dynamic_keys.enabled and spec.server.admin_token_env is None:
        warnings.append(f"{doc.file}:{doc.line_of(('dynamic_keys', 'enabled'))}: dynamic_keys.enabled: without "
                        "server.admin_token_env this gateway cannot create keys; it only accepts those another "
                        "replica sharing its store created")
    if doc.issues:
        raise PolicyError(doc.issues)
    return Policy(
        source=doc.file,
        version=version,
        server=spec.server,
        state=state,
        auth=spec.auth,
        keys=KeyRing(keys),
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        rules=rules,
        prices=prices,
        breaker=spec.routing.breaker,
        warnings=tuple(warnings),
        metrics_token=metrics_token,
        admin_token=admin_token,
        guards=spec.guards,
        dynamic_keys=spec.dynamic_keys,
        telemetry=spec.telemetry,
        labels=labels,
        tenants=MappingProxyType(dict(spec.tenants)),
        alias_limits=MappingProxyType({a: m.limits for a, m in spec.models.items() if m.limits is not None}),
        alias_budgets=MappingProxyType({a: m.budget for a, m in spec.models.items() if m.budget is not None}),
        accounting=spec.accounting,
        accounting_on=uses_accounting(spec),
        tenant_names=frozenset(spec.tenants) | {key.tenant for key in spec.keys},
        key_names=frozenset(record.name for record in keys.values()),
    )


def _spends(spec: PolicySpec) -> bool:
    """Whether any provider spends real credit (everything but the in-process demo)."""
    return any(provider.kind != "demo" for provider in spec.providers.values())


def open_to_network(policy: Policy, host: str) -> bool:
    """Anyone who reaches `host` could spend the providers' credit: no keys, a real provider, not loopback."""
    return policy.auth == "none" and not is_loopback(host) and any(
        provider.kind != "demo" for provider in policy.providers.values()
    )


def is_loopback(host: str) -> bool:
    """Whether a listen address keeps the gateway on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token(
    var: str | None, path: tuple[str, ...], doc: _Located, env: Mapping[str, str], require_env: bool,
    warnings: list[str], consequence: str,
) -> str | None:
    """A bearer token from the environment. Named but unset: the feature fails closed."""
    if var is None:
        return None
    value = env.get(var)
    if value:
        return value
    message = f"environment variable `{var}` is not set"
    if require_env:
        doc.issue(path, message)
    else:
        warnings.append(f"{doc.file}:{doc.line_of(path)}: {'.'.join(path)}: {message}; {consequence}")
    return None if path[-1] == "admin_token_env" else ""


def _state(
    spec: StateSpec, doc: _Located, env: Mapping[str, str], require_env: bool, warnings: list[str]
) -> StoreConfig:
    url = None
    if spec.backend == "redis":
        if spec.url_env is None:
            doc.issue(("state", "backend"), "`backend: redis` needs `url_env` (the variable holding the Redis URL)")
        else:
            url = env.get(spec.url_env)
            if not url:
                message = f"environment variable `{spec.url_env}` is not set"
                if require_env:
                    doc.issue(("state", "url_env"), message)
                else:
                    warnings.append(f"{doc.file}:{doc.line_of(('state', 'url_env'))}: state.url_env: {message}")
    elif spec.url_env is not None:
        doc.issue(("state", "url_env"), "`url_env` is for `backend: redis`; the memory backend takes none")
    if spec.backend == "redis" and not url:  # reported above; a placeholder so that `check` goes on, never served
        return StoreConfig(on_unavailable=spec.on_unavailable)
    return StoreConfig(
        backend=spec.backend, url=url, key_prefix=spec.key_prefix, connect_timeout_s=spec.connect_timeout_s,
        op_timeout_s=spec.op_timeout_s, on_unavailable=spec.on_unavailable, max_connections=spec.max_connections,
    )


def _keys(spec: PolicySpec, doc: _Located) -> dict[bytes, VirtualKey]:
    if spec.auth == "keys" and not spec.keys and not spec.dynamic_keys.enabled:
        doc.issue(("auth",), "`auth: keys` needs at least one entry under `keys`, or `dynamic_keys: {enabled: true}` "
                             "(or use `auth: none` for local use)")
    if spec.auth == "none" and spec.dynamic_keys.enabled:
        doc.issue(("dynamic_keys", "enabled"),
                  "`auth: none` lets everyone in: keys created at run time need `auth: keys`")
    if spec.auth == "none" and spec.keys:
        doc.issue(("keys",), "`keys` are listed but `auth: none` ignores them; remove them or set `auth: keys`")
    keys: dict[bytes, VirtualKey] = {}
    for index, key in enumerate(spec.keys):
        digest = bytes.fromhex(key.hash.removeprefix("sha256:"))
        if digest in keys:
            doc.issue(("keys", index, "hash"), "the same key hash is listed twice")
        aliases = None if "*" in key.models else frozenset(key.models)
        keys[digest] = VirtualKey(key.name or f"key-{index}", key.tenant, digest, aliases,
                                  limits=key.limits, budget=key.budget)
    return keys


def _provider(
    name: str, spec: ProviderSpec, doc: _Located, env: Mapping[str, str], require_env: bool, warnings: list[str]
) -> ProviderConfig:
    path = ("providers", name)
    base_url = DEMO_BASE_URL
    if spec.kind == "openai":
        base_url = _base_url(spec.base_url, doc, path)
    elif spec.base_url is not None:
        doc.issue(path + ("base_url",), "a `demo` provider answers in-process and takes no base_url")
    t = spec.timeouts
    if t.first_byte_s > t.total_s or t.connect_s > t.total_s:
        doc.issue(path + ("timeouts",), "connect_s and first_byte_s must not exceed total_s")
    headers: dict[str, str] = {}
    for header, value in spec.headers.items():
        if header.lower() in ("authorization", spec.api_key_header.lower()) and spec.api_key_env:
            doc.issue(path + ("headers", header), "the API key header is set from api_key_env; do not repeat it")
        if _looks_secret(header):
            doc.issue(path + ("headers", header), "put secrets in headers_env (an environment variable), not inline")
        headers[header] = value
    secret_vars = dict(spec.headers_env)
    if spec.api_key_env:
        secret_vars[spec.api_key_header] = spec.api_key_env
    secret_values: list[str] = []
    for header, var in secret_vars.items():
        secret = env.get(var)
        if secret is None:
            message = f"environment variable `{var}` is not set"
            field = "api_key_env" if var == spec.api_key_env and header == spec.api_key_header else "headers_env"
            if require_env:
                doc.issue(path + (field,), message)
            else:
                warnings.append(f"{doc.file}:{doc.line_of(path + (field,))}: providers.{name}.{field}: {message}")
            continue
        bearer = header.lower() == "authorization" and not secret.lower().startswith(("bearer ", "basic "))
        headers[header] = f"Bearer {secret}" if bearer else secret
        secret_values.append(secret)
    return ProviderConfig(
        name=name,
        kind=spec.kind,
        base_url=base_url,
        headers=MappingProxyType(headers),
        query=MappingProxyType(dict(spec.query)),
        timeouts=Timeouts(t.connect_s, t.first_byte_s, t.idle_s, t.total_s),
        pool_size=spec.pool_size,
        pool_timeout_s=spec.pool_timeout_s,
        keepalive_s=spec.keepalive_s,
        stream_usage=spec.stream_usage,
        chunk_delay_ms=spec.chunk_delay_ms,
        max_response_bytes=spec.max_response_bytes,
        secrets=tuple(secret_values),
        public_hosts=_public_hosts(base_url),
    )


def _public_hosts(base_url: str) -> tuple[str, ...]:
    """The provider's host when it is a public API host (https, a domain name, not internal)."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or "." not in host or host.endswith(_INTERNAL_SUFFIXES):
        return ()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return (host,)
    return ()


def _base_url(url: str | None, doc: _Located, path: tuple[str, ...]) -> str:
    if not url:
        doc.issue(path, "an `openai` provider needs `base_url` (e.g. https://api.openai.com/v1)")
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        doc.issue(path + ("base_url",), f"`{url}` is not an http(s) URL with a host")
    if parts.query or parts.fragment:
        doc.issue(path + ("base_url",), "put query parameters under `query`, not in base_url")
    if parts.username or parts.password:
        doc.issue(path + ("base_url",), "credentials in base_url are not allowed; use api_key_env")
    return url.rstrip("/")


def _looks_secret(header: str) -> bool:
    lowered = header.lower()
    return lowered in ("authorization", "api-key", "x-api-key", "proxy-authorization") or "token" in lowered
