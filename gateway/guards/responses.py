"""Output guards on the Responses API (`POST /v1/responses`): the complete answer and its event stream.

The texts of an answer are the `text` of each `output_text` part of its
`message` items and the `arguments` (a JSON string: restored pseudonyms are
JSON-escaped) of its `function_call` items. They are checked and rewritten like
a chat answer's content and tool call arguments.

A blocked answer keeps the Responses API's own way of saying that a content
filter stopped it: `status: "incomplete"` with `incomplete_details.reason:
"content_filter"`. Not streamed, its text parts are emptied and its function
calls removed. Streamed, the stream ends with a `response.incomplete` event
whose output is what was released so far, then `[DONE]`.

Streamed, each `output_text` part (by `output_index`, `content_index`) and each
function call's arguments is a lane of the shared window (`window.py`): the
`...delta` events carry what may leave (an event whose text is all held back is
dropped). The events that repeat a whole text (`response.output_text.done`,
`response.content_part.done`, `response.output_item.done`,
`response.function_call_arguments.done`, and the final response's output)
first release what their lane still holds, as one more delta event, and then
carry exactly the text that was released, never the upstream's. Sequence
numbers are renumbered to stay consecutive when events are dropped or added.
`logprobs` are emptied (their tokens are the upstream's text): in a stream
whenever a guard enforces (what is held may yet be rewritten), in an answer
where its text was rewritten.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from ..schemas.events import Chunk
from .base import Finding, Guard, Where
from .session import GuardSession
from .verdict import apply
from .window import ANSWER, TOOL, Lane, LaneKey, Window

if TYPE_CHECKING:
    from .runtime import GuardRuntime

__all__ = ["ResponsesChunks", "guard_answer"]

_TEXT_DELTA = "response.output_text.delta"
_TEXT_DONE = "response.output_text.done"
_ARGS_DELTA = "response.function_call_arguments.delta"
_ARGS_DONE = "response.function_call_arguments.done"
_PART_ADDED = "response.content_part.added"
_PART_DONE = "response.content_part.done"
_ITEM_ADDED = "response.output_item.added"
_ITEM_DONE = "response.output_item.done"
_STARTED = frozenset({"response.created", "response.queued", "response.in_progress"})
_ENDED = frozenset({"response.completed", "response.incomplete", "response.failed"})
_FILTERED = {"reason": "content_filter"}
_REWRITING = frozenset({"redact", "mask", "pseudonymize"})

Ref = tuple[dict[str, Any], str, Where, bool]  # (container, key, where, JSON string): container[key] is the text


# -- the complete answer


def answer_texts(answer: dict[str, Any]) -> Iterator[Ref]:
    """Every text of a Responses answer, as a place it can be written back to."""
    output = answer.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            content = item.get("content")
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    yield part, "text", ANSWER, False
        elif item.get("type") == "function_call" and isinstance(item.get("arguments"), str):
            yield item, "arguments", TOOL, True


async def guard_answer(runtime: GuardRuntime, guards: tuple[Guard, ...], session: GuardSession,
                       answer: dict[str, Any]) -> None:
    """Check and rewrite a Responses answer in place; on a block, empty it and mark it incomplete."""
    refs = list(answer_texts(answer))
    parts = [ref for ref in refs if ref[1] == "text"]
    if not parts and isinstance(answer.get("output_text"), str):  # a server's convenience field, alone
        refs.append((answer, "output_text", ANSWER, False))
    for container, key, where, json_string in refs:
        text = container[key]
        enforced: list[Finding] = []
        if guards:
            enforced, shadow = await runtime.detect(guards, text, where)
            session.note_findings(enforced, "enforce", "output")
            session.note_findings(shadow, "shadow", "output")
            if any(f.action == "block" for f in enforced):
                filtered(answer)
                return
            if "logprobs" in container and any(f.action in _REWRITING for f in enforced):
                container["logprobs"] = []  # their tokens are the upstream's text
        container[key] = apply(text, enforced, session.pseudonyms,
                               partial(session.pseudonyms.restore, json_string=json_string))
    if parts and isinstance(answer.get("output_text"), str):
        answer["output_text"] = "".join(part["text"] for part, _, _, _ in parts)


def filtered(answer: dict[str, Any]) -> None:
    """A blocked answer: text parts emptied, function calls removed, status incomplete (content filter)."""
    output = answer.get("output")
    if isinstance(output, list):
        answer["output"] = [item for item in output
                            if not (isinstance(item, dict) and item.get("type") == "function_call")]
    for part, _, _, _ in answer_texts(answer):
        part["text"] = ""
        for key in ("annotations", "logprobs"):
            if key in part:
                part[key] = []
    for item in answer.get("output") or ():
        if isinstance(item, dict) and item.get("type") == "message":
            item["status"] = "incomplete"
    if "output_text" in answer:
        answer["output_text"] = ""
    answer["status"] = "incomplete"
    answer["incomplete_details"] = dict(_FILTERED)


# -- the stream


class ResponsesChunks:
    """The Responses API's stream events through the window (see the module's docstring)."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.scrub = any(guard.mode == "enforce" for guard in window.guards)
        self.response: dict[str, Any] = {}  # as `response.created` described it: for `response.incomplete`
        self.items: dict[int, dict[str, Any]] = {}  # output items as added (and done), by output_index
        self.ids: dict[int, str] = {}  # their ids, for the delta events the gateway adds
        self.fed: dict[LaneKey, int] = {}  # upstream characters fed into each lane
        self.sent: dict[LaneKey, str] = {}  # what each lane released, rewritten: what summary events repeat
        self.seq: int | None = None  # the next sequence number, once the upstream numbers its events

    async def chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data()
        kind = data.get("type")
        before: list[dict[str, Any]] = []  # events the gateway adds ahead of this one
        changed = True
        if kind == _TEXT_DELTA or kind == _ARGS_DELTA:
            if not await self._delta(data, kind):
                return []
        elif kind == _TEXT_DONE:
            key = (_int(data.get("output_index")), "text", _int(data.get("content_index")))
            before = await self._settle(key, data.get("text"))
            data["text"] = self.sent.get(key, "")
            self._scrub(data)
        elif kind == _ARGS_DONE:
            key = (_int(data.get("output_index")), "tool", 0)
            before = await self._settle(key, data.get("arguments"))
            data["arguments"] = self.sent.get(key, "")
        elif kind == _PART_DONE and isinstance(data.get("part"), dict):
            part = data["part"]
            if part.get("type") == "output_text":
                key = (_int(data.get("output_index")), "text", _int(data.get("content_index")))
                before = await self._settle(key, part.get("text"))
                part["text"] = self.sent.get(key, "")
                self._scrub(part)
        elif kind == _ITEM_DONE and isinstance(data.get("item"), dict):
            index = _int(data.get("output_index"))
            before = await self._item(index, data["item"])
            self.items[index] = data["item"]
        elif kind in _ENDED and isinstance(data.get("response"), dict):
            before = await self._ended(data["response"])
        else:
            changed = self._opening(data, kind)
        numbered = self._number(data)
        return [*(Chunk.of(event) for event in before), Chunk.of(data) if changed or numbered else chunk]

    async def finish(self) -> list[Chunk]:
        """The upstream sent `[DONE]` without ending the response: release what every lane holds."""
        out: list[dict[str, Any]] = []
        for key in list(self.window.lanes):
            out += await self._settle(key, None)
        return [Chunk.of(event) for event in out]

    def blocked(self) -> Chunk:
        response = {**self.response, "object": "response", "status": "incomplete",
                    "incomplete_details": dict(_FILTERED), "output": self._released()}
        response.pop("output_text", None)
        event: dict[str, Any] = {"type": "response.incomplete", "response": response}
        self._number(event)
        return Chunk.of(event)

    # -- events

    async def _delta(self, data: dict[str, Any], kind: str) -> bool:
        """A text or arguments delta: the part of it (and of what was held) that may leave now, if any."""
        index = _int(data.get("output_index"))
        text = kind == _TEXT_DELTA
        key = (index, "text", _int(data.get("content_index"))) if text else (index, "tool", 0)
        if isinstance(data.get("item_id"), str):
            self.ids.setdefault(index, data["item_id"])
        delta = data.get("delta")
        lane = self._lane(key)
        if isinstance(delta, str) and delta:
            self.window.feed(lane, delta)
            self.fed[key] = self.fed.get(key, 0) + len(delta)
        released = await self.window.release(lane, False, ANSWER if text else TOOL)
        if not released:
            return False
        self.sent[key] = self.sent.get(key, "") + released
        data["delta"] = released
        self._scrub(data)
        return True

    def _opening(self, data: dict[str, Any], kind: object) -> bool:
        """Events before the text: remembered for a block's `response.incomplete`; any text in them is
        emptied (it is released by the deltas the done events add). Whether the event changed."""
        if kind in _STARTED and isinstance(data.get("response"), dict):
            self.response = data["response"]
        elif kind == _ITEM_ADDED and isinstance(data.get("item"), dict):
            item = data["item"]
            index = _int(data.get("output_index"))
            self.items[index] = {**item, "content": list(item.get("content") or [])} if item.get("type") == "message" \
                else dict(item)
            if isinstance(item.get("id"), str):
                self.ids[index] = item["id"]
            if item.get("arguments"):
                item["arguments"] = ""
                return True
            parts = [p for p in item.get("content") or () if isinstance(p, dict) and p.get("text")]
            for part in parts:
                part["text"] = ""
            return bool(parts)
        elif kind == _PART_ADDED and isinstance(data.get("part"), dict):
            item = self.items.get(_int(data.get("output_index")))
            if item is not None:
                item.setdefault("content", []).append(data["part"])
            if data["part"].get("text"):
                data["part"] = {**data["part"], "text": ""}
                return True
        return False

    async def _item(self, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        """An output item that repeats its texts: released in full first, then written as released."""
        before: list[dict[str, Any]] = []
        if item.get("type") == "message" and isinstance(item.get("content"), list):
            for position, part in enumerate(item["content"]):
                if isinstance(part, dict) and part.get("type") == "output_text":
                    key = (index, "text", position)
                    before += await self._settle(key, part.get("text"))
                    part["text"] = self.sent.get(key, "")
                    self._scrub(part)
        elif item.get("type") == "function_call":
            key = (index, "tool", 0)
            before += await self._settle(key, item.get("arguments"))
            item["arguments"] = self.sent.get(key, "")
        return before

    async def _ended(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        """The final response: its output items as released; lanes it does not list released too."""
        before: list[dict[str, Any]] = []
        output = response.get("output")
        for index, item in enumerate(output if isinstance(output, list) else ()):
            if isinstance(item, dict):
                before += await self._item(index, item)
        for key in list(self.window.lanes):
            before += await self._settle(key, None)
        if isinstance(response.get("output_text"), str):
            response["output_text"] = "".join(self.sent[k] for k in sorted(self.sent) if k[1] == "text")
        return before

    # -- lanes

    def _lane(self, key: LaneKey) -> Lane:
        return self.window.lane(key, key[1] == "tool")

    async def _settle(self, key: LaneKey, full: object) -> list[dict[str, Any]]:
        """The lane's text is complete (`full`: the upstream's whole text, if the event repeats it): what it
        still holds, and any of `full` no delta brought, released as one more delta event."""
        lane = self._lane(key)
        fed = self.fed.get(key, 0)
        if isinstance(full, str) and len(full) > fed:
            self.window.feed(lane, full[fed:])
            self.fed[key] = len(full)
        released = await self.window.release(lane, True, TOOL if lane.json else ANSWER)
        if not released:
            return []
        self.sent[key] = self.sent.get(key, "") + released
        index, kind, position = key
        item_id = self.ids.get(index, "")
        event: dict[str, Any]
        if kind == "text":
            event = {"type": _TEXT_DELTA, "item_id": item_id, "output_index": index, "content_index": position,
                     "delta": released, "logprobs": []}
        else:
            event = {"type": _ARGS_DELTA, "item_id": item_id, "output_index": index, "delta": released}
        self._number(event)
        return [event]

    def _released(self) -> list[dict[str, Any]]:
        """The output items so far, with what was released of their texts: a blocked stream's output."""
        output = []
        for index in sorted(self.items):
            item = dict(self.items[index])
            if item.get("type") == "function_call":
                item["arguments"] = self.sent.get((index, "tool", 0), "")
            elif item.get("type") == "message":
                item["content"] = [
                    {**part, "text": self.sent.get((index, "text", position), ""), "annotations": [],
                     **({"logprobs": []} if "logprobs" in part else {})}
                    if isinstance(part, dict) and part.get("type") == "output_text" else part
                    for position, part in enumerate(item.get("content") or ())]
            if item.get("status") != "completed":
                item["status"] = "incomplete"
            output.append(item)
        return output

    def _scrub(self, holder: dict[str, Any]) -> None:
        if self.scrub and "logprobs" in holder:
            holder["logprobs"] = []

    def _number(self, event: dict[str, Any]) -> bool:
        """Give the event the next sequence number; whether that changed it."""
        number = event.get("sequence_number")
        if self.seq is None:
            if not isinstance(number, int):
                return False
            self.seq = number
        given = self.seq
        event["sequence_number"] = given
        self.seq += 1
        return number != given


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0
