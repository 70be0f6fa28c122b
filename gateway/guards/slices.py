"""Long texts on the guard pool: a regex searched one slice at a time, with exactly the matches of one pass.

Python's `re` holds the GIL for the whole of one search call, so a pool thread that hands a 3.7 MB prompt
to `finditer` holds the event loop for as long as one pass of the regex over it takes (130 to 300 ms for
most secrets regexes, over a second for the key-like-word one: a regex that starts with a lookbehind or a
case-insensitive alternation is tried at every offset). A long text is therefore not searched whole.

Each regex searched this way has a lead: a regex that matches at least wherever a match of the regex starts
(`sk-` for an OpenAI key, whose own regex starts with a lookbehind that `re` cannot skip ahead for; the
key-like word of `password = ...`), and that reads at most `LEAD_REACH` characters from where it starts.
The lead is searched one slice of `SLICE_CHARS` start offsets at a time, each search seeing `LEAD_REACH`
characters past its slice (and, as a lookbehind does, everything before it), so it finds exactly the offsets
where it matches the whole text. The regex itself is then tried with `match` on the whole text at those
offsets only, so its matches may be of any length, as in one pass.

Why this is `pattern.finditer(text)` exactly: finditer's next match is the one `pattern.match` finds at the
first offset, at or after the end of the last match, where it finds one; every such offset is one where the
lead matches, and each is tried in order. (The regex must not match the empty string: finditer treats an
empty match specially. None of the guards' built-in regexes can.) `search` is the first of them.

The `secrets`, `denylist` and `injection` guards (the last on a text of 64 characters or more) search a short
text on the event loop this way too, in one slice with no deadline: their regexes open with a lookbehind or a
`\b`, which `re` tries at every offset, and one pass of each costs several times its lead's search. A regex
whose every match holds one of some strings (`Sliced.needs`: its lead's own words, `literals_of`, and its
caller's) is not searched at all in a text without them: `in` runs at memchr's speed.

Between slices the scan looks at the guard's deadline (its `timeout_s` from when the check started), so that
a worker stops soon after the check has timed out, instead of finishing a scan nobody waits for. The
deadline is `time.monotonic()`, which is one clock for the whole machine on Linux (process pool workers).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Protocol

from .pool import INLINE_CHARS

__all__ = ["LEAD_REACH", "SLICE_CHARS", "Searchable", "Sliced", "finditer", "literals_of", "starts"]

# Start offsets searched by one call: the loop waits at most about as long as for a text checked inline.
SLICE_CHARS = INLINE_CHARS
# The most characters a lead may read from where it starts (its widest match and one character after it,
# for a `\b` or lookahead at its end): every built-in lead is far shorter (`tests/test_guard_slices.py`).
LEAD_REACH = 64


def starts(lead: re.Pattern[str], text: str, deadline: float, reach: int = LEAD_REACH) -> Iterator[int]:
    """Every offset where `lead` matches `text`, in order, one slice at a time."""
    size = len(text)
    search = lead.search
    pos = 0
    while pos < size:
        if time.monotonic() > deadline:
            raise TimeoutError
        stop = min(pos + SLICE_CHARS, size)
        end = min(stop + reach, size)
        while (found := search(text, pos, end)) is not None and (start := found.start()) < stop:
            yield start
            pos = start + 1
        pos = stop


def finditer(pattern: re.Pattern[str], lead: re.Pattern[str], text: str, deadline: float,
             reach: int = LEAD_REACH, folded: re.Pattern[str] | None = None) -> Iterator[re.Match[str]]:
    """`pattern.finditer(text)`, trying `pattern` only where `lead` matches. `folded`, for a lead that ignores
    case: the same lead in lowercase, matched with case, searched instead on the text's lowercase copy when the
    text is ASCII (the same length, so the same offsets; `re`'s case folding is what makes such a lead slow:
    about 80 ns a character for the key-like word, against 10 on the copy)."""
    end = 0
    match = pattern.match
    offsets = starts(folded, text.lower(), deadline, reach) if folded is not None and text.isascii() \
        else starts(lead, text, deadline, reach)
    for start in offsets:
        if start >= end and (found := match(text, start)) is not None:
            yield found
            end = found.end()


class Searchable(Protocol):
    """What a guard's scan searches: a compiled regex, or (for a long text) a `Sliced` one."""

    @property
    def groups(self) -> int: ...

    def finditer(self, text: str, /) -> Iterator[re.Match[str]]: ...

    def search(self, text: str, /) -> re.Match[str] | None: ...


_PLAIN = r"[^()|\\\[\].*+?{}^$]"  # a character that stands for itself in a regex (outside a class)
_ALTERNATIVES = re.compile(rf"\((?:\?:)?({_PLAIN}+(?:\|{_PLAIN}+)*)\)({_PLAIN}*)")  # `(a|bc) d`, `(?:a|bc)`
_LITERAL = re.compile(rf"{_PLAIN}+")


def literals_of(lead: str, flags: int = 0) -> tuple[str, ...] | None:
    """Strings one of which is in every text where `lead` matches, when the lead is plain enough to tell: a
    literal (`jailbreak`), or a group of literal alternatives (capturing or not) and a literal after it
    (`(developer|god) mode`: `developer mode`, `god mode`), matched with case. None for any other lead."""
    if flags & (re.IGNORECASE | re.VERBOSE):  # (`in` is matched with case, and with every space)
        return None
    if _LITERAL.fullmatch(lead):
        return (lead,)
    found = _ALTERNATIVES.fullmatch(lead)
    return tuple(alternative + found[2] for alternative in found[1].split("|")) if found else None


class Sliced:
    """A regex with its lead and a deadline, searched as the regex would be (`finditer`, `search`, `groups`):
    the guards' scans run unchanged on a long text with these in place of their compiled regexes."""

    __slots__ = ("deadline", "folded", "groups", "lead", "needs", "pattern", "reach")

    def __init__(self, pattern: re.Pattern[str], lead: str, deadline: float, reach: int = LEAD_REACH,
                 folded: str | None = None, needs: tuple[tuple[str, ...], ...] = ()) -> None:
        self.pattern = pattern
        self.lead = re.compile(lead, pattern.flags)  # the regex's flags (case, dot): `re` caches it
        self.folded = re.compile(folded, pattern.flags) if folded is not None else None  # (see `finditer`)
        # Groups of strings, one of each in every text the regex matches: the lead's own (`literals_of`), and the
        # caller's `needs` (words its regex requires after the lead). A text without one of a group is not
        # searched at all (`in` runs at memchr's speed; an alternation of words at about 7 ns a character).
        literals = literals_of(lead, pattern.flags)
        if literals is not None and all(set(group) != set(literals) for group in needs):  # (a deny list's words)
            needs = (literals, *needs)
        self.needs = needs
        self.deadline = deadline
        self.reach = reach
        self.groups = pattern.groups

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        for group in self.needs:  # (loops, not `any` over a generator: half the interpreter's steps)
            for literal in group:
                if literal in text:
                    break
            else:
                return iter(())
        return finditer(self.pattern, self.lead, text, self.deadline, self.reach, self.folded)

    def search(self, text: str) -> re.Match[str] | None:
        for group in self.needs:  # (as `finditer`, in line: most searches of a prompt end here)
            for literal in group:
                if literal in text:
                    break
            else:
                return None
        return next(finditer(self.pattern, self.lead, text, self.deadline, self.reach, self.folded), None)
