"""A stream a hard budget cuts ends every choice it asked for with `finish_reason: "length"`, in its endpoint's
chunk shape (`accounting.settling._final`): `n` choices of a chat, `n` for each prompt a completion lists. The
last chunk finished choice 0 only, and a client's other choices never ended.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp


def _policy(upstream: MockUpstream) -> str:
    # Reserved: a short prompt and 10 tokens (~$0.02); past them 10 more do not fit the $0.03: cut.
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 1000, output_per_mtok: 2000}}
        models:
          chat: {{provider: mock, model: mock-model}}
        accounting: {{default_max_tokens: 10}}
        tenants:
          acme:
            budget: {{usd: 0.03, period: day, mode: hard}}
        """)


def _events(gateway: RunningGateway, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", gateway.base_url + path, json={"model": "chat", "stream": True, **body},
                      headers={"Authorization": f"Bearer {FULL_KEY}"}, timeout=30) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    return [json.loads(frame.removeprefix("data: ")) for frame in raw.split("\n\n") if frame.startswith("data: {")]


@pytest.mark.parametrize(("path", "body", "choices"), [
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 2),
    ("/completions", {"prompt": "hi", "n": 2}, 2),
    ("/completions", {"prompt": ["hi", "yo"], "n": 2}, 4),  # n for each prompt listed
    ("/completions", {"prompt": ["hi", "yo", "ok"]}, 3),
])
def test_a_cut_stream_finishes_every_choice_it_asked_for(
    upstream: MockUpstream, path: str, body: dict[str, Any], choices: int,
) -> None:
    gateway = RunningGateway(_policy(upstream), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        events = _events(gateway, path, body)
    finally:
        gateway.stop()
    error, last = events[-1], events[-2]
    assert error["error"]["code"] == "budget_exceeded"  # cut by the budget
    finished = {choice["index"]: choice["finish_reason"] for choice in last["choices"]}
    assert finished == dict.fromkeys(range(choices), "length"), last
    chat = path == "/chat/completions"
    assert last["object"] == ("chat.completion.chunk" if chat else "text_completion")
    for choice in last["choices"]:  # the endpoint's chunk shape
        assert (choice["delta"] == {}) if chat else (choice["text"] == ""), choice
    earlier = [choice for event in events[:-2] for choice in event.get("choices", ())]
    assert {choice["index"] for choice in earlier} == set(range(choices))  # each one was open: none had finished
    assert not any(choice.get("finish_reason") for choice in earlier)


class _OneChoiceEarly(ThreadedApp):
    """An upstream whose choice 1 finishes at once, then, a read later, choice 0 runs long (past the budget)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(index: int, content: str | None, finish: str | None = None) -> None:
            delta = {} if content is None else {"content": content}
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "mock-model",
                     "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            await response.write(b"data: %s\n\n" % json.dumps(chunk).encode())

        await send(1, "Done.")
        await send(1, None, "stop")
        await asyncio.sleep(0.3)  # (another read: choice 1's finish passed in an earlier batch than the cut)
        for _ in range(60):
            await send(0, "word ")
            await asyncio.sleep(0.01)
        await send(0, None, "stop")
        await response.write(b"data: [DONE]\n\n")
        return response


def test_a_choice_finished_before_the_cut_is_not_finished_again() -> None:
    with _OneChoiceEarly() as wire:
        upstream = type("Wire", (), {"base_url": f"http://127.0.0.1:{wire.port}/v1"})()
        gateway = RunningGateway(_policy(upstream), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()  # type: ignore[arg-type]
        try:
            events = _events(gateway, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2})
        finally:
            gateway.stop()
    assert events[-1]["error"]["code"] == "budget_exceeded"
    finishes = [(choice["index"], choice["finish_reason"]) for event in events[:-1]
                for choice in event.get("choices", ()) if choice.get("finish_reason")]
    assert finishes == [(1, "stop"), (0, "length")]  # choice 1 once, as the upstream finished it
