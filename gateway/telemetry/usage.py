"""Token counts when the upstream reports none: counted with tiktoken, marked as estimates.

An upstream may not report usage: a non-streamed answer without a `usage` field,
a provider configured with `stream_usage: false`, or an OpenAI-compatible server
that ignores `stream_options.include_usage`. Tokens must not silently read 0
then: this stage counts the prompt and the answer itself and marks the figure
`usage_estimated`, as it does when the upstream's figures cannot be believed
(negative or absurd: `Usage.usable`), so that a counter never goes down and a
cost never reads below 0. It reads a stream's content only when the provider is
known not to report usage; when a provider that should have reported it does not,
that stream's answer is estimated from its chunk count (OpenAI-compatible servers
send about one token a chunk) and the provider's later streams are counted. A
stream's text is what its client got: a chat stream's reasoning (`reasoning_content`,
or `reasoning`: counted once, though vLLM sends both), content (a string, or a list
of parts), refusal, tool call arguments, custom tool input and legacy function call
arguments (read by the module `answer_text`); a Responses stream's `*.delta` texts
(`ResponsesText`). A complete answer's text is the same: a chat message's fields; a
Responses answer's message text and refusal parts, reasoning content and summary,
tool call arguments and a custom tool's input. A stream whose text counts no token
while its upstream sent some (an output guard held it all back) is billed its
length instead.

The prompt is counted as the reservation estimates it and as `/v1/messages/count_tokens` answers
(`accounting.prompt.PromptEstimator.estimate_body`: messages with their format's overhead, tool calls and their
ids, images, the current turn's thinking, tool definitions; a completion's prompt, an embedding's input: the fields
of the endpoint the request came in by), in the encoding of the alias's upstream model: a
Messages client's `count_tokens` figure is the `input_tokens` its answer carries and the figure it is billed for.
A body past `OFF_LOOP_CHARS` is counted in a thread; a stream's (whose provider reports no usage) from its
start, so that its figure is ready when a Messages stream's last event is written.

A stream that ends before its usage came (an error mid-stream, the client gone, a budget's cut), whose upstream
reported the prompt's figures on the way (Anthropic's `message_start`, Gemini's `usageMetadata`:
`StreamEnd.usage_so_far`), keeps them: only its completion is estimated, from what was sent, unless the upstream
reported more completion tokens so far (Gemini's cumulative `candidatesTokenCount`): then its figure (`_after_prompt`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..accounting.prompt import PromptEstimator, estimate_prompt
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..pipeline.streams import StreamEnd
from ..schemas.endpoints import Endpoint
from ..schemas.events import Chunk, StreamEvent, is_content_event
from ..schemas.openai import Usage
from .answer_text import OWN_TEXT_FIELDS, REASONING_FIELDS, answer_text, chunk_text
from .tokens import TokenCounter

__all__ = ["KEEP_CHARS", "OFF_LOOP_CHARS", "OWN_TEXT_FIELDS", "REASONING_FIELDS", "CountTokens", "ResponsesText",
           "StreamText", "answer_text", "count_on_loop", "count_text", "estimate_on_loop", "estimate_stream_usage",
           "estimate_usage", "pipeline_counter", "stream_text"]

OFF_LOOP_CHARS = 64 * 1024  # count larger texts and bodies in a thread: tiktoken holds the GIL but not the loop
_ROUGH = PromptEstimator(TokenCounter(), keep=False)  # no encoding loaded: every text at four characters a token


class CountTokens:
    name = "count_tokens"
    reads_events = False

    def __init__(self, tokens: TokenCounter) -> None:
        self.tokens = tokens
        # Runs only when no usage came: it keeps no counts (unlike the reservation's), so it may count in a thread.
        self.prompts = PromptEstimator(tokens, keep=False)

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        reply = await call_next(ctx)
        if reply.stream is not None:
            provider = ctx.provider
            if provider is not None and not getattr(provider, "stream_usage_expected", True):
                text = stream_text(ctx, reply.stream)
                if text.prompt is None and len(ctx.raw_body) > OFF_LOOP_CHARS:  # counted while the answer comes
                    text.prompt = asyncio.ensure_future(asyncio.to_thread(
                        self.prompts.estimate_body, ctx.body, _model(ctx), ctx.endpoint))
                reply.stream.add(_CountText(self))
            else:
                reply.stream.add(self)
        elif reply.body is not None and (ctx.usage is None or not ctx.usage.usable()):
            completion = await self._count(answer_text(reply.body))
            ctx.usage = await self._usage(ctx, completion)
        return reply

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        if (ctx.usage is None or not ctx.usage.usable()) and ctx.provider is not None:
            ctx.usage = await self._usage(ctx, ctx.chunks, end.usage_so_far)

    async def _usage(self, ctx: RequestContext, completion_tokens: int, so_far: Usage | None = None) -> Usage:
        """The estimate, marked; with `so_far` (a stream that ended early: `StreamEnd.usage_so_far`), its prompt
        figures are the upstream's (`_after_prompt`)."""
        if so_far is not None and so_far.usable():
            ctx.usage_estimated = True
            return _after_prompt(so_far, completion_tokens)
        prompt = await self._prompt(ctx) + ctx.continued_tokens  # (a continuation's kept context: billed as input)
        ctx.usage_estimated = True
        return Usage(prompt, completion_tokens, prompt + completion_tokens)

    async def _prompt(self, ctx: RequestContext) -> int:
        """The prompt's estimate: the one counted since the stream began, else counted now (in a thread when the
        body is large)."""
        text = ctx.answer_text
        if text is not None and text.prompt is not None:
            return await text.prompt  # type: ignore[no-any-return]
        if len(ctx.raw_body) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.prompts.estimate_body, ctx.body, _model(ctx), ctx.endpoint)
        return self.prompts.estimate_body(ctx.body, _model(ctx), ctx.endpoint)

    async def _count(self, text: str) -> int:
        if len(text) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.tokens.count, text)
        return self.tokens.count(text)


KEEP_CHARS = 1 << 20  # a stream's text kept for its count: past it, the rest is counted by its length (`StreamText`)


class StreamText:
    """A stream's answer text, collected as its chunks pass (only when its provider reports no usage): one per
    request (`ctx.answer_text`, made by `stream_text`), read at the stream's end by every stage that counts it.
    `prompt`: the prompt's estimate of a large body, counted in a thread from the stream's start (`CountTokens`).

    At most `KEEP_CHARS` of it are kept (and the chunk that crosses them): a stream runs as long as `total_s` lets
    it, and its text (tool call arguments included) held whole grew without bound, and took tiktoken seconds to count
    at its end. The text past them is counted by its length only, at the rate of the text kept (`_whole`: its tokens
    per character), so a long answer is billed about what its tokens would count."""

    __slots__ = ("_beyond", "_kept", "_parts", "_textless", "prompt")
    reads_events = True

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._textless = 0  # chunks without text the client got (a chat stream's role and finish chunks)
        self._kept = 0  # characters in `_parts`
        self._beyond = 0  # characters past `KEEP_CHARS`, not kept
        self.prompt: asyncio.Future[int] | None = None

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        parts = self._parts
        for event in events:
            if isinstance(event, Chunk):
                before = len(parts)
                chunk_text(event.data(), parts)
                if len(parts) == before:
                    self._textless += 1
                elif self._kept > KEEP_CHARS:  # counted by its length, not kept
                    self._beyond += sum(map(len, parts[before:]))
                    del parts[before:]
                else:
                    self._kept += sum(map(len, parts[before:]))
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        return None

    def text(self) -> str:
        """The text kept (all of it, unless past `KEEP_CHARS`)."""
        return "".join(self._parts)

    def _whole(self, counted: int) -> int:
        """`counted`, the tokens of `text()`, and those of the text past `KEEP_CHARS` at the same rate (rounded up)."""
        if not self._beyond or not self._kept:
            return counted
        return counted + -(-counted * self._beyond // self._kept)

    def tokens(self, ctx: RequestContext, counted: int) -> int:
        """The answer's tokens, given `counted`, those of `text()`. A chat stream's are its text's; one whose text
        counts no token while its upstream sent text (an output guard held it all back) is billed the stream's
        length (`ctx.chunks`, the upstream's chunks) less the chunks without text its client got, as a Responses
        stream is billed its content events: an empty answer stays 0."""
        return self._whole(counted) or max(ctx.chunks - self._textless, 0)


class ResponsesText(StreamText):
    """A Responses stream's text: the `delta` of each of its events of generated content (`*.delta`, `Chunk.content`:
    a message's text or refusal, reasoning and its summary, a function call's arguments, a custom tool's input),
    as chat's is its content and tool call arguments. One whose `delta` is no text (audio's base64 bytes, a value
    of another type) counts a token, as the stream's length counts it (`pipeline.streams`); and an answer whose
    text counts no token while its upstream sent content (every delta empty, or held back from the client) is
    billed that length rather than nothing."""

    __slots__ = ("_untexted",)

    def __init__(self) -> None:
        super().__init__()
        self._untexted = 0  # content events without text to count: a token each

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        for event in events:
            # (lifecycle events, `content` False, are not decoded: `response.created` and the last one are large)
            if type(event) is Chunk and event.content:
                data = event.data()
                kind = data.get("type")
                if not is_content_event(kind):  # (a gateway's `Chunk.of` counts as content unless it says not)
                    continue
                delta = data.get("delta")
                if isinstance(delta, str) and kind not in _DATA_DELTAS:
                    if self._kept > KEEP_CHARS:
                        self._beyond += len(delta)
                    else:
                        self._parts.append(delta)
                        self._kept += len(delta)
                else:
                    self._untexted += 1
        return events

    def tokens(self, ctx: RequestContext, counted: int) -> int:
        return self._whole(counted) + self._untexted or ctx.chunks


# A Responses stream's deltas that carry data, not text: base64 audio, about a token an event.
_DATA_DELTAS = frozenset({"response.audio.delta", "response.output_audio.delta"})


def stream_text(ctx: RequestContext, stream: Any) -> StreamText:
    """The request's `StreamText` (of a Responses stream, a `ResponsesText`: chosen once, so that a chat stream's
    chunks pay nothing for the Responses events), added to `stream` (a `ReplyStream`) by the first stage that asks
    for it. A stage that may cut the stream (the accounting stage's bill) asks after adding itself: the text is
    what the client got."""
    found = ctx.answer_text
    if found is None:
        found = ctx.answer_text = ResponsesText() if ctx.endpoint is Endpoint.RESPONSES else StreamText()
        stream.add(found)
    return found  # type: ignore[no-any-return]


async def _stream_completion(counter: CountTokens, ctx: RequestContext) -> int:
    """A stream's completion tokens: of its text when it was collected (`stream_text`), else its length."""
    text = ctx.answer_text
    if text is None:
        return ctx.chunks
    return text.tokens(ctx, await counter._count(text.text()))  # type: ignore[no-any-return]


class _CountText:
    """A stream whose provider reports no usage: its answer counted from its text (`ctx.answer_text`) at its end,
    unless a stage counted it before (the accounting stage, whose end hook runs first)."""

    __slots__ = ("_counter",)
    reads_events = False

    def __init__(self, counter: CountTokens) -> None:
        self._counter = counter

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        if ctx.usage is None or not ctx.usage.usable():
            completion = await _stream_completion(self._counter, ctx)
            ctx.usage = await self._counter._usage(ctx, completion, end.usage_so_far)


def _after_prompt(so_far: Usage, completion_tokens: int) -> Usage:
    """A stream that ended before its usage, whose upstream reported the prompt's (`StreamEnd.usage_so_far`): the
    upstream's prompt, cached and cache-write figures, as it bills them (a re-count would bill cache reads at the
    full input price); the completion is what was sent, estimated, plus the reasoning the upstream reported so far
    (it sends no chunk), or the completion the upstream reported so far when it is more. Gemini's `usageMetadata`
    is cumulative (its `candidatesTokenCount` grows with each event, tens of tokens an event, where the estimate of
    a provider that reports usage counts about one a chunk) and its `completion_tokens` already hold the reasoning
    (`thoughtsTokenCount`), as Anthropic's `output_tokens` hold the thinking: the larger figure, never their sum,
    so reasoning is counted once."""
    reasoning = so_far.reasoning_tokens
    completion = max(completion_tokens + reasoning, so_far.completion_tokens)
    return Usage(so_far.prompt_tokens, completion, so_far.prompt_tokens + completion, so_far.prompt_tokens_details,
                 so_far.completion_tokens_details if reasoning else None)


def _model(ctx: RequestContext) -> str | None:
    """The model whose encoding counts the prompt: the alias's upstream model, as the reservation counts it."""
    route = ctx.route
    return route.upstream_model if route is not None else None


# -- for the accounting stage, which bills a request before this stage's own end hook runs -------------


async def estimate_usage(counter: CountTokens, ctx: RequestContext, completion_tokens: int) -> Usage:
    """The estimate this stage would make (and marks `ctx.usage_estimated`), for a caller that needs it first."""
    return await counter._usage(ctx, completion_tokens)


def estimate_on_loop(tokens: TokenCounter, ctx: RequestContext) -> Usage:
    """The estimate this stage makes, made at once on the event loop (a caller that must write it before this
    stage's end hook runs: a Messages stream's last event), and kept as the request's usage (marked), so that the
    bill and this stage read the figure the client got. A large body's prompt is the one counted since the stream
    began; when there is none (a provider found not to report usage only at this stream's end), its texts are
    taken at four characters a token instead of holding the loop, as is an answer text past `OFF_LOOP_CHARS`."""
    text = ctx.answer_text
    early = text.prompt if text is not None else None
    if early is not None and early.done() and not early.cancelled() and early.exception() is None:
        prompt = early.result()
    elif len(ctx.raw_body) <= OFF_LOOP_CHARS:
        prompt = estimate_prompt(tokens, ctx.body, _model(ctx), ctx.endpoint)
    else:
        prompt = _ROUGH.estimate_body(ctx.body, None, ctx.endpoint)
    completion = text.tokens(ctx, count_on_loop(tokens, text.text())) if text is not None else ctx.chunks
    ctx.usage, ctx.usage_estimated = Usage(prompt, completion, prompt + completion), True
    return ctx.usage


def pipeline_counter(ctx: RequestContext) -> TokenCounter | None:
    """The counter the request's pipeline estimates usage with (its `CountTokens` stage's: encodings loaded), for a
    caller that must estimate before this stage's end hook runs (a Messages stream's last event, a blocked stream)."""
    for stage in ctx.runtime.pipeline.stages:
        if isinstance(stage, CountTokens):
            return stage.tokens
    return None


def count_on_loop(tokens: TokenCounter, text: str) -> int:
    return tokens.count(text) if len(text) <= OFF_LOOP_CHARS else len(text) // 4


async def estimate_stream_usage(counter: CountTokens, ctx: RequestContext, so_far: Usage | None = None) -> Usage:
    """A stream's estimate at its end, as this stage makes it: from its text when it was collected (its provider
    reports no usage: `stream_text`, `StreamText.tokens`), else from its chunk count (a provider that should have
    reported it; of a Responses stream, its `*.delta` events only: `pipeline.streams`); with `so_far`
    (`StreamEnd.usage_so_far`), the prompt's figures are the upstream's."""
    return await counter._usage(ctx, await _stream_completion(counter, ctx), so_far)


async def count_text(counter: CountTokens, text: str) -> int:
    return await counter._count(text)
