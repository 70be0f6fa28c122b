"""A stream a hard budget cuts ends every choice it asked for with `finish_reason: "length"`, in its endpoint's
chunk shape (`accounting.settling._final`): `n` choices of a chat, `n` for each prompt a completion lists. The
last chunk finished choice 0 only, and a client's other choices never ended.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream


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
