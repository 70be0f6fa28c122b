"""One request's guard state: its guards, its pseudonyms, and what they did (header and metrics)."""

from __future__ import annotations

from ..telemetry.metrics import Metrics
from .base import Finding, Place
from .pseudonyms import Pseudonyms
from .verdict import Verdict

__all__ = ["GuardSession"]


class GuardSession:
    __slots__ = ("counts", "metrics", "pseudonyms")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.pseudonyms = Pseudonyms()
        self.counts: dict[str, int] = {}

    def expect(self, guard: str, action: str) -> None:
        """List a guard in the header even when it finds nothing (`secrets.block=0`)."""
        self.counts.setdefault(f"{guard}.{action}", 0)

    def note(self, guard: str, mode: str, place: Place, verdict: Verdict) -> None:
        self.metrics.guard_verdicts_of(guard, verdict.decision, mode, place).inc()
        for finding in verdict.findings if mode == "enforce" else verdict.shadow:
            self._count(finding, mode, place)

    def note_findings(self, findings: list[Finding], mode: str, place: Place) -> None:
        """Count `findings`, once per (guard, type, action): a prompt with ten addresses is one metric
        update and one header count of ten, not ten of one."""
        if len(findings) < 2:
            for finding in findings:
                self._count(finding, mode, place)
            return
        groups: dict[tuple[str, str, str], int] = {}
        for finding in findings:
            group = (finding.guard, finding.type, finding.action)
            groups[group] = groups.get(group, 0) + 1
        for (guard, kind, action), count in groups.items():
            self.metrics.guard_findings_of(guard, kind, action, mode, place).inc(count)
            key = f"{guard}.{action}" if mode == "enforce" else f"{guard}.shadow_{action}"
            self.counts[key] = self.counts.get(key, 0) + count

    def _count(self, finding: Finding, mode: str, place: Place) -> None:
        self.metrics.guard_findings_of(finding.guard, finding.type, finding.action, mode, place).inc()
        key = f"{finding.guard}.{finding.action}" if mode == "enforce" else f"{finding.guard}.shadow_{finding.action}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def header(self) -> bytes:
        return ",".join(f"{key}={count}" for key, count in sorted(self.counts.items())).encode()
