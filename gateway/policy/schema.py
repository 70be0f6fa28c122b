"""The policy file's raw shape (version 1), as msgspec structs.

These structs are what YAML decodes into: every field typed, unknown fields
rejected, defaults written down here once. They are checked field by field by
`policy.loader` (so that one run reports every error with its line) and then
turned into the runtime objects of `policy.compiled` by `policy.compile`.
`gateway schema` prints the JSON Schema generated from these same structs.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from .guard_schema import GuardsSpec

__all__ = [
    "AuthMode",
    "KeySpec",
    "ModelSpec",
    "PolicySpec",
    "ProviderKind",
    "ProviderSpec",
    "ServerSpec",
    "StateSpec",
    "TimeoutSpec",
    "json_schema",
]

Seconds = Annotated[float, Meta(gt=0, le=86_400, description="seconds")]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]
EnvVarName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of an environment variable")]
HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")]
KeyHash = Annotated[
    str,
    Meta(pattern=r"^sha256:[0-9a-f]{64}$", description="output of `gateway keys hash`"),
]
ProviderKind = Literal["openai", "demo"]
AuthMode = Literal["none", "keys"]


class _Spec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Common options: reject unknown fields, immutable."""


class ServerSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The HTTP server. `host`, `port` and the connection limits take effect at start;
    everything else is re-read on reload."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65_535)] = 8080
    max_body_bytes: Annotated[int, Meta(ge=1_024, le=256 * 1024 * 1024)] = 4 * 1024 * 1024
    # Request line + headers; refused with 431 before they are buffered.
    max_header_bytes: Annotated[int, Meta(ge=1_024, le=1024 * 1024)] = 64 * 1024
    # A connection must send its request head within this; silent connections are closed.
    header_timeout_s: Seconds = 10.0
    # Open connections per process; over it new requests get 503.
    max_connections: Annotated[int, Meta(ge=16, le=1_000_000)] = 20_000
    drain_timeout_s: Seconds = 30.0
    # On SIGTERM: keep serving, with /readyz answering 503, this long before closing the
    # listening socket, so that a load balancer sees the drain (Kubernetes: 5-10).
    drain_delay_s: Annotated[float, Meta(ge=0, le=300)] = 0.0
    metrics: bool = True
    # If set, /metrics requires `Authorization: Bearer <value of this variable>`.
    metrics_token_env: EnvVarName | None = None
    # If set, /admin/* is on, behind `Authorization: Bearer <value of this variable>`.
    admin_token_env: EnvVarName | None = None
    access_log: bool = False
    # Reload when the policy file changes (polled), on SIGHUP and on POST /admin/reload.
    watch_policy: bool = True
    watch_interval_s: Annotated[float, Meta(ge=0.1, le=3_600)] = 2.0


class StateSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Where shared state (limits, budgets, breakers, cache) lives."""

    backend: Literal["memory", "redis"] = "memory"
    url_env: EnvVarName | None = None  # the Redis URL, from this environment variable
    key_prefix: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9:_.{}-]*$")] = "gw:"
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
    api_key_header: HeaderName = "Authorization"
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
    # A non-streamed answer larger than this is refused (502) while it is read.
    max_response_bytes: Annotated[int, Meta(ge=1_024, le=1024 * 1024 * 1024)] = 64 * 1024 * 1024
    chunk_delay_ms: Annotated[float, Meta(ge=0, le=10_000)] = 0.0


class ModelSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    provider: Name
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str = ""


class KeySpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    hash: KeyHash
    tenant: Name
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    name: str = ""


class PolicySpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    version: Literal[1]
    server: ServerSpec = ServerSpec()
    state: StateSpec = StateSpec()
    auth: AuthMode = "keys"
    keys: list[KeySpec] = []
    providers: dict[Name, ProviderSpec]
    models: dict[Name, ModelSpec]
    guards: GuardsSpec = GuardsSpec()


def json_schema() -> dict[str, object]:
    """The policy's JSON Schema, for editors (yaml-language-server and friends)."""
    schema = msgspec.json.schema(PolicySpec)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "LLM gateway policy, version 1"
    return schema
