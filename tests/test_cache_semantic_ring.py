"""The semantic index's scopes are ring buffers (H49): at `max_entries`, an added vector replaces the oldest by
writing one row.

It shifted the whole matrix by a row instead (`vectors[:-1] = vectors[1:].copy()`), and so did a removal: on the
event loop, for each stored semantic miss and each vector another replica shared, 1.6 ms at 384 dimensions, 14 ms
at 1,536, up to 117 ms at 3,072, a stall of every request of the process. What is checked here is the behaviour,
not a time: the rows an add or a removal writes, and that lookups stay right as the ring goes round.
"""

from __future__ import annotations

import numpy as np
import pytest

from gateway.cache.semantic import SemanticIndex, Vector


def unit_vectors(count: int, dim: int = 16, seed: int = 0) -> list[Vector]:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return [row / np.linalg.norm(row) for row in rows]


def matrix(index: SemanticIndex, scope: str) -> Vector:
    return index._scopes[scope].vectors.copy()


def test_an_add_at_the_bound_writes_one_row_over_the_oldest() -> None:
    vectors = unit_vectors(25)
    index = SemanticIndex(10)
    for number in range(10):
        index.add("s", f"k{number}", vectors[number])
    for number in range(10, 25):  # round the ring and half again
        before = matrix(index, "s")
        index.add("s", f"k{number}", vectors[number])
        changed = np.flatnonzero((matrix(index, "s") != before).any(axis=1))
        assert changed.tolist() == [number % 10]  # was: every row (the matrix shifted by one)
        assert len(index) == 10
    for number in range(25):  # the 10 newest are found, each by its own vector; the others went
        found = index.nearest("s", vectors[number])
        assert found is not None
        if number >= 15:
            assert found == (f"k{number}", pytest.approx(1.0, abs=1e-5))
        else:
            assert found[0] != f"k{number}"


def test_a_removed_vector_leaves_a_hole_the_ring_fills_in_its_turn() -> None:
    vectors = unit_vectors(8)
    index = SemanticIndex(4)
    for number in range(4):
        index.add("s", f"k{number}", vectors[number])
    before = matrix(index, "s")
    index.remove("s", "k1")
    assert (matrix(index, "s") == before).all()  # nothing moved (was: the rows after it, shifted)
    assert len(index) == 3
    assert index.nearest("s", vectors[1])[0] != "k1"  # type: ignore[index]
    assert index.nearest("s", -vectors[3]) is not None  # a hole never matches, even as the best score
    assert index.nearest("s", -vectors[3])[0] != "k1"  # type: ignore[index]
    index.remove("s", "k1")  # again, and an unknown key: nothing
    index.remove("s", "nope")
    index.add("s", "k4", vectors[4])  # over the oldest row (k0's), not into the hole
    assert len(index) == 3 and index.nearest("s", vectors[0])[0] != "k0"  # type: ignore[index]
    index.add("s", "k5", vectors[5])  # the ring's turn at the hole: no vector goes
    assert len(index) == 4
    for number in (2, 3, 4, 5):
        assert index.nearest("s", vectors[number]) == (f"k{number}", pytest.approx(1.0, abs=1e-5))
    index.add("s", "k5", vectors[6])  # a key already there: kept as it was
    assert index.nearest("s", vectors[5]) == ("k5", pytest.approx(1.0, abs=1e-5)) and len(index) == 4


def test_a_scope_whose_vectors_were_all_removed_matches_nothing() -> None:
    vectors = unit_vectors(3)
    index = SemanticIndex(2)
    index.add("s", "a", vectors[0])
    index.add("s", "b", vectors[1])
    index.remove("s", "a")
    index.remove("s", "b")
    assert len(index) == 0 and index.nearest("s", vectors[0]) is None
    index.add("s", "a", vectors[0])  # back, in the ring's next row
    assert index.nearest("s", vectors[0]) == ("a", pytest.approx(1.0, abs=1e-5))
