"""Output guards on a stream: hold back a bounded window of text, release it once no finding can
still start inside it.

Per choice, the content (and each tool call's arguments) is a lane of text. New
text waits in the lane; once `window_chars + step_chars` are waiting, the lane
is scanned (with the last released `window_chars` as left context) and all but
the last `window_chars` are released, cut at a whitespace, never inside a
finding, an open private key block, or a placeholder that may still be
completing. Any entity shorter than the window is therefore whole in some scan
before its first character leaves, whatever the chunking. The released text is
rewritten (redact, mask, pseudonymize) and its placeholders restored. On a
block, the stream ends at once with `finish_reason: "content_filter"`: held text
is dropped, so nothing of the finding is sent. Chunks keep OpenAI's shape (ids,
roles, tool call deltas, usage, finish_reason); a chunk left with nothing to say
is dropped.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any

from ..policy.guard_schema import StreamScanSpec
from ..schemas.events import DONE, Chunk, StreamDone, StreamEvent
from .base import Finding, Guard, Where
from .pseudonyms import Pseudonyms
from .session import GuardSession
from .verdict import apply

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext
    from ..pipeline.streams import StreamEnd
    from .runtime import GuardRuntime

__all__ = ["StreamGuard"]

_ANSWER = Where("output", "answer")
_TOOL = Where("output", "tool_arguments")


class _Blocked(Exception):
    pass


class _Lane:
    __slots__ = ("context", "json", "pending", "scanned")

    def __init__(self, json: bool) -> None:
        self.pending = ""
        self.context = ""  # the last released upstream text: left context for the next scan
        self.json = json  # tool arguments: restored originals are JSON-escaped
        self.scanned = 0  # len(pending) at the last scan


class StreamGuard:
    reads_events = True

    def __init__(self, runtime: GuardRuntime, guards: tuple[Guard, ...], session: GuardSession,
                 spec: StreamScanSpec, chat: bool, model: str) -> None:
        self.runtime = runtime
        self.guards = guards
        self.session = session
        self.spec = spec
        self.key = "content" if chat else "text"
        self.chat = chat
        self.model = model
        self.lanes: dict[tuple[int, str, int], _Lane] = {}
        self.meta: dict[str, Any] = {}
        self.first_in: float | None = None
        self.first_out = False
        self.blocked = False

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        try:
            for event in events:
                if isinstance(event, Chunk):
                    chunk = await self._chunk(event)
                    if chunk is not None:
                        out.append(chunk)
                elif isinstance(event, StreamDone):
                    rest = await self._flush_all()
                    if rest is not None:
                        out.append(rest)
                    out.append(event)
                else:
                    out.append(event)
        except _Blocked:
            self.blocked = True
            return [self._filtered(), DONE]
        return out

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        return None

    # -- chunks

    async def _chunk(self, chunk: Chunk) -> Chunk | None:
        data = chunk.data()
        choices = data.get("choices")
        if not choices:
            return chunk
        if not self.meta:
            self.meta = {k: data[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in data}
        keep = False
        for choice in choices:
            index = choice.get("index", 0)
            holder = choice.get("delta") if self.chat else choice
            if not isinstance(holder, dict):
                keep = True
                continue
            final = choice.get("finish_reason") is not None
            text = holder.get(self.key)
            lane = self._lane(index, "text", 0, False)
            if isinstance(text, str) and text:
                lane.pending += text
                self.first_in = self.first_in or time.perf_counter()
            if lane.pending or (isinstance(text, str) and text):
                holder[self.key] = await self._release(lane, final, _ANSWER)
            calls = holder.get("tool_calls") if self.chat else None
            for call in calls if isinstance(calls, list) else []:
                function = call.get("function") if isinstance(call, dict) else None
                args = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(function, dict) and isinstance(args, str) and args:
                    tool = self._lane(index, "tool", call.get("index", 0), True)
                    tool.pending += args
                    function["arguments"] = await self._release(tool, False, _TOOL)
            if final:
                await self._flush_tools(index, holder)
            keep = keep or final or bool(holder.get(self.key)) or any(
                v not in (None, "", []) for k, v in holder.items() if k not in (self.key, "logprobs", "finish_reason",
                                                                               "index", "text"))
        return Chunk.of(data) if keep else None

    def _lane(self, index: int, kind: str, sub: int, json: bool) -> _Lane:
        key = (index, kind, sub)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = _Lane(json)
        return lane

    async def _flush_tools(self, index: int, holder: dict[str, Any]) -> None:
        for (i, kind, sub), lane in self.lanes.items():
            if i != index or kind != "tool" or not lane.pending:
                continue
            rest = await self._release(lane, True, _TOOL)
            calls = holder.setdefault("tool_calls", [])
            entry = next((c for c in calls if isinstance(c, dict) and c.get("index") == sub), None)
            if entry is None:
                calls.append({"index": sub, "function": {"arguments": rest}})
            else:
                function = entry.setdefault("function", {})
                function["arguments"] = (function.get("arguments") or "") + rest

    async def _flush_all(self) -> Chunk | None:
        """The upstream ended without a finish_reason for some lanes: release what they hold."""
        choices: list[dict[str, Any]] = []
        for (index, kind, _), lane in list(self.lanes.items()):
            if kind == "text" and lane.pending:
                text = await self._release(lane, True, _ANSWER)
                delta: dict[str, Any] = {self.key: text}
                if self.chat:
                    await self._flush_tools(index, delta)
                choices.append({"index": index, "delta": delta} if self.chat else {"index": index, **delta})
        return Chunk.of({**self.meta, "choices": choices}) if choices else None

    def _filtered(self) -> Chunk:
        indexes = sorted({index for index, _, _ in self.lanes}) or [0]
        choices: list[dict[str, Any]]
        if self.chat:
            choices = [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"} for i in indexes]
        else:
            choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": "content_filter"} for i in indexes]
        return Chunk.of({**self.meta, "choices": choices})

    # -- the window

    async def _release(self, lane: _Lane, final: bool, where: Where) -> str:
        text = lane.pending
        if not text:
            return ""
        pseudonyms = self.session.pseudonyms
        if not self.guards:  # nothing to scan: only placeholders to restore
            cut = len(text) if final else len(text) - Pseudonyms.open_tail(text)
            return self._emit(lane, text, cut, [], [], where)
        spec = self.spec
        waiting = len(text) < spec.window_chars + spec.step_chars or len(text) - lane.scanned < spec.step_chars
        if not final and waiting:
            return ""
        lane.scanned = len(text)
        offset = len(lane.context)
        full = lane.context + text
        enforced, shadow = await self.runtime.detect(self.guards, full, where)
        enforced = _shift(enforced, offset)
        shadow = _shift(shadow, offset)
        if any(f.action == "block" for f in enforced):
            self.session.note_findings([f for f in enforced if f.action == "block"], "enforce", where.place)
            raise _Blocked
        cut = len(text) if final else self._cut(text, full, offset, enforced + shadow)
        if pseudonyms and cut < len(text):
            cut -= Pseudonyms.open_tail(text[:cut])
        return self._emit(lane, text, cut, enforced, shadow, where)

    def _cut(self, text: str, full: str, offset: int, findings: list[Finding]) -> int:
        cut = len(text) - self.spec.window_chars
        for guard in self.guards:
            opened = guard.hold_from(full)
            if opened is not None:
                cut = min(cut, opened - offset)
        for _ in range(3):  # moving the cut back may land inside another finding: settle
            for f in findings:
                if f.start < cut < f.end:
                    cut = f.start
            if 0 < cut < len(text) and not (text[cut].isspace() or text[cut - 1].isspace()):
                space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
                if space >= 0:
                    cut = space + 1
                elif len(text) <= self.spec.max_hold_chars:
                    cut = 0
        return max(0, cut)

    def _emit(self, lane: _Lane, text: str, cut: int, enforced: list[Finding], shadow: list[Finding],
              where: Where) -> str:
        if cut <= 0:
            return ""
        released = text[:cut]
        applied = [f for f in enforced if f.start < cut]
        self.session.note_findings(applied, "enforce", where.place)
        self.session.note_findings([f for f in shadow if f.start < cut], "shadow", where.place)
        pseudonyms = self.session.pseudonyms
        out = apply(released, applied, pseudonyms, partial(pseudonyms.restore, json_string=lane.json))
        lane.context = (lane.context + released)[-self.spec.window_chars:]
        lane.pending = text[cut:]
        lane.scanned = max(0, lane.scanned - cut)
        if out and not self.first_out and self.first_in is not None:
            self.first_out = True
            self.runtime.metrics.guard_stream_delay.labels(self.model).observe(time.perf_counter() - self.first_in)
        return out


def _shift(findings: list[Finding], offset: int) -> list[Finding]:
    """Findings in the scanned text, as spans of the held text (those wholly in the context dropped)."""
    out = []
    for f in findings:
        if f.type == "GUARD_FAILURE":
            out.append(f)
        elif f.end > offset:
            out.append(Finding(f.guard, f.type, max(0, f.start - offset), f.end - offset, f.score, f.recognizer,
                               f.action, f.keep))
    return out
