"""The pieces of the retry and fallback loop: what a failure is, how long to wait, one error for many.

`classify` names a failure by what the policy's `retry_on` can list. `backoff`
is exponential with full jitter (a random wait between zero and the ceiling), so
that clients failing together do not retry together; an upstream's Retry-After
replaces it, up to the target's cap. `aggregate` turns every failed attempt into
the one error the client gets (a 429 from every target tells the client the smallest
Retry-After, capped at a day, as does a 502 whose every attempt sent one). `peek`
reads a stream up to its first content event, so that a stream that fails before any
content (even with a 200 and an in-band error, or a body that ends without one) can
still fall back; `Replay` then hands the buffered batches on, unchanged.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence

from ..errors import (
    AllTargetsFailed,
    AnswerTooLarge,
    ContextLengthExceeded,
    CredentialsRejected,
    GatewayBusy,
    GatewayError,
    InternalError,
    RateLimited,
    Unsupported,
    UnusableAnswer,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
)
from ..policy.compiled import RetryPolicy, Target
from ..schemas.events import ChoicesReader, Chunk, EventSource, StreamDone, StreamError, StreamEvent
from ..schemas.openai import Usage
from ..upstream.client import at_work
from ..upstream.retry_after import client_retry_after, upstream_wait, wait_headers

__all__ = ["BREAKER_FAILURES", "NEXT_AT_ONCE", "NOT_SENT", "DeadlineExceeded", "Replay", "TargetsUnavailable",
           "aggregate", "backoff", "breaker_verdict", "classify", "final", "peek", "retry_after_s"]

# Failures that say something about the target's health. A 429 says it is busy (Retry-After
# covers it), a full local pool says the gateway is, a client error says nothing about the target;
# a refused credential says the target cannot be used until its key is fixed.
BREAKER_FAILURES = frozenset({"connect", "timeout", "server_error", "credentials"})
# Failures that go to the next target at once, whatever `retry_on` says, and are never retried on the same one: a
# full local pool (nothing was sent), the gateway's own credential refused (the same key would be refused again).
NEXT_AT_ONCE = frozenset({"busy", "credentials"})
# Failures of a target that sent nothing upstream: no attempt (`x-gateway-attempts` counts what was sent, or being
# sent), and the next target at once: a full local pool, a field (or an endpoint) the target's API lacks.
NOT_SENT = frozenset({"busy", "unsupported"})
_MAX_MESSAGE = 900
# Failures that hand the request on rather than fail it: a context overflow (to `context_fallback`), a field the
# target lacks (nothing sent: to the next target).
_PASSED_ON = frozenset({"context_length", "unsupported"})
# Failures the same request would meet again at once: the gateway's own key refused, a field no target has, a prompt
# too long, an answer too large to read (a client error is judged by its status: `final`).
_FINAL = frozenset({"credentials", "unsupported", "context_length", "too_large"})


class DeadlineExceeded(UpstreamTimeout):
    """504: the alias's `deadline_s` ran out before any attempt answered."""

    code = "deadline_exceeded"


class TargetsUnavailable(GatewayError):
    """503: every target's breaker is open and the policy says `when_all_open: refuse`."""

    status = 503
    type = "server_error"
    code = "targets_unavailable"


def classify(error: GatewayError) -> str:
    """The `retry_on` name of a failure, or `client_error` (never retried) / `busy` (the local pool) /
    `credentials` (the upstream refused the gateway's own key) / `unsupported` (the target cannot do what the
    request asks: the next one may) / `too_large` (an answer past `max_response_bytes`: never retried nor fallen
    back from, as every target would answer as large)."""
    if isinstance(error, Unsupported):
        return "unsupported"
    if isinstance(error, ContextLengthExceeded):
        return "context_length"
    if isinstance(error, RateLimited):
        return "rate_limit"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, GatewayBusy):
        return "busy"
    if isinstance(error, AnswerTooLarge):
        return "too_large"  # the request's own doing: the same size from every target (see `AnswerTooLarge`)
    if isinstance(error, CredentialsRejected):
        return "credentials"  # a 401/403 (or Gemini's 400 for a bad key): the gateway's fault, not the client's
    if isinstance(error, UpstreamError):
        status = error.upstream_status
        if status is not None and 400 <= status < 500:
            return "client_error"  # 404, 405...: the spec says no retry on other 4xx
        return "connect" if error.code == "upstream_unavailable" else "server_error"
    return "client_error"


def breaker_verdict(kind: str, error: GatewayError) -> bool | None:
    """What a failed attempt (`classify`'s `kind`) says of its target's health: True a failure, False a success (it
    answered: a client error, a context overflow, an `UnusableAnswer`, the model's fault), None nothing (a 429, a
    full local pool, a field it lacks)."""
    if kind in ("client_error", "context_length", "too_large") or isinstance(error, UnusableAnswer):
        return False
    return True if kind in BREAKER_FAILURES else None


def retry_after_s(error: GatewayError) -> float | None:
    """The upstream's wait in seconds, if it sent one: its `retry-after-ms` (the finer), else its Retry-After
    (delta or HTTP date), strictly read (`upstream.retry_after`)."""
    return upstream_wait(error.headers)


def backoff(policy: RetryPolicy, retry: int, error: GatewayError, rng: random.Random) -> float:
    """The wait before retry number `retry` (0-based): Retry-After up to its cap, else full jitter."""
    hinted = retry_after_s(error)
    if hinted is not None:
        return min(hinted, policy.retry_after_max_s)
    ceiling = min(policy.backoff_max_s, policy.backoff_s * (2 ** retry))
    return rng.uniform(0, ceiling)


def aggregate(alias: str, failures: Sequence[tuple[Target, GatewayError, str]]) -> GatewayError:
    """One error for all attempts: 429 when every one was rate limited (with the smallest Retry-After),
    504 when every one timed out, 503 `gateway_busy` when every target's local pool was full (nothing was
    sent), 503 `upstream_overloaded` when every one was overloaded (with the smallest Retry-After; Anthropic's
    529 to a Messages client, as a single attempt's is), a 400 when every target passed the request on
    (`_handed_on`), else 502 (with the smallest Retry-After when every attempt sent one: a 503's); its message
    lists each attempt.

    The status and Retry-After are those of the attempts that could have answered: a target that passed the
    request on (`_PASSED_ON`: to the context fallback, or to the next target) says nothing of why the request
    found no answer, and would turn the last target's 429 and its Retry-After into a bare 502."""
    if len(failures) == 1:
        return failures[0][1]
    error = _aggregate(alias, failures, _listed(failures, False))
    if any(failed.bare is not None for _, failed, _ in failures):  # (rare: an upstream's words in an attempt's)
        error.bare = _aggregate(alias, failures, _listed(failures, True)).message
    return error


def _listed(failures: Sequence[tuple[Target, GatewayError, str]], bare: bool) -> str:
    """Each attempt's message (`bare`: without the upstream's words, `GatewayError.bare`), in one bounded text."""
    listed = "; ".join(f"{target.name}: {error.bare if bare and error.bare is not None else error.message}"
                       for target, error, _ in failures)
    return listed[:_MAX_MESSAGE] + "..." if len(listed) > _MAX_MESSAGE else listed


def _aggregate(alias: str, failures: Sequence[tuple[Target, GatewayError, str]], listed: str) -> GatewayError:
    """`aggregate`'s error, its message listing the attempts as `listed`."""
    deciding = [failure for failure in failures if failure[2] not in _PASSED_ON]
    if not deciding:
        return _handed_on(alias, failures, listed)
    kinds = {kind for _, _, kind in deciding}
    hints = [h for _, error, _ in deciding if (h := retry_after_s(error)) is not None]
    wait: dict[str, str] = {}
    if hints:  # the smallest wait, as the upstream gave it; `Retry-After`, in whole seconds, at least one
        wait = {**wait_headers(min(hints)), "Retry-After": client_retry_after(max(1.0, min(hints)))}
    what = f"all {len(failures)} attempts for `{alias}` failed ({listed})"
    if kinds == {"rate_limit"}:
        return RateLimited(what, headers=wait)
    if kinds == {"timeout"}:
        return _timed_out(what, [error for _, error, _ in deciding])
    if kinds == {"busy"}:
        return GatewayBusy(what, headers={"Retry-After": "1"})
    if _all_overloaded(deciding):
        return UpstreamOverloaded(what, headers=wait)
    return AllTargetsFailed(what, headers=wait if len(hints) == len(deciding) else None)


def _timed_out(what: str, errors: Sequence[GatewayError]) -> UpstreamTimeout:
    """The 504 of attempts that all timed out, keeping what they said of the upstreams' work (`at_work`): a connect
    timeout when every one was one (nothing was sent); the upstream's own status (its 504 or 408, the last one's)
    when none had its upstream at work and some answered one (the others connect timeouts, or cut by the alias's
    deadline), as a single such attempt's error holds it; else a plain timeout, the gateway's own wait. (Whether the
    request is billed is the router's to say, from every attempt: `router._left_at_work`.)"""
    if all(isinstance(error, UpstreamConnectTimeout) for error in errors):
        return UpstreamConnectTimeout(what)
    error = UpstreamTimeout(what)
    if not any(at_work(failed) for failed in errors):
        statuses = [failed.upstream_status for failed in errors if failed.upstream_status is not None]
        if statuses:
            error.upstream_status = statuses[-1]
    return error


def _handed_on(alias: str, failures: Sequence[tuple[Target, GatewayError, str]], listed: str) -> GatewayError:
    """The client's 400 when every target passed the request on, none could have answered: a 502 would blame the
    upstreams (and count as their failure) for a request the client can change. The prompt too long when a target
    refused it so (a shorter one fits there; the context fallback's targets lack the endpoint or a field the request
    asks, or refused it too), else what no target supports, with the code they all gave (`unsupported_endpoint`)."""
    too_long = [error for _, error, kind in failures if kind == "context_length"]
    if too_long:
        return ContextLengthExceeded(f"the prompt is too long for `{alias}`, whose context fallback could not take "
                                     f"the request ({listed})", param=too_long[-1].param)
    return Unsupported(f"no target of `{alias}` supports this request ({listed})", param=failures[0][1].param,
                       code=_shared_code(failures))


def _shared_code(failures: Sequence[tuple[Target, GatewayError, str]]) -> str | None:
    """The code every failure gave (`unsupported_endpoint` when no target's API has the endpoint), else None (the
    class's own, `unsupported_parameter`)."""
    codes = {error.code for _, error, _ in failures}
    return codes.pop() if len(codes) == 1 else None


def final(failures: Sequence[tuple[Target, GatewayError, str]]) -> bool:
    """Whether the client sending the request again would meet the same error: every attempt that could have
    answered (as `aggregate` judges them) failed for a reason a retry does not change. The error then says
    `x-should-retry: false`, which the openai and anthropic SDKs obey: without it they send a 502 (an upstream's
    404, a refused key) twice more. Not for a 429, a 5xx, a timeout, a full pool or an open breaker, which may clear;
    nor for an upstream's 409, which OpenAI's SDK retries (a conflict may clear), nor for an error of the gateway's
    own with a 5xx (`classify` names it a `client_error` too)."""
    deciding = [failure for failure in failures if failure[2] not in _PASSED_ON] or failures
    return bool(deciding) and all(_final(error, kind) for _, error, kind in deciding)


def _final(error: GatewayError, kind: str) -> bool:
    if kind in _FINAL:
        return True
    if kind != "client_error":
        return False
    status = error.upstream_status
    return status != 409 if status is not None else error.status < 500


def _all_overloaded(failures: Sequence[tuple[Target, GatewayError, str]]) -> bool:
    """Whether every attempt was told the upstream is overloaded (`classify` names it a `server_error`, as any 5xx:
    the client is told the overload, which it may retry, not a bare 502)."""
    return all(isinstance(error, UpstreamOverloaded) for _, error, _ in failures)


async def peek(source: EventSource) -> tuple[list[list[StreamEvent]], AsyncIterator[list[StreamEvent]]]:
    """Read batches until the first content event (or the clean end); raise the error of a stream that
    fails before it. Returns the batches read and the iterator to go on with."""
    iterator = aiter(source)
    buffered: list[list[StreamEvent]] = []
    while True:
        try:
            batch = await anext(iterator)
        except StopAsyncIteration:
            raise UpstreamError("the upstream stream ended before any content") from None
        buffered.append(batch)
        for event in batch:
            if isinstance(event, (Chunk, StreamDone)):
                return buffered, iterator
            if isinstance(event, StreamError):
                raise event.error


class Replay:
    """A peeked stream: the buffered batches first, then the rest, as one `EventSource`."""

    __slots__ = ("_buffered", "_closed", "_iterator", "_on_close", "_source")

    def __init__(
        self, source: EventSource, buffered: list[list[StreamEvent]], iterator: AsyncIterator[list[StreamEvent]],
        on_close: Callable[[], None],
    ) -> None:
        self._source = source
        self._buffered = buffered
        self._iterator = iterator
        self._on_close = on_close
        self._closed = False

    def read_choices(self, reader: ChoicesReader) -> bool:
        """The source's `read_choices(reader, earlier)`, `earlier` the buffered chunks (decoded while the attempt
        was peeked at: their choices on the events up to the first text), which `reader` takes first. (None of the
        source's later chunks is decoded before this stream is read.)"""
        take = getattr(self._source, "read_choices", None)
        if take is None:
            return False
        earlier = [event for batch in self._buffered for event in batch if isinstance(event, Chunk)]
        return bool(take(reader, earlier))

    @property
    def usage_so_far(self) -> Usage | None:
        """The source's (`pipeline.streams.StreamEnd.usage_so_far`): a routed stream that ends early keeps the
        upstream's prompt figures too."""
        so_far: Usage | None = getattr(self._source, "usage_so_far", None)
        return so_far

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[list[StreamEvent]]:
        buffered, self._buffered = self._buffered, []
        for batch in buffered:
            yield batch
        try:
            async for batch in self._iterator:
                yield batch
        except GatewayError as exc:
            yield [StreamError(exc)]
        except Exception:  # noqa: BLE001 -- a provider bug mid-stream ends this stream, not the process
            yield [StreamError(InternalError("the stream ended unexpectedly"))]

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_close()
            await self._source.aclose()
