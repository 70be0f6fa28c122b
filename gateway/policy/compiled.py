"""The policy as the running gateway sees it: frozen, cross-checked, secrets resolved.

Built once per load by `policy.compile`; a request reads the `Policy` it started
with and never sees a half-applied change (a reload swaps the whole object).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..auth.keys import KeyRing
from ..store.base import StoreConfig
from .guard_schema import GuardsSpec
from .schema import AuthMode, ProviderKind, ServerSpec

__all__ = ["ModelRoute", "Policy", "ProviderConfig", "Timeouts"]


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


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """Where an alias goes. The routing issue turns this into an ordered target list."""

    alias: str
    provider: str
    upstream_model: str
    description: str


@dataclass(frozen=True, slots=True)
class Policy:
    source: str
    version: str  # sha256 of the file's text, short: names this policy in logs and cache keys
    server: ServerSpec
    state: StoreConfig
    auth: AuthMode
    keys: KeyRing
    providers: Mapping[str, ProviderConfig]
    models: Mapping[str, ModelRoute]
    warnings: tuple[str, ...] = ()
    metrics_token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    guards: GuardsSpec = field(default_factory=GuardsSpec)

    @property
    def has_guards(self) -> bool:
        """Whether any guard is defined: without one, no guard stage is built at all."""
        g = self.guards
        return bool(g.global_ or any(g.models.values()) or any(g.tenants.values()))
