"""Text as a filter should read it: case-folded, compatibility-decomposed without accents, no invisible characters, homoglyphs folded.

`ign\u200bore` and `іgnore` (Cyrillic і) must read as `ignore`. The folded text
keeps a map back to the original offsets, so a finding in it can still redact
the right characters of the original.
"""

from __future__ import annotations

import unicodedata

__all__ = ["fold"]

# Look-alikes of Latin letters in Cyrillic and Greek (lower case, after casefold), plus common digit swaps.
_HOMOGLYPHS = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "ո": "n",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ω": "w", "ς": "s",
})


def fold(text: str) -> tuple[str, list[int]]:
    """The folded text, and for each of its characters the offset of the original character."""
    out: list[str] = []
    where: list[int] = []
    for index, char in enumerate(text):
        if char.isascii():
            out.append(char.lower())
            where.append(index)
            continue
        if unicodedata.category(char) == "Cf":  # zero-width spaces, joiners, direction marks
            continue
        for piece in unicodedata.normalize("NFKD", char).casefold().translate(_HOMOGLYPHS):
            if unicodedata.category(piece) == "Mn":  # accents, split off by NFKD
                continue
            out.append(piece)
            where.append(index)
    return "".join(out), where
