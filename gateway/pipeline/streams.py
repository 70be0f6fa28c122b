"""Watching a chunk stream as it passes: per chunk, and exactly once at its end.

Stages that act on a streamed reply (telemetry now; accounting, output guards and
cache storing later) wrap its iterator. An async generator would not do: one that
was never started ignores `aclose()`, so a client that left before the first
chunk would skip the wrapper's clean-up (an in-flight count, an open upstream
connection). `StreamWatch` runs its end callback whether the stream finished,
failed, or was closed before or while it ran.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

__all__ = ["ClosedEarly", "StreamWatch"]


class ClosedEarly(Exception):
    """Passed to `on_end` when the consumer closed the stream before its end."""


class StreamWatch:
    __slots__ = ("_done", "_inner", "_iterator", "_on_chunk", "_on_end")

    def __init__(
        self,
        inner: AsyncIterable[bytes],
        on_end: Callable[[BaseException | None], None],
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> None:
        self._inner = inner
        self._iterator: AsyncIterator[bytes] | None = None
        self._on_chunk = on_chunk
        self._on_end = on_end
        self._done = False

    def __aiter__(self) -> StreamWatch:
        return self

    async def __anext__(self) -> bytes:
        if self._iterator is None:
            self._iterator = aiter(self._inner)
        try:
            chunk = await anext(self._iterator)
        except StopAsyncIteration:
            await self._finish(None)
            raise
        except BaseException as exc:
            await self._finish(exc)
            raise
        if self._on_chunk is not None:
            self._on_chunk(chunk)
        return chunk

    async def aclose(self) -> None:
        await self._finish(ClosedEarly())

    async def _finish(self, reason: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        try:
            await _close(self._iterator)
            if self._inner is not self._iterator:
                await _close(self._inner)
        finally:
            self._on_end(reason)


async def _close(thing: Any) -> None:
    close = getattr(thing, "aclose", None)
    if close is not None:
        await close()
