"""Output guards on the Responses API (`POST /v1/responses`): its event stream (the complete answer:
`responses_answer.py`).

The texts of an answer are those `responses_answer.item_texts` finds in its output items (message parts, reasoning
summary and content parts, function call arguments, custom tool call input), and a stream's audio transcript
(`response.audio.transcript.delta`, in no item).

A blocked stream ends with a `response.incomplete` event whose output is what
was released so far, `incomplete_details.reason: "content_filter"`, and the request's usage (the upstream's if it
came, else the gateway's estimate: `stream.StreamGuard._blocked`); the edge writes no `[DONE]` after it
(`api/responses_frames.py`).

Streamed, each of those texts (by `output_index`, and the part's `content_index` or `summary_index`) is a lane of
the shared window (`window.py`), but the output text parts of all the message items share one (`_lane_key`: the
client reads them joined, the SDK's `response.output_text`): the `...delta` events carry what may leave (an event
whose text is all held back is dropped). The events
that repeat a whole text (the `...done` events of each text, `response.content_part.done`,
`response.reasoning_summary_part.done`, `response.output_item.done`, and the final response's output) first release
what their lane still holds, as one more delta event, and then carry exactly the text that was released, never the
upstream's (of a repeated text that does not go on from its deltas, none of the rest is sent: `_goes_on`). The
lifecycle events (`response.created`, `.queued`, `.in_progress`) list the output with its texts as released so far.
Sequence numbers are renumbered to stay consecutive when events are dropped or added. `logprobs` are emptied
whenever a guard enforces (their tokens are the upstream's text, and what is held may yet be rewritten).

An event of a type the guard does not know (`_known`) that carries any text (`_carries_text`) is withheld (dropped)
when a guard enforces: passed on, its text reached the client unread (a type the API adds, or a server's own). The
events whose texts no guard reads by design (`_UNREAD`: the hosted tools', a text's annotations, the audio's bytes)
pass as they are, as do events of any type with no text (ids and indexes only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..schemas.events import Chunk, UsageReport, is_content_event
from ..schemas.openai import Usage
from .base import enforcing
from .responses_answer import FILTERED, ITEM_TEXTS, KINDS, guard_answer, item_texts, part_kind, withhold_error
from .window import Lane, LaneKey, Window, lane_index

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext

__all__ = ["ResponsesChunks", "guard_answer"]

_TEXT_DELTA = "response.output_text.delta"
_PART_ADDED = frozenset({"response.content_part.added", "response.reasoning_summary_part.added"})
_PART_DONE = frozenset({"response.content_part.done", "response.reasoning_summary_part.done"})
_ITEM_ADDED = "response.output_item.added"
_ITEM_DONE = "response.output_item.done"
_STARTED = frozenset({"response.created", "response.queued", "response.in_progress"})
_ENDED = frozenset({"response.completed", "response.incomplete", "response.failed"})
# The delta events of a text: lane kind, and the event's field that says which part (None: the item's only text).
_DELTAS: dict[str, tuple[str, str | None]] = {
    _TEXT_DELTA: ("text", "content_index"),
    "response.refusal.delta": ("refusal", "content_index"),
    "response.reasoning_summary_text.delta": ("summary", "summary_index"),
    "response.reasoning_text.delta": ("reasoning", "content_index"),
    "response.function_call_arguments.delta": ("tool", None),
    "response.custom_tool_call_input.delta": ("custom", None),
    "response.audio.transcript.delta": ("transcript", None),
}
_DELTA_OF = {kind: (event, index) for event, (kind, index) in _DELTAS.items()}  # the delta event the gateway adds
# The done events that repeat a whole text: lane kind, the part's field (as for deltas), the text's field.
_DONES: dict[str, tuple[str, str | None, str]] = {
    "response.output_text.done": ("text", "content_index", "text"),
    "response.refusal.done": ("refusal", "content_index", "refusal"),
    "response.reasoning_summary_text.done": ("summary", "summary_index", "text"),
    "response.reasoning_text.done": ("reasoning", "content_index", "text"),
    "response.function_call_arguments.done": ("tool", None, "arguments"),
    "response.custom_tool_call_input.done": ("custom", None, "input"),
    "response.audio.transcript.done": ("transcript", None, "transcript"),  # (OpenAI's repeats no text: none added)
}
_TRANSCRIPT_DONE = "response.audio.transcript.done"
_KNOWN = frozenset({*_DELTAS, *_DONES, *_PART_ADDED, *_PART_DONE, _ITEM_ADDED, _ITEM_DONE, *_STARTED, *_ENDED})
# The events whose texts no guard reads (docs/guards.md, "Not checked on output"), by the start of their type: the
# hosted tools' (code interpreter, searches, image generation, MCP calls, shell calls), a text's annotations
# (citations), the audio itself, a compaction's (no text), and the client's own steering input repeated.
_UNREAD = ("response.code_interpreter_call", "response.file_search_call", "response.web_search_call",
           "response.image_generation_call", "response.mcp_call", "response.mcp_list_tools", "response.shell_call",
           "response.output_text.annotation.added", "response.audio.delta", "response.audio.done",
           "response.compaction.", "response.steer")
# The fields of an event (or of anything in it) that name or place it rather than say anything: no text of the answer.
_NAMING = frozenset({"type", "id", "item_id", "call_id", "status", "object", "role", "obfuscation"})
# -- the stream


class ResponsesChunks:
    """The Responses API's stream events through the window (see the module's docstring)."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.scrub = any(guard.mode == "enforce" for guard in window.guards)
        self.withholds = enforcing(window.guards)  # a failed response's error loses the upstream's words
        self.response: dict[str, Any] = {}  # as `response.created` described it: for `response.incomplete`
        self.items: dict[int, dict[str, Any]] = {}  # output items as added (and done), by output_index
        self.ids: dict[int, str] = {}  # their ids, for the delta events the gateway adds
        # By text (its lane's key, but a message's output text parts share one lane: `_lane_key`): how many upstream
        # characters it fed, and their digest (a `...done` text is fed on only where it goes on from them: `_settle`)
        self.fed: dict[LaneKey, int] = {}
        self.digests: dict[LaneKey, hashlib.blake2b] = {}
        self.sent: dict[LaneKey, str] = {}  # what each text released, rewritten: what summary events repeat
        self.current: dict[LaneKey, LaneKey] = {}  # the text a shared lane is fed by now (`_lane_key`)
        self.seq: int | None = None  # the next sequence number, once the upstream numbers its events

    async def chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data()
        kind = data.get("type")
        if not isinstance(kind, str):  # (a list would not hash: no event of the API's)
            kind = ""
        before: list[dict[str, Any]] = []  # events the gateway adds ahead of this one
        changed = True
        if kind in _DELTAS:
            if not await self._delta(data, _DELTAS[kind]):
                return []
        elif kind in _DONES:
            lane, part, field = _DONES[kind]
            key = (lane_index(data.get("output_index")), lane, lane_index(data.get(part)) if part else 0)
            before = await self._settle(key, data.get(field))
            if field in data or kind != _TRANSCRIPT_DONE:
                data[field] = self.sent.get(key, "")
            self._scrub(data)
        elif kind in _PART_DONE and isinstance(data.get("part"), dict):
            part = data["part"]
            found = part_kind(part)
            if found is not None:
                position = data.get("summary_index" if found[0] == "summary" else "content_index")
                key = (lane_index(data.get("output_index")), found[0], lane_index(position))
                before = await self._settle(key, part.get(found[1]))
                part[found[1]] = self.sent.get(key, "")
                self._scrub(part)
        elif kind == _ITEM_DONE and isinstance(data.get("item"), dict):
            index = lane_index(data.get("output_index"))
            before = await self._item(index, data["item"])
            self.items[index] = data["item"]
        elif kind in _ENDED and isinstance(data.get("response"), dict):
            before = await self._ended(data["response"])
        elif self.withholds and not _known(kind) and _carries_text(data):  # (see the module's docstring)
            return []
        else:
            changed = self._opening(data, kind)
        numbered = self._number(data)
        return [*(_rebuilt(event) for event in before), _rebuilt(data) if changed or numbered else chunk]

    async def finish(self) -> list[Chunk]:
        """The upstream sent `[DONE]` without ending the response: release what every lane holds."""
        out: list[dict[str, Any]] = []
        for key in list(self.window.lanes):
            out += await self._settle(self.current.get(key, key), None)
        return [_rebuilt(event) for event in out]

    def shows_usage(self, ctx: RequestContext) -> bool:
        """Always: the response a blocked stream ends with has its usage, as a complete blocked answer has."""
        return True

    def usage_report(self, usage: Usage) -> UsageReport:
        return UsageReport(usage)  # (the edge writes none: the usage is in `response.incomplete`)

    def blocked(self, usage: Usage | None = None) -> Chunk:
        """`response.incomplete`, as `response.created` described the response, with the output released so far
        and `usage` (else the one `response.created` had: null)."""
        response = {**self.response, "object": "response", "status": "incomplete",
                    "incomplete_details": dict(FILTERED), "output": self._released()}
        response.pop("output_text", None)
        if usage is not None:
            response["usage"] = _usage_shape(usage)
        event: dict[str, Any] = {"type": "response.incomplete", "response": response}
        self._number(event)
        return _rebuilt(event)

    # -- events

    async def _delta(self, data: dict[str, Any], found: tuple[str, str | None]) -> bool:
        """A text's delta: the part of it (and of what was held) that may leave now, if any."""
        index = lane_index(data.get("output_index"))
        kind, part = found
        key = (index, kind, lane_index(data.get(part)) if part else 0)
        if isinstance(data.get("item_id"), str):
            self.ids.setdefault(index, data["item_id"])
        delta = data.get("delta")
        lane = self._lane(key)
        if isinstance(delta, str) and delta:
            self._feed(key, lane, delta)
        released = await self.window.release(lane, False, KINDS[kind][0])
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
            return self._lifecycle(data["response"])
        elif kind == _ITEM_ADDED and isinstance(data.get("item"), dict):
            item = data["item"]
            index = lane_index(data.get("output_index"))
            self.items[index] = {**item, **{field: list(item[field]) for field in ("content", "summary")
                                            if isinstance(item.get(field), list)}}
            if isinstance(item.get("id"), str):
                self.ids[index] = item["id"]
            texts = [(container, key) for _, _, container, key in item_texts(item) if container[key]]
            for container, key in texts:
                container[key] = ""
            return bool(texts)
        elif kind in _PART_ADDED and isinstance(data.get("part"), dict):
            part = data["part"]
            item = self.items.get(lane_index(data.get("output_index")))
            if item is not None:
                field = "summary" if kind == "response.reasoning_summary_part.added" else "content"
                if not isinstance(item.get(field), list):  # (`"content": null` in the item as added)
                    item[field] = []
                item[field].append(part)
            found = part_kind(part)
            if found is not None and part.get(found[1]):
                data["part"] = {**part, found[1]: ""}
                return True
        return False

    async def _item(self, index: int, item: dict[str, Any], announced: bool = True) -> list[dict[str, Any]]:
        """An output item that repeats its texts: released in full first (as delta events, for an item the stream
        `announced`), then written as released."""
        before: list[dict[str, Any]] = []
        for kind, position, container, key in item_texts(item):
            lane_key = (index, kind, position)
            before += await self._settle(lane_key, container[key], announced)
            container[key] = self.sent.get(lane_key, "")
            self._scrub(container)
        return before

    async def _ended(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        """The final response: its output items as released; lanes it does not list released too. Items are
        matched to their lanes by id: their places may differ from the stream's (an item left out, or listed in
        another order), and by place a text would be checked in another item's lane and sent twice. An item no
        `response.output_item.added` announced gets no delta events (a client's stream reader fails on a delta for
        an item it never saw): its texts are checked and written, as released, in the final response alone."""
        before: list[dict[str, Any]] = []
        if self.withholds:
            withhold_error(response)
        output = response.get("output")
        for index, item in self._placed(output if isinstance(output, list) else []):
            before += await self._item(index, item, index in self.items)
        for key in list(self.window.lanes):
            before += await self._settle(self.current.get(key, key), None)
        if isinstance(response.get("output_text"), str):
            response["output_text"] = self._output_text()
        return before

    def _lifecycle(self, response: dict[str, Any]) -> bool:
        """`response.created`, `.queued` or `.in_progress`: the output it lists (an upstream may list the output so
        far) with each text as released so far (an item the stream has not shown: emptied), and `output_text` as
        the final response's would be. Whether it changed. (Left as the upstream's, the text reached the client
        unread; emptied rather than left out, a client's reader that takes the listed items keeps them.)"""
        changed = False
        output = response.get("output")
        if isinstance(output, list) and output:
            streamed = {item_id: index for index, item_id in self.ids.items()}
            for item in output:
                if not isinstance(item, dict):
                    continue
                item_id = item.get("id")
                index = streamed.get(item_id) if isinstance(item_id, str) else None
                for kind, position, container, key in item_texts(item):
                    text = self.sent.get((index, kind, position), "") if index is not None else ""
                    if container[key] and container[key] != text:
                        container[key] = text
                        if "logprobs" in container:
                            container["logprobs"] = []
                        changed = True
        if response.get("output_text") and isinstance(response["output_text"], str):
            response["output_text"] = self._output_text()
            changed = True
        return changed

    def _output_text(self) -> str:
        """The final response's `output_text`: the output texts released, in order."""
        return "".join(self.sent[k] for k in sorted(self.sent) if k[1] == "text")

    def _placed(self, output: list[Any]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each final item and the `output_index` it streamed at, by its id (an item without one: its place; an
        item the stream never showed: its place, or a new index if a streamed item has that one)."""
        streamed = {item_id: index for index, item_id in self.ids.items()}
        for place, item in enumerate(output):
            item_id = item.get("id") if isinstance(item, dict) else None
            if isinstance(item_id, str) and item_id not in streamed:
                taken = {*self.items, *self.ids}
                new = streamed[item_id] = place if place not in taken else max(taken) + 1
                self.ids[new] = item_id
            if isinstance(item, dict):
                yield (streamed[item_id] if isinstance(item_id, str) else place), item

    # -- lanes

    def _lane(self, key: LaneKey) -> Lane:
        return self.window.lane(_lane_key(key), KINDS[key[1]][1])

    def _feed(self, key: LaneKey, lane: Lane, text: str) -> None:
        """Feed the text `key`'s lane (the text its lane is fed by from now on), and note what it was fed."""
        self.window.feed(lane, text)
        self.current[_lane_key(key)] = key
        self.fed[key] = self.fed.get(key, 0) + len(text)
        digest = self.digests.get(key)
        if digest is None:
            digest = self.digests[key] = hashlib.blake2b(digest_size=16)
        digest.update(text.encode("utf-8", "surrogatepass"))

    def _goes_on(self, key: LaneKey, full: str, fed: int) -> bool:
        """Whether `full` (a `...done` event's whole text, longer than what its deltas brought) starts with what they
        brought, and its lane is still fed by this text: only then is its rest the text's rest. A text that does
        not (another string, or a part done after the next one began) would have its rest checked as if it went on
        from the deltas (a key after 18 characters of other text left cut, unrecognised): the rest is not sent, and
        the events that repeat the text carry what was released."""
        if not fed:  # (a text no delta brought: it goes on from what its lane holds, as a delta of it would)
            return True
        if self.current.get(_lane_key(key), key) != key:
            return False
        digest = hashlib.blake2b(full[:fed].encode("utf-8", "surrogatepass"), digest_size=16)
        return digest.digest() == self.digests[key].digest()

    async def _settle(self, key: LaneKey, full: object, announced: bool = True) -> list[dict[str, Any]]:
        """The text is complete (`full`: the upstream's whole text, if the event repeats it): what its lane
        still holds, and any of `full` no delta brought (`_goes_on`), released as one more delta event (none for an
        item the stream never `announced`: what is released is only in `sent`). A text whose shared lane has gone
        on to the next part releases nothing more: what the lane holds leaves in that part."""
        lane = self._lane(key)
        fed = self.fed.get(key, 0)
        if isinstance(full, str) and len(full) > fed and self._goes_on(key, full, fed):
            self._feed(key, lane, full[fed:])
        if self.current.get(_lane_key(key), key) != key:
            return []
        index, kind, position = key
        released = await self.window.release(lane, True, KINDS[kind][0])
        if not released:
            return []
        self.sent[key] = self.sent.get(key, "") + released
        if not announced:
            return []
        event_type, part = _DELTA_OF[kind]
        event: dict[str, Any] = {"type": event_type}
        if kind != "transcript":  # (the transcript's events name no item)
            event.update(item_id=self.ids.get(index, ""), output_index=index)
        if part is not None:
            event[part] = position
        event["delta"] = released
        if kind == "text":
            event["logprobs"] = []
        self._number(event)
        return [event]

    def _released(self) -> list[dict[str, Any]]:
        """The output items so far, with what was released of their texts: a blocked stream's output."""
        output = []
        for index in sorted(self.items):
            kind = self.items[index].get("type")
            if not isinstance(kind, str) or kind not in ITEM_TEXTS:  # a hosted tool's item: its texts are not read
                continue
            item = _copied(self.items[index])
            for kind, position, container, key in item_texts(item):
                container[key] = self.sent.get((index, kind, position), "")
                if kind == "text":
                    container["annotations"] = []
                if "logprobs" in container:
                    container["logprobs"] = []
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


def _lane_key(key: LaneKey) -> LaneKey:
    """The window's lane for a text: the output text parts of all the message items share one (the parts joined,
    across items too, are the text the client reads, the SDK's `response.output_text`; a key cut at a part's or an
    item's end is seen whole), each other text has its own. A part's text is released whole at its `...done` (the
    part is over), so a finding that reaches back from the next part, or the next item, into it blocks the stream
    (`Lane.sealed`)."""
    return (0, "text", 0) if key[1] == "text" else key


def _known(kind: str) -> bool:
    """Whether the guard knows an event of this type: reads its texts, or knows that no guard reads them (`_UNREAD`)."""
    return kind in _KNOWN or kind.startswith(_UNREAD)


def _carries_text(event: dict[str, Any]) -> bool:
    """Whether an event holds a non-empty string anywhere but in the fields that name or place it (`_NAMING`).
    Walked without recursion: an upstream's event may nest deeper than the interpreter's stack."""
    stack: list[Any] = [event]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if value:
                return True
        elif isinstance(value, dict):
            stack.extend(inner for name, inner in value.items() if name not in _NAMING)
        elif isinstance(value, list):
            stack.extend(value)
    return False


def _rebuilt(event: dict[str, Any]) -> Chunk:
    """An event the guard rewrote or added, as a chunk that counts as content only if it is a `*.delta` event, as
    `ResponsesEvents.feed` marks the upstream's (`Chunk.content`): a budget's cut, after the guard, looks for the
    delta that crossed its step among the content chunks, and a rewritten lifecycle event counted there moved it."""
    chunk = Chunk.of(event)
    chunk.content = is_content_event(event.get("type"))
    return chunk


def _usage_shape(usage: Usage) -> dict[str, Any]:
    """The gateway's `Usage` in the Responses API's shape (its details too: the SDK's `ResponseUsage` has them)."""
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}, "total_tokens": usage.total_tokens}


def _copied(item: dict[str, Any]) -> dict[str, Any]:
    """An output item whose part lists and parts are its own (the item as added is not changed)."""
    return {**item, **{field: [dict(part) if isinstance(part, dict) else part for part in item[field]]
                       for field in ("content", "summary") if isinstance(item.get(field), list)}}
