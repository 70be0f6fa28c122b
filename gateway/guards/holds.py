"""Stream holds: from where a guard must still hold back streamed text.

The stream scanner (`window.py`) releases text as soon as no finding can still
start inside it. Each guard answers, for the text seen so far, the offset from
which a finding may start that this text does not complete: an e-mail address
still being written, a number that may grow into a phone number, a date whose
"born" may still follow. Everything before that offset is final: scanning the
longer text later finds the same findings there.

For a regex this is exact, with the `regex` module's partial matching: `P\\Z[\\s\\S]`
never matches wholly, and matches partly from exactly the starts from which
some way of matching `P` reaches the end of the text, i.e. from which more text
could change what `P` matches; a partial search returns the leftmost. A start
from which no path of `P` reaches the end matches the same (or nothing) however
the text goes on, since a backtracking engine tries its paths in the same order,
and stays so: the next look can start where the last one found a possible start.
Rules that are not plain regexes get their own conservative rule:

* a context word that may still arrive after a match (the gateway's
  `ContextRecognizer` looks `window // 2` characters past it): a match that ends
  less than that before the text's end is held from its start;
* presidio's phone recognizer (libphonenumber), which the gateway only runs on
  letter-free stretches (`windowed.PhoneWindows`): the trailing stretch of
  characters other than letters (x and X count as non-letters, as there) is held
  from its first digit, plus sign or opening bracket (where libphonenumber's
  matcher lets a number start);
* what cannot say (a spaCy pipeline, which may tag any word as a name and reads
  the words around it; a classifier; a regex the `regex` module cannot compile)
  answers 0, and the scanner holds its whole window as before.

Everything is compiled once per guard (per runtime), never per request or chunk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import regex  # type: ignore[import-untyped]  # no stubs

__all__ = ["HOLD_TIMEOUT_S", "RegexHolds", "phone_from", "pii_holds"]

HOLD_TIMEOUT_S = 0.1  # the bound on one search of a regex a policy wrote (a deny list's or a custom recognizer's)

# A letter other than x and X: what ends a phone number's letter-free stretch. The stdlib's `\w`, as
# `recognizers._RUN` (the `regex` module's also counts combining marks and joiners as word characters).
_LETTER = re.compile(r"[^\W\d_xX]")
# What a phone number starts with (libphonenumber's matcher: an opening bracket, a plus sign or a digit).
_LEAD = regex.compile("[\\d(\\[\uff08\uff3b+\uff0b]")


class RegexHolds:
    """Where a match of any of some regexes may still start, as the text goes on."""

    __slots__ = ("after", "broken", "phone", "tails", "timeout")

    def __init__(self, patterns: Iterable[tuple[str, int, int]], *, phone: bool = False,
                 timeout: float | None = None) -> None:
        """`patterns`: (regex, flags, how many characters after a match a context word still counts).
        `timeout`: a bound on each search, for regexes a policy wrote (the built-in ones are linear enough,
        and the bound costs about 2 us a search); a search past it answers "cannot tell"."""
        # One regex per pattern: an alternation of them all costs more than their sum (each pattern
        # alone skips most positions on its first character; an alternation tries them all).
        self.tails: list[Any] = []  # `(?:P)\Z[\s\S]`
        self.after: list[tuple[Any, int]] = []
        self.broken = False
        self.phone = phone
        self.timeout = timeout
        for rx, flags, after in patterns:
            try:
                self.tails.append(regex.compile(f"(?:{rx})\\Z[\\s\\S]", flags))
                if after > 0:
                    self.after.append((regex.compile(rx, flags), after))
            except (regex.error, ValueError, OverflowError):
                self.broken = True  # a policy's regex this module reads otherwise: cannot tell

    @property
    def reach(self) -> int:
        """How many characters past a match a context word may still come (the largest `after`; 0 for none)."""
        return max((after for _, after in self.after), default=0)

    def open_from(self, text: str, start: int = 0) -> int:
        """The earliest offset at or after `start` where a match may start that more text could still
        make or change; `len(text)` when there is none; 0 when this cannot tell."""
        if self.broken:
            return 0
        if self.timeout is not None:
            try:
                return self._open_from(text, start, self.timeout)
            except TimeoutError:
                return 0
        return self._open_from(text, start, None)

    def _open_from(self, text: str, start: int, timeout: float | None) -> int:
        end = len(text)
        best = end
        for tail in self.tails:
            # `P\Z[\s\S]` never matches wholly: it matches partly from every start where a path of P
            # reaches the end, and a partial search returns the leftmost such start. (`P\Z` would not do:
            # a partial search prefers a later complete match to an earlier partial one.)
            found = tail.search(text, start, partial=True, timeout=timeout)
            if found is not None and found.start() < best:
                best = found.start()
        for pattern, after in self.after:
            for match in pattern.finditer(text, start, overlapped=True, timeout=timeout):
                if match.start() >= best:
                    break
                if match.end() > end - after:
                    best = match.start()
                    break
        if self.phone:
            best = min(best, phone_from(text, start))
        return best


def phone_from(text: str, start: int = 0) -> int:
    """Where a phone number may start in the trailing letter-free stretch of `text` (it may still grow from
    there): its first digit, plus sign or opening bracket; `len(text)` when it has none."""
    letter = _LETTER.search(text[:start - 1 if start else None:-1])  # backwards: the last letter first
    run = start if letter is None else len(text) - letter.start()
    found = _LEAD.search(text, run)
    return len(text) if found is None else found.start()


def pii_holds(recognizers: Sequence[Any]) -> RegexHolds | None:
    """The holds of the `patterns` engine's recognizers; None when one of them cannot say."""
    from presidio_analyzer import PatternRecognizer

    from .recognizers import ContextRecognizer
    from .windowed import PhoneWindows

    patterns: list[tuple[str, int, int]] = []
    phone = False
    written = False  # a policy's own recognizer (`policy.<name>`): its searches are bounded
    for recognizer in recognizers:
        if isinstance(recognizer, PhoneWindows):  # letter-free stretches only: see `phone_from`
            phone = True
        elif isinstance(recognizer, PatternRecognizer):
            after = 0
            if isinstance(recognizer, ContextRecognizer) and recognizer._context is not None:
                after = recognizer._window // 2 + 1  # how far past a match `ContextRecognizer.analyze` looks
            written = written or str(getattr(recognizer, "name", "")).startswith("policy.")
            flags = recognizer.global_regex_flags or 0
            own: list[Any] = getattr(recognizer, "patterns", [])
            patterns += [(p.regex, flags, after) for p in own]
        else:
            return None
    return RegexHolds(patterns, phone=phone, timeout=HOLD_TIMEOUT_S if written else None)
