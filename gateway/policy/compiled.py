"""The policy as the running gateway sees it: frozen, cross-checked, secrets resolved.

Built once per load by `policy.compile`; a request reads the `Policy` it started
with and never sees a half-applied change (a reload swaps the whole object).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..auth.keys import KeyRing
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
    keepalive_s: float
    stream_usage: bool
    chunk_delay_ms: float


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
    auth: AuthMode
    keys: KeyRing
    providers: Mapping[str, ProviderConfig]
    models: Mapping[str, ModelRoute]
    warnings: tuple[str, ...] = ()
