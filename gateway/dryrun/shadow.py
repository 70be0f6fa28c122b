"""Shadow policies: a candidate policy decides every request beside the live one, and the two are compared.

The request's path pays one `put_nowait` on a bounded queue (the request's raw body, its
credential, headers and dialect): never a wait, and when the queue is full the request is
dropped from the comparison and counted. One background task takes requests off the queue,
decodes each as Ingress did (a `/v1/messages` body into the chat request the live pipeline
decided), and decides it under both policies with `dryrun.decide` (the live policy is
re-decided the same offline way, so the two sides are compared like for like), then counts
each kind of decision on which they differ. Nothing is sent upstream; no breaker, statistic,
store or live metric is touched (each decider counts into metrics that record nothing,
`dryrun.unrecorded`). Promoting the candidate is a reload: point `server.shadow_policy` at
nothing and copy the candidate in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import Any

from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..policy.compiled import Policy
from ..telemetry.metrics import Metrics
from ..telemetry.tokens import TokenCounter
from .decide import Decider, DecisionRequest, decoded
from .decisions import KINDS, disagreements

__all__ = ["Shadow", "ShadowStage"]

log = logging.getLogger("gateway.shadow")


class Shadow:
    """A runtime service: the two deciders, the queue and the task that compares."""

    def __init__(self, live: Policy, candidate: Policy, metrics: Metrics, tokens: TokenCounter | None) -> None:
        self.live = Decider(live, tokens)
        self.candidate = Decider(candidate, tokens)
        self.metrics = metrics
        self.queue: asyncio.Queue[DecisionRequest] = asyncio.Queue(live.server.shadow_queue)
        self.sample = live.server.shadow_sample
        self._rng = random.Random()
        self._task: asyncio.Task[None] | None = None
        self._dropped = metrics.shadow_requests.labels("dropped")
        self._compared = metrics.shadow_requests.labels("compared")
        self._failed = metrics.shadow_requests.labels("failed")
        self._kinds = {kind: metrics.shadow_disagreements.labels(kind) for kind in KINDS}

    async def start(self) -> None:
        await asyncio.gather(self.live.start(), self.candidate.start())
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(self.live.aclose(), self.candidate.aclose())

    def submit(self, ctx: RequestContext) -> None:
        """Offer a request (its body already read) for comparison; never waits."""
        if self.sample < 1.0 and self._rng.random() >= self.sample:
            return
        # The raw body (a later stage may rewrite `ctx.body` in place: a guard's redaction) and its dialect: decoded
        # off the request's path into the body the live pipeline decides (`/v1/messages`: the translated chat body).
        request = DecisionRequest(ctx.raw_body, ctx.endpoint, ctx.head.credential, None, ctx.head.raw_headers,
                                  ctx.key, ctx.dialect)
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            self._dropped.inc()

    async def _work(self) -> None:
        while True:
            request = await self.queue.get()
            if request.run_time_key is not None and request.credential is not None and \
                    self.live.policy.keys.find(request.credential) is not None:  # a policy key, not a run-time one
                request = dataclasses.replace(request, run_time_key=None)
            try:
                try:
                    body: dict[str, Any] | None = decoded(request)[0]  # once for both sides
                except Exception:  # noqa: BLE001 -- each side then reports the refusal itself
                    body = None
                live = await self.live.decide(request, body)
                candidate = await self.candidate.decide(request, body)
            except Exception as exc:  # noqa: BLE001 -- a shadow failure must never reach a request
                log.error("shadow decision failed: %s", type(exc).__name__)
                self._failed.inc()
                continue
            self._compared.inc()
            for kind in disagreements(live, candidate):
                self._kinds[kind].inc()

    async def drained(self) -> None:
        """Wait until every offered request has been compared (tests)."""
        while not self.queue.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)


class ShadowStage:
    """After Ingress (the body is read): offer the request to the shadow policy, then go on at once."""

    name = "shadow"

    def __init__(self, shadow: Shadow) -> None:
        self.shadow = shadow

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        self.shadow.submit(ctx)
        return await call_next(ctx)

