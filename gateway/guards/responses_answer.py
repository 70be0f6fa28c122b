"""Output guards on a complete Responses answer (`POST /v1/responses`, not streamed), and where an answer's texts are.

The texts of an answer are the `text` of each `output_text` part (and of a `text` part, as some servers write it)
and the `refusal` of each `refusal` part of its `message` items; the `text` of each
summary and content part of its `reasoning` items (the model's reasoning, which
often repeats what the prompt held); the `arguments` (a JSON string: restored
pseudonyms are JSON-escaped) of its `function_call` items; and the `input` of
its `custom_tool_call` items (`item_texts`: the stream adapter, `responses.py`,
reads an item's texts where this module does). They are checked and rewritten like a chat
answer's content and tool call arguments (the output text parts of all its messages as one text, as the client
reads them, the SDK's `response.output_text`: `_checked_texts`); `logprobs` are emptied where a text was rewritten.

A blocked answer keeps the Responses API's own way of saying that a content
filter stopped it: `status: "incomplete"` with `incomplete_details.reason:
"content_filter"`, its texts emptied and its tool calls removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from .base import WITHHELD, Finding, Guard, Where, enforcing
from .joined import TEXT, Joined
from .pool import PER_TEXT, YIELD_CHARS
from .session import GuardSession
from .verdict import apply
from .window import ANSWER, REASONING, TOOL

if TYPE_CHECKING:
    from .runtime import GuardRuntime

__all__ = ["FILTERED", "ITEM_TEXTS", "KINDS", "answer_texts", "filtered", "guard_answer", "item_texts", "part_kind"]

FILTERED = {"reason": "content_filter"}
_REWRITING = frozenset({"redact", "mask", "pseudonymize"})
# A lane's kind: where its text is, and whether it is a JSON string (restored pseudonyms are JSON-escaped).
KINDS: dict[str, tuple[Where, bool]] = {
    "text": (ANSWER, False), "refusal": (ANSWER, False), "summary": (REASONING, False),
    "reasoning": (REASONING, False), "tool": (TOOL, True), "custom": (TOOL, False),
    "transcript": (ANSWER, False),  # (a stream's audio transcript, `response.audio.transcript.delta`: in no item)
}
# A part's type: its lane kind and its text's field. A message's `text` part (some OpenAI-compatible servers write
# their answer's text so, for `output_text`) is read as output text: left unread, it reached the client unchecked.
_PARTS = {"output_text": ("text", "text"), "text": ("text", "text"), "refusal": ("refusal", "refusal"),
          "summary_text": ("summary", "text"), "reasoning_text": ("reasoning", "text")}
# An output item's texts: where its parts are (a list field, or None: the item's own field) and what they may be.
ITEM_TEXTS: dict[str, tuple[tuple[str | None, str], ...]] = {
    "message": (("content", "output_text"), ("content", "text"), ("content", "refusal")),
    "reasoning": (("summary", "summary_text"), ("content", "reasoning_text")),
    "function_call": ((None, "arguments"),),
    "custom_tool_call": ((None, "input"),),
}
_ITEM_KINDS = {"function_call": "tool", "custom_tool_call": "custom"}
# What a blocked answer keeps of its output, texts emptied: tool calls go, and so do the hosted tools' items (code,
# searches, MCP calls), whose texts the guards do not read. (A tuple: an item's `type` may be a list, which no set
# lookup takes.)
_KEPT = ("message", "reasoning")

Ref = tuple[dict[str, Any], str, Where, bool]  # (container, key, where, JSON string): container[key] is the text
# One text of an output item: its lane kind, its part's position (0: the item's own field), its container and key.
_Text = tuple[str, int, dict[str, Any], str]


def part_kind(part: dict[str, Any]) -> tuple[str, str] | None:
    """A part's lane kind and its text's field (`_PARTS`); None for a part of another type (or a type that is no
    string: a list would not hash)."""
    kind = part.get("type")
    return _PARTS.get(kind) if isinstance(kind, str) else None


def item_texts(item: dict[str, Any]) -> Iterator[_Text]:
    """Every text of an output item (`ITEM_TEXTS`), found where it is, whatever its value: a list field's parts in
    their order (a message's text parts joined are the text the client reads: `_checked_texts`)."""
    kind = item.get("type")
    texts = ITEM_TEXTS.get(kind if isinstance(kind, str) else "", ())
    for field, what in texts:
        if field is None and what in item:
            yield _ITEM_KINDS[str(kind)], 0, item, what
    for field in dict.fromkeys(field for field, _ in texts if field is not None):
        types = [what for listed, what in texts if listed == field]
        parts = item.get(field)
        for position, part in enumerate(parts if isinstance(parts, list) else ()):
            if isinstance(part, dict) and part.get("type") in types:
                lane, key = _PARTS[part["type"]]
                yield lane, position, part, key


def answer_texts(answer: dict[str, Any]) -> Iterator[Ref]:
    """Every text of a Responses answer, as a place it can be written back to."""
    output = answer.get("output")
    for item in output if isinstance(output, list) else ():
        if isinstance(item, dict):
            for kind, _, container, key in item_texts(item):
                if isinstance(container[key], str):
                    yield container, key, *KINDS[kind]


def _checked_texts(answer: dict[str, Any]) -> Iterator[tuple[dict[str, Any] | Joined, str, Where, bool]]:
    """The texts of a Responses answer as the guards check them: the output text parts of all its messages as one
    text (a `joined.Joined`, written back with `rewrite`), as the client reads them (`output_text`; the SDK's
    `response.output_text` joins every message item's): checked one part, or one item, at a time, a key cut at a
    part's or an item's end was left whole. Where one message item ends and the next begins is a seam (read both
    ways, whole and cut: `Joined.seams`): a client that shows each item on its own reads a value that ends there."""
    parts: list[dict[str, Any]] = []
    starts: list[int] = []  # the parts that begin a message item after the first: its seams
    output = answer.get("output")
    for item in output if isinstance(output, list) else ():
        if isinstance(item, dict):
            first = len(parts)
            for kind, _, container, key in item_texts(item):
                if not isinstance(container[key], str):
                    continue
                if kind == "text":
                    parts.append(container)
                else:
                    yield container, key, *KINDS[kind]
            if 0 < first < len(parts):
                starts.append(first)
    if len(parts) == 1:
        yield parts[0], TEXT, *KINDS["text"]
    elif parts:
        yield Joined(parts, starts), TEXT, *KINDS["text"]


def _output_parts(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The output text parts of an answer's messages, in order: what its `output_text` joins."""
    output = answer.get("output")
    return [container for item in (output if isinstance(output, list) else ()) if isinstance(item, dict)
            for kind, _, container, key in item_texts(item) if kind == "text" and isinstance(container[key], str)]


async def guard_answer(runtime: GuardRuntime, guards: tuple[Guard, ...], session: GuardSession,
                       answer: dict[str, Any]) -> None:
    """Check and rewrite a Responses answer in place; on a block, empty it and mark it incomplete. A failed answer's
    error loses the upstream's words when a guard enforces (`withhold_error`)."""
    if enforcing(guards):
        withhold_error(answer)
    refs = list(_checked_texts(answer))
    parts = _output_parts(answer)
    if not parts and isinstance(answer.get("output_text"), str):  # a server's convenience field, alone
        refs.append((answer, "output_text", ANSWER, False))
    checked = 0  # as the guard stage's (`YIELD_CHARS`): an answer of many short texts checked in one go held the loop
    for container, key, where, json_string in refs:
        text = container[key]
        checked += len(text) + PER_TEXT
        if checked >= YIELD_CHARS:
            checked = 0
            await asyncio.sleep(0)
        enforced: list[Finding] = []
        if guards:
            seams = container.seams if isinstance(container, Joined) else ()
            enforced, shadow = await runtime.detect(guards, text, where, seams)
            session.note_findings(enforced, "enforce", "output")
            session.note_findings(shadow, "shadow", "output")
            if any(f.action == "block" for f in enforced):
                filtered(answer)
                return
            if any(f.action in _REWRITING for f in enforced):  # (logprobs' tokens are the upstream's text)
                for holder in container.parts if isinstance(container, Joined) else (container,):
                    if "logprobs" in holder:
                        holder["logprobs"] = []
        new = apply(text, enforced, session.pseudonyms, partial(session.pseudonyms.restore, json_string=json_string))
        if not isinstance(container, Joined):
            container[key] = new
        elif new != text:  # (the messages' text parts read as one: the edits go back onto the parts)
            container.rewrite(new, enforced, session.pseudonyms)
    if parts and isinstance(answer.get("output_text"), str):
        answer["output_text"] = "".join(part["text"] for part in parts)


def filtered(answer: dict[str, Any]) -> None:
    """A blocked answer: texts emptied, tool calls (and hosted tools' items) removed, status incomplete (content
    filter)."""
    output = answer.get("output")
    if isinstance(output, list):
        answer["output"] = [item for item in output if isinstance(item, dict) and item.get("type") in _KEPT]
    for part, key, _, _ in answer_texts(answer):
        part[key] = ""
        for field in ("annotations", "logprobs"):
            if field in part:
                part[field] = []
    for item in answer.get("output") or ():
        if isinstance(item, dict) and item.get("type") in ("message", "reasoning"):
            item["status"] = "incomplete"
    if "output_text" in answer:
        answer["output_text"] = ""
    answer["status"] = "incomplete"
    answer["incomplete_details"] = dict(FILTERED)


def withhold_error(response: dict[str, Any]) -> None:
    """A Responses answer's (or a `response.failed` event's) `error.message`, the upstream's own words, which may quote
    the answer's text no output guard read, replaced by the gateway's (its `code` kept), as `stream.withhold` does
    for the errors the gateway raises."""
    error = response.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
        error["message"] = f"the response failed ({WITHHELD})"
