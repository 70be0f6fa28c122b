"""A refusal heuristic: does an answer open by declining the request?

Phrase patterns on the answer's first few hundred characters, case-folded and with
typographic apostrophes straightened. It is a signal for dashboards, not a
classifier: its precision and recall on the labelled set in `evals/quality/`
are measured by `python -m evals.quality.evaluate` and stated in docs/metrics.md.
An upstream's own `refusal` field (OpenAI structured outputs) counts as a refusal
without the heuristic.
"""

from __future__ import annotations

import re

__all__ = ["NOT_INITIALS", "REFUSAL_HEAD_CHARS", "cannot_become_refusal", "looks_like_refusal"]

REFUSAL_HEAD_CHARS = _HEAD_CHARS = 300
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# An opener ("I'm sorry, but", "Unfortunately,", "As an AI language model,") may come first; then the
# refusal itself: "I can't / won't / am unable to / must decline ..." followed by a verb of doing or helping.
_OPENER = (
    r"(?:(?:i'?m|i\s+am)\s+(?:really\s+|very\s+|so\s+)?sorry|sorry|(?:my\s+)?apologies|i\s+apologi[sz]e"
    r"|unfortunately|regrettably|i'?m\s+afraid|no|as\s+an\s+ai\b[^,.]{0,60})"
    r"[\s,.!:;\u2014\u2013-]*(?:but\s+|that\s+)?"
)
_SUBJECT_VERB = (
    r"i\s*(?:can\s*not|can'?t|cannot|won'?t|will\s+not|must\s+not|am\s+not\s+going\s+to|'?m\s+not\s+going\s+to"
    r"|(?:am|'?m)\s+(?:not\s+able|unable)\s+to|(?:won'?t|will\s+not)\s+be\s+able\s+to"
    r"|(?:am|'?m)\s+not\s+comfortable|do(?:n'?t|\s+not)\s+feel\s+comfortable"
    r"|(?:must|have\s+to|need\s+to)\s+(?:respectfully\s+)?(?:decline|refuse)|'?d\s+rather\s+not"
    r"|do(?:n'?t|\s+not)\s+have\s+(?:personal\s+)?(?:opinions|feelings|emotions|access))"
)
# What turns "I can't / won't ..." into something else: a promise, praise, or giving up ("I won't make that
# mistake again", "I can't recommend it enough", "I can't do better than", "I won't give up").
_NOT_A_REFUSAL = r"(?!\s+give\s+up\b|\s+do\s+(?:better|more|without)\b|[^.!?\n]{0,40}\b(?:again|mistake|enough)\b)"
_ACTION = (
    r"\s+(?!help\s+but\b)(?:help|assist|provide|comply|do\b|fulfil|share|create|write|generate|give|support"
    r"|engage|answer|continue|produce|complete|process|translate|access|browse|make|feel|with\b|that\b|this\b"
    r"|to\b|on\b|about\b)"
)
# The answer's opening: any non-word characters but a double quote (an answer that opens on a quotation is a
# story or an example, not the model's own refusal).
_REFUSAL = re.compile(
    rf"^[^\w\"\u201c]*(?:{_OPENER}){{0,2}}(?:{_SUBJECT_VERB}{_NOT_A_REFUSAL}(?:{_ACTION}|\s*[.!:]|,)"
    r"|(?:that|this)(?:'s|\s+is)\s+not\s+something\s+i(?:'m|\s+am)?\s+(?:can|able|will|going)"
    rf"|(?:that|this)(?:'s|\s+is)\s+something\s+i\s+(?:can'?t|cannot|won'?t){_NOT_A_REFUSAL}"
    r"|(?:that|this)\s+request\s+(?:goes\s+against|violates)\s+my)",
    re.IGNORECASE,
)


# Every text the pattern matches opens, after non-word characters, with the first letter of an opener or of a
# refusal (i, sorry, my, apologies, unfortunately, regrettably, no, as; that, this); a test derives these
# letters from the pattern itself.
_INITIALS = "ismaurnt"
NOT_INITIALS = _NOT_INITIALS = frozenset("bcdefghjklopqvwxyzBCDEFGHJKLOPQVWXYZ")  # the other ASCII letters
_FIRST_WORD_CHAR = re.compile(r"\w")
_MAY_OPEN_A_REFUSAL = re.compile(f"[{_INITIALS}]", re.IGNORECASE)  # the pattern's flags: the same case folding


def cannot_become_refusal(text: str) -> bool:
    """True when no text that starts with `text` looks like a refusal: its first word character opens none of
    the pattern's words (a stream's later text then need not be kept for this check)."""
    if text[:1] in _NOT_INITIALS:  # the common opening: a letter no refusal opens with, no regex to run
        return True
    found = _FIRST_WORD_CHAR.search(text, 0, _HEAD_CHARS)
    return found is not None and _MAY_OPEN_A_REFUSAL.match(text, found.start()) is None


def looks_like_refusal(text: str) -> bool:
    if text[:1] in _NOT_INITIALS:  # most answers open with a letter no refusal opens with: no regex to run
        return False
    head = text[:_HEAD_CHARS]
    if "\u2019" in head or "\u2018" in head or "\u02bc" in head:  # translating costs ~2 us: only when needed
        head = head.translate(_APOSTROPHES)
    return _REFUSAL.match(head) is not None  # anchored at the start
