"""Metrics that record nothing: what a decider's router and guard runtime count into.

A decider must never count in the gateway's metrics (they count served requests only). A private `Metrics()` is
not enough: under `gateway serve --workers N` (`PROMETHEUS_MULTIPROC_DIR` set) prometheus_client writes every
metric's values to the shared multiprocess files, whatever registry it belongs to, and every worker's `/metrics`
reads them all back; a shadow policy's guards then showed up in the live exposition. Nothing reads a decider's
counts, so they are made nowhere: every metric, child and `Children` lookup here is one object that ignores what
it is told.
"""

from __future__ import annotations

from typing import Any

from ..telemetry.metrics import Metrics

__all__ = ["UnrecordedMetrics"]


class _Nothing:
    """A metric, a labelled child, or a `Children` lookup, all at once: every call records nothing."""

    __slots__ = ()

    def labels(self, *args: Any, **kwargs: Any) -> _Nothing:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Nothing:
        return self

    def inc(self, amount: float = 1.0) -> None:
        pass

    def dec(self, amount: float = 1.0) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_NOTHING = _Nothing()


class UnrecordedMetrics(Metrics):
    """A `Metrics` with no metric behind it: every attribute `Metrics` would make is `_NOTHING`, so its own methods
    (`waiting`, `series`, ...) record nothing either. Made in no registry and no multiprocess file."""

    def __init__(self) -> None:  # not Metrics's: no metric is made
        self.multiprocess = False

    def __getattr__(self, name: str) -> Any:  # only for what __init__ did not set: every metric
        if name.startswith("__"):
            raise AttributeError(name)
        return _NOTHING
