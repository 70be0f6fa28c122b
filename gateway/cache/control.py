"""What a request says about caching (its `Cache-Control` header, its sampling), and what the cache did.

`CacheResult` is left on the request's context (`ctx.cache`; its status in `ctx.cache_result`) for accounting
and the access log: whether the answer came from the cache, and what it saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ..policy.cache_schema import CacheSpec, CacheWhenSpec
from ..schemas.endpoints import Endpoint

__all__ = ["HEADER", "CachePlan", "CacheResult", "Directives", "cacheable", "directives", "plan"]

HEADER = b"x-gateway-cache"
Status = Literal["hit", "semantic-hit", "miss", "bypass"]


@dataclass(slots=True)
class CacheResult:
    status: Status
    age_s: float = 0.0
    similarity: float | None = None  # semantic hits
    saved_prompt_tokens: int = 0  # a hit: what the upstream would have charged
    saved_completion_tokens: int = 0
    saved_usd: float = 0.0

    @property
    def hit(self) -> bool:
        return self.status in ("hit", "semantic-hit")


@dataclass(frozen=True, slots=True)
class Directives:
    """The request's `Cache-Control`: `no-cache` (do not serve from the cache; refresh it),
    `no-store` (do not store this answer), `max-age=N` (serve only entries at most N seconds old)."""

    no_cache: bool = False
    no_store: bool = False
    max_age: float | None = None


NONE = Directives()
_MAX_DELTA_S = 2**31  # RFC 9111's greatest delta-seconds: any larger one reads as this
_DELTA_DIGITS = len(str(_MAX_DELTA_S))


def directives(headers: Sequence[tuple[bytes, bytes]]) -> Directives:
    values = [value for name, value in headers if name.lower() == b"cache-control"]
    if not values:
        return NONE
    no_cache = no_store = False
    max_age: float | None = None
    for part in b",".join(values).decode("latin-1").lower().split(","):
        name, _, arg = part.strip().partition("=")
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            max_age = _delta_seconds(arg.strip().strip('"'))
    return Directives(no_cache, no_store, max_age)


def _delta_seconds(text: str) -> float:
    """A `max-age` in seconds, never raising on what a client sends: past 2^31 it is 2^31 (RFC 9111, 1.2.2: a
    number of any length, 400 digits included, which `float` could not hold); below 0, 0; an unreadable one also
    0 (the safe reading is "nothing stale")."""
    if text.isascii() and text.isdigit() and len(text.lstrip("0")) > _DELTA_DIGITS:
        return float(_MAX_DELTA_S)  # (not parsed: `int` refuses more than 4300 digits)
    try:
        return float(min(max(int(text), 0), _MAX_DELTA_S))
    except ValueError:
        return 0.0


def cacheable(endpoint: Endpoint, request: object, when: CacheWhenSpec) -> bool:
    """Whether the same request would get the same answer again (as far as the policy trusts it)."""
    if endpoint is Endpoint.EMBEDDINGS:
        return True
    temperature = getattr(request, "temperature", None)
    if (1.0 if temperature is None else temperature) <= when.max_temperature:
        return True
    return when.seed and getattr(request, "seed", None) is not None


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the cache stage does with a request before any store is read: look up, store, and why.

    One source of truth for the stage and for `gateway explain`/`gateway test` (which never touch a store).
    """

    lookup: bool
    store: bool
    reason: str
    bypass: bool = False  # the stage does not even try (its status: `bypass`, not `miss`)


_NOT_CACHEABLE = CachePlan(False, False, "not cacheable (temperature above the policy's, no seed)", bypass=True)


def plan(spec: CacheSpec, endpoint: Endpoint, request: object, control: Directives) -> CachePlan:
    """Whether an alias's cache (`spec`) would look `request` up and store its answer, given its directives."""
    if endpoint is Endpoint.RESPONSES:  # stateful (`store`, `previous_response_id`), and its own answer shapes
        return CachePlan(False, False, "the Responses API is not cached", bypass=True)
    if not cacheable(endpoint, request, spec.when):
        return _NOT_CACHEABLE
    return _plan(spec, control.no_cache, control.no_store)


@lru_cache(maxsize=256)
def _plan(spec: CacheSpec, no_cache: bool, no_store: bool) -> CachePlan:
    """A cacheable request's plan: the same few per alias, so made once (with its reason) and reused."""
    if no_cache and no_store:
        return CachePlan(False, False, "Cache-Control: no-cache, no-store", bypass=True)
    lookup = spec.mode in ("on", "read-only") and not no_cache
    store = spec.mode in ("on", "write-only") and not no_store
    why = [f"mode {spec.mode}"] + [f"Cache-Control: {name}" for name, on in
                                   (("no-cache", no_cache), ("no-store", no_store)) if on]
    return CachePlan(lookup, store, ", ".join(why))
