"""What a target's health is judged by beside the walk: a streamed attempt's whole stream, and the health check.

A streamed attempt answers once its stream opens (at its first content event when the walk could still fall
back), but whether the upstream served it shows only at its end. Judged when it opens, an upstream that fails
every stream after its first chunk would be a success on every request: it would never trip its breaker, and
each stream would reset its consecutive failures. So the walk tells the breaker only that the stream opened
(`Breakers.opened`, which closes a breaker that was not closed: a probe is not held for the length of a stream)
and adds the router's `StreamVerdicts` to the stream; its `on_end` judges the attempt once, by how the stream
ended (`Breakers.ended`), and only then counts it in `gateway_upstream_attempts_total`:

- it finished: a success, outcome `ok`;
- the upstream ended it (its last event is the upstream's failure, raised as an `UpstreamError`, an
  `UpstreamTimeout` or the upstream's `RateLimited`: a reset connection, a read timeout, an error event, a body cut
  before its end): the outcome is `classify`'s name for it, as for an attempt that failed before answering:
  `connect`, `timeout`, `server_error` and `credentials` are a breaker failure, `client_error` a success (it answered),
  `rate_limit` no verdict; in `ctx.attempts` (listed by the access log once an attempt before it failed) it
  replaces the stream's `ok`;
- anything else ended it (the client left, a shutdown or a drain deadline, a guard, a budget, a gateway bug; the
  alias's deadline too, though it bounds only the attempts before an answer; the exchange's `total_s` passing while
  the gateway was held writing to a slow client, `StreamDeadlinePassed`, not an `UpstreamTimeout`): no verdict,
  as for an attempt cancelled before it answered (a client that gives up on a stalled stream says nothing of the
  upstream either way), and outcome `ok`: the upstream did not fail it (the access log says so of a lone attempt too).

One `StreamVerdicts` per router, and nothing kept per request: the target is the request's last (`ctx.target`),
the breakers those of the policy the request started under (it holds its runtime; `Breakers` hands a verdict that
comes after a reload on to the policy in force).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..errors import BudgetExceeded, GatewayError, RateLimited, UpstreamError, UpstreamTimeout
from ..pipeline.streams import StreamEnd
from ..policy.compiled import Target
from ..providers.base import Call, Provider
from ..schemas.endpoints import Endpoint
from ..telemetry.series import loop_child, loop_value
from .attempts import BREAKER_FAILURES, DeadlineExceeded, breaker_verdict, classify
from .breaker import Breakers

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext
    from ..schemas.events import StreamEvent

__all__ = ["StreamVerdicts", "check_health", "stream_outcome"]

_UPSTREAM_ENDS = (UpstreamError, UpstreamTimeout, RateLimited)  # how an upstream's failure mid-stream is raised
_GATEWAY_ENDS = (DeadlineExceeded, BudgetExceeded)  # of those, the ones the gateway's own limits raise


def stream_outcome(end: StreamEnd) -> str | None:
    """A streamed attempt's outcome by how its stream ended: `ok` when it finished, `classify`'s name of the
    upstream's failure that ended it, None when something else did (see the module)."""
    if end.outcome == "done":
        return "ok"
    error = end.error
    if end.outcome != "error" or not isinstance(error, _UPSTREAM_ENDS) or isinstance(error, _GATEWAY_ENDS):
        return None
    return classify(error)


class StreamVerdicts:
    """The router's stream stage: at a routed stream's end, its attempt's verdict and count (see the module)."""

    reads_events = False  # only `on_end`: the stream's events pass as they would without it

    def __init__(self, breakers: Breakers, attempts: Any) -> None:
        self._breakers = breakers
        self._attempts = attempts  # the `gateway_upstream_attempts_total` metric
        self._ok: dict[str, Any] = {}  # a target's `ok` series, added to in line (`telemetry.series.loop_value`)

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events  # (never called: `reads_events` is False)

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        target = ctx.target
        if target is None:  # (the router set it before it added this stage)
            return
        name = target.name
        kind = "ok" if end.outcome == "done" else stream_outcome(end)
        if kind == "ok":
            self._breakers.ended(name, failed=False)
        elif kind is not None:
            self._failed(ctx, name, kind, end.error)
            return
        ok = self._ok.get(name)
        if ok is None:
            ok = self._ok[name] = loop_value(loop_child(self._attempts.labels(name, "ok")))
        ok._value += 1

    def _failed(self, ctx: RequestContext, name: str, kind: str, error: GatewayError | None) -> None:
        """The upstream ended the stream: the breaker's verdict as for an attempt that failed so before it answered
        (`breaker_verdict`), and the attempt counted, and listed (when the access log lists the attempts), with its
        failure."""
        failed = breaker_verdict(kind, error) if error is not None else None
        if failed is not None:
            self._breakers.ended(name, failed=failed)
        self._attempts.labels(name, kind).inc()
        attempts = ctx.attempts
        if attempts is not None:  # its entry is the last: no attempt follows one that answered
            _, _, ms = attempts[-1]
            attempts[-1] = (name, kind, ms)


async def check_health(target: Target, provider: Provider, breakers: Breakers, attempts: Any) -> None:
    """A one-token request on an interval; its outcome feeds the breaker (a success closes it, unless the breaker
    opened after it was sent: `Breakers.checked`) and is counted in `attempts` (`gateway_upstream_attempts_total`)
    as `health_<outcome>`."""
    assert target.health_check is not None
    check = target.health_check
    body = {"model": target.upstream_model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
    while True:
        await asyncio.sleep(check.interval_s)
        began = breakers.check_began(target.name)
        try:
            async with asyncio.timeout(check.timeout_s):
                await provider.complete(Call(Endpoint.CHAT, {**body, **target.extra_body}, False, "health-check",
                                             target.timeouts))
        except (GatewayError, TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else classify(exc)
            if kind in BREAKER_FAILURES:
                breakers.failure(target.name)
            attempts.labels(target.name, "health_" + kind).inc()
        else:
            breakers.checked(target.name, began)
            attempts.labels(target.name, "health_ok").inc()
