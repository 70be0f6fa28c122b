"""The policy's `dynamic_keys` section: virtual keys created at run time through the admin API.

Kept apart from `schema.py` (like the guards' and accounting's shapes): the runtime key lookup
(`auth.dynamic`) and the admin API (`api.admin_keys`) read it, nothing else. Off by default, and
off means the pipeline looks keys up in the policy's own key ring only, without a store call.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

__all__ = ["DynamicKeysSpec"]


class DynamicKeysSpec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Keys kept hashed in the state store (`state:`), beside the policy's static `keys`.

    A key the policy lists is always found first; only a key it does not know is looked up in the
    store, through a bounded local cache that every replica empties at once (pub/sub) when a key is
    revoked or rotated. `cache_ttl_s` bounds how long a replica that missed that message (Redis
    restarting, a network cut) can still accept a revoked key while it can reach the store (or with
    `on_unavailable: closed`); with `open`, a replica cut off from the store keeps accepting the keys
    it has cached until it reaches the store again.
    """

    enabled: bool = False
    # How long a found key is trusted without asking the store again.
    cache_ttl_s: Annotated[float, Meta(ge=0.05, le=300)] = 5.0
    # How long an unknown key is answered 401 without asking the store again.
    negative_ttl_s: Annotated[float, Meta(ge=0.05, le=60)] = 2.0
    # Keys remembered per process, found and unknown each (found: least recently used dropped first; unknown: the one
    # looked up longest ago).
    cache_size: Annotated[int, Meta(ge=16, le=1_000_000)] = 10_000
    # Store look-ups in flight at once per process; more requests with uncached keys wait their turn.
    max_lookups: Annotated[int, Meta(ge=1, le=10_000)] = 64
    # Keys the admin API may create in all (revoked ones do not count).
    max_keys: Annotated[int, Meta(ge=1, le=100_000)] = 10_000
    # When the store cannot answer (default: `state.on_unavailable`). open: keys this process
    # has seen keep working, unseen ones get 503; closed: every key not freshly cached gets 503.
    on_unavailable: Literal["open", "closed"] | None = None
