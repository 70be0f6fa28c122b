"""The payload log: prompts and answers, PII redacted, to a rotating file or a Redis stream.

Off unless `telemetry.payload_log.enabled`, and configured apart from the access
log, which never holds text. A request only hands its texts to a queue bounded by entries (`queue`) and by the
characters they hold (`QUEUE_CHARS`; full: the entry is dropped and counted in `gateway_telemetry_dropped_total`,
`queue_full`): an entry holds at most `read_chars` characters of prompts in all (the newest texts, counted from the
last one back and kept in order; the one across that line cut, those before it left out, and counted in the entry's
`input_dropped`, so that a reader tells a cut history from a whole one) and as many of answer,
so that a sink that stalls, or redaction slower than big prompts arrive, holds a bounded memory. One background
task redacts them with the log's own guards (`redact`, by default a `pii` patterns guard and a `secrets` guard;
each reads every text, whatever its `places`: every finding is replaced, whatever its action says;
a text a guard failed to check, timed out or refused by a full queue, is withheld whole, whatever its `fail`
says, and counted, `redact_failed`; these guards are not a request's: they count nothing in the request guard
series, `gateway_guard_*`) and writes them: to a file rotated at `max_bytes` (writes in a thread, never on the
event loop; the workers of `--workers N` share the file and its rotation: `payload_file.py`) or to a Redis stream
capped at `max_entries` (`XADD MAXLEN ~`), which is its retention, through a client built as the store's
(`open_client`: every URL form the store takes, its timeouts; each write bounded by `op_timeout_s`).
An entry whose write fails (a full disk, a Redis down) is dropped and counted (`sink_failed`), and the next one
is tried; the failure is logged once until a write succeeds again, never with the entry's text.
At close, what is still queued is written within `FINAL_DRAIN_S` in all; the rest is dropped and counted,
so a stalled sink never holds a shutdown or a reload.

A text is redacted before it is cut to `max_text_chars`: a cut first would split a finding (a card number cut
to 14 digits fails its Luhn check) and leave its pieces in clear. The work stays bounded all the same: of a
text longer than `2 x max_text_chars + _UNSURE_TAIL` characters only that much is read and redacted, and only
what comes from its first `2 x max_text_chars` characters is written (a finding across that line is left out
whole): the last `_UNSURE_TAIL` characters read are never written, since a finding that the read's end splits
and that no guard recognises cut lies there. Only redactions that shorten the text by more than
`max_text_chars` make that line matter (the entry may then be shorter than `max_text_chars`), and only a finding
longer than the tail, split by the read's end and not recognised cut, could show a piece (a cut private key
block is recognised, as is a cut API key of 20 characters or more after its prefix).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from ..guards.base import Finding, Where
from ..guards.runtime import GuardRuntime
from ..guards.texts import input_texts
from ..guards.verdict import apply
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..pipeline.streams import StreamEnd
from ..policy.guard_schema import GuardSpec, GuardsSpec, PiiGuardSpec, SecretsGuardSpec
from ..policy.telemetry_schema import PayloadLogSpec
from ..schemas.endpoints import Endpoint
from ..schemas.events import Chunk, StreamEvent
from ..store.base import StoreConfig
from .access import CLIENT_CLOSED
from .final_drain import finish_within
from .metrics import Metrics
from .payload_file import PrivateRotatingFile

if TYPE_CHECKING:
    from ..store.redis_client import RedisHandle

_TEXT_DELTA = "response.output_text.delta"  # a Responses stream's event that carries answer text

__all__ = ["PayloadLog", "PayloadWriter"]

_FAILED = "GUARD_FAILURE"  # the finding a guard that failed leaves (`GuardRuntime`): nothing was checked
_WITHHELD = "<WITHHELD: a redacting guard failed>"

log = logging.getLogger("gateway.payload_log")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_DEFAULT_REDACT: dict[str, GuardSpec] = {"pii": PiiGuardSpec(), "secrets": SecretsGuardSpec(action="redact")}
_INPUT, _OUTPUT = Where("input", "message"), Where("output", "message")
FINAL_DRAIN_S = 2.0
"""At close, the entries still queued get this long in all to be redacted and written; the rest are dropped."""
_UNSURE_TAIL = 4_096
"""Of a text read only in part, the characters at its end that are redacted and never written (a JWT, a long
key, an e-mail address or a card number fit in it)."""
QUEUE_CHARS = 16 * 1024 * 1024
"""The characters (prompts and answers) the queue holds at most, over all its entries; beyond, an entry is dropped
as at `queue` entries. At most 64 MiB of text per process (a character takes 1 to 4 bytes in Python), where
10,000 entries of big prompts took gigabytes; it holds 227 entries of the largest size under the default
`max_text_chars` (16,384: 36,864 characters of prompts and as many of answer), and thousands of common ones."""


def read_chars(spec: PayloadLogSpec) -> int:
    """How much of one text is read and redacted; a text handed over with more was cut (see the docstring)."""
    return 2 * spec.max_text_chars + _UNSURE_TAIL


@dataclasses.dataclass(slots=True)
class _Entry:
    ts: float
    request_id: str
    tenant: str
    model: str
    target: str | None
    status: int
    input: list[str]
    output: str
    cut: bool = False  # the first text of `input` was cut at the entry's `read_chars` (`_entry_texts`)
    dropped: int = 0  # the prompt texts before `input`'s first left out (`_entry_texts`): `input_dropped`

    @property
    def size(self) -> int:
        """The characters the entry holds, as the queue counts them."""
        return sum(map(len, self.input)) + len(self.output)


class PayloadWriter:
    """The queue, the redacting guards and the sink; a `Service` (started and closed with the runtime)."""

    def __init__(self, spec: PayloadLogSpec, metrics: Metrics, state: StoreConfig, count: Any) -> None:
        self.spec = spec
        self.metrics = metrics
        self.state = state
        self.stream_key = state.key_prefix + spec.stream
        # Not counted in the request guard series (`gateway_guard_*`): no request ran these guards, and a guard of
        # the policy's with the same name would have had the log's counts added. A text one fails to check is
        # counted here, `redact_failed`.
        self.guards = GuardRuntime(GuardsSpec(global_=redacting(spec.redact or _DEFAULT_REDACT)), metrics, count,
                                   counted=False)
        self.guard_list = list(self.guards.resolve("", "").input)  # (every text guard: `redacting`)
        self._queue: deque[_Entry] = deque()
        self._held = 0  # the characters the queued entries hold (`_Entry.size`), at most `QUEUE_CHARS`
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False  # the task is done: what is added now would never be written
        self._failing = False  # the last write failed (logged once, until a write succeeds)
        self._file: PrivateRotatingFile | None = None
        self._redis: RedisHandle | None = None  # with `sink: redis`

    def add(self, entry: _Entry) -> None:
        if self._closed:  # a request that ended after the close (a stream of a retired policy): nothing writes it
            self.metrics.telemetry_dropped.labels("payload_log", "close_timeout").inc()
            return
        size = entry.size
        if len(self._queue) >= self.spec.queue or self._held + size > QUEUE_CHARS:
            self.metrics.telemetry_dropped.labels("payload_log", "queue_full").inc()
            return
        self._queue.append(entry)
        self._held += size
        self._wake.set()

    @property
    def held_chars(self) -> int:
        """The characters the queued entries hold (at most `QUEUE_CHARS`)."""
        return self._held

    async def start(self) -> None:
        await self.guards.start()
        if self.spec.sink == "file":
            try:
                self._file = await asyncio.to_thread(
                    PrivateRotatingFile, self.spec.path, self.spec.max_bytes, self.spec.backups)
            except OSError as exc:  # (a start that fails: the gateway does not start, a reload keeps the policy)
                error = PayloadLogPathError(f"telemetry.payload_log.path: cannot open {self.spec.path!r} to append: "
                                            f"{exc.strerror or type(exc).__name__}")
                log.error("%s", error)  # (a line of its own: the start's traceback holds it deep inside)
                raise error from None
        else:
            from ..store.redis_client import open_client  # redis-py: loaded only for this sink
            from ..store.redis_url import parse_redis_url

            self._redis = open_client(parse_redis_url(self.state.url or "redis://127.0.0.1:6379/0"), self.state)
        self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        await self._final_drain()
        await self.guards.aclose()
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
        if self._redis is not None:
            await self._redis.aclose()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._drain()

    async def _final_drain(self) -> None:
        """The task writes what is still queued, then ends, within `FINAL_DRAIN_S`: a sink that stalls must not
        hold the close. It is cut only then, so an entry being written is never cut short and written again."""
        self._closing = True
        if self._task is not None:
            await finish_within(self._task, self._wake, FINAL_DRAIN_S, log, "the payload log's writer")
        self._closed = True
        if left := len(self._queue):  # cut at the deadline: the one being written among them
            self._queue.clear()
            self._held = 0
            self.metrics.telemetry_dropped.labels("payload_log", "close_timeout").inc(left)
            log.warning("payload log: %d entries dropped at close: not written within %.0f s", left, FINAL_DRAIN_S)

    async def _drain(self) -> None:
        while self._queue:
            entry = self._queue[0]  # taken off once written or failed: one cut at the close deadline is counted
            try:
                await self._write(await self._redacted(entry))
            except Exception as exc:  # noqa: BLE001 -- counted, and logged once a run of failures: never the text
                self.metrics.telemetry_dropped.labels("payload_log", "sink_failed").inc()
                if not self._failing:
                    self._failing = True
                    log.warning("payload log: entries dropped until a write succeeds: the %s sink failed (%s)",
                                self.spec.sink, _failure(exc))
            else:
                if self._failing:
                    self._failing = False
                    log.info("payload log: writing again after a failure")
            self._held -= self._queue.popleft().size

    async def redact(self, text: str, where: Where, cut: bool = False) -> str:
        """`text` redacted, then cut to `max_text_chars`; a text longer than `read_chars` is read that far, and
        only what comes from its first `2 x max_text_chars` characters is written (see the module's docstring).
        A text `cut` already (at its entry's `read_chars`) is read whole, and its last `_UNSURE_TAIL` characters
        are not written, for the same reason."""
        if not text:
            return text
        read = read_chars(self.spec)
        if len(text) > read:
            text = text[:read]
            cut = True
        enforced, shadow = await self.guards.detect(self.guard_list, text, where)
        if any(f.type == _FAILED for f in (*enforced, *shadow)):  # a guard failed (timed out on a long text, its
            # queue full): the text was not checked, so none of it is written; counted as the log's own
            self.metrics.telemetry_dropped.labels("payload_log", "redact_failed").inc()
            return _WITHHELD
        findings = [msgspec.structs.replace(f, action="redact") for f in (*enforced, *shadow)]
        if cut:
            text, findings = _before(text, findings, max(0, len(text) - _UNSURE_TAIL))
        return apply(text, findings, None)[: self.spec.max_text_chars]

    async def _redacted(self, entry: _Entry) -> bytes:
        """The entry's line: `input_dropped`, the number of prompt texts left out before `input`'s first (0: the
        request's texts are all there), written always, so that a reader need not know the bounds to tell."""
        return _encode({
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.ts)),
            "request_id": entry.request_id, "tenant": entry.tenant, "model": entry.model, "target": entry.target,
            "status": entry.status,
            "input": [await self.redact(text, _INPUT, entry.cut and n == 0) for n, text in enumerate(entry.input)],
            "input_dropped": entry.dropped,
            "output": await self.redact(entry.output, _OUTPUT),
        })

    async def _write(self, line: bytes) -> None:
        if self._file is not None:
            await asyncio.to_thread(self._file.write, line)
        elif self._redis is not None:
            async with asyncio.timeout(self.state.op_timeout_s):  # as every store operation
                await self._redis.client.xadd(self.stream_key, {"entry": line}, maxlen=self.spec.max_entries,
                                              approximate=True)


class PayloadLogPathError(OSError):
    """`telemetry.payload_log.path` cannot be opened (its folder missing, not writable): named in the error."""


def redacting(guards: dict[str, GuardSpec]) -> dict[str, GuardSpec]:
    """`guards` as the payload log runs them: each checks every text the log writes, prompts and answers alike,
    whatever its `places` says (only the log's texts reach them: a guard scoped to answers left the prompts in
    clear), and a text one failed to check is withheld whole whatever its `fail` says (`fail: open` wrote it
    in clear). Both settings weigh a request's delivery against its checks; here nothing waits on the log."""
    return {name: msgspec.structs.replace(spec, places=["input", "output"], fail="closed")
            for name, spec in guards.items()}


def _failure(exc: Exception) -> str:
    """What failed, without the exception's message, which might quote the line (an `OSError`'s is the system's)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


class PayloadLog:
    """The stage: hands each answered request's texts (request and answer) to the writer."""

    name = "payload_log"

    def __init__(self, writer: PayloadWriter) -> None:
        self.writer = writer

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        reply = await call_next(ctx)  # ctx.body is read by then (and already redacted by input guards, if any)
        read = read_chars(self.writer.spec)
        texts, cut, dropped = _entry_texts((str(c[k]) for c, k, _ in input_texts(ctx.endpoint, ctx.body)), read)
        if reply.stream is not None:
            reply.stream.add(_StreamText(self, texts, cut, dropped))
        else:  # (one more than is read: the writer sees that it was cut)
            self.add(ctx, texts, cut, dropped, _answer_text(ctx.endpoint, reply.body)[: read + 1], reply.status)
        return reply

    def add(self, ctx: RequestContext, texts: list[str], cut: bool, dropped: int, output: str, status: int) -> None:
        self.writer.add(_Entry(time.time(), ctx.request_id, ctx.tenant, ctx.alias_label,
                               ctx.target.name if ctx.target else None, status, texts, output, cut, dropped))


def _entry_texts(texts: Iterable[str], read: int) -> tuple[list[str], bool, int]:
    """An entry's prompts, `read` characters at most in all: the newest kept, filled from the last text back, in
    their order; the one across that line (the oldest kept) cut to its head, as a long text is (and then said to
    be: `_Entry.cut`) unless what would be left of it is all in the unsure tail, which is never written; the texts
    before it are left out, and counted (`_Entry.dropped`: the entry says how many). A text alone longer than
    `read` is cut so too. (In order from the first, a long system prompt or a long conversation left out the
    question it ends with.)"""
    every = list(texts)  # (the body's own strings: nothing copied)
    left = read
    for n in range(len(every) - 1, -1, -1):
        text = every[n]
        if len(text) > left:
            if left > _UNSURE_TAIL:
                return [text[:left], *every[n + 1:]], True, n
            return every[n + 1:], False, n + 1
        left -= len(text)
    return every, False, 0


def _before(text: str, findings: list[Finding], line: int) -> tuple[str, list[Finding]]:
    """`text` up to `line` and the findings wholly before it; the line is moved back to the start of any finding
    across it, so that no finding is cut in two."""
    spans = sorted((f.start, f.end) for f in findings)
    start = end = -1  # the findings that overlap, run together
    for span in spans:
        if span[0] >= line:
            break
        start, end = (start, max(end, span[1])) if span[0] < end else span
        if start < line < end:  # (no finding before this group reaches into it: it would be in it)
            line = start
            break
    return text[:line], [f for f in findings if f.end <= line]


def _answer_text(endpoint: Endpoint, body: bytes | None) -> str:
    if not body or endpoint is Endpoint.EMBEDDINGS:
        return ""
    try:
        data = _decode(body)
    except msgspec.DecodeError:
        return ""
    choices = data.get("choices") if isinstance(data, dict) else None
    parts: list[str] = []
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            message = choice.get("message")
            content = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(content, str):
                parts.append(content)
    if endpoint is Endpoint.RESPONSES and isinstance(data, dict):  # a Responses answer: its messages' text parts
        for item in data.get("output") or ():
            if isinstance(item, dict) and item.get("type") == "message":
                parts.extend(part["text"] for part in item.get("content") or ()
                             if isinstance(part, dict) and part.get("type") == "output_text"
                             and isinstance(part.get("text"), str))
    return "\n".join(parts)


class _StreamText:
    """A stream's answer text as `_answer_text` reads the complete answer: a chat stream's first choice; a Responses
    stream's `output_text` parts, one line each, wherever their message is in `output` (after a reasoning item, it
    is not the first: only the first output's text was kept, and such an answer was logged empty)."""

    __slots__ = ("cut", "dropped", "part", "parts", "size", "stage", "texts")
    reads_events = True

    def __init__(self, stage: PayloadLog, texts: list[str], cut: bool, dropped: int) -> None:
        self.stage = stage
        self.texts = texts
        self.cut = cut
        self.dropped = dropped
        self.parts: list[str] = []
        self.size = 0
        self.part: tuple[Any, Any] | None = None  # a Responses stream: the (output, content) index of the last delta

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        limit = read_chars(self.stage.writer.spec)
        for event in events:
            if isinstance(event, Chunk) and self.size <= limit:  # (past it: the writer sees that it was cut)
                data = event.data()
                if data.get("type") == _TEXT_DELTA:  # a Responses stream: a message's text (only they have any)
                    text = data.get("delta")
                    if isinstance(text, str):
                        part = (data.get("output_index"), data.get("content_index"))
                        if self.part is not None and part != self.part:  # another text part: another line
                            self.parts.append("\n")
                        self.part = part
                        self.parts.append(text)
                        self.size += len(text)
                    continue
                for choice in data.get("choices") or ():
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                    if isinstance(text, str):
                        self.parts.append(text)
                        self.size += len(text)
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        read = read_chars(self.stage.writer.spec)  # (one more than is read: the writer sees that it was cut)
        self.stage.add(ctx, self.texts, self.cut, self.dropped, "".join(self.parts)[: read + 1],
                       ended_status(ctx, end))


def ended_status(ctx: RequestContext, end: StreamEnd) -> int:
    """The status a stream that ended so is recorded with, as the telemetry stage sets it (`Telemetry.on_end`):
    this hook runs before that one (end hooks run innermost first), so `ctx.status` is not set yet."""
    if end.outcome == "error" and end.error is not None:
        return end.error.status
    if end.outcome == "client_gone":
        return CLIENT_CLOSED
    if end.outcome == "shutdown":
        return 503
    return ctx.status
