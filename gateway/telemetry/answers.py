"""An answer as the quality checks read it, and what its request asked of it: the same shapes for every API
(chat, completions, Responses), so that one set of checks (`quality.signals_for`) serves them all."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Answer", "Asked"]


class Answer:
    """An answer as the checks need it: a chat or completions answer's first choice, or a Responses answer's
    output (built from a body, from stream chunks, or from a stream's last event)."""

    __slots__ = ("finish_reasons", "overflow", "refusal", "size", "text", "tool_calls")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.refusal = False
        self.finish_reasons: list[str] = []
        # index -> [name, arguments...]: a function call's (a chat call of another type, a custom tool's, whose name
        # and input are not in `function`, reads as [""]: `quality._malformed_tool_call`); a chat answer's legacy
        # `function_call` is one more, at -1 (`quality_reading.add_legacy_call`)
        self.tool_calls: dict[int, list[str]] = {}
        self.size = 0
        self.overflow = False

    def add_text(self, text: str, limit: int) -> None:
        if self.overflow:
            return
        self.size += len(text)
        if self.size > limit:
            self.overflow = True
            return
        self.text.append(text)


class Asked(NamedTuple):
    """What a request asked of its answer's form, whatever its API: a JSON kind (`json_object`,
    `json_schema` or None), that schema, the offered function tools' parameter schemas by name, the names
    of all the tools it offered, whatever their type (None when they cannot all be told: a Responses request's
    stored `prompt` may offer more), and whether it offered any tool at all (the defaults: none)."""

    json_kind: str | None
    schema: Any
    tools: dict[str, Any]
    names: frozenset[str] | None = frozenset()
    offers_tools: bool = False
