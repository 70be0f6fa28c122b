"""Deny lists and banned topics: keywords and regexes matched on the folded text.

Keywords match whole words, whatever their case, accents, homoglyphs or the
zero-width characters slipped into them; a topic is a named keyword list whose
findings are reported as `TOPIC_<NAME>`. Spans map back to the original text, so
`action: redact` removes exactly what matched. A policy's own regexes are searched
in the same folded text, as written: a non-ASCII letter in one never matches (the
policy check warns of it; write `cafe`, not `café`).

The terms and topics are searched from their lead, the word list itself (`slices.py`: a match of bounded
length, and a text holding none of the words is not searched at all), and a policy's own regexes (`patterns`,
of any length) in one pass each. A text of at most `INLINE_CHARS` characters is checked so on the event loop;
a longer one on the guard pool, the terms and topics slice by slice.
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_left

from ..policy.guard_schema import Action, DenyListGuardSpec
from .base import Finding, Where
from .common import GuardBase
from .holds import HOLD_TIMEOUT_S, RegexHolds
from .normalize import fold
from .pool import INLINE_CHARS, GuardPool
from .slices import Searchable, Sliced

__all__ = ["DenyListGuard", "Rules"]


# A deny list's rule: label, regex, its lead or None, how far the lead reads, and the strings one of which every
# match holds (the folded words: a text without any is not searched; none for a policy's own regex).
_Rule = tuple[str, re.Pattern[str], str | None, int, tuple[str, ...]]


def _keywords(words: list[str]) -> tuple[re.Pattern[str], str, int, tuple[str, ...]]:
    """The whole-word regex of `words` (folded), a term's words apart by any run of white space (a line break, a
    tab, two spaces: `project\nfalcon` is the term `project falcon`); its lead, each term's first word anywhere (a
    match starts with one, and the lead reads a bounded length, `slices.py`); how far the lead reads; the first
    words."""
    terms = sorted({tuple(fold(w)[0].split()) for w in words if w.split()}, key=lambda t: len(" ".join(t)),
                   reverse=True)
    whole = "(?:" + "|".join(r"\s+".join(re.escape(part) for part in term) for term in terms) + ")"
    firsts = sorted({term[0] for term in terms}, key=len, reverse=True)
    lead = "(?:" + "|".join(re.escape(first) for first in firsts) + ")"
    return re.compile(r"(?<!\w)" + whole + r"(?!\w)"), lead, len(firsts[0]) + 1, tuple(firsts)


class Rules:
    """A deny list's regexes and how it searches them: picklable, so that a process pool worker can run it."""

    __slots__ = ("action", "name", "patterns", "regexes")

    def __init__(self, name: str, action: Action, regexes: list[_Rule]) -> None:
        self.name = name
        self.action = action
        self.regexes = regexes
        # What `find` searches: the terms and topics from their lead (the words, which a text without any of them
        # is not searched for; `re` tries the whole-word regex, a lookbehind first, at every offset), a policy's
        # own regexes as they are; `find_long`'s, slice by slice until its deadline.
        self.patterns: list[tuple[str, Searchable]] = _led(regexes, math.inf)

    def find(self, text: str) -> list[Finding]:
        folded, at = fold(text)
        found = []
        for label, pattern in self.patterns:
            for match in pattern.finditer(folded):
                if match.end() > match.start():
                    found.append(Finding(self.name, label, at[match.start()], at[match.end() - 1] + 1, 1.0,
                                         f"denylist.{label.lower()}", self.action))
        return found

    def find_long(self, text: str, deadline: float) -> list[Finding]:
        """`find(text)`, the terms and topics searched slice by slice (`slices.py`) until `deadline`; a
        policy's own regex has no lead (its matches may be of any length): one pass, which holds the GIL."""
        sliced = Rules(self.name, self.action, self.regexes)
        sliced.patterns = _led(self.regexes, deadline)
        return sliced.find(text)


def _led(regexes: list[_Rule], deadline: float) -> list[tuple[str, Searchable]]:
    """Each regex with a lead searched from it until `deadline` (not at all in a text without its words); the
    others as they are."""
    return [(label, pattern if lead is None else Sliced(pattern, lead, deadline, reach, needs=(words,)))
            for label, pattern, lead, reach, words in regexes]


class DenyListGuard(GuardBase):
    kind = "denylist"

    def __init__(self, name: str, spec: DenyListGuardSpec, pool: GuardPool | None = None) -> None:
        super().__init__(name, spec)
        self.action = spec.action
        rules: list[_Rule] = []
        if any(term.split() for term in spec.terms):  # (a term of white space alone matches nothing)
            rules.append(("DENIED_TERM", *_keywords(spec.terms)))
        for pattern in spec.patterns:
            rules.append(("DENIED_PATTERN", re.compile(pattern, re.IGNORECASE), None, 0, ()))
        for topic, words in spec.topics.items():
            if any(word.split() for word in words):
                rules.append((f"TOPIC_{topic.upper().replace('-', '_')}", *_keywords(words)))
        self.rules = Rules(name, self.action, rules)
        self.pool = pool
        self.holds = RegexHolds([(p.pattern, p.flags & re.IGNORECASE, 0) for _, p, _, _, _ in rules],
                                timeout=HOLD_TIMEOUT_S if spec.patterns else None)  # a policy's regexes: bounded

    def detect_now(self, text: str, where: Where) -> list[Finding] | None:
        """The findings of a text of at most `INLINE_CHARS` characters, on the loop; None for a longer one,
        which `detect` hands to the pool."""
        if len(text) > INLINE_CHARS:
            return None
        return self.rules.find(text)

    async def detect(self, text: str, where: Where) -> list[Finding]:
        if len(text) <= INLINE_CHARS:
            return self.rules.find(text)
        deadline = time.monotonic() + self.timeout_s
        if self.pool is None:  # a guard built on its own (tests, tools): no pool to hand the text to
            return self.rules.find_long(text, deadline)
        return await self.pool.run(self.rules.find_long, text, deadline)

    def open_from(self, text: str, start: int) -> int:
        """Where a term or pattern may still be being written, on the folded text (`holds.py`)."""
        folded, at = fold(text)
        found = self.holds.open_from(folded, bisect_left(at, start))
        if found <= 0:
            return 0
        return at[found] if found < len(folded) else len(text)

