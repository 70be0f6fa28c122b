"""Unit tests of how a request watches for its client leaving: a callback from the gateway's own HTTP
protocol when it offers one (no task per request), else a watcher task on `receive`."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.pipeline.lifecycle import DISCONNECT_HOOK, Lifecycle


class Cycle:
    """Stands for uvicorn's request cycle as the gateway's protocol leaves it: `receive` bound to it,
    the hook attribute present."""

    def __init__(self) -> None:
        self.disconnected = False
        self.received = 0
        setattr(self, DISCONNECT_HOOK, None)

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    def lose_connection(self) -> None:  # what `LimitedHttpToolsProtocol.connection_lost` does
        self.disconnected = True
        hook = getattr(self, DISCONNECT_HOOK)
        if hook is not None:
            setattr(self, DISCONNECT_HOOK, None)
            hook()


async def _request(life_box: list[Lifecycle], watch: Any) -> None:
    task = asyncio.current_task()
    assert task is not None
    life = Lifecycle(task)
    life_box.append(life)
    watch(life)
    await asyncio.sleep(3600)


async def test_behind_the_gateways_protocol_a_lost_connection_cancels_the_request_without_a_task() -> None:
    cycle, box = Cycle(), []
    tasks_before = len(asyncio.all_tasks())
    request = asyncio.ensure_future(_request(box, lambda life: life.watch(cycle.receive)))
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == tasks_before + 1  # the request's own task only: no watcher
    assert getattr(cycle, DISCONNECT_HOOK) is not None and cycle.received == 0
    cycle.lose_connection()
    await asyncio.gather(request, return_exceptions=True)
    assert request.cancelled() and box[0].reason == "client_gone"


async def test_a_request_that_stopped_watching_is_not_called_back() -> None:
    cycle, box = Cycle(), []
    request = asyncio.ensure_future(_request(box, lambda life: life.watch(cycle.receive)))
    await asyncio.sleep(0)
    box[0].stop()
    assert getattr(cycle, DISCONNECT_HOOK) is None
    cycle.lose_connection()
    await asyncio.sleep(0)
    assert not request.done() and box[0].reason is None
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)


async def test_a_client_already_gone_when_watching_starts_cancels_at_once() -> None:
    cycle, box = Cycle(), []
    cycle.disconnected = True
    request = asyncio.ensure_future(_request(box, lambda life: life.watch(cycle.receive)))
    await asyncio.gather(request, return_exceptions=True)
    assert request.cancelled() and box[0].reason == "client_gone"


async def test_behind_another_server_a_watcher_task_reads_the_disconnect() -> None:
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive() -> dict[str, Any]:  # a plain ASGI receive: no hook offered
        return await messages.get()

    box: list[Lifecycle] = []
    request = asyncio.ensure_future(_request(box, lambda life: life.watch(receive)))
    await asyncio.sleep(0)
    await messages.put({"type": "http.request", "body": b"", "more_body": False})  # not a disconnect: ignored
    await asyncio.sleep(0.01)
    assert not request.done()
    await messages.put({"type": "http.disconnect"})
    await asyncio.gather(request, return_exceptions=True)
    assert request.cancelled() and box[0].reason == "client_gone"
