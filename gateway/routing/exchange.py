"""One attempt's exchange with its upstream (`exchange`), and the same within the alias's deadline (`within`).

The router's walk decides which target to try and what a failure means; this is what one try does: call the
provider, time it for the target's measurements (`TargetStats`), and hand back the reply. A stream that
may still fall back is held until its first content event (`peek`, within the target's first-byte timeout),
so that an upstream failing before it says anything can be left for the next target; so is a lone target's
under an alias's `deadline_s` (within the deadline alone), which runs until the first chunk. A lone target's
stream that is not held is counted in flight until it ends and timed to its first content only when a strategy
reads its measurements (`TargetStats.read`: an end hook, `_Measured`), else at no cost. A complete answer for a
client whose API is not OpenAI's (`/v1/messages`) is translated here, within the attempt (`_translated`): one the
translation refuses is the attempt's failure (retried, fallen back from, never cached), not a 502 written after
routing, the breaker, the cache and the telemetry took it for an answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import Unsupported, UpstreamError, UpstreamTimeout
from ..pipeline.context import Reply, RequestContext
from ..pipeline.streams import ReplyStream, StreamEnd
from ..policy.compiled import ModelRoute, Target
from ..providers.base import Call, Completion, Provider
from ..schemas.endpoints import Endpoint
from ..schemas.events import StreamEvent
from .attempts import DeadlineExceeded, Replay, classify, peek
from .stats import TargetStats

__all__ = ["TranslatedReply", "exchange", "within"]


@dataclass(slots=True)
class TranslatedReply(Reply):
    """A complete answer its client's dialect translated within the attempt: `write(ctx)` is the client's body,
    once the usage is known (`api.proxy`), while `body` is still `translated_of` (a stage that rewrites the body
    leaves it behind: the dialect translates the new one)."""

    write: Callable[[RequestContext], bytes] | None = None
    translated_of: bytes | None = None


async def within(deadline: float, ctx: RequestContext, route: ModelRoute, target: Target, provider: Provider,
                 call: Call, stats: TargetStats) -> Reply:
    """`exchange`, cut at the alias's `deadline` (the loop's clock) with a 504 naming the target tried last."""
    try:
        async with asyncio.timeout_at(deadline):
            return await exchange(ctx, route, target, provider, call, stats)
    except TimeoutError:
        raise DeadlineExceeded(
            f"`{ctx.alias_label}` found no answer within its deadline (last tried: {target.name})") from None


async def exchange(ctx: RequestContext, route: ModelRoute, target: Target, provider: Provider, call: Call,
                   stats: TargetStats) -> Reply:
    """One call of `target`'s provider: a complete answer (with its usage on `ctx`), or a stream, held until its
    first content event unless nothing could replace it (a lone target, no retries, no context fallback) and no
    deadline bounds it (`deadline_s` runs until a stream's first chunk)."""
    if ctx.attempts is not None and ctx.endpoint is _RESPONSES:  # (None until an attempt failed: the usual request)
        _stay_with_the_state(ctx, route, target)
    started = time.perf_counter()
    stats.in_flight += 1
    if not ctx.stream:
        try:
            completion = await provider.complete(call)
        finally:
            stats.in_flight -= 1
            ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
        stats.observe(False, time.perf_counter() - started)
        if ctx.dialect is not None:
            return _translated(ctx, completion)
        ctx.usage = completion.usage
        if completion.choices is not None:  # read for a stage (`Call.read_choices`): handed on with the body
            return Reply(body=completion.body, choices_of=(completion.body, completion.choices))
        return Reply(body=completion.body)
    try:
        source = await provider.open_stream(call)
    except BaseException:
        stats.in_flight -= 1
        ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
        raise
    lone = route.single and target.retry.attempts == 0 and route.context_fallback is None
    if lone and route.deadline_s is None:
        # Nothing to fall back to, no deadline to keep: no need to hold the first events back.
        ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
        stream = ReplyStream(source, ctx)
        if stats.read:  # an alias's strategy reads them: counted in flight to its end, timed to its first content
            stream.add(_Measured(stats, started))
        else:  # nobody reads them (`Router.start`): no more work than that
            stats.in_flight -= 1
        return Reply(stream=stream)
    # Held until its first content event: within the target's first-byte timeout when something could replace it
    # (a fallback, a retry), else (a lone target, held for its alias's deadline) within that deadline alone.
    first_byte_s = (target.timeouts or provider.config.timeouts).first_byte_s
    try:
        async with asyncio.timeout(None if lone else max(0.0, first_byte_s - (time.perf_counter() - started))):
            buffered, iterator = await peek(source)
    except TimeoutError:
        stats.in_flight -= 1
        await source.aclose()
        raise UpstreamTimeout(f"upstream `{target.provider}` sent no content within {first_byte_s:g} s") from None
    except BaseException:
        stats.in_flight -= 1
        await source.aclose()
        raise
    finally:
        ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
    stats.observe(True, time.perf_counter() - started)
    return Reply(stream=ReplyStream(Replay(source, buffered, iterator, stats.release), ctx))


_RESPONSES = Endpoint.RESPONSES


def _stay_with_the_state(ctx: RequestContext, route: ModelRoute, target: Target) -> None:
    """A Responses continuation (`previous_response_id`) after a failed attempt goes only to a target of the
    provider the walk tried first: that upstream keeps the response it continues, another one (another account, or
    another API altogether) answers a permanent 400 `previous_response_not_found`, which the SDKs do not retry, in
    place of the first one's error (a 5xx, a timeout: worth a retry). A target of another provider is passed over as
    one that lacks a field is (`Unsupported`: nothing sent, no attempt counted), so the client gets the error of the
    attempts that could have answered (`attempts.aggregate`). Retries on the first provider's targets go on."""
    if ctx.body.get("previous_response_id") is None:
        return
    assert ctx.attempts is not None
    first = ctx.attempts[0][0]
    if first == target.name:
        return
    holder = next((t.provider for t in (*ctx.candidates, *route.targets) if t.name == first), None)
    if holder != target.provider:
        raise Unsupported(f"`previous_response_id` names a response kept by the upstream tried first "
                          f"(`{holder}`), which `{target.provider}` cannot continue: not sent there",
                          param="previous_response_id")


class _Measured:
    """The end hook of a lone target's stream (not held: nothing could replace it) whose `TargetStats` a strategy
    reads: the stream stays in flight until it ends, and its time to first content (the first batch the client
    was sent, `ctx.first_chunk_seconds`, when any content came) is its sample; no work per event."""

    __slots__ = ("_started", "_stats")
    reads_events = False

    def __init__(self, stats: TargetStats, started: float) -> None:
        self._stats = stats
        self._started = started

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events  # (never called: `reads_events` is False)

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        stats = self._stats
        stats.in_flight -= 1
        first = ctx.first_chunk_seconds
        if first is not None and ctx.chunks:
            stats.observe(True, max(0.0, ctx.started + first - self._started))
        elif end.error is not None and end.outcome == "error":  # failed before any content: as a held stream's
            stats.failed(classify(end.error), True, time.perf_counter() - self._started)


def _translated(ctx: RequestContext, completion: Completion) -> Reply:
    """A complete answer for a dialect's client, translated by the dialect's `translate` when it has one
    (`api.anthropic.MessagesDialect`) before anything takes it for an answer: one it refuses (`UpstreamError`: a
    tool call without a name) fails the attempt, with the usage the upstream reported for it (`GatewayError.usage`:
    generated, so billed by the provider, and counted as a refused answer's)."""
    translate: Any = getattr(ctx.dialect, "translate", None)
    write = None
    if translate is not None:
        try:
            write = translate(completion.body)
        except UpstreamError as exc:
            exc.usage = completion.usage
            raise
    ctx.usage = completion.usage
    choices_of = (completion.body, completion.choices) if completion.choices is not None else None
    return TranslatedReply(body=completion.body, choices_of=choices_of, write=write, translated_of=completion.body)
