"""A vector of another dimension (another replica's embedder under the same scope: a rolling deploy of a new local
model in the default model_dir, or any client of the store publishing), or one that is not finite, is dropped by the
semantic index before anything changes, and the shared-vector listener goes on.

`add` recorded the key (and, at the bound, dropped the evicted key's row mapping) before the row write raised
ValueError: the index mapped a key to a row holding another prompt's vector (served at similarity 1.0) or an
uninitialised one, and the listener ended for good (review of 3f1eb5e). A NaN vector would win every look-up.
"""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np

from gateway.cache.semantic import CHANNEL, SemanticIndex, SemanticShare, _Shared
from gateway.store.memory import MemoryStore


def unit(seed: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_full_ring_wrong_dimension_maps_new_key_to_old_vector() -> None:
    index = SemanticIndex(2)
    a, b = unit(1, 8), unit(2, 8)
    index.add("s", "entry-a", a)
    index.add("s", "entry-b", b)
    try:
        index.add("s", "entry-c", unit(3, 4))  # another replica's 4-dimension vector
    except ValueError:
        pass
    found = index.nearest("s", a)  # a prompt just like a's
    print("nearest to a:", found, "len", len(index))
    # expected: entry-a (or nothing); observed: entry-c, whose answer is another prompt's, at similarity 1.0
    assert found is not None and found[0] == "entry-a", found


def test_not_full_wrong_dimension_leaves_uninitialised_row() -> None:
    index = SemanticIndex(100)
    index.add("s", "entry-a", unit(1, 8))
    try:
        index.add("s", "entry-c", unit(3, 4))
    except ValueError:
        pass
    sc = index._scopes["s"]
    print("used", sc.used, "keys", sc.keys, "rows", sc.rows)
    assert sc.used == len(sc.rows), (sc.used, sc.keys, sc.rows)


def test_a_shared_vector_of_another_dimension() -> None:
    """Through the real listener (another replica's message on the store's channel)."""
    async def main() -> tuple[object, bool, bool]:
        store = MemoryStore()
        await store.start()
        index = SemanticIndex(2)
        share = SemanticShare(store, {"m": index})
        await share.start()
        a = unit(1, 8)
        index.add("s", "entry-a", a)
        index.add("s", "entry-b", unit(2, 8))

        def msg(key: str, dim: int) -> bytes:
            return msgspec.msgpack.encode(_Shared("other-replica", "m\x00s", key, unit(5, dim).tobytes()))

        await store.publish(CHANNEL, msg("entry-c", 4))  # a replica whose embedder has 4 dimensions
        await asyncio.sleep(0.1)
        found = index.nearest("s", a)
        listener_alive = share._task is not None and not share._task.done()
        await store.publish(CHANNEL, msg("entry-d", 8))  # a good vector afterwards
        await asyncio.sleep(0.1)
        got_later = "entry-d" in index._scopes["s"].rows
        if share._task is not None and share._task.done():
            share._task = None  # (its ValueError would be raised again by aclose)
        await share.aclose()
        return found, listener_alive, got_later

    found, alive, later = asyncio.run(main())
    print("nearest to a:", found, "listener alive:", alive, "later vector added:", later)
    assert found is not None and found[0] == "entry-a", found
    assert alive and later


def test_a_vector_that_is_not_finite_is_dropped() -> None:
    index = SemanticIndex(4)
    a = unit(1, 8)
    index.add("s", "entry-a", a)
    index.add("s", "entry-nan", np.full(8, np.nan, dtype=np.float32))
    found = index.nearest("s", a)
    assert found is not None and found[0] == "entry-a"
    assert len(index) == 1
