"""Where the rest of an entity split at `max_hold_chars` ends, in a stream's lane (`window.py`'s `_split` and
`_cut_key`): a run up to its white space (in tool arguments, a JSON string's closing quote or an escaped white
space), a private key block up to and including its END line; and an escape still completing at a JSON string's end.

What is dropped as the rest of a split entity is never scanned again, so each end is read as the guards read the
text: a key block's END line as the secrets guard's pattern reads it (in full-width letters, with a zero-width space),
a JSON string's escapes as the characters they stand for.
"""

from __future__ import annotations

import re

import regex  # type: ignore[import-untyped]  # no stubs

from .json_view import json_view
from .normalize import canonical, original_offset
from .secrets import _KEY_FOOTER

__all__ = ["DOMAIN_REACH", "domain_open", "key_end", "open_escape", "run_end"]

# How much longer than `max_hold_chars` a lane may wait for the domain its text ends in (`domain_open`): a label's
# longest (63 characters), and one more for what ends it.
DOMAIN_REACH = 64
# A host name from its start to the end of the text: labels of letters, digits and hyphens, dots between them.
_HOST = re.compile(r"[\w-]*(?:\.[\w-]*)*")

_SPACE = re.compile(r"\s")
# A run in a JSON string: characters other than white space, quotes and backslashes, and escapes that stand for
# none of them (`\"`, `\\`, `\/`, `\b`, a `\u` escape) or that begin no escape at all.
_JSON_RUN = re.compile(r'(?:[^\s"\\]|\\[^nrtfu\s]|\\u[0-9a-fA-F]{4}|\\u(?![0-9a-fA-F]{0,3}\Z))*')
# An escape that may still be completing at the text's end.
_OPEN_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?\Z")


def open_escape(text: str) -> int:
    """Where an escape that may still be completing (`_OPEN_ESCAPE`) starts at the end of a JSON string's text;
    `len(text)` when none does. A backslash after an odd number of them is the second of an escaped backslash."""
    found = _OPEN_ESCAPE.search(text, max(0, len(text) - 6))  # (`\u` and three digits at most)
    if found is None:
        return len(text)
    at = before = found.start()
    while before > 0 and text[before - 1] == "\\":
        before -= 1
    return len(text) if (at - before) % 2 else at


def run_end(text: str, json: bool) -> tuple[int, bool]:
    """How much of `text` is the run it starts with (up to its first white space; in a JSON string also up to its
    closing quote or an escaped white space), and whether the run ended in it."""
    if not json:
        space = _SPACE.search(text)
        return (len(text), False) if space is None else (space.start(), True)
    end = _JSON_RUN.match(text).end()  # type: ignore[union-attr]  # (`*`: always)
    if end < len(text) and _OPEN_ESCAPE.match(text, end):
        return end, False  # `\` or `\u00` at the end: the next chunk says what it is
    return end, end < len(text)


_FOOTER = regex.compile(_KEY_FOOTER)  # a private key block's END line, as the secrets guard's pattern reads it
_FOOTER_TAIL = 128  # the most of a possible END line a lane keeps (longer: dropped; the block goes on to the end)
# A JSON string's text up to its closing quote, or up to an escape at its end that may still be completing.
_JSON_STRING = re.compile(r'(?:[^"\\]|\\[^u]|\\u[0-9a-fA-F]{4}|\\u(?![0-9a-fA-F]{0,3}\Z))*')


def key_end(text: str, json: bool) -> tuple[int, bool]:
    """How much of `text` is the rest of an open private key block (`Window._cut_key`), and whether the block ended in
    it: up to and including its END line, read as the secrets guard reads it (in tool arguments, also up to the
    string's closing quote); else all but what may be the END line's start, or an escape still completing."""
    shown, where = canonical(json_view(text)[0] if json else text, digits=False)
    found = _FOOTER.search(shown, partial=True)
    if found is None or found.partial:
        end, over = len(shown) if found is None else max(found.start(), len(shown) - _FOOTER_TAIL), False
    else:
        end, over = found.end(), True
    end = end if where is None else original_offset(where, len(text), end)
    if json and (quote := _JSON_STRING.match(text).end()) < min(end, len(text)):  # type: ignore[union-attr]
        return quote, text[quote] == '"'
    return end, over


def domain_open(text: str) -> bool:
    """Whether `text` ends inside the domain of an e-mail address or the host of a URL (after its last `@`, `://` or
    `www.`): cut now, at `max_hold_chars`, its top-level domain would still be being written (`jane@example.c`, no
    address to presidio's check of the domain), so no finding would cover the cut and the address's start would leave
    as plain text (`Window._hold` waits, `DOMAIN_REACH` at most, for the domain to end)."""
    at = max(text.rfind("@") + 1, _after(text, "://"), _after(text, "www."))
    return at > 0 and _HOST.match(text, at).end() == len(text)  # type: ignore[union-attr]  # (`*`: always)


def _after(text: str, mark: str) -> int:
    """Where the text after the last `mark` starts; 0 when there is none."""
    at = text.rfind(mark)
    return 0 if at < 0 else at + len(mark)

