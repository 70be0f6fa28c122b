"""Text as a filter should read it: case-folded, without accents or invisible characters, homoglyphs folded.

`ign\\u200bore` and `\\u0456gnore` (a Cyrillic i) must read as `ignore`. The folded text
keeps a map back to the original offsets, so a finding in it can still redact
the right characters of the original.
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import overload

import regex  # type: ignore[import-untyped]  # no stubs

__all__ = ["canonical", "canonical_open_from", "fold", "fold_native", "original_offset", "original_span"]

# Look-alikes of Latin letters in Cyrillic and Greek (lower case, after casefold), plus common digit swaps.
_HOMOGLYPHS = str.maketrans(
    "\u0430\u0432\u0435\u0451\u043a\u043c\u043d\u043e\u0440\u0441\u0442\u0443\u0445\u0456\u0457\u0458"
    "\u0455\u0501\u0261\u0578\u03b1\u03b2\u03b5\u03b7\u03b9\u03ba\u03bd\u03bf\u03c1\u03c4\u03c5\u03c7"
    "\u03c9\u03c2",
    "abeekmhopctyxiijsdgnabenikvoptuxws",
)


# Characters that show nothing: every format character (Unicode's `Cf`, as `unicodedata` knows them in Python 3.11)
# and the other default-ignorable code points. A text with none of them, whose case-folding keeps its length, is
# folded by `fold_native` at C speed; the slow path drops the same characters (tests check the set against `Cf`).
_INVISIBLE_CLASS = (
    "\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff")
_INVISIBLE = re.compile(f"[{_INVISIBLE_CLASS}]")


def _members(chars: str) -> frozenset[str]:
    """The characters of a class's inside made of characters and ranges (`a-z`), no escapes."""
    out: set[str] = set()
    at = 0
    while at < len(chars):
        if at + 2 < len(chars) and chars[at + 1] == "-":
            out.update(map(chr, range(ord(chars[at]), ord(chars[at + 2]) + 1)))
            at += 3
        else:
            out.add(chars[at])
            at += 1
    return frozenset(out)


_INVISIBLE_CHARS = _members(_INVISIBLE_CLASS)  # (for `fold`'s loop: a set's lookup costs a fraction of a match)


def fold(text: str) -> tuple[str, Sequence[int]]:
    """The folded text, and for each of its characters the offset of the original character. Every invisible
    character (`_INVISIBLE`) is dropped, not only the format ones: a Hangul filler (U+3164, U+FFA0, U+115F, U+1160),
    a letter to Unicode that shows nothing, inside `falc\\u3164on` or `Ign\\u3164ore` hid the word from the deny
    list and the injection patterns."""
    if text.isascii():  # the common case, at C speed
        return text.lower(), range(len(text))
    filled = _ascii_but_fills(text)
    if filled is not None:
        return filled[0].lower(), filled[1]
    out: list[str] = []
    where: list[int] = []
    for index, char in enumerate(text):
        if char.isascii():
            out.append(char.lower())
            where.append(index)
            continue
        if char in _INVISIBLE_CHARS or unicodedata.category(char) == "Cf":  # zero-width spaces, joiners, fillers
            continue
        for piece in unicodedata.normalize("NFKD", char).casefold().translate(_HOMOGLYPHS):
            if unicodedata.category(piece) == "Mn":  # accents, split off by NFKD
                continue
            out.append(piece)
            where.append(index)
    return "".join(out), where


_FILL = "\u200b"  # what `json_view` writes after an escape's character: a zero-width space


def _ascii_but_fills(text: str) -> tuple[str, Sequence[int]] | None:
    """`text` without its zero-width spaces and the map back, when nothing else in it is other than ASCII (tool
    arguments read by `json_view`, whose escapes leave fills): at C speed, where reading each character took a
    millisecond for a few kilobytes of code with its line breaks escaped. None otherwise."""
    if _FILL not in text:
        return None
    pieces = text.split(_FILL)
    bare = "".join(pieces)
    if not bare.isascii():
        return None
    return bare, _Filled(list(accumulate(map(len, pieces[:-1]))), len(bare))


class _Filled(Sequence[int]):
    """The map back of a text whose fills were taken out (`_ascii_but_fills`): each index plus the fills before it
    (`gaps`: where each fill was, in the text without them)."""

    __slots__ = ("_gaps", "_size")

    def __init__(self, gaps: list[int], size: int) -> None:
        self._gaps, self._size = gaps, size

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return [self[at] for at in range(*index.indices(self._size))]
        if index < 0:
            index += self._size
        if not 0 <= index < self._size:
            raise IndexError(index)
        return index + bisect_right(self._gaps, index)


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


# Where in the astral planes a character `canonical` changes may be (math letters and digits, other scripts' digits
# and marks, enclosed forms, tags and other invisible characters): not the emoji (U+1F300 to U+1FAFF), frequent in
# chat answers, which would send a text to the slow path; nor CJK compatibility ideographs (NFKC makes them other
# ideographs, which no pattern reads). Three ranges: the stdlib's `re` searches a class with more at a fraction of
# its speed.
_ASTRAL = "\U00010000-\U0001f2ff\U0001fbf0-\U0001fbf9\U000e0000-\U000e0fff"


def _char_class(chars: Sequence[str]) -> str:
    """The inside of a regex class of `chars` (sorted), as ranges."""
    spans: list[list[int]] = []
    for char in chars:
        if spans and spans[-1][1] == ord(char) - 1:
            spans[-1][1] = ord(char)
        else:
            spans.append([ord(char), ord(char)])
    return "".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in spans)


class _Canonical:
    """What `canonical` looks for, as stdlib regexes over explicit classes (the `regex` module's property classes
    cost about 50 ns a character, these a few), built once from the `regex` module's Unicode tables.

    `changing`: the characters of the Basic Multilingual Plane it changes, and the astral ones it may; `uneven`:
    those that do not turn into exactly one character (dropped, expanded, astral: read one by one); `marked`: a
    combining mark on a character that is or turns ASCII; `odd`: either; `even`: the translation of the others
    (with and without other scripts' digits)."""

    def __init__(self) -> None:
        plane = "".join(map(chr, range(0x80, 0x10000)))
        changing = regex.findall(r"[\p{NFKC_QC=N}\p{Cf}\p{DI}\p{Nd}\p{Zs}]", plane)
        marks = regex.findall(r"[\p{M}--[\p{NFKC_QC=N}\p{Cf}\p{DI}]]", plane, flags=regex.V1)
        self.even: dict[bool, dict[int, str]] = {False: {}, True: {}}
        uneven: list[str] = []
        for char in changing:
            turns = {digits: _canonical_char(char, digits) for digits in (False, True)}
            if all(len(to) == 1 and unicodedata.category(to)[0] != "M" for to in turns.values()):
                for digits, to in turns.items():
                    if to != char:
                        self.even[digits][ord(char)] = to
            else:
                uneven.append(char)
        evens = _char_class(sorted(set(changing) - set(uneven)))
        self.changing = re.compile(f"[{_char_class(changing)}{_ASTRAL}]")
        self.uneven = re.compile(f"[{_char_class(uneven)}{_ASTRAL}]")
        self.marked = re.compile(f"[{_char_class(marks)}](?<=[\\x00-\\x7f{evens}].)")
        odd, marked = f"{_char_class(uneven)}{_ASTRAL}", _char_class(marks)  # (marks after either, in its run)
        self.odd = re.compile(f"(?:[{odd}]|(?<=[\\x00-\\x7f{evens}])[{marked}])[{odd}{marked}]*")


def canonical(text: str, digits: bool = True) -> tuple[str, Sequence[int] | None]:
    """The text as a pattern (a card number, an address, a key) should read it, and for each of its characters
    the offset of the original character; None for the map when that is the text itself (any ASCII text).

    Unlike `fold`, letters keep their case and accents (keys are case-sensitive, names keep theirs): each
    character is NFKC-normalized on its own (full-width digits and at signs, math-bold digits, ligatures turn ASCII),
    every space is an ASCII space, format and other invisible characters are dropped, and so are combining marks
    on an ASCII character (`4\u0301`). `digits`: another script's digits (Arabic-Indic, Devanagari) turn ASCII
    too, for recognizers whose check (Luhn, an IBAN's checksum) reads ASCII digits only. A text with nothing to
    change (most French, Russian or Hindi prose) costs two searches at C speed; one whose changes keep its length
    (full-width punctuation in Chinese) a translation too."""
    if text.isascii():  # the common case, at C speed
        return text, None
    filled = _ascii_but_fills(text)
    if filled is not None:
        return filled
    if _CANONICAL.marked.search(text) is None:
        first = _CANONICAL.changing.search(text)
        if first is None:
            return text, None
        if _CANONICAL.uneven.search(text, first.start()) is None:
            even = _CANONICAL.even[digits]  # (a slice at a time: a prompt of megabytes on the pool holds the GIL
            shown = "".join(text[at:at + _SLICE].translate(even) for at in range(0, len(text), _SLICE))  # briefly)
            return (text, None) if shown == text else (shown, range(len(text)))
    return _canonical_by_char(text, digits)


def _canonical_by_char(text: str, digits: bool) -> tuple[str, Sequence[int] | None]:
    """`canonical`, reading on its own each character that does not turn into exactly one (and each mark that may
    sit on an ASCII one); the stretches between them translated, at C speed."""
    even = _CANONICAL.even[digits]
    out: list[str] = []
    where = array("q")  # (a machine word an offset: a list of ints costs four times as much on a long text)
    done = 0
    on_ascii = False  # what the last character written is
    for match in _CANONICAL.odd.finditer(text):
        start, end = match.span()
        if start > done:
            stretch = text[done:start].translate(even)
            out.append(stretch)
            where.extend(range(done, start))
            on_ascii = stretch[-1].isascii()
        for index in range(start, end):
            for piece in _canonical_char(text[index], digits):
                if on_ascii and unicodedata.category(piece)[0] == "M":
                    continue  # a mark on an ASCII character
                out.append(piece)
                where.append(index)
                on_ascii = piece.isascii()
        done = end
    out.append(text[done:].translate(even))
    where.extend(range(done, len(text)))
    shown = "".join(out)
    return (text, None) if shown == text else (shown, where)


def _canonical_char(char: str, digits: bool) -> str:
    category = unicodedata.category(char)
    if category == "Cf" or _INVISIBLE.match(char):
        return ""
    if category == "Zs":
        return " "
    if digits and category == "Nd":
        return str(unicodedata.decimal(char))
    return unicodedata.normalize("NFKC", char)


_CANONICAL = _Canonical()
_SLICE = 1 << 16  # characters translated in one call (a few milliseconds)


def original_span(where: Sequence[int], size: int, start: int, end: int) -> tuple[int, int]:
    """The span of the original text (of `size` characters) that `canonical`'s [start, end) came from: from its
    first character's original to its last one's, and the invisible characters dropped right after it (a
    combining mark on its last digit belongs to it; a redaction that left it would leave it hanging)."""
    if end <= start:  # (an empty span: where it is)
        at = where[start] if start < len(where) else size
        return at, at
    last = where[end - 1]
    after = where[end] if end < len(where) else size
    return where[start], after if after > last else last + 1  # (inside one character's expansion: all of it)


def original_offset(where: Sequence[int], size: int, offset: int) -> int:
    """The original offset of `canonical`'s `offset` (a stream hold's start): `size` at the end, and 0 at 0
    (a hold from the start holds everything, the invisible characters before the first one too)."""
    if offset <= 0:
        return 0
    return where[offset] if offset < len(where) else size


def canonical_open_from(open_from: Callable[[str, int], int], text: str, start: int, digits: bool = True) -> int:
    """A stream hold (`Guard.open_from`) looked for in `text`'s canonical form, as the guard's scan reads it, and
    mapped back: a value whose zero-width space or no-break space has arrived, but not its last digits, is held
    whole, invisible characters included."""
    shown, where = canonical(text, digits)
    if where is None:
        return open_from(text, start)
    return original_offset(where, len(text), open_from(shown, bisect_left(where, start)))
