"""The demo model's answers are bounded: prompts x `n` at most 128 a request, chat or completions, streamed or not,
refused with a 400 before any is made. Unbounded, a 24 KB completions request (4,000 prompts, `n` 128) made half a
million answers (100 MB) on the event loop and held every other request of the process for seconds."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import FULL_KEY, RunningGateway

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
BOUND = 128


def _post(gateway: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gateway.base_url + path, headers=AUTH, json=body, timeout=60)


def _streamed_choices(gateway: RunningGateway, path: str, body: dict[str, Any]) -> set[int]:
    """The indices of the choices a streamed answer carried (it must end with `[DONE]`)."""
    seen: set[int] = set()
    with httpx.stream("POST", gateway.base_url + path, headers=AUTH, json={**body, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        seen.update(choice["index"] for choice in json.loads(line)["choices"])
    return seen


@pytest.mark.parametrize(("prompts", "n", "param"), [(4000, 128, "prompt"), (BOUND + 1, 1, "prompt"),
                                                      (2, 65, "n"), (16, 9, "n")])
@pytest.mark.parametrize("stream", [False, True])
def test_completions_over_the_bound_are_refused(gateway: RunningGateway, prompts: int, n: int, param: str,
                                                stream: bool) -> None:
    started = time.monotonic()
    response = _post(gateway, "/completions", {"model": "demo", "prompt": ["hi"] * prompts, "n": n, "stream": stream})
    assert response.status_code == 400, (response.status_code, len(response.content))
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert f"at most {BOUND} answers" in error["message"] and f"{prompts} x {n}" in error["message"]
    assert time.monotonic() - started < 5


def test_completions_at_the_bound_are_answered(gateway: RunningGateway) -> None:
    body = {"model": "demo", "prompt": [f"prompt {i}" for i in range(16)], "n": 8}
    answer = _post(gateway, "/completions", body)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert [c["index"] for c in choices] == list(range(BOUND))
    assert "prompt 15" in choices[-1]["text"]
    assert _streamed_choices(gateway, "/completions", body) == set(range(BOUND))


def test_chat_answers_up_to_the_bound(gateway: RunningGateway) -> None:
    """Chat has one prompt: its `n` (at most 128, as OpenAI's) is the bound itself."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": BOUND}
    answer = _post(gateway, "/chat/completions", body)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == BOUND
    assert _streamed_choices(gateway, "/chat/completions", body) == set(range(BOUND))
    refused = _post(gateway, "/chat/completions", {**body, "n": BOUND + 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
