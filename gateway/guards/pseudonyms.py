"""Pseudonyms: consistent placeholders within one request, restored in the answer.

`<PERSON_1>` stands for the same original everywhere in one request (messages,
tool arguments, prompts), so the model can reason about "the same person"; the
answer's placeholders are turned back into the originals before the client sees
them, in text, in JSON tool arguments (escaped as JSON), and in streams where a
placeholder may be split across chunks at any offset (`open_tail` says how much
of a text's end could still become one).

Inside JSON a placeholder may come back escaped: Go's `json.Marshal` (Ollama's OpenAI-compatible API) writes `<` and
`>` as `\\u003c` and `\\u003e`, so `{"to": "\\u003cEMAIL_ADDRESS_1\\u003e"}` is restored as well (either hex case, split
across chunks too). An original is kept as the value it stands for (a pseudonym made in JSON-escaped arguments is the
value read: `json_view.EscapedFinding`), written plain in text and escaped in JSON.

Only the placeholders made for the prompt are restored, and none the prompt already held. A name the request's body
already holds (a template's `<EMAIL_ADDRESS_1>`, an earlier turn's reasoning sent back with its placeholders kept, an
escaped one in tool arguments) is never issued (`reserve`): the model could not tell the two apart, and its answer's
`<EMAIL_ADDRESS_1>`, echoing the client's own text, came back as the client's address. And a placeholder made once
the prompt is sent (`seal`), for a finding of the answer itself (an output guard that pseudonymizes), stays a
placeholder: it was restorable, so the same name written by the model after that finding (on its own, or guessed
from the names it saw) was restored into the very value the guard hid.

Never into the model's reasoning (`keeping`): Anthropic signs its thinking over the text it wrote, placeholders
included, and a client sends that thinking back in a tool loop; input guards do not read an assistant turn's
reasoning, so an original restored there would reach the upstream in clear on the next turn (and, signed, be
refused as tampered with).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PLACEHOLDER", "Pseudonyms"]

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]{0,47})_(\d{1,6})>")
# In a JSON string, also with `<` and `>` written as escapes (`\u003c`, `\u003e`, either case): the name is group 1.
_JSON_PLACEHOLDER = re.compile(r"(?:<|\\u003[cC])([A-Z][A-Z0-9_]{0,47}_\d{1,6})(?:>|\\u003[eE])")
# The same in a request's raw JSON body (`reserve`): a `<` and `>` its strings hold, written as they are or escaped.
_RAW_PLACEHOLDER = re.compile(rb"(?:<|\\u003[cC])([A-Z][A-Z0-9_]{0,47}_\d{1,6})(?:>|\\u003[eE])")
_MAX_PLACEHOLDER = 67  # `\u003c`, a name of 48, `_`, 6 digits, `\u003e`
# What may still become a placeholder (at a text's end): its start, written `<` or escaped, and, once its digits
# came, the start of an escaped `>`; or the start of an escaped `<` alone.
_OPEN = re.compile(r"(?:<|\\u003[cC])(?:[A-Z][A-Z0-9_]{0,47}(?:_\d{0,6}|_\d{1,6}\\(?:u(?:0(?:03?)?)?)?)?)?\Z"
                   r"|\\(?:u(?:0(?:03?)?)?)?\Z")


class Pseudonyms:
    __slots__ = ("_by_original", "_by_placeholder", "_counts", "_kept", "_reserved", "_sealed")

    def __init__(self) -> None:
        self._by_original: dict[tuple[str, str], str] = {}
        self._by_placeholder: dict[str, str] = {}  # the placeholders `restore` turns back: those made for the prompt
        self._counts: dict[str, int] = {}
        self._kept = False  # `restore` leaves placeholders as they are (`keeping`)
        self._reserved: set[str] = set()  # names the request already held, never issued (`reserve`)
        self._sealed = False  # the prompt was sent: a placeholder made now is the answer's, never restored (`seal`)

    def __bool__(self) -> bool:
        return bool(self._by_placeholder)

    def placeholder(self, entity: str, original: str) -> str:
        key = (entity, original)
        found = self._by_original.get(key)
        if found is None:
            count = self._counts.get(entity, 0) + 1
            if self._reserved:
                while f"<{entity}_{count}>" in self._reserved:
                    count += 1
            self._counts[entity] = count
            found = self._by_original[key] = f"<{entity}_{count}>"
            if not self._sealed:
                self._by_placeholder[found] = original
        return found

    def reserve(self, body: bytes) -> None:
        """Never issue a name that a request's raw JSON body already holds as a placeholder: a text of it that reads
        `<EMAIL_ADDRESS_1>` (its `<` and `>` written as they are, or as `\\u003c` and `\\u003e` by a client's
        encoder), but one issued already (the input guards' second pass over a body they rewrote). A text that holds
        a backslash and the letters `u003c` (an escaped backslash in the body: Go-escaped JSON inside a string) is
        no placeholder to the model, and reserves nothing. Run by the guard stage when an input guard may
        pseudonymize, before any is made: one look for `<` (and an escape) in the body, a scan only when there is
        one."""
        if b"<" not in body and b"\\u003" not in body:
            return
        for match in _RAW_PLACEHOLDER.finditer(body):
            start = match.start()
            if body[start] == 0x5C and _escaped_byte(body, start):
                continue  # (`\\u003c` in the body: a backslash, then the letters)
            name = f"<{match.group(1).decode()}>"
            if name not in self._by_placeholder:
                self._reserved.add(name)

    def seal(self) -> None:
        """The prompt is sent: a placeholder made from now on (for a finding of the answer) is never restored."""
        self._sealed = True

    def restore(self, text: str, *, json_string: bool = False) -> str:
        """`text` with every known placeholder replaced by its original (JSON-escaped inside JSON, where a
        placeholder may be written with `\\u003c` and `\\u003e` too)."""
        if self._kept or not self._by_placeholder:
            return text
        if json_string:
            if "<" in text or "\\u003" in text:
                return _JSON_PLACEHOLDER.sub(self._json_back, text)
            return text
        return PLACEHOLDER.sub(self._back, text) if "<" in text else text

    def _back(self, match: re.Match[str]) -> str:
        return self._by_placeholder.get(match.group(0), match.group(0))

    def _json_back(self, match: re.Match[str]) -> str:
        written = match.group(0)
        if written[0] == "\\" and _escaped(match.string, match.start()):
            return written  # `\\u003c...`: a backslash, then the letters `u003c`
        original = self._by_placeholder.get(f"<{match.group(1)}>")
        return written if original is None else json.dumps(original, ensure_ascii=False)[1:-1]

    @contextmanager
    def keeping(self) -> Iterator[None]:
        """While it lasts, `restore` leaves every placeholder in place: for the release of a streamed reasoning,
        which the window (`window.py`) restores as any lane's text. The stream stage releases one lane at a time."""
        self._kept = True
        try:
            yield
        finally:
            self._kept = False

    @staticmethod
    def open_tail(text: str) -> int:
        """How many characters at the end of `text` could be the start of a placeholder, written `<` or, as in a
        JSON string, `\\u003c` (in a plain text, such a start too waits for the next chunk: a moment, no more)."""
        size = len(text)
        low = max(0, size - _MAX_PLACEHOLDER)
        starts = [text.rfind("<", low)]
        if text.find("\\", low) >= 0:  # (the earliest start that is one: an escaped `>` begins with `\\` too)
            starts += (text.rfind("\\u003c", low), text.rfind("\\u003C", low), text.rfind("\\", max(0, size - 5)))
        for start in sorted(starts):
            if start >= 0 and _OPEN.match(text, start):
                return size - start
        return 0


def _escaped_byte(body: bytes, at: int) -> bool:
    """`_escaped` in bytes: whether the backslash at `at` is escaped."""
    before = at
    while before > 0 and body[before - 1] == 0x5C:
        before -= 1
    return (at - before) % 2 == 1


def _escaped(text: str, at: int) -> bool:
    """Whether the backslash at `at` is escaped: an odd number of backslashes before it."""
    before = at
    while before > 0 and text[before - 1] == "\\":
        before -= 1
    return (at - before) % 2 == 1
