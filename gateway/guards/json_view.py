"""What a guard reads of a tool call's arguments: the JSON text with its escapes read as the characters they stand for.

A tool call's arguments are JSON text, and a string in it writes a line break as `\\n`, a tab as `\\t`, a quote as
`\\"`. Read as they are, the `n` of `\\n` sits before the next value: a key on the line after `Details:` was
`nAKIA...` to the secrets guard (whose patterns want no letter before a key) and an address was `njane@...` to the
pii guard, which redacted the `n` and left a lone backslash (arguments no longer JSON). So the guards read a view of
the same length in which each escape is the character it stands for and zero-width spaces (`\\n` a line break and
one, `\\uXXXX` its character and five), which every guard drops as it reads (`normalize.canonical`, `fold`); a
surrogate, no part of any finding, reads as six zero-width spaces. Not the character written twice (as it once was):
`\\/\\/` read `////`, so `https:\\/\\/hooks.slack.com\\/...` (PHP's `json_encode` writes every `/` so) was no
webhook, no connection string, no profile URL; `\\"` read `""`, so `key=\\"...\\"` was no quoted key; and
`4111\\u00201111 1111 1111` read six spaces where a card has one. The same length keeps every offset: what the
guards find in the view is redacted in the text at the same place, widened where it would split an escape
(`whole_escapes`), so the arguments stay JSON. A finding so widened that holds an escape is an `EscapedFinding`: what
it stands for is its text read (`unescaped`), which a pseudonym is made for (and restored as, escaped again where it
goes: `pseudonyms.py`) and a mask keeps the end of: `zo\\u00eb@gmail.com` in arguments and `zoë@gmail.com` in a message
are one `<EMAIL_ADDRESS_1>`, restored as `zoë@gmail.com` in an answer's text (it came back as `zo\\u00eb@...`).
A backslash that begins no escape (a plain text's `C:\\Users`) is read as it is.

A card or a phone number may also be a JSON number (`{"card": 4111111111111111}`), which a placeholder cannot
stand in for (`{"card": <CREDIT_CARD>}` is no JSON: an upstream gets broken arguments, and translating them for
another API fails). So a finding that covers a number of a JSON object or array text (`json_numbers`) is widened to
the whole number and its replacement written as a JSON string (`whole_numbers`): `{"card": "<CREDIT_CARD>"}`.
A stream's arguments come in pieces, none a JSON text of its own: `JsonPieces` follows them, piece by piece, for
whether each starts inside a string, and so where its numbers are; `number_around` keeps the stream's window from
cutting one of them in two (its start sent before the string that replaces the rest).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right

import msgspec
from msgspec.structs import replace

from .base import Finding

__all__ = ["EscapedFinding", "JsonPieces", "json_numbers", "json_view", "unescaped", "whole_escapes", "whole_numbers"]

_ESCAPE = re.compile(r'\\(?:u[0-9a-fA-F]{4}|["\\/bfnrt])')
_STANDS_FOR = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_FILL = "\u200b"  # zero-width space: not white space, not a word character, dropped by `normalize.canonical`, `fold`
_OPENS_CONTAINER = re.compile(r"[ \t\r\n]*[\[{]")
# A JSON text's strings (matched whole, so that nothing inside one is taken) and numbers: in a valid JSON text, what
# this finds that is no string is a number (no other token holds a digit or a minus sign).
_NUMBER_TEXT = r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
_STRING_OR_NUMBER = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|' + _NUMBER_TEXT)
_STRUCTURE = re.compile(r"[\[\]{}:]")  # between two numbers of one array, only commas and white space
_validate = msgspec.json.Decoder(msgspec.Raw).decode  # checks the syntax, builds nothing


def json_numbers(text: str) -> list[tuple[int, int]]:
    """Where the numbers of `text` are (start, end), when it is a JSON object or array; none for any other text (a
    sentence's numbers are no JSON numbers, and a JSON text cut short cannot be told apart from one)."""
    if not _OPENS_CONTAINER.match(text):
        return []
    try:
        _validate(text)
    except msgspec.DecodeError:
        return []
    return [token.span() for token in _STRING_OR_NUMBER.finditer(text) if text[token.start()] != '"']


_QUOTE_OR_ESCAPE = re.compile(r'\\.?|"', re.DOTALL)  # a quote, or an escape (a lone backslash: the piece's last)
_NUMBER = re.compile(_NUMBER_TEXT)


class JsonPieces:
    """A JSON text read in pieces (a stream's tool call arguments, as the stream guard releases them): where each
    piece's numbers are, outside its strings (`json_numbers` for a whole text), and whether the next piece starts
    inside a string. Every piece must pass through `numbers`, in order."""

    __slots__ = ("escaped", "inside")

    def __init__(self) -> None:
        self.inside = False  # the next piece starts inside a string
        self.escaped = False  # ... and its first character is escaped (the last piece ended in a backslash)

    def numbers(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        inside = self.inside
        at = 1 if self.escaped and text else 0
        self.escaped = self.escaped and not text
        outside_from = at
        for token in _QUOTE_OR_ESCAPE.finditer(text, at):
            if token.group() == '"':
                if not inside:
                    spans.extend(number.span() for number in _NUMBER.finditer(text, outside_from, token.start()))
                inside = not inside
                outside_from = token.end()
            elif token.end() - token.start() == 1:  # a backslash that ends the piece
                self.escaped = True
        if not inside:
            spans.extend(number.span() for number in _NUMBER.finditer(text, outside_from))
        self.inside = inside
        return spans


    def number_around(self, text: str, cut: int, longest: int) -> int:
        """`cut` in `text`, the next piece, moved back to the start of the number outside a string that it would
        split (a finding on a number is replaced by a JSON string in place of the whole number: `-` or `12.` sent
        before it, in a piece of its own, were left outside the string). A number that the piece starts with is
        split all the same when it is longer than `longest` (the window: a lane's text stays bounded)."""
        if not 0 < cut < len(text) or text[cut - 1] not in _NUMBER_CHARS or text[cut] not in _NUMBER_CHARS:
            return cut  # (nearly every cut: beside white space or a letter)
        probe = JsonPieces()
        probe.inside, probe.escaped = self.inside, self.escaped
        for start, end in probe.numbers(text):
            if start >= cut:
                break
            if cut < end:
                return start if start > 0 or end - start <= longest else cut
        return cut


_NUMBER_CHARS = frozenset("0123456789-+.eE")


def whole_numbers(text: str, numbers: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The span of the JSON numbers that the span `start` to `end` covers part of, when it covers one and no part of
    a string (what it covers besides, the white space and punctuation around them, is kept): its replacement is then
    written as a JSON string. None for any other span, and for numbers apart in the JSON's structure."""
    first = bisect_left(numbers, (start + 1, -1)) - 1  # the last number starting at or before `start`
    if first < 0 or numbers[first][1] <= start:
        first += 1
    if first >= len(numbers) or numbers[first][0] >= end:
        return None
    last = bisect_left(numbers, (end, -1)) - 1  # the last number starting before `end`
    covered = text[min(start, numbers[first][0]):max(end, numbers[last][1])]
    if '"' in covered or (first != last and _STRUCTURE.search(text, numbers[first][1], numbers[last][0])):
        return None
    return numbers[first][0], numbers[last][1]


def json_view(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` with its JSON escapes read (see the module's docstring), and where each escape is (start, end)."""
    if "\\" not in text:
        return text, []
    parts: list[str] = []
    escapes: list[tuple[int, int]] = []
    last = 0
    for escape in _ESCAPE.finditer(text):
        start, end = escape.span()
        parts.append(text[last:start])
        kind = text[start + 1]
        if kind != "u":
            parts.append(_STANDS_FOR[kind] + _FILL)
        else:
            char = chr(int(text[start + 2:end], 16))
            parts.append(_FILL * 6 if 0xD800 <= ord(char) <= 0xDFFF else char + _FILL * 5)
        escapes.append((start, end))
        last = end
    if not escapes:
        return text, []
    parts.append(text[last:])
    return "".join(parts), escapes


class EscapedFinding(Finding, frozen=True):
    """A finding in a JSON string's text (a tool call's arguments) that holds an escape: the value it stands for is
    its text read (`unescaped`). Only a pseudonym and a mask read the value (`verdict.replacement`)."""


_READS_VALUE = frozenset({"pseudonymize", "mask"})


def whole_escapes(findings: list[Finding], escapes: list[tuple[int, int]]) -> list[Finding]:
    """`findings`, each widened to the whole of an escape it would start or end inside of; one whose value is read
    (pseudonymized, masked) and that holds an escape is an `EscapedFinding`."""
    if not escapes or not findings:
        return findings
    starts = [start for start, _ in escapes]
    out: list[Finding] = []
    for finding in findings:
        start, end = finding.start, finding.end
        at = bisect_right(starts, start) - 1  # the last escape starting at or before the finding's start
        if at >= 0 and escapes[at][0] < start < escapes[at][1]:
            start = escapes[at][0]
        at = bisect_right(starts, end - 1) - 1  # the escape holding the finding's last character, if any
        if at >= 0 and escapes[at][0] < end < escapes[at][1]:
            end = escapes[at][1]
        if finding.action in _READS_VALUE and at >= 0 and escapes[at][1] > start:  # (it holds that escape)
            out.append(EscapedFinding(finding.guard, finding.type, start, end, finding.score, finding.recognizer,
                                      finding.action, finding.keep))
        elif (start, end) != (finding.start, finding.end):
            out.append(replace(finding, start=start, end=end))
        else:
            out.append(finding)
    return out


def unescaped(text: str) -> str:
    """A JSON string's text (or a piece of one) with its escapes read: `zo\\u00eb` is `zoë`, a surrogate pair one
    character. A lone surrogate, which no text can carry (no UTF-8), leaves the text as it is."""
    read = _ESCAPE.sub(_character, text)
    try:
        read.encode()
    except UnicodeEncodeError:
        try:
            return read.encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            return text
    return read


def _character(escape: re.Match[str]) -> str:
    kind = escape.group()[1]
    return _STANDS_FOR[kind] if kind != "u" else chr(int(escape.group()[2:], 16))
