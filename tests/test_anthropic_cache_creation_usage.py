"""Anthropic's cache writes split by lifetime reach a `/v1/messages` client (a real gateway, a mock Anthropic).

Anthropic's current API reports its prompt cache writes in `cache_creation_input_tokens` and, split by lifetime, in
`usage.cache_creation` (`ephemeral_5m_input_tokens`, `ephemeral_1h_input_tokens`): in a complete answer and in a
stream's `message_start` (its `message_delta` repeats the totals only). The gateway read the split to bill the 1-hour
writes at their rate, but its `/v1/messages` answers dropped it: an `anthropic` SDK client got `cache_creation: None`
where Anthropic itself gives the split. Now a complete answer carries it as Anthropic's does, and a stream in its
`message_delta` (the gateway's `message_start` knows no usage yet: it says 0), both parsed by the real `anthropic`
SDK. A usage without the split (Anthropic's older API, an OpenAI-compatible upstream's cache writes) gets none: the
gateway never makes one up.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web
from anthropic.types import CacheCreation

from gateway.translate.anthropic_answer import messages_answer
from tests.conftest import RunningGateway
from tests.support.mock_anthropic import MockAnthropic, _event
from tests.support.mock_upstream import _RECORD, _deliver_json, _deliver_stream

ANTHROPIC_KEY = "sk-ant-cache-creation"
FRESH, READ = 10, 7  # uncached prompt tokens, and tokens read from the cache
WORDS = ["split", "usage", "here"]


class SplitAnthropic(MockAnthropic):
    """The Anthropic mock reporting cache writes as the model name says: `split-<5m>-<1h>` with the split in
    `cache_creation` (the current API), `total-<n>` with `cache_creation_input_tokens` alone (the older API). The
    split is in a complete answer's usage and in `message_start`'s; `message_delta` carries the totals without it,
    as the real API's does."""

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = request[_RECORD].json or {}
        kind, *counts = body["model"].split("-")
        usage: dict[str, Any] = {"input_tokens": FRESH, "cache_read_input_tokens": READ, "output_tokens": len(WORDS)}
        if kind == "split":
            five, hour = int(counts[0]), int(counts[1])
            usage["cache_creation_input_tokens"] = five + hour
            usage["cache_creation"] = {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": hour}
        else:
            usage["cache_creation_input_tokens"] = int(counts[0])
        base = {"id": "msg_split", "type": "message", "role": "assistant", "model": body["model"]}
        if not body.get("stream"):
            answer = {**base, "content": [{"type": "text", "text": " ".join(WORDS)}], "stop_reason": "end_turn",
                      "stop_sequence": None, "usage": usage}
            return await _deliver_json(request, answer, None)
        stream = self._stream(base, WORDS, usage, False, None)
        totals = {key: value for key, value in usage.items() if key != "cache_creation"}
        stream.events[-2] = _event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                                   usage=totals)
        return await _deliver_stream(request, stream, None)


@pytest.fixture(scope="module")
def claude() -> Iterator[SplitAnthropic]:
    with SplitAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


MODELS = ("split-20000-100000", "split-20000-0", "split-0-100000", "split-0-0", "total-5000")


@pytest.fixture(scope="module")
def gw(claude: SplitAnthropic) -> Iterator[RunningGateway]:
    models = "\n".join(f"  {model}: {{provider: claude, model: {model}}}" for model in MODELS)
    policy = textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          claude: {{kind: anthropic, base_url: {claude.base_url}, api_key_env: ANTHROPIC_KEY}}
        models:
        """) + models + "\n"
    running = RunningGateway(policy, {"ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def sdk(gw: RunningGateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=15) as client:
        yield client


def _split(model: str) -> tuple[int, int]:
    _, five, hour = model.split("-")
    return int(five), int(hour)


def _ask(sdk: anthropic.Anthropic, model: str) -> anthropic.types.Message:
    return sdk.messages.create(model=model, max_tokens=50, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("model", ["split-20000-100000", "split-20000-0", "split-0-100000"])
def test_a_complete_answer_carries_the_split(sdk: anthropic.Anthropic, model: str) -> None:
    """As Anthropic answers: the total, and the split parsed by the SDK as its `CacheCreation` (5-minute writes
    alone too, the common case, where `ephemeral_1h_input_tokens` is 0)."""
    five, hour = _split(model)
    usage = _ask(sdk, model).usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens,
            usage.output_tokens) == (FRESH, READ, five + hour, len(WORDS))
    assert isinstance(usage.cache_creation, CacheCreation), usage
    assert (usage.cache_creation.ephemeral_5m_input_tokens, usage.cache_creation.ephemeral_1h_input_tokens) \
        == (five, hour)


def test_a_read_only_answer_carries_a_split_of_zeros(sdk: anthropic.Anthropic) -> None:
    """Cache reads without writes: Anthropic's split says 0 and 0, and so does the gateway's."""
    usage = _ask(sdk, "split-0-0").usage
    assert usage.cache_read_input_tokens == READ and usage.cache_creation_input_tokens == 0
    assert usage.cache_creation is not None
    assert (usage.cache_creation.ephemeral_5m_input_tokens, usage.cache_creation.ephemeral_1h_input_tokens) == (0, 0)


def test_no_split_is_made_up(sdk: anthropic.Anthropic) -> None:
    """Anthropic's older API gives the total alone: so does the gateway (a split would be a guess)."""
    usage = _ask(sdk, "total-5000").usage
    assert usage.cache_creation_input_tokens == 5000 and usage.cache_creation is None


def _stream_events(gw: RunningGateway, model: str) -> list[tuple[str, dict[str, Any]]]:
    body = {"model": model, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(gw.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"},
                          timeout=15)
    assert response.status_code == 200, response.text
    events = []
    for frame in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.parametrize("model", ["split-20000-100000", "split-20000-0"])
def test_a_stream_carries_the_split_in_message_delta(gw: RunningGateway, sdk: anthropic.Anthropic,
                                                     model: str) -> None:
    """The usage the gateway writes at the end of a stream (`message_delta`'s: its `message_start` says 0) has the
    split beside the totals; the SDK parses the event, the split as an extra field of its usage."""
    five, hour = _split(model)
    split = {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": hour}
    events = _stream_events(gw, model)
    [usage] = [data["usage"] for kind, data in events if kind == "message_delta"]
    assert usage == {"input_tokens": FRESH, "output_tokens": len(WORDS), "cache_read_input_tokens": READ,
                     "cache_creation_input_tokens": five + hour, "cache_creation": split}, usage
    with sdk.messages.stream(model=model, max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as stream:
        deltas = [event for event in stream if event.type == "message_delta"]
        final = stream.get_final_message()
    assert len(deltas) == 1 and deltas[0].usage.cache_creation_input_tokens == five + hour
    assert (deltas[0].usage.model_extra or {}).get("cache_creation") == split
    assert final.usage.cache_creation_input_tokens == five + hour and final.usage.input_tokens == FRESH


def test_a_stream_without_the_split_has_none(gw: RunningGateway) -> None:
    [usage] = [data["usage"] for kind, data in _stream_events(gw, "total-5000") if kind == "message_delta"]
    assert usage["cache_creation_input_tokens"] == 5000 and "cache_creation" not in usage, usage


def test_a_chat_client_sees_the_1_hour_writes_where_anthropic_split_them(gw: RunningGateway) -> None:
    """The carrier: `prompt_tokens_details.cache_write_1h_tokens`, 0 too when Anthropic split its writes (and only
    then), which the `/v1/messages` answer reads back."""
    with openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=15) as client:
        def details(model: str) -> dict[str, Any]:
            answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
            return answer.usage.prompt_tokens_details.model_dump(exclude_none=True)

        assert details("split-20000-0") == {"cached_tokens": READ, "cache_write_tokens": 20000,
                                            "cache_write_1h_tokens": 0}
        assert details("split-20000-100000")["cache_write_1h_tokens"] == 100000
        assert "cache_write_1h_tokens" not in details("total-5000")


def test_an_openai_compatible_upstream_s_cache_writes_get_no_split() -> None:
    """A chat answer with cache writes but no 1-hour count (an OpenAI-compatible upstream's): the total alone."""
    body = {"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                             "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 2, "total_tokens": 102,
                      "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 50}}}
    usage = messages_answer(json.dumps(body).encode())["usage"]
    assert usage == {"input_tokens": 20, "output_tokens": 2, "cache_read_input_tokens": 30,
                     "cache_creation_input_tokens": 50}
