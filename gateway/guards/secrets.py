"""Secrets: provider API keys, cloud keys, private key blocks, JWTs, connection strings with
passwords, and high-entropy tokens next to key-like words.

Each detector is a compiled regex with a fixed score; the entropy detector also
requires the token to look random (Shannon entropy per character), so that
`password: changeme` in a tutorial is not a secret but `api_key = "q8Zr...` is.

Each regex is tried only where its lead (`LEADS`) matches (`slices.py`): most of them open with a lookbehind,
which `re` tries at every offset (a pass of all of them cost about 330 ns a character: 660 µs for a prompt of
2,000), where a lead is searched for its literal start; the leads that ignore case are searched with case on
the text's lowercase copy (`FOLDED_LEADS`). The findings are those of one pass of each regex. A text of at most
`INLINE_CHARS` characters is scanned so on the event loop; a longer one on the guard pool, one slice at a time:
its regexes would hold the loop for seconds on a prompt of a few megabytes.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence

from msgspec.structs import replace

from ..policy.guard_schema import Action, SecretsGuardSpec
from .base import Finding, Where
from .common import GuardBase
from .holds import RegexHolds
from .normalize import canonical, canonical_open_from, original_offset, original_span
from .pool import INLINE_CHARS, GuardPool
from .slices import Searchable, Sliced

__all__ = ["DETECTORS", "FOLDED_LEADS", "LEADS", "NEEDS", "SecretsGuard", "entropy"]

_KEY_HEADER = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
_KEY_FOOTER = r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
_B = r"(?<![A-Za-z0-9])"  # a token starts here (after `-`, `_` or `/` too: `id_AKIA...`, `token-ghp_...`)
_E = r"(?![A-Za-z0-9])"  # and ends (a `-` or `_` after a key of fixed length: `AKIA...-prod`)
DETECTORS: dict[str, list[tuple[str, str]]] = {
    "openai": [("OPENAI_API_KEY", _B + r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}" + _E)],
    "anthropic": [("ANTHROPIC_API_KEY", _B + r"sk-ant-[a-z0-9]{2,8}-[A-Za-z0-9_\-]{20,}" + _E)],
    "github": [("GITHUB_TOKEN", _B + r"(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})" + _E)],
    "gitlab": [("GITLAB_TOKEN", _B + r"glpat-[A-Za-z0-9_\-]{20,}" + _E)],
    "slack": [("SLACK_TOKEN", _B + r"xox[abposr]-[A-Za-z0-9\-]{10,}" + _E),
              ("SLACK_WEBHOOK", r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+")],
    "stripe": [("STRIPE_KEY", _B + r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}" + _E)],
    "google": [("GOOGLE_API_KEY", _B + r"AIza[0-9A-Za-z_\-]{35}" + _E)],
    "aws": [("AWS_ACCESS_KEY", _B + r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}" + _E),
            ("AWS_SECRET_KEY", r"(?i:aws_?secret_?access_?key|aws_?secret)[\"']?\s*[:=]\s*[\"']?"
                               r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])")],
    "azure": [("AZURE_KEY", r"(?i:AccountKey|SharedAccessKey)=([A-Za-z0-9+/]{40,}={0,2})")],
    "huggingface": [("HUGGINGFACE_TOKEN", _B + r"hf_[A-Za-z0-9]{30,}" + _E)],
    "sendgrid": [("SENDGRID_KEY", _B + r"SG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}" + _E)],
    "npm": [("NPM_TOKEN", _B + r"npm_[A-Za-z0-9]{36}" + _E)],
    # A whole block, or one with no END line after it (an answer cut at `max_tokens` inside a key, a pasted key cut
    # short) from its header to the text's end, once key material follows the header (PEM header lines allowed).
    "private_key": [("PRIVATE_KEY", _KEY_HEADER + r"(?:[\s\S]*?" + _KEY_FOOTER + r"|(?=\s*(?:[A-Za-z-]+:[^\n]*\n\s*)*"
                                    r"[A-Za-z0-9+/]{16})[\s\S]*\Z)")],
    "jwt": [("JWT", _B + r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}" + _E)],
    "connection_string": [("CONNECTION_STRING",
                           r"\b[a-z][a-z0-9+.\-]{1,20}://[^\s:/@\"'<>]{1,64}:([^\s@/\"'<>]{3,128})@[^\s/\"'<>]{2,}")],
}
# What every match of a detector's regex starts with, at the match's start (its lookbehind left out): a long
# text is searched for these, and each regex tried only where its lead matches (`slices.py`).
LEADS: dict[str, str] = {
    "OPENAI_API_KEY": "sk-", "ANTHROPIC_API_KEY": "sk-ant-", "GITHUB_TOKEN": "gh[pousr]_|github_pat_",
    "GITLAB_TOKEN": "glpat-", "SLACK_TOKEN": "xox[abposr]-", "SLACK_WEBHOOK": r"https://hooks\.slack\.com/",
    "STRIPE_KEY": "(?:sk|rk)_(?:live|test)_", "GOOGLE_API_KEY": "AIza", "AWS_ACCESS_KEY": "(?:AKIA|ASIA|ABIA|ACCA)",
    "AWS_SECRET_KEY": "(?i:aws_?secret)", "AZURE_KEY": "(?i:AccountKey|SharedAccessKey)=", "HUGGINGFACE_TOKEN": "hf_",
    "SENDGRID_KEY": r"SG\.", "NPM_TOKEN": "npm_", "PRIVATE_KEY": "-----BEGIN ", "JWT": "eyJ",
    "CONNECTION_STRING": r"\b[a-z][a-z0-9+.\-]{1,20}://",
}
_KEYWORD = (r"(?i:api[_\- ]?key|apikey|secret|token|passw(?:or)?d|pwd|auth|credential|access[_\- ]?key"
            r"|private[_\- ]?key)")  # the key-like word: `_KEYWORD_TOKEN`'s lead
# The leads that ignore case, in lowercase and matched with case, for an ASCII text's lowercase copy (`slices.py`):
# wherever the lead matches a text, this matches its lowercase copy, and nowhere else (`tests/test_guard_slices.py`).
FOLDED_LEADS: dict[str, str] = {"AWS_SECRET_KEY": "aws_?secret", "AZURE_KEY": "(?:accountkey|sharedaccesskey)="}
# Strings one of which every match of a detector's lead holds, for the leads `re` is slow to search (a class or a
# choice of letters first): a text without one is not searched for that detector (`slices.Sliced`).
NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "CONNECTION_STRING": (("://",),), "STRIPE_KEY": (("k_live_", "k_test_"),), "AZURE_KEY": (("=",),),
}
_KEYWORD_FOLDED = "(?:" + _KEYWORD.removeprefix("(?i:")
_KEYWORD_TOKEN = re.compile(_KEYWORD + r"[\"']?\s*(?:[:=]|=>|\bis\b)\s*[\"']?([A-Za-z0-9/+_\-.=]{16,})")
_OPEN_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY")
_CLOSE_KEY = re.compile(_KEY_FOOTER)  # as the block's own pattern
_SCORE = 0.95


def entropy(token: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(token)
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


class Scanner:
    """A secrets guard's scan: picklable, so that a process pool worker can run it on a long text."""

    __slots__ = ("action", "allow", "entropy_bits", "keyword", "name", "patterns", "regexes")

    def __init__(self, name: str, action: Action, regexes: list[tuple[str, re.Pattern[str]]],
                 entropy_bits: float | None, allow: frozenset[str]) -> None:
        self.name = name
        self.action = action
        self.regexes = regexes
        self.entropy_bits = entropy_bits
        self.allow = allow
        # What `scan` searches: each regex from its lead; `scan_long`'s, slice by slice until its deadline.
        self.patterns: Sequence[tuple[str, Searchable]] = _led(regexes, math.inf)
        self.keyword: Searchable = Sliced(_KEYWORD_TOKEN, _KEYWORD, math.inf, folded=_KEYWORD_FOLDED)

    def scan(self, text: str) -> list[Finding]:
        """The findings in `text`'s canonical form (`normalize.canonical`, case and other scripts' digits kept: a
        key in full-width letters or with a zero-width space inside is the key), as spans of the original text."""
        shown, where = canonical(text, digits=False)
        found = self._scan(shown)
        if where is None:
            return found
        return [_spanned(f, where, len(text)) for f in found]

    def _scan(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        for label, pattern in self.patterns:
            for match in pattern.finditer(text):
                group = 1 if pattern.groups else 0
                start, end = match.span(group)
                if text[start:end] not in self.allow:
                    found.append(Finding(self.name, label, start, end, _SCORE, f"secrets.{label.lower()}", self.action))
        if self.entropy_bits is not None:
            for match in self.keyword.finditer(text):
                token = match.group(1).rstrip(".")
                start = match.start(1)
                end = start + len(token)
                if len(token) >= 16 and entropy(token) >= self.entropy_bits and _mixed(token) \
                        and token not in self.allow and not any(f.start <= start < f.end for f in found):
                    found.append(Finding(self.name, "HIGH_ENTROPY_SECRET", start, end, 0.8, "secrets.entropy",
                                         self.action))
        return found

    def scan_long(self, text: str, deadline: float) -> list[Finding]:
        """`scan(text)`, each regex searched slice by slice from its lead (`slices.py`) until `deadline`
        (`time.monotonic()`): the same findings, without holding the GIL for a whole pass over the text."""
        sliced = Scanner(self.name, self.action, self.regexes, self.entropy_bits, self.allow)
        sliced.patterns = _led(self.regexes, deadline)
        sliced.keyword = Sliced(_KEYWORD_TOKEN, _KEYWORD, deadline, folded=_KEYWORD_FOLDED)
        return sliced.scan(text)


def _led(regexes: list[tuple[str, re.Pattern[str]]], deadline: float) -> list[tuple[str, Searchable]]:
    """Each detector's regex, searched from its lead (and its folded lead) until `deadline`."""
    return [(label, Sliced(p, LEADS[label], deadline, folded=FOLDED_LEADS.get(label), needs=NEEDS.get(label, ())))
            for label, p in regexes]


class SecretsGuard(GuardBase):
    kind = "secrets"

    def __init__(self, name: str, spec: SecretsGuardSpec, pool: GuardPool | None = None) -> None:
        super().__init__(name, spec)
        kinds = spec.detectors if spec.detectors is not None else list(DETECTORS) + ["entropy"]
        self.action = spec.action
        self.patterns = [
            (label, re.compile(rx)) for kind in kinds if kind in DETECTORS for label, rx in DETECTORS[kind]
        ]
        self.entropy_bits = spec.entropy_bits if "entropy" in kinds else None
        self.allow = frozenset(spec.allow)
        self.pool = pool
        self.scanner = Scanner(name, self.action, self.patterns, self.entropy_bits, self.allow)
        self.holds = RegexHolds([(p.pattern, 0, 0) for _, p in self.patterns]
                                + ([(_KEYWORD_TOKEN.pattern, 0, 0)] if self.entropy_bits is not None else []))

    def detect_now(self, text: str, where: Where) -> list[Finding] | None:
        """The findings of a text of at most `INLINE_CHARS` characters, on the loop; None for a longer one,
        which `detect` hands to the pool."""
        if len(text) > INLINE_CHARS:
            return None
        return self.scanner.scan(text)

    async def detect(self, text: str, where: Where) -> list[Finding]:
        if len(text) <= INLINE_CHARS:
            return self.scanner.scan(text)
        deadline = time.monotonic() + self.timeout_s
        if self.pool is None:  # a guard built on its own (tests, tools): no pool to hand the text to
            return self.scanner.scan_long(text, deadline)
        return await self.pool.run(self.scanner.scan_long, text, deadline)

    def scan(self, text: str) -> list[Finding]:
        """Every finding in `text`, in one pass of each regex, wherever it runs."""
        return self.scanner.scan(text)

    def open_from(self, text: str, start: int) -> int:
        """Where a key, token or `password = ...` may still be being written (`holds.py`), as `scan` reads it."""
        return canonical_open_from(self.holds.open_from, text, start, digits=False)

    def hold_from(self, text: str) -> int | None:
        """An opened private key block must be held until its END line is complete (or the stream's end):
        the block is found whole or not at all, and may be longer than the window. (In the canonical text, as
        `scan` reads it.)"""
        shown, where = canonical(text, digits=False)
        match = None
        for match in _OPEN_KEY.finditer(shown):  # noqa: B007 -- the last one
            pass
        if match is None or _CLOSE_KEY.search(shown, match.end()) is not None:
            return None
        return match.start() if where is None else original_offset(where, len(text), match.start())


def _spanned(finding: Finding, where: Sequence[int], size: int) -> Finding:
    """`finding` in a canonical text, as a finding in the original one (`normalize.original_span`)."""
    start, end = original_span(where, size, finding.start, finding.end)
    return replace(finding, start=start, end=end)


def _mixed(token: str) -> bool:
    """Letters and digits both: random keys have both; words, paths and version strings rarely do."""
    return any(c.isdigit() for c in token) and any(c.isalpha() for c in token)
