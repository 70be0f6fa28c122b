"""Deny lists and banned topics: keywords and regexes matched on the folded text.

Keywords match whole words, whatever their case, accents, homoglyphs or the
zero-width characters slipped into them; a topic is a named keyword list whose
findings are reported as `TOPIC_<NAME>`. Spans map back to the original text, so
`action: redact` removes exactly what matched.
"""

from __future__ import annotations

import re
from bisect import bisect_left

from ..policy.guard_schema import DenyListGuardSpec
from .base import Finding, Where
from .common import GuardBase
from .holds import HOLD_TIMEOUT_S, RegexHolds
from .normalize import fold

__all__ = ["DenyListGuard"]


def _keywords(words: list[str]) -> re.Pattern[str]:
    folded = sorted({fold(w)[0] for w in words}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in folded) + r")(?!\w)")


class DenyListGuard(GuardBase):
    kind = "denylist"

    def __init__(self, name: str, spec: DenyListGuardSpec) -> None:
        super().__init__(name, spec)
        self.action = spec.action
        self.rules: list[tuple[str, re.Pattern[str]]] = []
        if spec.terms:
            self.rules.append(("DENIED_TERM", _keywords(spec.terms)))
        for pattern in spec.patterns:
            self.rules.append(("DENIED_PATTERN", re.compile(pattern, re.IGNORECASE)))
        for topic, words in spec.topics.items():
            self.rules.append((f"TOPIC_{topic.upper().replace('-', '_')}", _keywords(words)))
        self.holds = RegexHolds([(p.pattern, p.flags & re.IGNORECASE, 0) for _, p in self.rules],
                                timeout=HOLD_TIMEOUT_S if spec.patterns else None)  # a policy's regexes: bounded

    async def detect(self, text: str, where: Where) -> list[Finding]:
        folded, at = fold(text)
        found = []
        for label, pattern in self.rules:
            for match in pattern.finditer(folded):
                if match.end() > match.start():
                    found.append(Finding(self.name, label, at[match.start()], at[match.end() - 1] + 1, 1.0,
                                         f"denylist.{label.lower()}", self.action))
        return found

    def open_from(self, text: str, start: int) -> int:
        """Where a term or pattern may still be being written, on the folded text (`holds.py`)."""
        folded, at = fold(text)
        found = self.holds.open_from(folded, bisect_left(at, start))
        if found <= 0:
            return 0
        return at[found] if found < len(folded) else len(text)
