"""The request pipeline: an ordered list of small stages, composed once.

Each stage is `async (ctx, call_next) -> Reply`. It may answer early (an error, a
cache hit), call `call_next(ctx)` and return its reply, or wrap that reply (a
stream wrapper for output guards, accounting...). The chain of bound calls is
built once when the app starts, so a request pays only for the stages' own work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol

from ..errors import InternalError
from .context import Reply, RequestContext

__all__ = ["Next", "Pipeline", "Stage"]

Next = Callable[[RequestContext], Awaitable[Reply]]


class Stage(Protocol):
    name: str

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply: ...


async def _end_of_pipeline(ctx: RequestContext) -> Reply:
    raise InternalError("the pipeline has no terminal stage")


class Pipeline:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        handler: Next = _end_of_pipeline
        for stage in reversed(self.stages):
            handler = partial(stage, call_next=handler)
        self._entry = handler

    def run(self, ctx: RequestContext) -> Awaitable[Reply]:
        return self._entry(ctx)
