"""Pseudonyms: consistent placeholders within one request, restored in the answer.

`<PERSON_1>` stands for the same original everywhere in one request (messages,
tool arguments, prompts), so the model can reason about "the same person"; the
answer's placeholders are turned back into the originals before the client sees
them, in text, in JSON tool arguments (escaped as JSON), and in streams where a
placeholder may be split across chunks at any offset (`open_tail` says how much
of a text's end could still become one).

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
_MAX_PLACEHOLDER = 58
_OPEN = re.compile(r"<(?:[A-Z][A-Z0-9_]{0,47}(?:_\d{0,6})?)?\Z")


class Pseudonyms:
    __slots__ = ("_by_original", "_by_placeholder", "_counts", "_kept")

    def __init__(self) -> None:
        self._by_original: dict[tuple[str, str], str] = {}
        self._by_placeholder: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._kept = False  # `restore` leaves placeholders as they are (`keeping`)

    def __bool__(self) -> bool:
        return bool(self._by_placeholder)

    def placeholder(self, entity: str, original: str) -> str:
        key = (entity, original)
        found = self._by_original.get(key)
        if found is None:
            count = self._counts[entity] = self._counts.get(entity, 0) + 1
            found = self._by_original[key] = f"<{entity}_{count}>"
            self._by_placeholder[found] = original
        return found

    def restore(self, text: str, *, json_string: bool = False) -> str:
        """`text` with every known placeholder replaced by its original (JSON-escaped inside JSON)."""
        if self._kept or not self._by_placeholder or "<" not in text:
            return text

        def back(match: re.Match[str]) -> str:
            original = self._by_placeholder.get(match.group(0))
            if original is None:
                return match.group(0)
            return json.dumps(original, ensure_ascii=False)[1:-1] if json_string else original

        return PLACEHOLDER.sub(back, text)

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
        """How many characters at the end of `text` could be the start of a placeholder."""
        start = text.rfind("<", max(0, len(text) - _MAX_PLACEHOLDER))
        if start < 0 or not _OPEN.match(text, start):
            return 0
        return len(text) - start
