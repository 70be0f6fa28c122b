"""The close of a background writer (the OTLP exporter, the payload log): its task finishes what is queued, within a
bound, and is cut only then.

A sink that accepts and never answers (a stalled collector, a blocked file system) must not hold a shutdown, and a
write must not be cut short for nothing: so the task is asked to finish (`closing`, its wake-up set) and waited for, and
cancelled only when the bound passes. What is still queued then is the caller's to count as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

__all__ = ["finish_within"]


async def finish_within(task: asyncio.Task[None], wake: asyncio.Event, seconds: float, log: logging.Logger,
                        name: str) -> None:
    """Wake `task` (its owner has set its closing flag) and wait up to `seconds` for it to end; past them, cancel it and
    wait for the cancellation. A task that had already stopped on an error is reported, as `name`."""
    wake.set()
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    elif not task.cancelled() and task.exception() is not None:
        log.warning("%s had stopped", name, exc_info=task.exception())
