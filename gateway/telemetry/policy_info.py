"""`gateway_policy_info`: the policy version served (1) and the last `EARLIER_VERSIONS` served before it (0).

A collector of its own rather than a labelled gauge: with several workers, prometheus_client's multiprocess mode
keeps every gauge series in the workers' files, and cannot remove one (`remove` does nothing there, and warns on
stderr, a line that is not JSON in the gateway's log), so a worker reloaded a hundred times showed a hundred
series. Here each process shows the versions it served, from memory: in multiprocess mode, the worker that
answers the scrape (every worker loads the same policy files, and reloads them on the same signal or change).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

__all__ = ["EARLIER_VERSIONS", "PolicyVersions"]

EARLIER_VERSIONS = 16  # policy versions served before this one whose series are kept


class PolicyVersions:
    """The versions served, oldest first (a dict keeps their order), as one gauge family."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._versions: dict[str, None] = {}
        registry.register(self)  # (a collector: `collect`, `describe`)

    def serving(self, version: str) -> None:
        """`version` is served now; earlier versions drop to 0, and past `EARLIER_VERSIONS` of them the oldest
        are forgotten."""
        versions = self._versions
        versions.pop(version, None)  # served again: the newest now
        while len(versions) >= EARLIER_VERSIONS + 1:
            del versions[next(iter(versions))]
        versions[version] = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("gateway_policy_info", _HELP, labels=("version",))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("gateway_policy_info", _HELP, labels=("version",))
        versions = list(self._versions)
        for version in versions:
            family.add_metric((version,), 1.0 if version == versions[-1] else 0.0)
        yield family


_HELP = "The policy version being served (1) and the ones before it (0)."
