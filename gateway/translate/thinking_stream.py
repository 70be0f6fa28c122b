"""A streamed chat answer's thinking as Messages' `thinking` and `redacted_thinking` blocks (for `MessagesStream`).

The text comes as `delta.reasoning_content`, each block's end as a `delta.reasoning_blocks` entry with its
signature and length (see `thinking.py`). The entries may come before the end of their text: an output guard
holds back the tail of the text it has not checked yet and releases it later, in a chunk after the entry. So
the text is written as it comes into the open thinking block, and a block is closed (its `signature_delta`,
then `content_block_stop`) once it holds as many characters as its entry says; the entries waiting for their
text are queued, in order, with the redacted blocks that came after them. When the answer moves on (text, a
tool call, the end), whatever is still open or queued is written and closed: text a guard made longer or
shorter than its entry said has lost its boundaries, and its signature no longer matches anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .thinking import messages_blocks

__all__ = ["HeldThinking", "ThinkingStream", "write_blocks"]

Event = Callable[[str, dict[str, Any]], bytes]  # an SSE event, framed: (type, fields)
_OPEN = {"type": "thinking", "thinking": "", "signature": ""}


class ThinkingStream:
    """Per stream: the thinking before the first tool call, written as it comes."""

    __slots__ = ("_chars", "_event", "_index", "_next", "_open", "_pending")

    def __init__(self, event: Event, next_index: Callable[[], int]) -> None:
        self._event = event
        self._next = next_index  # the index of a new content block
        self._open = False  # a thinking block is open (at `_index`)
        self._index = 0
        self._chars = 0  # characters written into the open block
        self._pending: list[dict[str, Any]] = []  # entries not written yet, in order

    @property
    def busy(self) -> bool:
        """A block is open or an entry is waiting (`flush` before another block starts)."""
        return self._open or bool(self._pending)

    def text(self, text: str, out: list[bytes]) -> None:
        """Thinking text: into the open block (one is opened), up to the length of the entry it waits for."""
        while text:
            if not self._open:
                self._start(out)
            head = self._pending[0] if self._pending else None
            if head is None or head.get("type") != "thinking":
                self._delta(text, out)
                return
            room = max(_length(head) - self._chars, 0)
            self._delta(text[:room], out)
            text = text[room:]
            if self._chars >= _length(head):
                self._stop(self._pending.pop(0), out)
                self._settle(out)

    def entries(self, entries: list[Any], out: list[bytes]) -> None:
        self._pending.extend(entry for entry in entries if isinstance(entry, dict))
        self._settle(out)

    def flush(self, out: list[bytes]) -> None:
        """The answer moves on: the open block closed (with the signature it waits for), the queue written."""
        if self._open:
            head = self._pending[0] if self._pending else None
            self._stop(self._pending.pop(0) if head is not None and head.get("type") == "thinking" else None, out)
        pending, self._pending = self._pending, []
        write_blocks([block for _, block in messages_blocks("", pending, signed_only=False)], self._event,
                     self._next, out)

    def _settle(self, out: list[bytes]) -> None:
        """The queue's head written while its text is all there (a redacted block has none)."""
        while self._pending:
            head = self._pending[0]
            if head.get("type") == "thinking":
                if self._open and self._chars >= _length(head):
                    self._stop(self._pending.pop(0), out)
                elif not self._open and _length(head) == 0:
                    self._start(out)
                    self._stop(self._pending.pop(0), out)
                else:
                    return  # its text is still to come
            else:
                if self._open:  # text beyond what its entries said (rewritten by a guard): closed as it is
                    self._stop(None, out)
                self._pending.pop(0)
                write_blocks([block for _, block in messages_blocks("", [head], signed_only=False)], self._event,
                             self._next, out)

    def _start(self, out: list[bytes]) -> None:
        self._index = self._next()
        self._open = True
        self._chars = 0
        out.append(self._event("content_block_start", {"index": self._index, "content_block": dict(_OPEN)}))

    def _delta(self, text: str, out: list[bytes]) -> None:
        if text:
            self._chars += len(text)
            out.append(self._event("content_block_delta", {"index": self._index,
                                                           "delta": {"type": "thinking_delta", "thinking": text}}))

    def _stop(self, entry: dict[str, Any] | None, out: list[bytes]) -> None:
        signature = entry.get("signature") if entry is not None else None
        if isinstance(signature, str) and signature:
            out.append(self._event("content_block_delta", {"index": self._index, "delta": {
                "type": "signature_delta", "signature": signature}}))
        out.append(self._event("content_block_stop", {"index": self._index}))
        self._open = False


class HeldThinking:
    """Thinking after the first tool call: held with the blocks after it, written whole at the end."""

    __slots__ = ("entries", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.entries: list[Any] = []

    def write(self, event: Event, next_index: Callable[[], int], out: list[bytes]) -> None:
        write_blocks([block for _, block in messages_blocks("".join(self.texts), self.entries, signed_only=False)],
                     event, next_index, out)


def write_blocks(blocks: list[dict[str, Any]], event: Event, next_index: Callable[[], int], out: list[bytes]) -> None:
    """Whole thinking and redacted_thinking blocks as their events."""
    for block in blocks:
        index = next_index()
        if block["type"] == "redacted_thinking":
            out.append(event("content_block_start", {"index": index, "content_block": block}))
        else:
            out.append(event("content_block_start", {"index": index, "content_block": dict(_OPEN)}))
            if block["thinking"]:
                out.append(event("content_block_delta", {"index": index, "delta": {
                    "type": "thinking_delta", "thinking": block["thinking"]}}))
            if block["signature"]:
                out.append(event("content_block_delta", {"index": index, "delta": {
                    "type": "signature_delta", "signature": block["signature"]}}))
        out.append(event("content_block_stop", {"index": index}))


def _length(entry: dict[str, Any]) -> int:
    found = entry.get("length")
    return found if type(found) is int and found >= 0 else 0
