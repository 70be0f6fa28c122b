"""The policy's documented JSON Schema (`gateway schema`) and reference (`gateway schema --markdown`).

Both are generated from the structs of `policy.schema` and its sibling modules, so they cannot
drift from what the loader accepts. A field's description is, in order: its `Meta(description=...)`,
else the comment written on its line (or the comment lines just above it) in the struct's source,
else the entry of `_DESCRIPTIONS` below, for fields whose meaning their name alone does not carry
a comment for. A test checks that every field of every section has one; `docs/policies.md` holds
the markdown, and a test checks it is current.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import json
import pkgutil
import tokenize
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as types

from . import schema

__all__ = ["field_descriptions", "policy_schema", "reference_markdown"]

# `schema.py` and every `*_schema.py` beside it (each feature keeps its shapes in a module of its own).
_MODULES = (schema, *(importlib.import_module(f"{__package__}.{info.name}")
                      for info in pkgutil.iter_modules([str(Path(__file__).parent)])
                      if info.name.endswith("_schema")))

# Fields without a comment in their struct's source. Keyed by `Struct.field` (the YAML name).
_DESCRIPTIONS: dict[str, str] = {
    "PolicySpec.version": "The policy format's version; always 1.",
    "PolicySpec.server": "The HTTP server, metrics, admin API, reload and shadow policy.",
    "PolicySpec.state": "Where shared state lives (memory, or Redis shared by replicas).",
    "PolicySpec.auth": "`keys`: every request needs a virtual key, listed under `keys` or created at run time "
                       "(`dynamic_keys`); `none`: no keys (local use).",
    "PolicySpec.keys": "Virtual keys: each a hash, a tenant, the aliases it may use, its limits and budget.",
    "PolicySpec.providers": "Upstream APIs by name; aliases and targets name them.",
    "PolicySpec.models": "The model aliases clients ask for, each with its targets and strategy.",
    "PolicySpec.routing": "Defaults for every alias (retries, retry_on, deadline) and the circuit breaker.",
    "PolicySpec.rules": "Conditional routing, before the strategy: the first rule that matches wins.",
    "PolicySpec.guards": "Input and output guards (PII, secrets, injection, deny lists, size limits) by scope.",
    "PolicySpec.accounting": "How limits and budgets are enforced (store failures, the completion tokens a request "
                             "without `max_tokens` reserves); the limits and budgets sit on keys, tenants, aliases.",
    "ServerSpec.host": "Listen address; a non-loopback address with `auth: none` and real providers is refused.",
    "ServerSpec.port": "Listen port.",
    "ServerSpec.max_body_bytes": "Largest request body accepted; larger ones get 413. (Whatever its size, a body "
                                 "nested more than 128 arrays and objects deep gets 400.)",
    "ServerSpec.drain_timeout_s": "On shutdown or reload, how long running requests and streams may finish.",
    "ServerSpec.metrics": ("Serve Prometheus metrics on /metrics; false also stops recording the per-request "
                           "metrics and the quality signals (other modules' metrics are kept, unserved)."),
    "ServerSpec.access_log": "Log one line per request (never its text or key).",
    "StateSpec.backend": "`memory` (one process) or `redis` (shared by every replica).",
    "StateSpec.key_prefix": "Prefix of every key the gateway writes in Redis.",
    "StateSpec.connect_timeout_s": "Connecting to Redis.",
    "StateSpec.op_timeout_s": "One Redis operation; slower counts as unavailable.",
    "StateSpec.max_connections": "Redis connections per process.",
    "TimeoutSpec.connect_s": "Opening a connection to the provider.",
    "TimeoutSpec.idle_s": "Longest silence between two reads of the answer, streamed or not.",
    "TimeoutSpec.total_s": "The whole exchange, from sending the request to the answer's last byte.",
    "ProviderSpec.kind": "`openai` (any OpenAI-compatible API), `azure`, `anthropic`, `gemini`, or `demo` "
                         "(answers in-process, for trials).",
    "ProviderSpec.base_url": "The API's base URL, e.g. https://api.openai.com/v1: required for `openai` and "
                             "`azure`; `anthropic` and `gemini` default to their public API; `demo` takes none.",
    "ProviderSpec.api_key_env": "The environment variable holding the provider's API key (never the key itself).",
    "ProviderSpec.api_key_header": "The header the key is sent in (`Authorization` gets `Bearer `; Azure: `api-key`).",
    "ProviderSpec.headers_env": "Extra headers whose values come from environment variables.",
    "ProviderSpec.query": "Query parameters added to every upstream URL (e.g. Azure's api-version); not secrets: a "
                          "credential-looking parameter is a policy error.",
    "ProviderSpec.headers": "Extra headers sent upstream (not secrets: a credential-looking header is a policy "
                            "error; those go in headers_env).",
    "ProviderSpec.timeouts": "Connect, first byte, idle and total timeouts of every request to this provider.",
    "ProviderSpec.stream_usage": "Ask streamed answers for their usage chunk (OpenAI's stream_options).",
    "ProviderSpec.chunk_delay_ms": "`demo` only: a pause between streamed chunks.",
    "PriceSpec.input_per_mtok": "USD per million prompt tokens.",
    "PriceSpec.output_per_mtok": "USD per million completion tokens.",
    "RetrySpec.backoff_max_s": "The longest backoff.",
    "TargetTimeoutSpec.connect_s": "Overrides the provider's connect_s.",
    "TargetTimeoutSpec.idle_s": "Overrides the provider's idle_s.",
    "TargetTimeoutSpec.total_s": "Overrides the provider's total_s.",
    "HealthCheckSpec.interval_s": "Time between two checks.",
    "HealthCheckSpec.timeout_s": "A check slower than this is a failure.",
    "TargetSpec.provider": "The provider (a name under `providers`).",
    "TargetSpec.model": "The model name the provider knows it by.",
    "TargetSpec.weight": "`weighted` strategy: this target's share, relative to the others'.",
    "TargetSpec.timeouts": "This target's own timeouts (unset ones: the provider's).",
    "TargetSpec.health_check": "An active health check of this target (off when unset).",
    "ModelSpec.provider": "One-target shorthand: the provider.",
    "ModelSpec.model": "One-target shorthand: the upstream model name.",
    "ModelSpec.targets": "The alias's targets (instead of provider and model).",
    "ModelSpec.strategy": "How targets are ordered: priority (as listed), weighted, latency, least_busy, cost.",
    "ModelSpec.retry": "Retries of each target (default: routing.retry).",
    "ModelSpec.description": "A note for readers of the policy (not served by /v1/models).",
    "MatchSpec.has_tools": "The request carries tools (or functions).",
    "MatchSpec.has_images": "A message has an image part.",
    "RuleSpec.name": "Names the rule in headers, logs, metrics and `gateway explain`.",
    "RuleSpec.when": "The conditions; all given must hold (none: always).",
    "RuleSpec.alias": "Send the request to this alias instead.",
    "RuleSpec.targets": "Send the request to these targets instead.",
    "RuleSpec.strategy": "With `targets`: how they are ordered.",
    "RuleSpec.sticky": "With `targets` and `weighted`: keep a caller on one target.",
    "BreakerSpec.enabled": "Whether targets have circuit breakers.",
    "BreakerSpec.when_all_open": "When every target is open: try the one that failed least recently, or refuse (503).",
    "RoutingSpec.retry": "Default retries of every target.",
    "RoutingSpec.retry_on": "Default failures that are retried or fallen back on.",
    "RoutingSpec.deadline_s": "Default deadline of all attempts of one request together.",
    "RoutingSpec.breaker": "The circuit breaker of every target.",
    "KeySpec.hash": "The key's SHA-256 (`gateway keys hash` or `gateway keys generate`); never the key.",
    "KeySpec.tenant": "The tenant the key belongs to (guards, rules, limits and budgets read it).",
    "KeySpec.models": "Aliases the key may use; `*`: all.",
    "KeySpec.name": "Names the key in logs, metrics, rules and `gateway test` (default: key-<index>).",
    "KeySpec.limits": "This key's own rate limits (its tenant's and alias's apply too).",
    "KeySpec.budget": "This key's own budget.",
    "TenantSpec.limits": "Rate limits for all of the tenant's keys together.",
    "TenantSpec.budget": "Budget for all of the tenant's keys together.",
    "GuardsSpec.pool": "Where CPU-bound analysis runs.",
    "GuardsSpec.stream": "How streamed output is held back while it is scanned.",
    "GuardsSpec.global": "Guards for every request, by name.",
    "GuardsSpec.models": "Guards for one alias, by alias then name (override global ones of the same name).",
    "GuardsSpec.tenants": "Guards for one tenant, by tenant then name (override alias and global ones).",
    "EntitySpec.action": "What to do with this type (default: the guard's action).",
    "EntitySpec.threshold": "The lowest score acted on (default: the guard's threshold).",
    "PatternSpec.regex": "A regular expression (the `regex` module's syntax).",
    "PatternSpec.score": "The score of a match before context words raise it.",
    "RecognizerSpec.entity": "The entity type it finds.",
    "RecognizerSpec.patterns": "Regex patterns.",
    "RecognizerSpec.deny_list": "Exact terms.",
    "RecognizerSpec.context": "Words near a match that raise its score.",
    "RecognizerSpec.validator": "A checksum a match must pass.",
    "PiiGuardSpec.engine": "`patterns` (regexes, fast) or `ner` (presidio with a spaCy model).",
    "PiiGuardSpec.languages": "Languages of the text (ner).",
    "PiiGuardSpec.action": "Default action: block, redact, mask, pseudonymize or record.",
    "PiiGuardSpec.threshold": "Default lowest score acted on.",
    "PiiGuardSpec.recognizers": "Custom recognizers by name.",
    "SecretsGuardSpec.action": "What a found secret does to the request.",
    "SecretsGuardSpec.allow": "Values never reported (exact).",
    "InjectionGuardSpec.places": "Where it runs (input only by default).",
    "InjectionGuardSpec.action": "block or record.",
    "InjectionGuardSpec.threshold": "The lowest score that counts as an injection.",
    "DenyListGuardSpec.action": "block, redact or record.",
    "DenyListGuardSpec.terms": "Terms (whole words, case-insensitive).",
    "DenyListGuardSpec.patterns": "Regular expressions.",
    "DenyListGuardSpec.topics": "Named groups of terms, reported by topic.",
    "LimitsGuardSpec.places": "Input only.",
    "LimitsGuardSpec.action": "block or record.",
    "LimitsGuardSpec.max_chars": "Most characters of text in one request.",
    "LimitsGuardSpec.max_messages": "Most messages in one request.",
    "LimitsGuardSpec.max_tokens": "Most prompt tokens in one request.",
    "ServerSpec.watch_interval_s": "How often the policy's files are polled for changes.",
    "ProviderSpec.pool_timeout_s": "How long a request waits for a free slot of pool_size before a 503.",
    "ModelSpec.budget": "A budget for all callers of this alias together.",
    "MatchSpec.tenant": "The caller's tenant.",
    "MatchSpec.prompt_tokens_under": "The prompt has fewer tokens than this (estimated with tiktoken).",
    "BreakerSpec.window_s": "The window failure_ratio is measured over.",
    "DowngradeSpec.at": "The share of the budget spent from which requests are downgraded.",
    "DowngradeSpec.alias": "The cheaper alias requests go to past `at`.",
    "BudgetSpec.usd": "USD allowed per period.",
    "BudgetSpec.period": "day, week (from Monday), month (UTC calendar) or rolling (fixed windows of window_s, "
                         "aligned to the Unix epoch).",
    "BudgetSpec.downgrade": "Past a share of the budget, send requests to a cheaper alias.",
    "_GuardBase.timeout_s": "A guard slower than this is a failure (decided by `fail`).",
    "_GuardBase.places": "Where the guard runs: input (the request), output (the answer).",
    "GuardPoolSpec.kind": "`thread` or `process` workers.",
    "GuardPoolSpec.workers": "Number of workers.",
    "DynamicKeysSpec.enabled": "Look up keys created at run time (the admin API) in the state store.",
    "TelemetrySpec.labels": "Caps on how many aliases, targets, tenants and keys become metric label values.",
    "TelemetrySpec.quality": "Quality signals of answers (finish reasons, refusals, empty, truncated, invalid JSON).",
    "TelemetrySpec.feedback": "POST /v1/feedback: scores and labels for answers, by request id.",
    "TelemetrySpec.payload_log": "Prompts and answers, redacted, to a rotating file or a Redis stream.",
    "TelemetrySpec.tracing": "W3C trace context and OTLP/HTTP span export.",
    "LabelCapsSpec.aliases": "Aliases that are label values; the rest count as `other`.",
    "LabelCapsSpec.targets": "Targets that are label values; the rest count as `other`.",
    "LabelCapsSpec.tenants": "Tenants that are label values; the rest count as `other`.",
    "QualitySpec.enabled": "Turn the quality signals on (off: no checks at all, not even a look at the endpoint).",
    "FeedbackSpec.enabled": "Turn POST /v1/feedback on.",
    "FeedbackSpec.ttl_s": "How long after its request a feedback is accepted.",
    "PayloadLogSpec.enabled": "Turn the payload log on.",
    "PayloadLogSpec.sink": "`file` (rotating) or `redis` (a capped stream).",
    "PayloadLogSpec.max_bytes": "File: size at which it is rotated.",
    "PayloadLogSpec.backups": "File: rotated files kept.",
    "TracingSpec.enabled": "Turn tracing on.",
    "TracingSpec.service_name": "The service name of exported spans.",
    "TracingSpec.batch_size": "Spans per export request.",
    "TracingSpec.flush_interval_s": "Longest wait before queued spans are exported.",
}

_EXAMPLES: dict[str, list[Any]] = {
    "PolicySpec.include": [["providers.yaml", "tenants/*.yaml"]],
    "ServerSpec.shadow_policy": ["candidate.yaml"],
    "ProviderSpec.base_url": ["https://api.openai.com/v1", "http://127.0.0.1:8000/v1"],
    "ProviderSpec.api_key_env": ["OPENAI_API_KEY"],
    "KeySpec.hash": ["sha256:" + "0" * 64],
    "KeySpec.models": [["gpt-4o-mini", "text-embedding-3-small"], ["*"]],
    "ModelSpec.strategy": ["priority", "weighted"],
    "TargetSpec.model": ["gpt-4o-mini"],
    "MatchSpec.header": [{"X-Beta": ["*"]}],
    "LimitSpec.rpm": [600],
    "BudgetSpec.usd": [100],
    "StateSpec.url_env": ["REDIS_URL"],
    "RuleSpec.deny": ["`cheap` does not take tools; use gpt-4o-mini"],
}


def _structs() -> dict[str, type[msgspec.Struct]]:
    found: dict[str, type[msgspec.Struct]] = {}
    for module in _MODULES:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__module__ == module.__name__:
                found[value.__name__] = value
    return found


@functools.cache
def field_descriptions() -> dict[str, str]:
    """`Struct.field` -> description, from source comments and the table above."""
    found: dict[str, str] = {}
    for name, struct in _structs().items():
        comments: dict[str, str] = {}
        for base in reversed(struct.__mro__):  # a guard kind's common fields are written on its base
            if isinstance(base, type) and issubclass(base, msgspec.Struct) and base is not msgspec.Struct:
                comments.update(_source_comments(base))
        for field in msgspec.structs.fields(struct):
            text = comments.get(field.name) or next(
                (_DESCRIPTIONS[f"{base.__name__}.{field.encode_name}"] for base in struct.__mro__
                 if f"{base.__name__}.{field.encode_name}" in _DESCRIPTIONS), None)
            if text:
                found[f"{name}.{field.encode_name}"] = text
    return found


def _source_comments(struct: type) -> dict[str, str]:
    """The comment on each field's line, or the full-line comments just above it."""
    try:
        source = inspect.getsource(struct)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    above: list[str] = []
    field: str | None = None
    depth = 0
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for index, tok in enumerate(tokens):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                above.append(text)
            elif field is not None and depth == 0:
                found[field] = _sentence(text)
                field = None
        elif tok.type == tokenize.NAME and depth == 0 and tok.start[1] == 4 and index + 1 < len(tokens) \
                and tokens[index + 1].string == ":":
            field = tok.string
            if above:
                found[field] = _sentence(" ".join(above))
            above = []
        elif tok.type == tokenize.NEWLINE:
            field = None
    return found


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] if text else text


def factory_defaults() -> dict[str, dict[str, Any]]:
    """By struct name, the defaults of its fields that a factory makes (a list or a set: `models: ["*"]`), which
    msgspec's schema leaves out, so that the reference shows them as it shows the others."""
    found: dict[str, dict[str, Any]] = {}

    def walk(info: Any) -> None:
        if isinstance(info, types.StructType):
            if info.cls.__name__ in found:
                return
            found[info.cls.__name__] = {field.encode_name: _made(field.default_factory())
                                        for field in info.fields if field.default_factory is not msgspec.NODEFAULT}
            for field in info.fields:
                walk(field.type)
        elif isinstance(info, types.Metadata):
            walk(info.type)
        elif isinstance(info, types.UnionType):
            for option in info.types:
                walk(option)
        elif isinstance(info, (types.ListType, types.SetType, types.FrozenSetType, types.VarTupleType)):
            walk(info.item_type)
        elif isinstance(info, types.DictType):
            walk(info.value_type)

    walk(types.type_info(schema.PolicySpec))
    return found


def _made(value: Any) -> Any:
    """A factory's default as JSON; a set's members sorted (a set's order differs from one process to the next)."""
    return sorted(value) if isinstance(value, (set, frozenset)) else msgspec.to_builtins(value)


def policy_schema(*, fragment: bool = False) -> dict[str, Any]:
    """The JSON Schema of a policy file, every field described. `fragment`: for included files."""
    out: dict[str, Any] = schema.json_schema()
    descriptions = field_descriptions()
    made = factory_defaults()
    for name, definition in out.get("$defs", {}).items():
        for prop, body in definition.get("properties", {}).items():
            key = f"{name}.{prop}"
            if "default" not in body and prop in made.get(name, {}):
                body["default"] = made[name][prop]
            inner = [o.get("description") for o in body.get("anyOf", ()) if isinstance(o, dict)]
            if "description" not in body and any(inner):  # `Annotated[..., Meta(description)] | None`
                body["description"] = next(text for text in inner if text)
            if key in descriptions and body.get("description") != descriptions[key]:
                unit = body.get("description")  # a shared type's Meta: "seconds", "name of an environment variable"
                body["description"] = descriptions[key] + (f" ({unit})" if unit and len(unit) < 40 else "")
            if prop == "kind" and "enum" in body and "description" not in body:  # a guard's tag
                body["description"] = "The kind of guard."
            if key in _EXAMPLES:
                body["examples"] = _EXAMPLES[key]
    root = out["$defs"]["PolicySpec"]
    required = root.pop("required", [])
    if fragment:
        out["title"] = "LLM gateway policy, version 1 (an included file)"
    else:  # a policy that includes files may have its providers and models in them
        root["required"] = ["version"]
        root["if"] = {"not": {"required": ["include"]}}
        root["then"] = {"required": [name for name in required if name != "version"]}
    return out


def reference_markdown() -> str:
    """Every section of the policy, as markdown tables, walking from the top-level section."""
    defs: dict[str, Any] = policy_schema()["$defs"]
    paths: dict[str, list[str]] = {}  # struct -> every path it is found at, breadth first
    queue = [("PolicySpec", "(top level)")]
    while queue:
        name, path = queue.pop(0)
        if name in paths:
            paths[name].append(path)
            continue
        paths[name] = [path]
        for prop, body in defs[name].get("properties", {}).items():
            for ref, suffix in _refs(body):
                queue.append((ref, (prop if path == "(top level)" else f"{path}.{prop}") + suffix))
    lines = ["<!-- generated by `gateway schema --markdown`: do not edit by hand -->", ""]
    for name, where in paths.items():
        lines.extend(_section(defs[name], where))
    return "\n".join(lines)


def _section(definition: dict[str, Any], where: list[str]) -> list[str]:
    tag = definition.get("properties", {}).get("kind", {}).get("enum", [])
    lines = [f"### `{where[0]}`" + (f" (kind: {tag[0]})" if len(tag) == 1 else ""), ""]
    if len(where) > 1:
        lines.extend(["Also at " + ", ".join(f"`{path}`" for path in where[1:]) + ".", ""])
    if definition.get("description"):
        lines.extend([" ".join(definition["description"].split()), ""])
    lines.extend(["| field | type | default | description |", "|---|---|---|---|"])
    required = set(definition.get("required", ())) | set(definition.get("then", {}).get("required", ()))
    for prop, body in definition.get("properties", {}).items():
        default = "required" if prop in required else _default(body)
        description = body.get("description", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{prop}` | {_type(body)} | {default} | {description} |")
    lines.append("")
    return lines


def _refs(body: Any) -> list[tuple[str, str]]:
    """The structs a property holds, each with the path suffix that reaches it (`[]`, `.<name>`)."""
    if not isinstance(body, dict):
        return []
    if isinstance(body.get("$ref"), str):
        return [(body["$ref"].rsplit("/", 1)[-1], "")]
    found: list[tuple[str, str]] = []
    if body.get("type") == "array":
        found += [(ref, "[]" + suffix) for ref, suffix in _refs(body.get("items"))]
    if body.get("type") == "object":
        found += [(ref, ".<name>" + suffix) for ref, suffix in _refs(body.get("additionalProperties"))]
    for option in (*body.get("anyOf", ()), *body.get("oneOf", ())):
        found += _refs(option)
    return found


def _type(body: dict[str, Any]) -> str:
    if "$ref" in body:
        return f"`{body['$ref'].rsplit('/', 1)[-1].removesuffix('Spec').lower()}`"
    if "enum" in body:
        return " \\| ".join(f"`{v}`" for v in body["enum"])
    if "anyOf" in body:
        return " or ".join(_type(option) for option in body["anyOf"])
    kind = body.get("type")
    if kind == "array":
        return f"list of {_type(body.get('items', {}))}"
    if kind == "object":
        values = body.get("additionalProperties")
        return f"map of {_type(values)}" if isinstance(values, dict) and values else "map"
    if "oneOf" in body:
        return " or ".join(_type(option) for option in body["oneOf"])
    return str(kind) if kind else "any"


def _default(body: dict[str, Any]) -> str:
    if "default" not in body:
        return ""
    if "$ref" in body and isinstance(body["default"], dict):
        return "see below"
    return f"`{json.dumps(body['default'])}`"


_START, _END = "<!-- reference:start -->\n", "<!-- reference:end -->"


def write_docs(folder: Path) -> None:
    """Refresh the generated parts of the docs: the reference in policies.md and the two schema files."""
    doc = folder / "policies.md"
    text = doc.read_text(encoding="utf-8")
    head, tail = text[:text.index(_START) + len(_START)], text[text.index(_END):]
    doc.write_text(head + reference_markdown() + tail, encoding="utf-8")
    for name, fragment in (("policy.schema.json", False), ("policy-fragment.schema.json", True)):
        (folder / name).write_text(json.dumps(policy_schema(fragment=fragment), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":  # python -m gateway.policy.reference docs
    import sys

    write_docs(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
