"""Text as a filter should read it: case-folded, without accents or invisible characters, homoglyphs folded.

`ign\\u200bore` and `\\u0456gnore` (a Cyrillic i) must read as `ignore`. The folded text
keeps a map back to the original offsets, so a finding in it can still redact
the right characters of the original.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["fold", "fold_native"]

# Look-alikes of Latin letters in Cyrillic and Greek (lower case, after casefold), plus common digit swaps.
_HOMOGLYPHS = str.maketrans(
    "\u0430\u0432\u0435\u0451\u043a\u043c\u043d\u043e\u0440\u0441\u0442\u0443\u0445\u0456\u0457\u0458"
    "\u0455\u0501\u0261\u0578\u03b1\u03b2\u03b5\u03b7\u03b9\u03ba\u03bd\u03bf\u03c1\u03c4\u03c5\u03c7"
    "\u03c9\u03c2",
    "abeekmhopctyxiijsdgnabenikvoptuxws",
)


def fold(text: str) -> tuple[str, Sequence[int]]:
    """The folded text, and for each of its characters the offset of the original character."""
    if text.isascii():  # the common case, at C speed
        return text.lower(), range(len(text))
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


# Characters that show nothing: every format character (Unicode's `Cf`, as `unicodedata` knows them in Python 3.11)
# and the other default-ignorable code points. A text with none of them, whose case-folding keeps its length, is
# folded by `fold_native` at C speed; the slow path drops the same characters (tests check the set against `Cf`).
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")


def fold_native(text: str) -> tuple[str, Sequence[int]]:
    """`fold` for a script whose letters must stay its own (Cyrillic, Chinese): case-folded, invisible characters
    dropped, and nothing else (no accents split off: `й` stays `й`; no look-alikes turned Latin). With the map
    back to the original offsets, as `fold`'s."""
    folded = text.casefold()
    if len(folded) == len(text) and _INVISIBLE.search(text) is None:  # the common case, at C speed
        return folded, range(len(text))
    out: list[str] = []
    where: list[int] = []
    for index, char in enumerate(text):
        if unicodedata.category(char) == "Cf" or _INVISIBLE.match(char):
            continue
        for piece in char.casefold():  # (`ß` folds to two)
            out.append(piece)
            where.append(index)
    return "".join(out), where
