"""The closed sets metric labels take their values from, built once per policy.

Aliases, targets, tenants and key names come from the policy file only, each capped
(`telemetry.labels`); anything else (a key created at run time for a new tenant, a
tenant beyond the cap) is counted as `other`. A client can therefore never add a
series: what it sends (model strings, users, headers, keys) is never a label value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["OTHER", "MetricLabels", "capped"]

OTHER = "other"


def capped(values: Iterable[str], cap: int) -> frozenset[str]:
    """The first `cap` distinct values, in sorted order (stable across replicas and reloads)."""
    return frozenset(sorted(set(values))[:cap])


@dataclass(frozen=True, slots=True)
class MetricLabels:
    aliases: frozenset[str] = frozenset()
    targets: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()

    def alias(self, value: str) -> str:
        return value if value in self.aliases or value == "unknown" else OTHER

    def target(self, value: str | None) -> str:
        if value is None:
            return "none"
        return value if value in self.targets else OTHER

    def tenant(self, value: str) -> str:
        return value if value in self.tenants or value == "anonymous" else OTHER

    def key(self, value: str | None) -> str:
        if not value:
            return "none"
        return value if value in self.keys else OTHER
