"""Pluggable injection classifiers (`classifier: "module:factory"` on an injection guard), off the event loop.

A classifier is the policy owner's code: a model, a remote call, anything, with no bound on its work that the
gateway can see. So it never runs on the event loop: every check hands it to the guard pool under the guard's
`timeout_s` (a slow classifier is a guard failure that `fail:` decides, not a stalled event loop), as the
injection model is. A call that overruns its timeout still holds its pool worker until it returns, and counts
in the pool's `max_queue` until then (`pool.py`).

Each runtime makes its own: its guard's `OwnClassifier` calls the factory when the runtime starts (off the
loop), so a reload makes a new classifier as it makes new guards, and a factory that raises fails that
runtime's checks (tried again at each check) without touching the runtime it replaces. One object serves every
check of its runtime, from the pool's threads, possibly at once: its `score` must be thread-safe (or give the
pool `workers: 1`). A process pool is the runtime's own too: each worker makes one (`warm`, `classifier_score`,
which take only strings, so that the pool can call them).
"""

from __future__ import annotations

import importlib
import threading
from typing import Protocol

__all__ = ["Classifier", "OwnClassifier", "classifier_score", "make_classifier", "warm"]


class Classifier(Protocol):
    def score(self, text: str) -> float: ...


def make_classifier(path: str) -> Classifier:
    """A new classifier from the factory `"module:factory"` names."""
    module, _, attr = path.partition(":")
    made: Classifier = getattr(importlib.import_module(module), attr)()
    return made


class OwnClassifier:
    """One runtime's classifier: made at its start (`make`), or at a check when the start's factory call
    failed (`score`: a failure again fails the check)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._made: Classifier | None = None
        self._lock = threading.Lock()  # two pool threads at a check: one factory call

    def make(self) -> None:
        self._made = make_classifier(self.path)

    def score(self, text: str) -> float:
        made = self._made
        if made is None:
            with self._lock:
                made = self._made
                if made is None:
                    made = self._made = make_classifier(self.path)
        return float(made.score(text))


_worker_own: dict[str, OwnClassifier] = {}  # in a process-pool worker: its runtime's, by path


def classifier_score(path: str, text: str) -> float:
    """In a process-pool worker: its classifier's score of `text` (the worker belongs to one runtime)."""
    own = _worker_own.get(path)
    if own is None:
        own = _worker_own.setdefault(path, OwnClassifier(path))
    return own.score(text)


def warm(paths: tuple[str, ...]) -> None:
    """In a process-pool worker: make the classifiers before the first check needs them."""
    for path in paths:
        _worker_own.setdefault(path, OwnClassifier(path)).make()
