"""Turn a decoded `PolicySpec` into a frozen `Policy`, checking what types cannot.

Cross-checks (an alias names a provider that exists, a key names aliases that
exist, an `openai` provider has a usable base URL...) are reported like decoding
errors, with file, line and field, all at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from ..auth.keys import KeyRing, VirtualKey
from ..store.base import StoreConfig
from .accounting_check import check_accounting, load_prices_file, uses_accounting
from .cache_check import compile_cache
from .compiled import Policy, ProviderConfig, Timeouts
from .entra_check import check_azure_credentials
from .env_credentials import credential, looks_secret, token, url_shown
from .guard_check import check_guards
from .includes import PolicyTree, beside, read_tree
from .loader import PolicyError, PolicyIssue, _Located, check_doc, format_path
from .provider_schema import KIND_TRAITS, AzureSpec, OpenAISpec
from .routes import compile_routing
from .schema import (
    HealthCheckSpec,
    KeySpec,
    PolicySpec,
    ProviderSpec,
    StateSpec,
    TargetSpec,
    gateway_fields_in_extra_body,
)
from .telemetry_check import metric_labels
from .token_file import header_credential

log = logging.getLogger("gateway.policy")

__all__ = ["PolicyError", "compile_policy", "is_loopback", "key_record", "load_policy", "open_to_network"]

DEMO_BASE_URL = "demo://in-process"
_INTERNAL_SUFFIXES = (".internal", ".local", ".lan", ".svc", ".cluster.local", ".localdomain", ".home.arpa")


def load_policy(path: str | Path, env: Mapping[str, str] | None = None, *, require_env: bool = True) -> Policy:
    """Read, validate and compile a policy file and the files it includes. Raises `PolicyError` with every issue."""
    return _checked(str(path), lambda: _compile_tree(read_tree(path), env, require_env))


def compile_text(
    text: str, file: str = "<policy>", env: Mapping[str, str] | None = None, *, require_env: bool = True
) -> Policy:
    """As `load_policy`, for text named `file` (its includes are read relative to `file`)."""
    return _checked(file, lambda: _compile_tree(read_tree(file, text), env, require_env))


def _checked(file: str, build: Callable[[], Policy]) -> Policy:
    """`build()`, with any failure a `PolicyError`: a policy that trips a bug in the checks is refused as any
    invalid policy is (a reload keeps the policy in force and says why, `gateway check` prints it), not a 500
    or a traceback. The traceback is logged, for the bug report."""
    try:
        return build()
    except PolicyError:
        raise
    except Exception as exc:  # a bug in the checks, or a file system's refusal: refused, and logged
        raise PolicyError([_bug(file, exc)]) from exc


def _bug(file: str, exc: Exception) -> PolicyIssue:
    """The issue a bug in the checks is: its traceback goes to the log when logging is configured (`gateway
    serve`), never to a command's output (`gateway check` configures none: Python would print it on stderr), which
    names where it was raised instead."""
    if log.hasHandlers():
        log.error("the policy %s could not be checked", file, exc_info=exc)
        told = "the log has its traceback"
    else:
        told = f"raised at {_raised_at(exc)}; please report it"
    return PolicyIssue(file, 1, "", f"the policy could not be checked ({type(exc).__name__}: a gateway bug; {told})")


def _raised_at(exc: BaseException) -> str:
    """`module.py:line` of the frame that raised `exc` (the file's name only: no path of this machine)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "an unknown place"


def _compile_tree(tree: PolicyTree, env: Mapping[str, str] | None, require_env: bool) -> Policy:
    """The policy `tree` makes; a refusal names the tree's files (`PolicyError.watch`: a reload watches them until a
    version loads, so that fixing one reloads)."""
    try:
        return _compile_read_tree(tree, env, require_env)
    except PolicyError as exc:
        exc.watching(tree.watch)
        raise


def _compile_read_tree(tree: PolicyTree, env: Mapping[str, str] | None, require_env: bool) -> Policy:
    spec = check_doc(tree.doc)
    env = os.environ if env is None else env
    policy = compile_policy(spec, tree.doc, env, tree.version, require_env=require_env, files=tree.files,
                            watch=tree.watch)
    if spec.server.shadow_policy is None:
        return policy
    shadow = _shadow(spec.server.shadow_policy, tree.doc, env)
    return dataclasses.replace(policy, shadow=shadow, watch=policy.watch + shadow.watch)


def _shadow(given: str, doc: _Located, env: Mapping[str, str]) -> Policy:
    """The candidate policy decided beside this one (never served, so its credentials need not be set).

    A candidate naming a shadow policy of its own is refused as soon as its files are read, before they are checked
    and without reading the one it names: compiled, it would load its own candidate, and a policy that names itself
    (`cp gateway.yaml candidate.yaml` with the live one naming `candidate.yaml`), or two naming each other, would
    recurse until Python's stack ran out, in time and memory the policy's size times the depth."""
    field = ("server", "shadow_policy")
    if "\0" in given:  # (`open` raises ValueError)
        doc.issue(field, "a file name cannot hold a NUL character (`\\0`)")
        raise PolicyError(doc.issues)
    path = beside(doc, field, given)
    if os.path.realpath(path) == os.path.realpath(doc.file):
        doc.issue(field, f"the shadow policy {path} is the policy itself (a candidate is another file)")
        raise PolicyError(doc.issues)
    try:
        tree = read_tree(path)
        shadow = None if _names_a_shadow(tree.doc) else _compile_tree(tree, env, False)
    except PolicyError as exc:
        file, line = doc.locate(field)
        raise PolicyError([PolicyIssue(file, line, "server.shadow_policy", f"the shadow policy {path} is invalid"),
                           *exc.issues], exc.watch, exc.missing) from exc
    if shadow is None:
        doc.issue(field, f"the shadow policy {path} has a shadow policy of its own (a candidate names none: drop its "
                         "`server.shadow_policy`)")
        raise PolicyError(doc.issues, tree.watch)
    return shadow


def _names_a_shadow(doc: _Located) -> bool:
    """Whether the document, as written (before it is checked), gives `server.shadow_policy` a value."""
    server = doc.data.get("server") if isinstance(doc.data, dict) else None
    return isinstance(server, dict) and server.get("shadow_policy") is not None


def _check_health_checks(spec: PolicySpec, doc: _Located) -> None:
    """A target (`provider/model`) has one breaker and one health check, whichever aliases and rules list it: a
    listing without a `health_check` shares another's (`routing.all_targets`), but two listings that give it different
    ones are refused (only one could run)."""
    listings: list[tuple[tuple[str | int, ...], TargetSpec]] = [
        (("models", alias, "targets", index), target) for alias, model in spec.models.items()
        for index, target in enumerate(model.targets)]
    listings += [(("rules", number, "targets", index), target) for number, rule in enumerate(spec.rules)
                 for index, target in enumerate(rule.targets or ())]
    first: dict[str, tuple[HealthCheckSpec, tuple[str | int, ...]]] = {}
    for path, target in listings:
        check = target.health_check
        if check is None:
            continue
        name = f"{target.provider}/{target.model}"
        seen, where = first.setdefault(name, (check, path))
        if where is not path and seen != check:
            doc.issue(path + ("health_check",),
                      f"target `{name}` has another `health_check` at {format_path(doc.shown(where))} "
                      f"(interval_s {seen.interval_s:g}, timeout_s {seen.timeout_s:g}; here {check.interval_s:g} and "
                      f"{check.timeout_s:g}): one check runs per provider and model, so its listings must agree")


def compile_policy(
    spec: PolicySpec, doc: _Located, env: Mapping[str, str], version: str, *, require_env: bool = True,
    files: tuple[str, ...] = (), watch: tuple[str, ...] = (),
) -> Policy:
    warnings: list[str] = []
    providers = {
        name: _provider(name, provider, doc, env, require_env, warnings) for name, provider in spec.providers.items()
    }
    models, rules, prices = compile_routing(spec, doc, providers, load_prices_file(spec, doc), warnings)
    gateway_fields_in_extra_body(spec, doc.issue)
    _check_health_checks(spec, doc)
    check_accounting(spec, doc, models, warnings)
    keys = _keys(spec, doc)
    check_guards(spec.guards, doc, set(models), {key.tenant for key in keys.values()}, require_env, warnings)
    # (and checks the telemetry section)
    labels = metric_labels(spec, doc, models, rules, keys.values(), env, require_env, warnings)
    cache = compile_cache(spec, doc)
    state = _state(spec.state, doc, env, require_env, warnings, spec.cache.memory_max_bytes)
    metrics_token = token(spec.server.metrics_token_env, ("server", "metrics_token_env"), doc, env, require_env,
                           warnings, "`gateway serve` refuses this policy until it holds a token")
    admin_token = token(spec.server.admin_token_env, ("server", "admin_token_env"), doc, env, require_env,
                         warnings, "`gateway serve` refuses this policy until it holds a token")
    if not is_loopback(spec.server.host) and spec.auth == "none" and _spends(spec):
        warnings.append(
            f"{doc.where(('server', 'host'))}: server.host: SECURITY: `{spec.server.host}` serves the "
            "network with `auth: none`: anyone who reaches it can spend your providers' credit "
            "(`gateway serve` refuses this without --allow-open)"
        )
    if spec.telemetry.quality.enabled and not spec.server.metrics:
        warnings.append(f"{doc.where(('telemetry', 'quality', 'enabled'))}: telemetry.quality.enabled: the quality "
                        "signals are metrics, and server.metrics is false: no answer is checked")
    if spec.dynamic_keys.enabled and spec.server.admin_token_env is None:
        warnings.append(f"{doc.where(('dynamic_keys', 'enabled'))}: dynamic_keys.enabled: without "
                        "server.admin_token_env this gateway cannot create keys; it only accepts those another "
                        "replica sharing its store created")
    if doc.issues:
        raise PolicyError(doc.issues)
    return Policy(
        source=doc.file,
        version=version,
        files=files or (doc.file,),
        watch=watch or (doc.file,),
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
        spec=spec,
        cache=cache,
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
    return any(KIND_TRAITS[provider.kind].remote for provider in spec.providers.values())


def open_to_network(policy: Policy, host: str) -> bool:
    """Anyone who reaches `host` could spend the providers' credit: no keys, a real provider, not loopback."""
    return policy.auth == "none" and not is_loopback(host) and any(
        KIND_TRAITS[provider.kind].remote for provider in policy.providers.values()
    )


def is_loopback(host: str) -> bool:
    """Whether a listen address keeps the gateway on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _state(
    spec: StateSpec, doc: _Located, env: Mapping[str, str], require_env: bool, warnings: list[str],
    max_bytes: int | None = None,
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
                    warnings.append(f"{doc.where(('state', 'url_env'))}: state.url_env: {message}")
    elif spec.url_env is not None:
        doc.issue(("state", "url_env"), "`url_env` is for `backend: redis`; the memory backend takes none")
    if spec.backend == "redis" and not url:  # reported above; a placeholder so that `check` goes on, never served
        return StoreConfig(on_unavailable=spec.on_unavailable)
    return StoreConfig(
        backend=spec.backend, url=url, key_prefix=spec.key_prefix, connect_timeout_s=spec.connect_timeout_s,
        op_timeout_s=spec.op_timeout_s, on_unavailable=spec.on_unavailable, max_connections=spec.max_connections,
        max_bytes=max_bytes,
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
    named: dict[str, int] = {}  # a key's name (its own, or `key-<index>`) -> its index: names label its usage
    for index, key in enumerate(spec.keys):
        record = key_record(index, key)
        if record.digest in keys:
            doc.issue(("keys", index, "hash"), "the same key hash is listed twice")
        first = named.setdefault(record.name, index)
        if first != index:
            doc.issue(("keys", index, "name") if key.name else ("keys", index),
                      f"the key name `{record.name}` is also the name of keys[{first}]; each key name may be used once "
                      "(it names the key's usage, metrics and access lines)")
        keys[record.digest] = record
    return keys


def key_record(index: int, key: KeySpec) -> VirtualKey:
    """The record of the policy's `index`th key (`gateway test` picks callers by name with it)."""
    aliases = None if "*" in key.models else frozenset(key.models)
    return VirtualKey(key.name or f"key-{index}", key.tenant, bytes.fromhex(key.hash.removeprefix("sha256:")),
                      aliases, limits=key.limits, budget=key.budget)


def _provider(
    name: str, spec: ProviderSpec, doc: _Located, env: Mapping[str, str], require_env: bool, warnings: list[str]
) -> ProviderConfig:
    path = ("providers", name)
    traits = KIND_TRAITS[spec.kind]
    base_url = DEMO_BASE_URL
    if traits.remote:
        base_url = _base_url(spec.base_url or traits.default_base_url, doc, path, spec.kind)
    elif spec.base_url is not None:
        doc.issue(path + ("base_url",), f"a `{spec.kind}` provider answers in-process and takes no base_url")
    options = None
    for other in {t.options_field for t in KIND_TRAITS.values() if t.options_field}:
        block = getattr(spec, other)
        if block is not None and other != traits.options_field:
            doc.issue(path + (other,), f"`{other}` options apply to `kind: {other}` providers, not `{spec.kind}`")
    if traits.options is not None and traits.options_field is not None:
        options = getattr(spec, traits.options_field) or traits.options()
    if isinstance(options, OpenAISpec):  # the output cap's field, by host unless the policy names one
        options = options.for_host(base_url)
    key_header = spec.api_key_header or traits.default_key_header
    t = spec.timeouts
    if t.first_byte_s > t.total_s or t.connect_s > t.total_s:
        doc.issue(path + ("timeouts",), "connect_s and first_byte_s must not exceed total_s")
    headers: dict[str, str] = {}
    own_keys = (key_header.lower(), traits.default_key_header.lower())  # secret whatever they are called
    for header, value in spec.headers.items():
        if header.lower() in ("authorization", key_header.lower()) and spec.api_key_env:
            doc.issue(path + ("headers", header), "the API key header is set from api_key_env; do not repeat it")
        if looks_secret(header, value, own_keys):
            doc.issue(path + ("headers", header), "put secrets in headers_env (an environment variable), not inline")
        headers[header], problem = header_credential(value)
        if problem is not None:
            doc.issue(path + ("headers", header), f"the value {problem}")
    for param, value in spec.query.items():
        if looks_secret(param, value):
            doc.issue(path + ("query", param), "put secrets in environment variables, not inline: a query parameter "
                      f"cannot come from one, so send this credential in a header (api_key_env sends `{key_header}`, "
                      "headers_env any other)")
    secret_vars = dict(spec.headers_env)
    secret_fields: dict[str, tuple[str, ...]] = {header: ("headers_env", header) for header in spec.headers_env}
    if spec.api_key_env:
        secret_vars[key_header] = spec.api_key_env
        secret_fields[key_header] = ("api_key_env",)
    if isinstance(options, AzureSpec):  # one credential of three, an Entra token file checked (`entra_check`)
        options = check_azure_credentials(name, spec, options, doc, require_env, warnings)
        if options.entra_token_env is not None:  # Entra ID: a bearer token instead of the api-key header
            secret_vars["Authorization"] = options.entra_token_env
            secret_fields["Authorization"] = ("azure", "entra_token_env")
    secret_values: list[str] = []
    for header, var in secret_vars.items():
        secret = credential(env.get(var), var, path + secret_fields[header], doc, require_env, warnings)
        if secret is not None:
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
        options=options,
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


def _base_url(url: str | None, doc: _Located, path: tuple[str, ...], kind: str) -> str:
    if not url:
        article = "an" if kind[0] in "aeiou" else "a"
        doc.issue(path, f"{article} `{kind}` provider needs `base_url` (e.g. https://api.openai.com/v1)")
        return ""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an IPv6 address's bracket left open: "Invalid IPv6 URL"
        doc.issue(path + ("base_url",), f"{url_shown(url)} is not a URL ({exc})")
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        doc.issue(path + ("base_url",), f"{url_shown(url)} is not an http(s) URL with a host")
    if parts.query or parts.fragment:
        doc.issue(path + ("base_url",), "put query parameters under `query`, not in base_url")
    if parts.username or parts.password:
        doc.issue(path + ("base_url",), "credentials in base_url are not allowed; use api_key_env")
    return url.rstrip("/")

