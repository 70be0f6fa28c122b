"""Pluggable injection classifiers (`classifier: "module:factory"` on an injection guard), off the event loop.

A classifier is the policy owner's code: a model, a remote call, anything, with no bound on its work that the
gateway can see. So it never runs on the event loop: every check hands it to the guard pool under the guard's
`timeout_s` (a slow classifier is a guard failure that `fail:` decides, not a stalled gateway), as the
injection model is. Its factory is called when a runtime starts (`load_classifier(fresh=True)`, off the loop:
at start and on every reload) and in each process-pool worker (`warm`); one object then serves every check of
that process, from the pool's threads, possibly at once: its `score` must be thread-safe (or give the pool
`workers: 1`).

`classifier_score` is module-level and takes only strings, so a process pool can call it.
"""

from __future__ import annotations

import importlib
import threading
from typing import Protocol

__all__ = ["Classifier", "classifier_score", "load_classifier", "warm"]


class Classifier(Protocol):
    def score(self, text: str) -> float: ...


_loaded: dict[str, Classifier] = {}
_lock = threading.Lock()


def load_classifier(path: str, fresh: bool = False) -> Classifier:
    """The classifier `"module:factory"` names, made once per process (a factory that raises is tried again on
    the next call: its checks fail meanwhile). `fresh`: made anew (a runtime starting: a reload makes a new
    classifier, as it makes a new guard, for one whose factory reads files that changed)."""
    found = None if fresh else _loaded.get(path)
    if found is None:
        with _lock:  # two pool threads at once: one factory call
            found = None if fresh else _loaded.get(path)
            if found is None:
                module, _, attr = path.partition(":")
                found = _loaded[path] = getattr(importlib.import_module(module), attr)()
    return found


def classifier_score(path: str, text: str) -> float:
    """The classifier's score of `text`, in [0, 1] by its contract (on a pool thread or worker)."""
    return float(load_classifier(path).score(text))


def warm(paths: tuple[str, ...]) -> None:
    """In a process-pool worker: make the classifiers before the first check needs them."""
    for path in paths:
        load_classifier(path)
