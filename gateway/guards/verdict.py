"""From findings to a verdict: allow, redact (with the new text), or block.

All guards of a request look at the same text; their enforced findings are then
resolved once (overlaps keep the longest span, then the highest score) and
applied once, so that two guards never rewrite each other's replacements.
Shadow findings are reported but change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from .base import Finding
from .json_view import EscapedFinding, json_numbers, unescaped, whole_numbers
from .pseudonyms import PLACEHOLDER, Pseudonyms

__all__ = ["Verdict", "apply", "decide", "edits", "replacement"]

Decision = Literal["allow", "redact", "block"]


@dataclass(slots=True)
class Verdict:
    decision: Decision
    text: str  # the text to send on (unchanged unless the decision is redact)
    findings: list[Finding] = field(default_factory=list)  # enforced ones
    shadow: list[Finding] = field(default_factory=list)  # what shadow guards would have done

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "block"]


def decide(text: str, enforced: list[Finding], shadow: list[Finding], pseudonyms: Pseudonyms | None) -> Verdict:
    if any(f.action == "block" for f in enforced):
        return Verdict("block", text, enforced, shadow)
    new = apply(text, enforced, pseudonyms)
    return Verdict("redact" if new != text else "allow", new, enforced, shadow)


def resolve(findings: Iterable[Finding]) -> list[Finding]:
    """Non-overlapping findings, in text order: the longest span wins, then the highest score."""
    findings = list(findings)
    ordered = sorted(findings, key=_start)
    if _disjoint(ordered):
        return ordered  # what the ranking below keeps when nothing overlaps: all of them, in text order
    ranked = sorted(findings, key=lambda f: (-(f.end - f.start), -f.score, f.start))
    taken: list[Finding] = []
    for finding in ranked:
        if all(finding.end <= t.start or finding.start >= t.end for t in taken):
            taken.append(finding)
    return sorted(taken, key=lambda f: f.start)


def _start(finding: Finding) -> int:
    return finding.start


def _disjoint(ordered: list[Finding]) -> bool:
    """Whether findings sorted by start are well-formed, start at distinct places and none overlaps the next
    (so none overlaps any other): the usual case, a handful of separate addresses or numbers."""
    start = end = -1
    for finding in ordered:
        if finding.end < finding.start or finding.start <= start or finding.start < end:
            return False
        start, end = finding.start, finding.end
    return True


def apply(text: str, findings: Iterable[Finding], pseudonyms: Pseudonyms | None,
          restore: Callable[[str], str] | None = None, numbers: list[tuple[int, int]] | None = None) -> str:
    """`text` with every rewriting finding replaced (where `spans` puts them); placeholders already in it are never
    touched. In a JSON object or array (tool call arguments), a finding on a number replaces the whole number with a
    JSON string; `numbers`: where they are, for a piece of one (a stream's: `json_view.JsonPieces`), else found here.

    `restore` (output: placeholders back to originals) applies to the text between findings only, each piece before
    the finding after it is replaced: so that a placeholder made for a finding of the answer itself stays a
    placeholder, and one the answer wrote before that finding (`<PERSON_1>`, which the finding then becomes) is not
    taken for it.
    """
    out: list[str] = []
    at = 0
    for start, end, f, number in spans(text, findings, numbers):
        out.append(text[at:start] if restore is None else restore(text[at:start]))
        new = f"<{f.type}>" if f.action == "redact" else replacement(f, text[start:end], pseudonyms)
        out.append(new if not number else _json_string(new))
        at = end
    if not out:
        return text if restore is None else restore(text)
    out.append(text[at:] if restore is None else restore(text[at:]))
    return "".join(out)


def edits(text: str, findings: Iterable[Finding], pseudonyms: Pseudonyms | None) -> list[tuple[int, int, str]]:
    """The replacements `apply` makes in `text` on input (no restore), in order, as (start, end, replacement)
    (`joined.Joined.rewrite` writes them back onto a message's parts)."""
    changes: list[tuple[int, int, str]] = []
    for start, end, f, number in spans(text, findings, None):
        new = f"<{f.type}>" if f.action == "redact" else replacement(f, text[start:end], pseudonyms)
        changes.append((start, end, new if not number else _json_string(new)))
    return changes


def spans(text: str, findings: Iterable[Finding], numbers: list[tuple[int, int]] | None,
          ) -> Iterator[tuple[int, int, Finding, bool]]:
    """Where `apply` replaces, in order: each rewriting finding's span (a JSON number's whole, and then True), but
    where it overlaps one before it or a placeholder already in the text."""
    rewriting = [f for f in findings if f.action in ("redact", "mask", "pseudonymize")]
    if not rewriting:
        return
    guarded = [(m.start(), m.end()) for m in PLACEHOLDER.finditer(text)] if "<" in text else []
    if numbers is None:
        numbers = json_numbers(text)  # (none unless the text is a JSON object or array: tool call arguments)
    at = 0
    for f in resolve(rewriting):
        start, end = f.start, f.end
        number = whole_numbers(text, numbers, start, end) if numbers else None
        if number is not None:
            start, end = number
        if start < at or (guarded and any(start < e and end > s for s, e in guarded)):
            continue
        yield start, end, f, number is not None
        at = end


def _json_string(replaced: str) -> str:
    """A replacement written where a JSON number was (`json_view.whole_numbers`): as a JSON string."""
    return msgspec.json.encode(replaced).decode()


def replacement(finding: Finding, original: str, pseudonyms: Pseudonyms | None) -> str:
    """What replaces `original`, the text of `finding`. In a tool call's arguments, one that holds a JSON escape
    (`json_view.EscapedFinding`) stands for its text read: the pseudonym of `zo\\u00eb@gmail.com` is that of
    `zoë@gmail.com` elsewhere in the request, and restores as `zoë@gmail.com` (escaped again inside JSON)."""
    if type(finding) is EscapedFinding:
        original = unescaped(original)
    if finding.action == "mask":
        kept = "".join(c for c in original if c.isalnum())[-finding.keep:] if finding.keep else ""
        return "****" + kept
    if finding.action == "pseudonymize" and pseudonyms is not None:
        return pseudonyms.placeholder(finding.type, original)
    return f"<{finding.type}>"
