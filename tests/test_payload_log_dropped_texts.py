"""A payload log entry says how many prompt texts it left out: `input_dropped`.

An entry keeps `read_chars` characters of prompts in all, the newest texts (counted from the last one back), and
leaves out the ones before (`payload_log._entry_texts`). It did not say so: a reader could not tell a conversation
whose earlier turns were dropped from one that started there. Each entry now carries `input_dropped`, the number of
texts left out before its `input` (0: all of them are there), streamed or not, with the file sink.

`max_text_chars: 4000`: `read_chars` is 2 x 4,000 + 4,096 = 12,096 characters of prompts; each text is written up to
4,000 characters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.telemetry.payload_log import _UNSURE_TAIL
from tests.conftest import FULL_KEY, RunningGateway, policy_text

Make = Callable[..., RunningGateway]
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MAX_TEXT = 4_000
READ = 2 * MAX_TEXT + _UNSURE_TAIL
QUESTION = "what is the capital of France?"


def _texts(size: int) -> list[str]:
    """Six texts of `size` characters, told apart by their first word."""
    return [(f"t{n} " + "word " * size)[:size] for n in range(6)]


@pytest.fixture
def logged(make_gateway: Make, upstream: Any, tmp_path: Path) -> Callable[[list[str], bool], dict[str, Any]]:
    """Sends a chat request of these texts (a user message each, then `QUESTION`), streamed or not, and returns
    its payload log entry, read from the file sink."""
    path = tmp_path / "payloads.jsonl"
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}', max_text_chars: 4000}}\n"))
    sent = 0

    def send(texts: list[str], stream: bool) -> dict[str, Any]:
        nonlocal sent
        sent += 1
        request_id = f"dropped-{sent}"
        body = {"model": "chat", "max_tokens": 5, "stream": stream,
                "messages": [{"role": "user", "content": t} for t in [*texts, QUESTION]]}
        answer = httpx.post(f"{running.base_url}/chat/completions", json=body,
                            headers={**AUTH, "x-request-id": request_id}, timeout=30)
        assert answer.status_code == 200, answer.text[:300]
        deadline = time.monotonic() + 20
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            entries = [json.loads(line) for line in lines]
            found = [entry for entry in entries if entry["request_id"] == request_id]
            if found:
                return found[0]
            assert time.monotonic() < deadline, "the entry was never written"
            time.sleep(0.05)

    return send


@pytest.mark.parametrize("stream", [False, True])
def test_an_entry_with_every_text_says_none_was_dropped(logged: Callable[..., dict[str, Any]], stream: bool) -> None:
    texts = _texts(1_000)
    entry = logged(texts, stream)
    assert entry["input"] == [*texts, QUESTION]
    assert entry["input_dropped"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_entry_says_how_many_earlier_texts_it_left_out(logged: Callable[..., dict[str, Any]],
                                                          stream: bool) -> None:
    """Texts of 5,000: the question and the last two fit, the one before them would keep only characters of the
    unsure tail (never written): it is left out, and the three before it."""
    texts = _texts(5_000)
    assert READ - len(QUESTION) - 2 * 5_000 <= _UNSURE_TAIL
    entry = logged(texts, stream)
    assert entry["input"] == [texts[4][:MAX_TEXT], texts[5][:MAX_TEXT], QUESTION]
    assert entry["input_dropped"] == 4


@pytest.mark.parametrize("stream", [False, True])
def test_a_text_cut_to_its_head_is_not_counted_as_left_out(logged: Callable[..., dict[str, Any]],
                                                           stream: bool) -> None:
    """Texts of 7,000: the question and the last one fit, the one before it is cut to its head (written in part):
    the four before it are left out."""
    texts = _texts(7_000)
    left = READ - len(QUESTION) - 7_000
    assert left > _UNSURE_TAIL
    entry = logged(texts, stream)
    assert entry["input"] == [texts[4][: left - _UNSURE_TAIL], texts[5][:MAX_TEXT], QUESTION]
    assert entry["input_dropped"] == 4
