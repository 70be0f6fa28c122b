"""Gates for the `patterns` engine: cheap tests that a recognizer cannot match a text at all.

Each recognizer's regexes scan the whole text with the `regex` module, tens of microseconds each
for a 300-word prompt; a gate answers "can this recognizer find anything here?" in a microsecond or
two, and the recognizer runs only when the answer is yes. A gate is a necessary condition, never a
guess: whatever a recognizer would find, its gate lets through (so findings are the same with or
without gates; `tests/test_guard_units.py` checks it on the evaluation set and on made-up texts).

Gates read a `TextShape`, computed once per text:

- `shape`: the text with every ASCII digit written `0` and every other non-ASCII character written
  DEL (`\\x7f`), so that a gate is a short stdlib regex over literals (`000-00-0000`), which runs at
  C speed. DEL stands for "any character": in gate patterns it sits in every class of letters and
  spaces, and for a text with non-ASCII characters each digit `0` in a gate also accepts it
  (`ShapeGate` compiles that second form), since a recognizer's `\\d` matches other scripts' digits.
- `folded`: the text case-folded as the stdlib `re` module folds it under IGNORECASE, for context
  words (`WordGate`): a word matched by `(?i)word` is a substring of `folded`.
- `runs`: the shape with each number's digits run together (`RunGate`): a gate regex that starts with a
  digit is tried at every digit of the text, a few hundred instructions each on a prompt with years and
  order numbers, where one translation and a substring test tell whether any number is long enough.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from re import _casefix  # type: ignore[attr-defined]  # the stdlib's own table of extra case equivalences

__all__ = [
    "OTHER", "AllGates", "AnyGate", "AsciiWordGate", "CapitalsGate", "Gate", "LiteralGate", "RunGate", "ShapeGate",
    "TextShape", "WordGate", "fold", "letters", "literal", "literal_shape",
]

_DIGITS = str.maketrans("123456789", "000000000")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
OTHER = "\x7f"  # what every non-ASCII character becomes in a shape

# `re` matches a character under IGNORECASE when its simple lower case equals the pattern's, or when
# both are in one of the extra equivalence classes (`re._casefix`: dotless i and i, long s and s, the
# two small sigmas...). str.lower() is the simple mapping for every character but the capital I with a
# dot (which becomes two), so: that one first, then lower(), then each equivalence class to one member.
_BEFORE_LOWER = {0x130: "i"}
_CANONICAL = {c: min((c, *others)) for c, others in _casefix._EXTRA_CASES.items()}


def _runs_table() -> dict[int, str | None]:
    """For `TextShape.runs`, over a shape (ASCII and DEL only): a digit or DEL `0`; what separates the groups
    of a number in the digit gates' patterns (a space as `\\s` reads it, `.`, `-`, `/`) left out; a capital
    `A` and a small letter `|`, but for x and X (which libphonenumber reads inside a number): `,` and `X`;
    anything else `,`."""
    table: dict[int, str | None] = {}
    for code in range(128):
        c = chr(code)
        if c in ("0", OTHER):
            table[code] = "0"
        elif re.fullmatch(r"[\s./-]", c):
            table[code] = None
        elif c in "xX":
            table[code] = "X" if c == "X" else ","
        elif c.isalpha():
            table[code] = "A" if c.isupper() else "|"
        else:
            table[code] = ","
    return table


_RUNS = _runs_table()
# The same translations for ASCII strings, as `bytes.translate` tables: a lookup per byte, a fraction of the
# cost of `str.translate` (about twenty instructions a character); the encoding and decoding are copies.
_DIGITS_BYTES = bytes.maketrans(b"123456789", b"000000000")
_RUNS_BYTES = bytes(ord(_RUNS.get(code) or "\0") if code < 128 else code for code in range(256))
_RUNS_DROP = bytes(code for code in range(128) if _RUNS[code] is None)
_NEVER = 1 << 30  # longer than any run


def fold(text: str) -> str:
    """`text` with each character replaced by its case class under `re`'s IGNORECASE (same length)."""
    return text.translate(_BEFORE_LOWER).lower().translate(_CANONICAL)


class TextShape:
    """One text as the gates read it; each form is computed on first use, once per analysis."""

    __slots__ = (
        "_backwards", "_folded", "_loose", "_lowered", "_no_run", "_run", "_runs", "_shape", "ascii", "text",
    )

    def __init__(self, text: str) -> None:
        self.text = text
        self.ascii = text.isascii()
        self._shape: str | None = None
        self._backwards: str | None = None
        self._folded: str | None = None
        self._runs: str | None = None
        self._lowered: str | None = None
        self._loose: str | None = None
        self._run = 0  # digits in a run known to be there
        self._no_run = _NEVER  # digits in a run known not to be

    @property
    def shape(self) -> str:
        if self._shape is None:
            if self.ascii:
                self._shape = self.text.encode("ascii").translate(_DIGITS_BYTES).decode("ascii")
            else:
                self._shape = _NON_ASCII.sub(OTHER, self.text).translate(_DIGITS)
        return self._shape

    @property
    def backwards(self) -> str:
        """The shape reversed: for gates whose rare part (a year, a house number) ends their match."""
        if self._backwards is None:
            self._backwards = self.shape[::-1]
        return self._backwards

    @property
    def lowered(self) -> str:
        """The shape in lower case (for ASCII texts: `AsciiWordGate`)."""
        if self._lowered is None:
            self._lowered = self.shape.lower()
        return self._lowered

    @property
    def runs(self) -> str:
        """The shape with the digits that follow each other in a number (with nothing but spaces, dots,
        hyphens or slashes between them) written as runs of `0` (`_runs_table`); DEL counts as a digit."""
        if self._runs is None:  # a shape is ASCII (DEL included) whatever the text
            self._runs = self.shape.encode("ascii").translate(_RUNS_BYTES, _RUNS_DROP).decode("ascii")
        return self._runs

    def run(self, digits: int) -> bool:
        """Whether `digits` digits follow each other in a number (see `runs`) somewhere in the text."""
        if digits >= self._no_run:
            return False
        if digits <= self._run:
            return True
        if "0" * digits in self.runs:
            self._run = digits
            return True
        self._no_run = digits
        return False

    def loose_run(self, digits: str) -> bool:
        """Whether `digits` (a run of `0`) is in the text with anything but letters other than x and X
        between its digits."""
        if self._loose is None:
            self._loose = self.runs.replace(",", "").replace("X", "")
        return digits in self._loose

    @property
    def folded(self) -> str:
        if self._folded is None:
            self._folded = fold(self.text)
        return self._folded


# A `0` outside a class or a `{m,n}`: the digit that the form for non-ASCII texts widens to DEL as well.
_ANY_DIGIT = re.compile(r"\\.|\[(?:\\.|[^\]])*\]|\{[^}]*\}|0")


def _widen(match: re.Match[str]) -> str:
    return f"[0{OTHER}]" if match.group() == "0" else match.group()


class ShapeGate:
    """Open when one of `patterns` (stdlib regexes over a shape, `0` for a digit) is found in it.

    Written with `0` for a digit outside character classes only, so that the form for non-ASCII texts
    can accept DEL there too; classes of letters and spaces list DEL themselves. A pattern given as a
    pair is (the form for ASCII texts, the form for the others), for a form that cannot be derived.
    `backwards`: more patterns, searched in the reversed shape (and written reversed), so that they can
    start with a digit, which the regex engine looks for at C speed (a search for a literal is a fast
    scan; a search for a class tries every position).
    """

    __slots__ = ("_ascii", "_other", "ascii", "other")

    def __init__(self, *patterns: str | tuple[str, str], backwards: Sequence[str | tuple[str, str]] = ()) -> None:
        marked = [(p, False) for p in patterns] + [(p, True) for p in backwards]
        pairs = [(p if isinstance(p, tuple) else (p, _ANY_DIGIT.sub(_widen, p)), back) for p, back in marked]
        self.ascii = tuple((re.compile(a), back) for (a, _), back in pairs)
        self.other = tuple((re.compile(o), back) for (_, o), back in pairs)
        # What `__call__` looks for: a pattern that is a plain string (`@`, `00000`) as that string, which a
        # substring test finds for a fraction of a regex search's cost (the stdlib scans for it either way).
        self._ascii = tuple((_plain(p.pattern) or p, back) for p, back in self.ascii)
        self._other = tuple((_plain(p.pattern) or p, back) for p, back in self.other)

    def __call__(self, text: TextShape) -> bool:
        for pattern, back in self._ascii if text.ascii else self._other:
            scanned = text.backwards if back else text.shape
            if isinstance(pattern, str):
                if pattern in scanned:
                    return True
            elif pattern.search(scanned) is not None:
                return True
        return False


_SPECIAL = frozenset(".^$*+?{}[]|()")


def _plain(pattern: str) -> str | None:
    """The string that `pattern` matches, when it matches only that one (literals, and escaped punctuation)."""
    out = []
    escaped = False
    for c in pattern:
        if escaped:
            if c.isalnum():
                return None  # \d, \b, \1...
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in _SPECIAL:
            return None
        else:
            out.append(c)
    return None if escaped or not out else "".join(out)


class WordGate:
    """Open when one of `words` is in the text, in any case (as a substring: a superset of the whole words
    that a context regex `(?i)(?<!\\w)(?:word|...)(?!\\w)` looks for)."""

    __slots__ = ("words",)

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(fold(w) for w in words)

    def __call__(self, text: TextShape) -> bool:
        folded = text.folded
        for word in self.words:
            if word in folded:
                return True
        return False


class RunGate:
    """Open when `digits` digits follow each other in the text, as a number writes them: with nothing but
    spaces, dots, hyphens or slashes between them, or (`loose`) with anything but a letter other than x and
    X. One translation of the shape (`TextShape.runs`) answers every run gate, where each digit gate's
    regex tried every digit of the text: the cost of most gates on a prompt with years and order numbers.

    Strict: a necessary condition for a `ShapeGate` whose every match holds that many digits with only
    those separators between them (`AllGates(RunGate(n), ShapeGate(...))`; `test_run_gates_hold_for_their
    _shape_gates` checks each claim). Loose: the phone gate itself (seven digits that no letter separates).
    """

    __slots__ = ("digits", "loose", "needle")

    def __init__(self, digits: int, *, loose: bool = False) -> None:
        self.digits = digits
        self.loose = loose
        self.needle = "0" * digits

    def __call__(self, text: TextShape) -> bool:
        return text.loose_run(self.needle) if self.loose else text.run(self.digits)


class LiteralGate:
    """Open when one of `words` (as written, case included; a non-ASCII character as DEL) is in the text:
    a few substring tests, where a regex that needs one of them tries every digit of the text first."""

    __slots__ = ("words",)

    def __init__(self, words: Sequence[str]) -> None:
        shaped = {literal_shape(w) for w in words}
        # a word that holds another is found wherever that one is: only the other is looked for
        self.words = tuple(sorted(w for w in shaped if not any(v != w and v in w for v in shaped)))

    def __call__(self, text: TextShape) -> bool:
        shape = text.shape
        for word in self.words:
            if word in shape:
                return True
        return False


class CapitalsGate:
    """For an ASCII text, open when one of `needles` is in its `runs` (capitals written `A`, X as `X`, digits
    `0`): two capitals before two digits, for an IBAN. A text with other characters, whose shape writes
    them all as DEL, is left to the gates that follow. A few substring tests, where a regex that starts with
    a digit tries every digit of the text."""

    __slots__ = ("needles",)

    def __init__(self, *needles: str) -> None:
        self.needles = needles

    def __call__(self, text: TextShape) -> bool:
        if not text.ascii:
            return True
        runs = text.runs
        for needle in self.needles:
            if needle in runs:
                return True
        return False


class AsciiWordGate:
    """Open when one of `words` (ASCII, lower case) is in an ASCII text in any case, and for any other text:
    for a regex that needs one of those words under IGNORECASE, which an ASCII text can only hold as ASCII
    letters (a text with other characters is left to the regex)."""

    __slots__ = ("words",)

    def __init__(self, words: Sequence[str]) -> None:
        ascii_words = {w.lower() for w in words if w.isascii()}
        self.words = tuple(sorted(w for w in ascii_words if not any(v != w and v in w for v in ascii_words)))

    def __call__(self, text: TextShape) -> bool:
        if not text.ascii:
            return True
        lowered = text.lowered
        for word in self.words:
            if word in lowered:
                return True
        return False


Gate = Callable[[TextShape], bool]


class AllGates:
    """Open when every one of its gates is (the cheapest first: the rest is not even computed)."""

    __slots__ = ("gates",)

    def __init__(self, *gates: Gate) -> None:
        self.gates = gates

    def __call__(self, text: TextShape) -> bool:
        for gate in self.gates:
            if not gate(text):
                return False
        return True


class AnyGate:
    """Open when one of its gates is."""

    __slots__ = ("gates",)

    def __init__(self, *gates: Gate) -> None:
        self.gates = gates

    def __call__(self, text: TextShape) -> bool:
        for gate in self.gates:
            if gate(text):
                return True
        return False


def letters(word: str) -> str:
    """A gate pattern for `word` matched under the `regex` module's IGNORECASE: each ASCII letter in either
    case or any non-ASCII character (DEL), each non-ASCII letter as DEL, the rest as itself."""
    out = []
    for c in word:
        if not c.isascii():
            out.append(OTHER)
        elif c.isalpha():
            out.append(f"[{c.lower()}{c.upper()}{OTHER}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def literal_shape(word: str) -> str:
    """`word` as it is written in a shape: each non-ASCII character as DEL (its digits are not touched: a
    word of `LiteralGate` holds none)."""
    return "".join(OTHER if not c.isascii() else c for c in word)


def literal(word: str) -> str:
    """A gate pattern for `word` matched case-sensitively: each non-ASCII character as DEL."""
    return "".join(OTHER if not c.isascii() else re.escape(c) for c in word)
