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

__all__ = ["looks_like_refusal"]

_HEAD_CHARS = 300
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_REFUSAL = re.compile(
    r"^\W*(?:(?:i'?m|i am)\s+(?:really\s+|very\s+|so\s+)?sorry,?\s+(?:but\s+)?)?"
    r"(?:"
    r"i\s+(?:can(?:no|')t|cannot|won'?t|will\s+not|am\s+(?:not\s+able|unable)|'?m\s+(?:not\s+able|unable)"
    r"|must\s+(?:decline|refuse)|have\s+to\s+decline|do\s+not\s+feel\s+comfortable|don'?t\s+feel\s+comfortable)"
    r"\s+(?:help|assist|provide|comply|do\s+that|fulfil|fulfill|share|create|write|generate|give|support"
    r"|engage|answer|continue|with\s+that|that)"
    r"|(?:unfortunately,?\s+)?i(?:'m|\s+am)\s+(?:not\s+able|unable)\s+to"
    r"|as\s+an\s+ai(?:\s+language\s+model)?,?\s+i\s+(?:can(?:no|')t|cannot|am\s+not\s+able|don'?t|do\s+not)"
    r"|(?:sorry|i\s+apologi[sz]e),?\s+(?:but\s+)?(?:i|that'?s?)\s+(?:can(?:no|')t|cannot|won'?t|is\s+not|isn'?t)"
    r"|i\s+(?:must|have\s+to|need\s+to)\s+(?:respectfully\s+)?decline"
    r"|that'?s\s+not\s+something\s+i\s+(?:can|am\s+able\s+to|will)"
    r")",
    re.IGNORECASE,
)


def looks_like_refusal(text: str) -> bool:
    head = text[:_HEAD_CHARS].translate(_APOSTROPHES)
    return _REFUSAL.search(head) is not None
