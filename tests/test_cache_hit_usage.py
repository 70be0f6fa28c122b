"""A cache hit of an answer whose upstream reported no usage, on `/v1/messages`: the client is shown the usage its
miss showed (the gateway's estimate: Messages has no answer without usage, docs/providers.md), while the hit bills
nothing (docs/cache.md). A real gateway, the mock upstream's `fault-no-usage`."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_cache import AUTH, cache_policy

NOUSAGE = "nousage: {provider: mock, model: fault-no-usage, cache: {}}\n"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def _tokens_billed(gw: RunningGateway) -> list[str]:
    """The alias's `gateway_tokens_total` lines: what its requests were billed."""
    return [line for line in gw.metrics().splitlines()
            if line.startswith("gateway_tokens_total{") and 'model="nousage"' in line]


def _message_delta_usage(text: str) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith("data:"):
            event = json.loads(line[5:])
            if event.get("type") == "message_delta":
                return event["usage"]  # type: ignore[no-any-return]
    raise AssertionError(f"no message_delta in {text!r}")


def test_a_messages_hit_shows_the_estimate_its_miss_showed(make_gateway: Any, upstream: MockUpstream) -> None:
    gw = make_gateway(cache_policy(upstream.base_url, models=NOUSAGE))
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        ask: dict[str, Any] = {"model": "nousage", "max_tokens": 100, "messages": ASK,
                               "extra_body": {"temperature": 0}}  # (this SDK's `create` has no `temperature`)
        miss = client.messages.with_raw_response.create(**ask)
        assert miss.headers["x-gateway-cache"] == "miss"
        answer = miss.parse()
        assert answer.usage.input_tokens > 0 and answer.usage.output_tokens > 0  # the estimate
        time.sleep(0.3)  # the entry is written once the miss has left every stage
        billed = _tokens_billed(gw)
        hit = client.messages.with_raw_response.create(**ask)
        assert hit.headers["x-gateway-cache"] == "hit"
        again = hit.parse()
    assert again.content == answer.content
    assert again.usage.input_tokens == answer.usage.input_tokens
    assert again.usage.output_tokens == answer.usage.output_tokens
    assert billed and _tokens_billed(gw) == billed  # the hit spent nothing


def test_a_streamed_messages_hit_shows_the_estimate_in_its_message_delta(make_gateway: Any,
                                                                          upstream: MockUpstream) -> None:
    gw = make_gateway(cache_policy(upstream.base_url, models=NOUSAGE))
    body: dict[str, Any] = {"model": "nousage", "max_tokens": 100, "temperature": 0, "messages": ASK}
    miss = httpx.post(f"{gw.base_url}/messages", json=body, headers=AUTH, timeout=20)
    assert miss.status_code == 200 and miss.headers["x-gateway-cache"] == "miss"
    shown = miss.json()["usage"]
    assert shown["input_tokens"] > 0 and shown["output_tokens"] > 0
    time.sleep(0.3)
    billed = _tokens_billed(gw)
    with httpx.stream("POST", f"{gw.base_url}/messages", json={**body, "stream": True}, headers=AUTH,
                      timeout=20) as hit:
        assert hit.status_code == 200 and hit.headers["x-gateway-cache"] == "hit"
        text = hit.read().decode()
    usage = _message_delta_usage(text)
    assert (usage["input_tokens"], usage["output_tokens"]) == (shown["input_tokens"], shown["output_tokens"])
    assert billed and _tokens_billed(gw) == billed


@pytest.mark.parametrize("stream_hit", [False, True])
def test_a_hit_of_a_streamed_messages_miss_shows_the_estimate_its_miss_showed(
        make_gateway: Any, upstream: MockUpstream, stream_hit: bool) -> None:
    """The miss streamed (its upstream sent no usage: the gateway's estimate in its `message_delta`): the entry
    keeps that estimate, and a hit, complete or streamed, shows it, billing nothing."""
    gw = make_gateway(cache_policy(upstream.base_url, models=NOUSAGE))
    body: dict[str, Any] = {"model": "nousage", "max_tokens": 100, "temperature": 0, "messages": ASK, "stream": True}
    with httpx.stream("POST", f"{gw.base_url}/messages", json=body, headers=AUTH, timeout=20) as miss:
        assert miss.status_code == 200 and miss.headers["x-gateway-cache"] == "miss"
        shown = _message_delta_usage(miss.read().decode())
    assert shown["input_tokens"] > 0 and shown["output_tokens"] > 0
    time.sleep(0.3)
    billed = _tokens_billed(gw)
    if stream_hit:
        with httpx.stream("POST", f"{gw.base_url}/messages", json=body, headers=AUTH, timeout=20) as hit:
            assert hit.status_code == 200 and hit.headers["x-gateway-cache"] == "hit"
            usage = _message_delta_usage(hit.read().decode())
    else:
        hit = httpx.post(f"{gw.base_url}/messages", json={**body, "stream": False}, headers=AUTH, timeout=20)
        assert hit.status_code == 200 and hit.headers["x-gateway-cache"] == "hit"
        usage = hit.json()["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (shown["input_tokens"], shown["output_tokens"])
    assert billed and _tokens_billed(gw) == billed
