"""The cache stage: after the guards' input checks and authorization, before a target is chosen.

A hit answers here: no target, no upstream. It still passes back through the
output guards like any answer, so a cache never bypasses a policy. A miss goes on
and its answer is stored once the request has left every stage (`ctx.on_finish`,
run by the telemetry stage), and only if it is whole: a 200 with a body, or a
stream that ended cleanly, that no guard changed or blocked, within the alias's
size bound. Errors, cut or cancelled streams and guarded-away answers are never
stored. Every miss the stage meant to store ends in one `gateway_cache_stores_total`
outcome: `stored`, `too_large`, `unavailable`, or `uncacheable` (an error, a cut
or cancelled answer, a guard's change, a 200 that is not an answer a hit could
replay: `entry.holds_answer`, checked before the write).

A request a routing rule `deny`s passes on as a bypass, for the router to refuse:
it is neither looked up, nor embedded (the semantic cache's embeddings alias is
an upstream too), nor coalesced.

A coalesced miss's leader that stores nothing tells its waiters why
(`Flight.release`): a failure the next request of the key may not meet (an
upstream error, a timeout, a 408/409/429, a cut stream, a 200 that is not an
answer, its client gone) hands the key to one waiter, which leads next; one
every waiter would meet alike (a 4xx the request itself caused, a guard's
change, an answer too large to store, a store that cannot take it) lets them all
go upstream at once, as leading one at a time would spare no call and make the
last wait for all the others.

A hit the client asked for in the other form (a stored stream for a non-streamed
request, or the other way round) is served only when the conversion is exact
(`replay.Unconvertible`); otherwise it is a miss, and the new answer replaces the
entry in its own form. So is a hit its client's API would refuse (`/v1/messages`,
whose body has its chat translation's key: an answer a chat client stored, that
the Messages translation refuses, `_translate`, `_check_stream`), where a live
answer so refused would be retried and fallen back from; only a client of another
API than OpenAI's pays for that check. A Messages stream the translation refused
at the edge is not stored: its status is the error's (`api.anthropic._Framer`).
A stored entry that is not an answer at all (not a JSON object, no choice or a
null one) is never served, in either form: the cache reads it as a corrupt entry
(`ResponseCache.read`), a miss, and the new answer replaces it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from ..accounting.cost import usage_cost
from ..errors import GatewayError
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..pipeline.streams import ReplyStream, StreamEnd
from ..policy.cache_schema import CacheSpec
from ..routing.exchange import TranslatedReply
from ..schemas.events import Chunk, StreamEvent, UsageReport
from ..schemas.openai import Usage
from .coalesce import Flight
from .control import HEADER, CacheResult, directives, plan
from .entry import Entry
from .replay import ReplaySource, Unconvertible, assemble_body
from .service import ResponseCache, SemanticProbe

__all__ = ["CacheStage"]

_STATUS_HEADERS = {status: (HEADER, status.encode()) for status in ("hit", "semantic-hit", "miss", "bypass")}


class CacheStage:
    name = "cache"

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Reply]:
        """An alias without a cache passes the request on unawaited (one coroutine frame fewer: see
        `pipeline.runner`); a cached one goes through `_cached`."""
        route = ctx.route
        assert route is not None
        spec = self.cache.specs.get(route.alias)
        if spec is None:
            return call_next(ctx)
        return self._cached(ctx, call_next, spec, route.alias)

    async def _cached(self, ctx: RequestContext, call_next: Next, spec: CacheSpec, alias: str) -> Reply:
        control = directives(ctx.head.raw_headers)
        decided = plan(spec, ctx.endpoint, ctx.request, control)
        if decided.bypass:
            return await self._pass(ctx, call_next, CacheResult("bypass"), alias)
        cache = self.cache
        if cache.counts_first(ctx, alias):  # a large prompt a rule weighs: counted in a thread, not on the loop
            await cache.count(ctx)
        rule = cache.rule(ctx)
        if rule is not None and rule.deny is not None:  # the router refuses it: nothing to look up, embed or wait for
            return await self._pass(ctx, call_next, CacheResult("bypass"), alias)
        key = cache.key(ctx, rule)
        read, write = decided.lookup, decided.store
        probe: SemanticProbe | None = None
        if read:
            entry = await cache.read(key, control.max_age, alias, ctx.endpoint)
            if entry is not None and (reply := self._hit(ctx, entry, "hit", None)) is not None:
                return reply
            if spec.semantic is not None:
                entry, similarity, probe = await cache.semantic_read(ctx, spec, control.max_age, rule)
                if entry is not None and (reply := self._hit(ctx, entry, "semantic-hit", similarity)) is not None:
                    return reply
        elif spec.semantic is not None and write:
            probe = (await cache.semantic_read(ctx, spec, None, rule))[2]
        if not write:
            return await self._pass(ctx, call_next, CacheResult("miss"), alias)
        flight: Flight | None = None
        if spec.coalesce and read:
            flight = await cache.flights.join(key, spec.coalesce_timeout_s, partial(cache.present, key, ctx.endpoint))
            if flight is None:  # another request went upstream: its answer may be here now
                entry = await cache.read(key, control.max_age, alias, ctx.endpoint)
                if entry is not None and (reply := self._hit(ctx, entry, "hit", None)) is not None:
                    return reply
        try:
            reply = await self._pass(ctx, call_next, CacheResult("miss"), alias)
        except BaseException as exc:  # its client left or a shutdown: hand over; an error: by its status
            self._refuse(ctx, flight, hand_over=not (isinstance(exc, GatewayError) and _alike(exc.status)))
            raise
        self._arrange_store(ctx, reply, spec, key, probe, flight)
        return reply

    async def _pass(self, ctx: RequestContext, call_next: Next, result: CacheResult, alias: str) -> Reply:
        ctx.cache, ctx.cache_result = result, result.status
        self.cache.requests(alias, result.status).inc()
        _add_header(ctx, _STATUS_HEADERS[result.status])
        return await call_next(ctx)

    def _hit(self, ctx: RequestContext, entry: Entry, status: str, similarity: float | None) -> Reply | None:
        """The stored answer in the form the client asked for; None (a miss) when that form would not carry it
        exactly."""
        write: Callable[[RequestContext], bytes] | None = None
        try:
            if ctx.stream:
                source = ReplaySource(entry, ctx.endpoint, ctx.wants_usage)
                if ctx.dialect is not None:
                    _check_stream(ctx, source)
            else:
                body = entry.body if entry.kind == "body" else assemble_body(entry, ctx.endpoint)
                if ctx.dialect is not None:
                    write = _translate(ctx, body)
        except Unconvertible:
            return None
        result = self.cache.result(entry, status, similarity)
        ctx.cache, ctx.cache_result = result, result.status
        alias = ctx.route.alias if ctx.route is not None else "unknown"
        cache = self.cache
        cache.requests(alias, result.status).inc()
        if result.saved_prompt_tokens or result.saved_completion_tokens:
            cache.saved_tokens(alias, "prompt").inc(result.saved_prompt_tokens)
            cache.saved_tokens(alias, "completion").inc(result.saved_completion_tokens)
        if result.saved_usd:
            cache.saved_usd(alias).inc(result.saved_usd)
        status_header = _STATUS_HEADERS[result.status], (b"age", b"%d" % int(result.age_s))
        if ctx.headers is None:
            ctx.headers = list(status_header)
        else:
            ctx.headers += status_header
        ctx.usage = Usage()  # nothing was spent upstream; the client still sees the answer's own usage
        ctx.shown_usage = entry.usage  # (the one a dialect writes where the answer carries none: an estimate)
        if ctx.stream:
            stream = ReplyStream(source, ctx)
            stream.add(_HIT_END)
            return Reply(stream=stream)
        if write is not None:  # translated already: the edge writes it (unless a stage rewrites the body)
            return TranslatedReply(body=body, write=write, translated_of=body)
        return Reply(body=body)

    def _arrange_store(self, ctx: RequestContext, reply: Reply, spec: CacheSpec, key: str,
                       probe: SemanticProbe | None, flight: Flight | None) -> None:
        if reply.stream is not None:
            recorder = _Recorder(spec.max_entry_bytes)
            reply.stream.add(recorder)
            ctx.on_finish = partial(self._store_stream, ctx, recorder, spec, key, probe, flight)
        elif reply.body is not None and reply.status == 200:
            ctx.on_finish = partial(self._store_body, ctx, reply.body, spec, key, probe, flight)
        else:
            self._refuse(ctx, flight, hand_over=not _alike(reply.status))

    def _store_body(self, ctx: RequestContext, body: bytes, spec: CacheSpec, key: str, probe: SemanticProbe | None,
                    flight: Flight | None) -> None:
        if ctx.status != 200 or _guard_changed(ctx):
            self._refuse(ctx, flight, hand_over=ctx.status != 200 and not _alike(ctx.status))
            return
        provider, model = _answered_by(ctx)
        entry = Entry("body", time.time(), body=body, usage=ctx.usage, provider=provider, model=model,
                      cost_usd=usage_cost(ctx, ctx.usage) or 0.0, usage_estimated=ctx.usage_estimated)
        self._write(ctx, entry, spec, key, probe, flight)

    def _store_stream(self, ctx: RequestContext, recorder: _Recorder, spec: CacheSpec, key: str,
                      probe: SemanticProbe | None, flight: Flight | None) -> None:
        too_large = recorder.size > spec.max_entry_bytes
        if recorder.outcome != "done" or too_large or ctx.status != 200 or _guard_changed(ctx) \
                or not recorder.chunks:
            self._refuse(ctx, flight, "too_large" if too_large else "uncacheable",
                         _stream_hands_over(ctx, recorder, too_large))
            return
        provider, model = _answered_by(ctx)
        usage, estimated = recorder.usage, False
        if usage is None or not usage.usable():
            usage, estimated = _estimate(ctx)
        entry = Entry("stream", time.time(), chunks=recorder.chunks, usage=usage, usage_chunk=recorder.usage_chunk,
                      provider=provider, model=model, cost_usd=usage_cost(ctx, usage) or 0.0,
                      usage_estimated=estimated, usage_unasked=recorder.usage is None and not ctx.wants_usage)
        self._write(ctx, entry, spec, key, probe, flight)

    def _write(self, ctx: RequestContext, entry: Entry, spec: CacheSpec, key: str, probe: SemanticProbe | None,
               flight: Flight | None) -> None:
        alias = ctx.route.alias if ctx.route is not None else "unknown"

        async def write() -> None:
            outcome = ""
            try:
                outcome = await self.cache.write(alias, key, entry, spec.ttl_s, probe, spec.max_entry_bytes,
                                                 ctx.endpoint)
            finally:
                if flight is not None:  # an upstream's non-answer may not come again: hand over, as for its error
                    flight.release(hand_over=outcome == "uncacheable")

        self.cache.spawn(write())

    def _refuse(self, ctx: RequestContext, flight: Flight | None, why: str = "uncacheable",
                hand_over: bool = False) -> None:
        alias = ctx.route.alias if ctx.route is not None else "unknown"
        self.cache.metrics.cache_stores.labels(alias, why).inc()
        if flight is not None:
            flight.release(hand_over)


def _add_header(ctx: RequestContext, header: tuple[bytes, bytes]) -> None:
    if ctx.headers is None:
        ctx.headers = [header]
    else:
        ctx.headers.append(header)


def _translate(ctx: RequestContext, body: bytes) -> Callable[[RequestContext], bytes] | None:
    """A complete hit for a client whose API is not OpenAI's, translated as a miss's answer is within its attempt
    (the dialect's `translate`: `routing.exchange`), the writer of its body; `Unconvertible` when the translation
    refuses it (`/v1/messages`: a tool call without a name). Live, such an answer fails its attempt and is retried
    or fallen back from; from the cache it would be a 502 to every request of the key until the entry expired (an
    entry a chat client stored, valid for it: a Messages body has its chat translation's key)."""
    translate: Any = getattr(ctx.dialect, "translate", None)
    if translate is None:
        return None
    try:
        return translate(body)  # type: ignore[no-any-return]
    except GatewayError:
        raise Unconvertible("refused by the client's API") from None


def _check_stream(ctx: RequestContext, source: ReplaySource) -> None:
    """`_translate` for a streamed hit: `Unconvertible` when the dialect would end its stream with an error
    (`check_stream`: the replay framed to no one; its chunks keep what they decoded, for the edge's framing)."""
    check: Any = getattr(ctx.dialect, "check_stream", None)
    if check is not None:
        try:
            check(source.events())
        except GatewayError:
            raise Unconvertible("refused by the client's API") from None


def _answered_by(ctx: RequestContext) -> tuple[str, str]:
    target = ctx.target
    return (target.provider, target.upstream_model) if target is not None else ("", "")


def _estimate(ctx: RequestContext) -> tuple[Usage | None, bool]:
    """What a stream whose upstream reported no usage, or unusable usage (negative or absurd counts), is stored
    with, as a body is: the gateway's estimate, which accounting billed and a Messages client was shown (none if
    there is none), marked `usage_estimated`; its replay still sends the upstream's own usage chunk as it came (or
    none). Stored as sent, unusable figures would make every hit of the entry fail (a counter of saved tokens
    cannot go down)."""
    usage = ctx.usage
    if ctx.usage_estimated and usage is not None and usage.usable():
        return usage, True
    return None, False


def _alike(status: int) -> bool:
    """Whether every request of the key would fail so too: a 4xx the request caused, not 408, 409 or 429 (which
    OpenAI's SDKs retry: a timeout, a conflict, a rate limit pass) nor 499 (its client left)."""
    return 400 <= status < 500 and status not in (408, 409, 429, 499)


def _stream_hands_over(ctx: RequestContext, recorder: _Recorder, too_large: bool) -> bool:
    """Whether a stream that is not stored hands its key over: one cut, left or ended empty may come whole the next
    time; one ended by an error is judged by its status (`ctx.status`, set by the telemetry stage at its end); one
    too large or changed by a guard would be so for every waiter."""
    if recorder.outcome != "done":
        return recorder.outcome != "error" or not _alike(ctx.status)
    if ctx.status != 200:
        return not _alike(ctx.status)
    return not recorder.chunks and not too_large and not _guard_changed(ctx)


def _guard_changed(ctx: RequestContext) -> bool:
    """Whether an enforcing guard changed or blocked the input or the answer (recording only does not count)."""
    session = ctx.guard_session
    if session is None:
        return False
    counts: dict[str, int] = session.counts
    return any(count > 0 and not name.partition(".")[2].startswith(("shadow_", "record"))
               for name, count in counts.items())


class _Recorder:
    """A miss's stream, kept as it comes from the upstream, to store once it ended cleanly."""

    __slots__ = ("_max", "chunks", "outcome", "size", "usage", "usage_chunk")
    reads_events = True

    def __init__(self, max_bytes: int) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.usage: Usage | None = None
        self.usage_chunk: bytes | None = None
        self.outcome = ""
        self._max = max_bytes

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        if self.size > self._max:
            return events  # too large to store already: keep nothing more
        for event in events:
            if isinstance(event, Chunk):
                self.chunks.append(event.payload)
                self.size += len(event.payload)
            elif isinstance(event, UsageReport):
                self.usage = event.usage
                self.usage_chunk = event.payload
        if self.size > self._max:
            self.chunks = []
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        self.outcome = end.outcome


class _HitEnd:
    """A replayed stream: nothing was spent upstream (the replay's usage report is the answer's, for the client)."""

    reads_events = False

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        ctx.usage = Usage()


_HIT_END = _HitEnd()
