"""Anthropic's extended thinking in the internal chat form: its text as `reasoning_content`, the rest opaque.

On an assistant message (of a complete answer or of the history) and on a stream chunk's `delta`:

- `reasoning_content` (`REASONING`): the thinking text, the turn's thinking blocks joined with nothing between
  them. It is the only place the text travels, where the output guards read (and may rewrite) it.
- `reasoning_blocks` (`BLOCKS`): the turn's `thinking` and `redacted_thinking` blocks in order, without any
  text: `{"type": "thinking", "signature": s, "length": n}` (`n`: how many characters of `reasoning_content`
  are that block's) or `{"type": "redacted_thinking", "data": d}` (Anthropic's encrypted thinking), each with
  `"after_tool_calls": k` when it came after the turn's k-th tool call. In a stream, each block's entry comes
  once the block is over (a thinking block's after its text), in a chunk of its own: a list of one whose entry
  has an `"index"`, its place in the turn's list (per choice), by which a client joins it to the others, as it
  joins `tool_calls` pieces (the `openai` SDK's stream helper refuses a list of objects without). A complete
  message's list has no `index` (the place is the index); an entry sent back with one, or without, reads the same.

Text rewritten by a guard no longer matches its signature (Anthropic refuses the next turn that sends it back),
nor, when its length changed, the blocks' lengths: it then goes whole into the turn's first thinking block.
Pseudonyms are never restored into it (`guards/pseudonyms.py`): the signature covers the placeholders.
The ingress marks a body carrying `reasoning_blocks` as it marks `cache_control` (`CACHE_MARK`): every provider
but Anthropic's removes them, with the `reasoning_content` beside them (`cache_control.without_cache_control`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BLOCKS", "REASONING", "Thinking", "messages_blocks", "ordered"]

REASONING = "reasoning_content"
BLOCKS = "reasoning_blocks"
_KINDS = ("thinking", "redacted_thinking")


class Thinking:
    """A turn's thinking blocks as they are read (from a Messages request or answer), for its chat message."""

    __slots__ = ("entries", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.entries: list[dict[str, Any]] = []

    def add(self, block: dict[str, Any], calls: int) -> bool:
        """Take a `thinking` or `redacted_thinking` block that came after `calls` tool calls; False when it is not
        one of them or is malformed (its text, signature or data not a string)."""
        kind = block.get("type")
        if kind == "thinking":
            text, signature = block.get("thinking"), block.get("signature")
            if not isinstance(text, str) or not isinstance(signature, str):
                return False
            self.texts.append(text)
            entry: dict[str, Any] = {"type": "thinking", "signature": signature, "length": len(text)}
        elif kind == "redacted_thinking" and isinstance(block.get("data"), str):
            entry = {"type": "redacted_thinking", "data": block["data"]}
        else:
            return False
        if calls:
            entry["after_tool_calls"] = calls
        self.entries.append(entry)
        return True

    def put(self, message: dict[str, Any]) -> bool:
        """Set the fields on `message` (when there was any thinking); whether there was."""
        if not self.entries:
            return False
        message[REASONING] = "".join(self.texts)
        message[BLOCKS] = self.entries
        return True


def _length(entry: dict[str, Any]) -> int:
    found = entry.get("length")
    return found if type(found) is int and found >= 0 else 0


def messages_blocks(text: Any, entries: Any, *, signed_only: bool) -> list[tuple[int, dict[str, Any]]]:
    """A message's thinking as Messages blocks, each with the number of tool calls before it. Reasoning without
    entries (another provider's, or a client's) is one thinking block without a signature; `signed_only` leaves
    such blocks out (Anthropic refuses a thinking block that is not its own)."""
    text = text if isinstance(text, str) else ""
    found = [entry for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
    if text and not any(entry.get("type") == "thinking" for entry in found):
        found.insert(0, {"type": "thinking", "signature": "", "length": len(text)})
    exact = sum(_length(entry) for entry in found if entry.get("type") == "thinking") == len(text)
    out: list[tuple[int, dict[str, Any]]] = []
    at, first = 0, True
    for entry in found:
        after = entry.get("after_tool_calls")
        calls = after if type(after) is int and after > 0 else 0
        kind = entry.get("type")
        if kind == "redacted_thinking" and isinstance(entry.get("data"), str):
            out.append((calls, {"type": "redacted_thinking", "data": entry["data"]}))
        elif kind == "thinking":
            if exact:
                piece, at = text[at:at + _length(entry)], at + _length(entry)
            else:  # rewritten by a guard: the boundaries are lost (and the signatures no longer match)
                piece = text if first else ""
            first = False
            signature = entry.get("signature")
            signature = signature if isinstance(signature, str) else ""
            if signature or not signed_only:
                out.append((calls, {"type": "thinking", "thinking": piece, "signature": signature}))
    return out


def ordered(thinking: list[tuple[int, dict[str, Any]]], texts: list[dict[str, Any]],
            tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A turn's blocks: the thinking before any tool call first, then the text, then each tool call followed by
    the thinking that came after it (the chat form keeps no order between text and tool calls)."""
    out = [block for calls, block in thinking if calls == 0]
    out.extend(texts)
    for position, tool in enumerate(tools, 1):
        out.append(tool)
        out.extend(block for calls, block in thinking if calls == position)
    out.extend(block for calls, block in thinking if calls > len(tools))
    return out
