"""Shared state for limits, budgets, the cache, breakers and reload signals: one `Store`, two backends.

`build_store(StoreConfig(...))` gives the in-memory store (one process) or the Redis store (many
replicas share the state); both pass the same contract suite (`tests/test_store.py`).
"""

from __future__ import annotations

from gateway.store.base import (
    Backend,
    Channel,
    OnUnavailable,
    Reservation,
    Store,
    StoreConfig,
    StoreUnavailable,
    Take,
    WindowCount,
)
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

__all__ = [
    "Backend",
    "Channel",
    "MemoryStore",
    "OnUnavailable",
    "RedisStore",
    "Reservation",
    "Store",
    "StoreConfig",
    "StoreUnavailable",
    "Take",
    "WindowCount",
    "build_store",
]


def build_store(config: StoreConfig) -> Store:
    """The store `config` describes, not started yet (call `await store.start()`; `aclose()` at the end)."""
    if config.backend == "redis":
        return RedisStore(config)
    return MemoryStore(config)
