"""What a text must contain for a pii guard's types to be in it at all, tested before any analysis.

Why apart from the analysis (`pii.py`): it is the guard's one test of every text, and the only one most chat turns
meet; it reads nothing of presidio, only which types the policy asks for.

A text without any of the characters or words its types need ("hello", most chat turns without a
digit) skips the analysis. Types missing here (names, custom recognizers) turn the shortcut off.
Substring tests, not one regex: they run at C speed.
"""

from __future__ import annotations

import re

from .normalize import canonical

__all__ = ["Prefilter", "prefilter"]

_DIGIT_TYPES = frozenset({"PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "UK_NINO", "GOV_ID",
                          "STREET_ADDRESS", "DATE_OF_BIRTH", "DATE_TIME", "IP_ADDRESS"})
_NEEDS: dict[str, tuple[str, ...]] = {
    "EMAIL_ADDRESS": ("@",), "URL": (".",), "IP_ADDRESS": ("::",),
    "DATE_TIME": ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    "PERSONAL_URL": ("linkedin", "github", "gitlab", "twitter", "x.com", "facebook", "instagram", "tiktok",
                     "medium", "mastodon", "keybase"),
}
_DIGIT = re.compile(r"\d")


class Prefilter:
    __slots__ = ("digits", "words")

    def __init__(self, digits: bool, words: tuple[str, ...]) -> None:
        self.digits = digits
        self.words = words

    def may_match(self, text: str) -> bool:
        # (a full-width at sign is an `@` to the recognizers, which read the canonical text: `pii.analyze`)
        return self._may_match(text) or (not text.isascii() and self._may_match(canonical(text)[0]))

    def _may_match(self, text: str) -> bool:
        if self.digits and _DIGIT.search(text) is not None:
            return True
        if self.words:
            lowered = text.lower()
            return any(word in lowered for word in self.words)
        return False


def prefilter(entities: tuple[str, ...]) -> Prefilter | None:
    """The test for `entities`; None when one of them may be found in any text."""
    words: set[str] = set()
    digits = False
    for entity in entities:
        if entity not in _DIGIT_TYPES and entity not in _NEEDS:
            return None
        digits = digits or entity in _DIGIT_TYPES
        words.update(_NEEDS.get(entity, ()))
    return Prefilter(digits, tuple(sorted(words)))
