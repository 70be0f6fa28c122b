"""What a guard reads of a tool call's arguments: the JSON text with its escapes read as the characters they stand for.

A tool call's arguments are JSON text, and a string in it writes a line break as `\\n`, a tab as `\\t`, a quote as
`\\"`. Read as they are, the `n` of `\\n` sits before the next value: a key on the line after `Details:` was
`nAKIA...` to the secrets guard (whose patterns want no letter before a key) and an address was `njane@...` to the
pii guard, which redacted the `n` and left a lone backslash (arguments no longer JSON). So the guards read a view of
the same length in which each escape is the character it stands for, written twice (`\\n` is two line breaks, `\\"`
two quotes: white space and punctuation either way), or, for a `\\uXXXX`, that character and five zero-width spaces
(which the pii and secrets guards drop as they read: `normalize.canonical`); a surrogate, no part of any finding,
reads as six zero-width spaces. The same length keeps every offset: what the guards find in the view is redacted in
the text at the same place, widened where it would split an escape (`whole_escapes`), so the arguments stay JSON.
A backslash that begins no escape (a plain text's `C:\\Users`) is read as it is.
"""

from __future__ import annotations

import re
from bisect import bisect_right

from msgspec.structs import replace

from .base import Finding

__all__ = ["json_view", "whole_escapes"]

_ESCAPE = re.compile(r'\\(?:u[0-9a-fA-F]{4}|["\\/bfnrt])')
_STANDS_FOR = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_FILL = "\u200b"  # zero-width space: not white space, not a word character, dropped by `normalize.canonical`


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
            parts.append(_STANDS_FOR[kind] * 2)
        else:
            char = chr(int(text[start + 2:end], 16))
            parts.append(_FILL * 6 if 0xD800 <= ord(char) <= 0xDFFF
                         else char * 6 if char.isspace() else char + _FILL * 5)
        escapes.append((start, end))
        last = end
    if not escapes:
        return text, []
    parts.append(text[last:])
    return "".join(parts), escapes


def whole_escapes(findings: list[Finding], escapes: list[tuple[int, int]]) -> list[Finding]:
    """`findings`, each widened to the whole of an escape it would start or end inside of."""
    if not escapes or not findings:
        return findings
    starts = [start for start, _ in escapes]
    out = []
    for finding in findings:
        start, end = finding.start, finding.end
        at = bisect_right(starts, start) - 1  # the last escape starting at or before the finding's start
        if at >= 0 and escapes[at][0] < start < escapes[at][1]:
            start = escapes[at][0]
        at = bisect_right(starts, end - 1) - 1  # the escape holding the finding's last character, if any
        if at >= 0 and escapes[at][0] < end < escapes[at][1]:
            end = escapes[at][1]
        out.append(finding if (start, end) == (finding.start, finding.end) else replace(finding, start=start, end=end))
    return out
