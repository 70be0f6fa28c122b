"""Presidio's built-in recognizers run only on the stretches of a text that can hold their match.

Presidio's phone, e-mail and IP recognizers scan the whole text, and on a long prompt with a few
years, order numbers and addresses in it they were most of a `patterns` analysis. The classes here
hand them only the windows that can hold a match (letter-free digit runs for phone numbers,
whitespace-delimited tokens with an `@`, a dotted digit or a colon for the others) and find the same
results: `test_windowed_recognizers_find_what_presidio_finds` holds them to it. `BUILTIN_GATES` are
the cheap tests (`gates.py`) that skip presidio's other built-in recognizers on texts that cannot match.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import regex  # type: ignore[import-untyped]  # presidio matches with it; no stubs
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.pattern_recognizer import REGEX_TIMEOUT_SECONDS
from presidio_analyzer.predefined_recognizers import EmailRecognizer, IpRecognizer, PhoneRecognizer, UrlRecognizer

from .gates import OTHER, AllGates, CapitalsGate, Gate, RunGate, ShapeGate

__all__ = [
    "BUILTIN_GATES", "PHONE_MIN_DIGITS", "TWIN_CHARS", "EmailWindows", "IpWindows", "PhoneWindows",
    "UrlWindows", "phone_windows", "token_windows", "url_windows",
]


# The fewest digits of a phone number the windows guarantee to find (`phone_windows`): a number with fewer, or a
# shorter run of digits ("born 1984", "order 550"), is never reported as a phone number.
PHONE_MIN_DIGITS = 7
# A letter-free run (letters except x and X, which libphonenumber accepts between digits and before an
# extension) with at least that many digits, from its start: a phone number never spans a letter, so such
# a run holds every candidate whole. The two classes do not overlap, so the scan is linear.
_RUN = re.compile(rf"(?<![\W\d_xX])(?:[\W_xX]*\d){{{PHONE_MIN_DIGITS}}}[\W\d_xX]*")
# What libphonenumber's matcher lets a number's digits be joined by (its `_VALID_PUNCTUATION`, read case-blind
# as it reads it) and start with (opening brackets, in that set, and plus signs): a test holds this to the
# library's. A number's digits lie in one run of these and digits (a cluster), its extension after it.
PHONE_PUNCTUATION = ("-xX\u2010-\u2015\u2212\u30fc\uff0d-\uff0f \u00a0\u00ad\u200b\u2060\u3000()\uff08\uff09"
                     "\uff3b\uff3d.\\[\\]/~\u2053\u223c\uff5e+\uff0b")
# A cluster with at least `PHONE_MIN_DIGITS` digits, from its start (linear, as `_RUN`).
_CLUSTER = re.compile(rf"(?<![{PHONE_PUNCTUATION}\d])(?:[{PHONE_PUNCTUATION}]*\d){{{PHONE_MIN_DIGITS}}}"
                      rf"[{PHONE_PUNCTUATION}\d]*")
_CLUSTER_REST = re.compile(rf"[{PHONE_PUNCTUATION}\d]*")
# How far past a cluster the matcher may still read: an extension's separators and up to 20 digits
# (`,#123`, a tab and `~ 45`), a time's `:30` (a number followed by one is a time stamp, not a number).
_PHONE_TAIL = 32


# Gates for presidio's own recognizers, by name (`gates.py`; the windowed e-mail and IP recognizers look
# for their triggers themselves). Their patterns: `CreditCardRecognizer().patterns` and so on.
BUILTIN_GATES: dict[str, Gate] = {
    # 4 digits, 3 to 4, 3 to 4, 3 to 5, each group after an optional space or hyphen
    "CreditCardRecognizer": AllGates(RunGate(13), ShapeGate("0000[- ]?0000?[- ]?0000?[- ]?000")),
    # \d{5}-\d{4}, \d{3}-\d{6}, \d{3}-\d{2}-\d{4}, \d{9}, \d{3}[- .]\d{2}[- .]\d{4}
    "UsSsnRecognizer": AllGates(RunGate(9), ShapeGate("000(?:00-0000|-000000|[- .]00[- .]0000|000000)")),
    # two capital letters and two digits (case matters: its flags have no IGNORECASE)
    # (in an ASCII text, two capitals, X among them, right before two digits: `CapitalsGate`)
    "IbanRecognizer": AllGates(CapitalsGate("AA00", "AX00", "XA00", "XX00"),
                               ShapeGate(f"00(?<=[A-Z{OTHER}][A-Z{OTHER}]00)")),
    # `IpWindows.trigger` (a digit, a dot and a digit, or a colon) and `EmailWindows.trigger`
    "IpRecognizer": ShapeGate(r"0\.0", ":"),
    "EmailRecognizer": ShapeGate("@"),
    # `phone_windows` is empty unless a letter-free stretch holds `PHONE_MIN_DIGITS` digits (letters: `_RUN`'s,
    # all but x and X: `RunGate`'s loose runs; DEL, any non-ASCII character, may be a digit)
    "PhoneRecognizer": RunGate(PHONE_MIN_DIGITS, loose=True),
}


def phone_windows(text: str) -> list[tuple[int, int]]:
    """The stretches of `text` that can hold a phone number of `PHONE_MIN_DIGITS` digits or more: each cluster of
    that many digits in a letter-free run (`PHONE_PUNCTUATION`), with one character before it (the matcher checks
    that a number does not follow a letter) and what the matcher may read after it (`_PHONE_TAIL`, a cluster it
    reaches taken whole, within the run, and one character more), merged where they meet; empty for most prose.
    A table of figures (`12.5,13.75,...`), which libphonenumber would try as numbers a region at a time (a 16K
    one took 1.7 s), has no such cluster."""
    windows: list[tuple[int, int]] = []
    size = len(text)
    for run in _RUN.finditer(text):
        run_end = run.end()
        for cluster in _CLUSTER.finditer(text, run.start(), run_end):
            lo, hi = max(0, cluster.start() - 1), cluster.end() + _PHONE_TAIL
            if hi < run_end:
                hi = _CLUSTER_REST.match(text, hi, run_end).end()  # type: ignore[union-attr]  # (`*`: always)
            hi = min(size, min(hi, run_end) + 1)
            if windows and windows[-1][1] >= lo:
                windows[-1] = (windows[-1][0], hi)
            else:
                windows.append((lo, hi))
    return windows


class PhoneWindows(PhoneRecognizer):
    """Presidio's phone recognizer, run only on the stretches that can hold a number.

    libphonenumber's matcher parses every run of digits once per region, which made it nine tenths of a
    `patterns` analysis of a 300-word prompt with a few years and order numbers in it. Handing it only the
    clusters of enough digits (`phone_windows`) finds the same numbers of seven digits and more: a number's
    digits never leave their cluster, and each window keeps the characters the matcher looks at on either side.
    """

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[RecognizerResult]:
        results: list[RecognizerResult] = []
        for lo, hi in phone_windows(text):
            found: list[RecognizerResult] = super().analyze(text[lo:hi], entities, nlp_artifacts)
            for result in found:
                result.start += lo
                result.end += lo
            results.extend(found)
        return results


_SPACES = " \t\n\r\f\v"
_MAX_SCORE, _MIN_SCORE = EntityRecognizer.MAX_SCORE, EntityRecognizer.MIN_SCORE
_SPACE = re.compile(r"[ \t\n\r\f\v]")


def token_windows(text: str, trigger: re.Pattern[str] | str) -> list[tuple[int, int]]:
    """The whitespace-delimited tokens of `text` that contain `trigger` (a regex, or a plain string: found
    with `str.find`, cheaper than a regex search), each with the space on either side.

    For recognizers whose matches never hold a space (e-mail and IP addresses): their patterns give the
    same results on these windows as on the whole text, since each window keeps the neighbour characters
    that word boundaries and look-arounds test. Linear in the text: each search starts past the last window.
    """
    windows: list[tuple[int, int]] = []
    pos = 0
    spaces = [c for c in _SPACES if c in text]  # the others are never found
    space = spaces[0] if len(spaces) == 1 else None  # most texts: only " ", one search and no generator
    size = len(text)
    while True:
        if isinstance(trigger, str):
            start = text.find(trigger, pos)
            if start < 0:
                break
            end = start + len(trigger)
        else:
            found = trigger.search(text, pos)
            if found is None:
                break
            start, end = found.span()
        if space is not None:
            lo = text.rfind(space, pos, start)
        else:
            lo = max((text.rfind(c, pos, start) for c in spaces), default=-1)
        if lo < 0:  # the token starts right after the last window, whose space it shares
            lo = max(0, pos - 1)
        if space is not None:
            after = text.find(space, end)
            hi = size if after < 0 else after + 1
        else:
            spaced = _SPACE.search(text, end)
            hi = size if spaced is None else spaced.end()
        if windows and windows[-1][1] >= lo:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
        pos = hi
    return windows


class _TokenWindows:
    """Runs a pattern recognizer on `token_windows` only: presidio's e-mail and IP patterns are slow
    (milliseconds on a long prompt) and most of the text cannot hold their match.

    The windows are scanned joined, in one pass: presidio's fixed cost per call (timing, logging,
    deduplication) was most of the cost of a prompt with ten e-mail addresses. Joined windows find what
    each window finds alone: every window but the first starts with a space and every window but the last
    ends with one, and no match holds a space or looks past the character beside it. The pass is
    presidio's own (`PatternRecognizer.analyze`: same compiled patterns, validation, scores, timeout and
    deduplication); `explain = False` leaves out the explanation object it builds for every match, which
    only the AnalyzerEngine's context enhancer reads (the `ner` engine), not the patterns engine.
    """

    trigger: re.Pattern[str]
    literal: str | None = None  # the trigger, when it is a plain string
    deduplicated = True  # `_scan` ends with presidio's `remove_duplicates`, in its order
    explain = True
    # Whether `_scan` may use `_twins` (stdlib copies of the patterns) for short ASCII texts.
    twinned = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        recognizer: Any = self
        self._twins = _twins(recognizer.patterns, recognizer.global_regex_flags) if self.twinned else {}

    def windows(self, text: str) -> list[tuple[int, int]]:
        return token_windows(text, self.literal or self.trigger)

    # What is put between windows in the joined text: nothing for tokens (each has its spaces).
    joiner = ""

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        windows = self.windows(text)
        if not windows:
            return []
        starts = []  # where each window starts in the joined text
        size = 0
        for lo, hi in windows:
            starts.append(size)
            size += hi - lo + len(self.joiner)
        found = self._scan(self.joiner.join(text[lo:hi] for lo, hi in windows), regex_flags)
        for result in found:
            index = bisect_right(starts, result.start) - 1
            shift = windows[index][0] - starts[index]
            result.start += shift
            result.end += shift
        return found


    def _scan(self, text: str, regex_flags: int | None) -> list[RecognizerResult]:
        """presidio 2.2's `PatternRecognizer.__analyze_patterns`, explanations only if `explain`
        (`test_windowed_recognizers_find_what_presidio_finds` holds them to the same results)."""
        recognizer: Any = self  # the recognizer it is mixed into
        flags = regex_flags or recognizer.global_regex_flags
        entity = recognizer.supported_entities[0]
        metadata = {RecognizerResult.RECOGNIZER_NAME_KEY: recognizer.name,
                    RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: recognizer.id}
        # presidio's own `invalidate_result` invalidates nothing: not called unless a subclass has its own
        invalidates = type(recognizer).invalidate_result is not PatternRecognizer.invalidate_result
        results: list[RecognizerResult] = []
        for pattern in recognizer.patterns:
            if not pattern.compiled_regex or pattern.compiled_with_flags != flags:
                pattern.compiled_with_flags = flags
                pattern.compiled_regex = regex.compile(pattern.regex, flags=flags)
            twin = self._twins.get(pattern.regex) if flags == recognizer.global_regex_flags else None
            if twin is not None and len(text) <= TWIN_CHARS and text.isascii():
                matches: Any = twin.finditer(text)
            else:
                matches = pattern.compiled_regex.finditer(text, timeout=REGEX_TIMEOUT_SECONDS)
            try:
                for match in matches:
                    start, end = match.span()
                    if start == end:
                        continue
                    matched = text[start:end]
                    valid = recognizer.validate_result(matched)
                    score = pattern.score if valid is None else (_MAX_SCORE if valid else _MIN_SCORE)
                    if invalidates and recognizer.invalidate_result(matched):
                        score = _MIN_SCORE
                    explanation: Any = None
                    if self.explain:
                        explanation = PatternRecognizer.build_regex_explanation(
                            recognizer.name, pattern.name, pattern.regex, pattern.score, valid, flags)
                        explanation.score = score
                    if score > _MIN_SCORE:
                        results.append(RecognizerResult(entity, start, end, score, explanation, dict(metadata)))
            except TimeoutError:
                continue  # presidio logs and skips the pattern, keeping what it found before
        if _apart(results):
            return sorted(results, key=_score_first)
        return list(EntityRecognizer.remove_duplicates(results))


# The longest text `_scan` hands to a stdlib twin: the `regex` module's timeout bounds a catastrophic
# pattern, the stdlib has none, so the twin only sees texts on which the worst case (presidio's e-mail
# pattern backtracks over a token for each of its starts: quadratic) is a few milliseconds.
TWIN_CHARS = 1024
_TWIN_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL


def _twins(patterns: Sequence[Pattern], flags: int) -> dict[str, re.Pattern[str]]:
    """Stdlib copies of presidio's patterns, by source, for ASCII texts.

    The `regex` module scans presidio's e-mail pattern at about half the speed of the stdlib `re` (on a
    prompt with ten addresses, a third of the cost of its analysis). On an ASCII text the two agree on
    what the e-mail pattern uses: `\\w`, `\\b` and its classes see only ASCII characters, which both class
    alike, and IGNORECASE folds none of them to another; `test_ascii_twins_find_what_the_regex_module_finds`
    holds them to it. A pattern that the stdlib cannot compile, or flags beyond these three, get no twin.
    """
    if flags & ~_TWIN_FLAGS:
        return {}
    twins = {}
    for pattern in patterns:
        try:
            twins[pattern.regex] = re.compile(pattern.regex, flags)
        except re.error:
            continue
    return twins


def _apart(results: list[RecognizerResult]) -> bool:
    """Whether results of one type, none empty and none scored 0 (as `_scan` makes them), follow each other
    without overlapping (one pattern's matches): presidio's `remove_duplicates` then drops none of them,
    and only orders them, as `_score_first` does."""
    end = -1
    for result in results:
        if result.start < end:
            return False
        end = result.end
    return True


def _score_first(result: RecognizerResult) -> tuple[float, int, int]:
    """presidio's order for what `remove_duplicates` returns."""
    return -result.score, result.start, -(result.end - result.start)


# Domains whose validity `EmailWindows` has asked tldextract about: the same few (gmail.com, the
# company's own) come back in every prompt. Bounded: cleared when full, as `pii._built` is.
_MAX_DOMAINS = 4096
_domains: dict[str, bool] = {}


class EmailWindows(_TokenWindows, EmailRecognizer):
    trigger = re.compile("@")
    literal = "@"
    twinned = True

    def validate_result(self, pattern_text: str) -> bool:
        """presidio's check (tldextract finds a public suffix), asked once per domain.

        It was half the cost of a prompt with ten addresses. For a match without `/`, `?` or `#`
        (which tldextract reads as the end of a URL's authority), tldextract reads only the domain:
        the host is what follows the match's one `@`. Any other match is asked about as it is.
        """
        domain = pattern_text.rpartition("@")[2]
        if "/" in pattern_text or "?" in pattern_text or "#" in pattern_text:
            return bool(EmailRecognizer.validate_result(self, pattern_text))
        found = _domains.get(domain)
        if found is None:
            if len(_domains) >= _MAX_DOMAINS:
                _domains.clear()
            found = _domains[domain] = bool(EmailRecognizer.validate_result(self, pattern_text))
        return found


class IpWindows(_TokenWindows, IpRecognizer):
    trigger = re.compile(r"\d\.\d|:")


# presidio's URL patterns: an optional quote and scheme (9 characters), an optional `www000.` (7), then up to
# 253 of `[a-z0-9.-]`, a dot and a top-level domain (at most 13 letters), and a path only right after it.
_URL_DOMAIN = 253
_URL_BEFORE = 9 + 7 + _URL_DOMAIN
_URL_PREFIX = re.compile("[\"'hHwW]")  # what a match that starts further back than a domain's length starts with
_URL_TLD = 13
_URL_BASE = UrlRecognizer.BASE_URL_REGEX
_URL_TLDS = regex.compile("(?i)[.]" + _URL_BASE[_URL_BASE.index("[.](?:") + 3:_URL_BASE.index("))(?:/") + 2])
# a top-level domain's first two letters (a dot before two others cannot start one: most dots in prose)
_URL_HEADS = frozenset(tld[:2] for tld in regex.findall(r"\(\?:([a-z]+)\)", _URL_TLDS.pattern))
_URL_DOT = re.compile(r"\.(?=[^\W\d_]{2})")
_URL_PATH_END = regex.compile(r"[\s()<>\"']")  # where a path ends (the `regex` module's `\s`, as presidio's)


def url_windows(text: str) -> list[tuple[int, int]]:
    """The stretches of `text` that can hold a match of presidio's URL patterns, merged where they meet.

    Each match holds a dot and a top-level domain, starts at most `_URL_BEFORE` characters before that dot
    and ends after the domain (and its path, when a slash follows it, and a closing quote). The patterns
    have no anchors or look-arounds and never match a space, so a window, or windows joined by spaces, gives
    the matches that the whole text gives; the other starts could not reach a domain. Without windows,
    every start of a long run of dots and letters (`a.a.a...`) tried 253 lengths against 675 domains:
    seconds per thousand characters, on the event loop.
    """
    windows: list[tuple[int, int]] = []
    for dot in _URL_DOT.finditer(text):
        at = dot.start()
        head = text[at + 1:at + 3]
        if (head.lower() not in _URL_HEADS if head.isascii() else _URL_TLDS.match(text, at) is None):
            continue
        # (a start further back than a domain's length that is not a quote, scheme or `www` tried 253
        # lengths for nothing: a tenth of a second per dot in a long run of `a.a.a`)
        lo, hi = max(0, at - _URL_DOMAIN), at + 1 + _URL_TLD
        prefix = _URL_PREFIX.search(text, max(0, at - _URL_BEFORE), lo)
        lo = lo if prefix is None else prefix.start()
        if "/" in text[at + 1:hi + 1]:
            end = _URL_PATH_END.search(text, at)
            hi = len(text) if end is None else end.start()
        hi = min(len(text), hi + 1)
        if windows and windows[-1][1] >= lo:
            windows[-1] = (windows[-1][0], max(hi, windows[-1][1]))
        else:
            windows.append((lo, hi))
    return windows


class UrlWindows(_TokenWindows, UrlRecognizer):
    """presidio's URL recognizer on `url_windows`, joined by spaces (which no match holds)."""

    joiner = " "

    def windows(self, text: str) -> list[tuple[int, int]]:
        return url_windows(text)
