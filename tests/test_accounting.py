"""Accounting end to end: limits, budgets, cost and usage, through real gateways, the mock upstream and the
official `openai` SDK (memory store here; Redis and two processes in test_accounting_shared.py)."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.auth.keys import hash_key
from gateway.pipeline.streams import ReplyStream
from gateway.policy import PolicyError, compile_text
from gateway.schemas.events import StreamEvent
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import CACHED_SHARE, REASONING_TOKENS, MockUpstream

KEY = "gw-acct-test-key-000000000000000000000000"
OTHER = "gw-acct-test-other-1111111111111111111111"
ADMIN = "admin-token-for-accounting-tests"
MESSAGES = [{"role": "user", "content": "hello there"}]
ANSWER_WORDS = len(MockUpstream.REPLY_WORDS)  # completion tokens of every mock answer
# Prices: only output tokens cost, so that a reservation with `max_tokens: 20` is exactly the actual cost.
OUT_PER_MTOK = 1000.0  # $0.001 a token: one answer of 20 tokens costs $0.02


def accounting_policy(upstream: MockUpstream, *, key: str = "", tenant: str = "", models: str = "",
                      accounting: str = "", state: str = "", extra: str = "") -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ACCT_ADMIN}}
        {state}
        auth: keys
        keys:
          - name: main
            tenant: acme
            hash: "{hash_key(KEY)}"
            {key}
          - name: second
            tenant: acme
            hash: "{hash_key(OTHER)}"
        tenants:
          acme: {{{tenant}}}
        accounting: {{{accounting}}}
        providers:
          mock:
            kind: openai
            base_url: {upstream.base_url}
            api_key_env: MOCK_UPSTREAM_KEY
          quiet:  # reports no usage in its streams: the gateway counts them
            kind: openai
            base_url: {upstream.base_url}
            api_key_env: MOCK_UPSTREAM_KEY
            stream_usage: false
        prices:
          fault-echo: {{input_per_mtok: 0, output_per_mtok: {OUT_PER_MTOK}}}
          mock-model: {{input_per_mtok: 0, output_per_mtok: {OUT_PER_MTOK}}}
          fault-no-usage: {{input_per_mtok: 0, output_per_mtok: {OUT_PER_MTOK}}}
          fault-cached-reasoning:
            input_per_mtok: 100
            cached_input_per_mtok: 10
            output_per_mtok: 1000
            reasoning_per_mtok: 2000
          cheap-model: {{input_per_mtok: 0, output_per_mtok: 1}}
        models:
          chat: {{provider: mock, model: mock-model{models}}}
          cheap: {{provider: mock, model: cheap-model}}
          no-usage: {{provider: mock, model: fault-no-usage}}
          detailed: {{provider: mock, model: fault-cached-reasoning}}
          slow: {{provider: mock, model: fault-slow-stream-50}}
          broken: {{provider: mock, model: fault-status-500}}
          quiet-echo: {{provider: quiet, model: fault-echo}}
        {extra}""")


@pytest.fixture
def start(upstream: MockUpstream) -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []

    def make(**parts: str) -> RunningGateway:
        env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN}
        running = RunningGateway(accounting_policy(upstream, **parts), env).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


def client(gateway: RunningGateway, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=20)


def usage_of(gateway: RunningGateway, scope: str, name: str) -> dict[str, object]:
    response = httpx.get(gateway.url + "/admin/usage", params={"scope": scope, "name": name},
                         headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200, response.text
    rows = response.json()["usage"]
    assert len(rows) == 1
    return dict(rows[0])


def test_rate_limit_headers_and_429_through_the_sdk(start: Callable[..., RunningGateway]) -> None:
    gateway = start(key="limits: {rpm: 3, tpm: 100000}")
    sdk = client(gateway)
    for left in (2, 1, 0):
        raw = sdk.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(left)
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")
        assert raw.parse().choices[0].message.content
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="chat", messages=MESSAGES)
    response = caught.value.response
    assert response.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    # another key of the same tenant has no limit of its own
    assert client(gateway, OTHER).chat.completions.create(model="chat", messages=MESSAGES).choices
    assert 'gateway_limit_rejections_total{kind="rpm",scope="key"} 1.0' in gateway.metrics()


def test_upstream_errors_carry_the_headers_and_cost_nothing(start: Callable[..., RunningGateway]) -> None:
    gateway = start(key="limits: {rpm: 5}\n" + " " * 12 + "budget: {usd: 1}")  # indented as in the template
    response = httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "broken", "messages": MESSAGES}, timeout=20)
    assert response.status_code >= 500 and response.json()["error"]["type"]
    assert response.headers["x-ratelimit-limit-requests"] == "5"
    assert response.headers["x-ratelimit-remaining-requests"] == "4"
    assert "x-gateway-cost-usd" not in response.headers
    usage = usage_of(gateway, "model", "broken")
    assert usage["requests"] == 1 and usage["cost_usd"] == 0


def test_tokens_per_minute_count_the_estimate_then_the_actual(start: Callable[..., RunningGateway]) -> None:
    gateway = start(key="limits: {tpm: 60}")
    sdk = client(gateway)
    raw = sdk.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 60 - 20  # the prompt estimate and the cap
    with pytest.raises(openai.RateLimitError):  # 100 tokens asked for cannot fit in a 60 tpm window
        sdk.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=100)


def test_concurrent_requests_limit(start: Callable[..., RunningGateway]) -> None:
    gateway = start(tenant="limits: {concurrent: 1}")

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=20) as http:
            body = {"model": "slow", "messages": MESSAGES, "stream": True}
            async with http.stream("POST", gateway.base_url + "/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}) as first:
                assert first.status_code == 200
                second = await http.post(gateway.base_url + "/chat/completions", json={**body, "model": "chat"},
                                         headers={"Authorization": f"Bearer {OTHER}"})  # same tenant
                await first.aread()
            third = await http.post(gateway.base_url + "/chat/completions", json={**body, "model": "chat"},
                                    headers={"Authorization": f"Bearer {OTHER}"})
            return [second.status_code, third.status_code]

    refused, later = asyncio.run(run())
    assert refused == 429 and later == 200


def test_hard_budget_refuses_with_budget_exceeded(start: Callable[..., RunningGateway]) -> None:
    gateway = start(key="budget: {usd: 0.05, period: day}")  # two answers of $0.02 fit, a third does not
    sdk = client(gateway)
    for _ in range(2):
        raw = sdk.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
        assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(0.02)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=20)
    assert caught.value.code == "budget_exceeded"
    assert caught.value.body["type"] == "rate_limit_exceeded"  # type: ignore[index]
    assert sdk.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=5).choices  # $0.005 fits
    metrics = gateway.metrics()
    assert 'gateway_limit_rejections_total{kind="budget",scope="key"} 1.0' in metrics
    assert 'gateway_token_estimate_drift_ratio_count{model="chat"} 3.0' in metrics  # estimate vs upstream
    assert 'gateway_reservation_drift_ratio_count{model="chat"} 3.0' in metrics
    assert 'gateway_budget_remaining_usd{name="main",scope="key"}' in metrics
    assert usage_of(gateway, "key", "main")["cost_usd"] == pytest.approx(0.06)


@pytest.mark.parametrize("extra", [{"prompt": ["one", "two", "three", "four", "five"]},
                                   {"prompt": "one", "best_of": 5}])
def test_a_hard_budget_reserves_every_completion_a_completions_request_asks_for(
    start: Callable[..., RunningGateway], extra: dict[str, Any],
) -> None:
    """Five prompts (or `best_of: 5`) at `max_tokens: 20` may cost $0.10, which a $0.05 budget refuses outright:
    reserved as one completion ($0.02), they went through and could spend five times what the budget allowed."""
    gateway = start(key="budget: {usd: 0.05, period: day}")
    response = httpx.post(gateway.base_url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "chat", "max_tokens": 20, **extra}, timeout=20)
    assert response.status_code == 429 and response.json()["error"]["code"] == "budget_exceeded"
    single = httpx.post(gateway.base_url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "chat", "max_tokens": 20, "prompt": "one"}, timeout=20)
    assert single.status_code == 200


@pytest.mark.parametrize("reroute", [
    "rules: [{name: up, when: {alias: [cheap]}, alias: chat}]",
    "rules: [{name: up, when: {alias: [cheap]}, targets: [{provider: mock, model: mock-model}]}]",
])
def test_a_hard_budget_reserves_at_the_rates_a_rule_may_send_the_request_to(
    start: Callable[..., RunningGateway], reroute: str,
) -> None:
    """A rule sends `cheap` ($1 a million out) to `mock-model` ($1,000): reserved at the asked alias's rates, each
    request held $0.00002 of the budget and cost $0.02, so a $0.05 budget was overrun without limit."""
    gateway = start(key="budget: {usd: 0.05, period: day}", extra=reroute)
    statuses = []
    for _ in range(4):
        response = httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "cheap", "messages": MESSAGES, "max_tokens": 20}, timeout=20)
        statuses.append(response.status_code)
    assert statuses == [200, 200, 429, 429]
    assert usage_of(gateway, "key", "main")["cost_usd"] == pytest.approx(0.04)


def test_a_reservation_covers_the_context_fallback(upstream: MockUpstream) -> None:
    """`context_fallback` to a dearer alias: its rates are reserved too (pure: the rates each alias reserves)."""
    from gateway.accounting.outright import reach_rates

    text = accounting_policy(upstream, extra="").replace(
        "  cheap: {provider: mock, model: cheap-model}", "  cheap: {provider: mock, model: cheap-model, "
        "context_fallback: detailed}")
    policy = compile_text(text, "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN})
    rates = reach_rates(policy.models)
    assert rates["cheap"] == (100.0, 2000.0)  # `detailed`'s (fault-cached-reasoning): input 100, reasoning 2,000
    assert rates["detailed"] == (100.0, 2000.0) and rates["chat"] == (0.0, OUT_PER_MTOK)


def test_the_cost_header_rounds_half_a_nanodollar_as_the_access_log_does(upstream: MockUpstream) -> None:
    """A prompt of 5 tokens at $0.0125 a million is 62.5 nanodollars: the access log's `cost_usd` says 6.3e-08
    (`AccessLines.line`: half rounded up); the header said 0.000000062 (the format's rounding of the binary value)."""
    text = accounting_policy(upstream).replace(
        "cheap-model: {input_per_mtok: 0, output_per_mtok: 1}",
        "cheap-model: {input_per_mtok: 0.0125, output_per_mtok: 0}")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN}).start()
    try:
        raw = client(running).chat.completions.with_raw_response.create(model="cheap", messages=MESSAGES)
        usage = raw.parse().usage
        assert usage is not None and usage.prompt_tokens == 5
        assert raw.headers["x-gateway-cost-usd"] == "0.000000063"
    finally:
        running.stop()


def test_requests_under_a_millionth_of_a_dollar_add_up(upstream: MockUpstream) -> None:
    """100 answers of $0.0000002 each (20 tokens at $0.01 a million): rounded to the nearest millionth, each added
    nothing to the usage and the budgets; rounded up with the probability of the fraction, they add up to about
    $0.00002 (binomial: 20 millionths, standard deviation 4)."""
    text = accounting_policy(upstream, key="budget: {usd: 1, period: day}").replace(
        "cheap-model: {input_per_mtok: 0, output_per_mtok: 1}",
        "cheap-model: {input_per_mtok: 0, output_per_mtok: 0.01}")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN}).start()
    try:
        sdk = client(running)
        for _ in range(100):
            raw = sdk.chat.completions.with_raw_response.create(model="cheap", messages=MESSAGES, max_tokens=20)
            assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(2e-7)
        spent = usage_of(running, "key", "main")["cost_usd"]
        assert isinstance(spent, float) and 4e-6 <= spent <= 4e-5
        left = re.search(r'^gateway_budget_remaining_usd\{name="main",scope="key"\} (\S+)$', running.metrics(), re.M)
        assert left is not None and 1 - 4e-5 <= float(left.group(1)) <= 1 - 4e-6
    finally:
        running.stop()


def test_soft_budget_serves_with_a_header_and_a_metric(start: Callable[..., RunningGateway]) -> None:
    gateway = start(tenant="budget: {usd: 0.03, mode: soft}")
    sdk = client(gateway)
    first = sdk.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
    assert "x-gateway-budget-exceeded" not in first.headers
    second = sdk.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
    assert second.headers["x-gateway-budget-exceeded"] == "tenant"
    assert 'gateway_budget_soft_exceeded_total{scope="tenant"} 1.0' in gateway.metrics()
    assert usage_of(gateway, "tenant", "acme")["cost_usd"] == pytest.approx(0.04)  # both billed


def test_downgrade_past_a_share_of_the_budget(start: Callable[..., RunningGateway]) -> None:
    gateway = start(key="budget: {usd: 0.1, downgrade: {at: 0.3, alias: cheap}}")
    sdk = client(gateway)
    first = sdk.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
    assert first.headers["x-gateway-target"] == "mock/mock-model"  # 20% reserved: below the share
    second = sdk.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
    assert second.headers["x-gateway-budget-downgrade"] == "cheap"  # 40% with this one
    assert second.headers["x-gateway-target"] == "mock/cheap-model"
    assert float(second.headers["x-gateway-cost-usd"]) == pytest.approx(ANSWER_WORDS * 1 / 1e6)


def test_a_downgrade_never_sends_a_key_to_an_alias_it_may_not_use(start: Callable[..., RunningGateway]) -> None:
    """A key scoped to `chat` whose budget downgrades to `cheap`: the downgrade is skipped (it answered from an
    alias the key was refused when it asked for it)."""
    gateway = start(key="models: [chat]\n            budget: {usd: 0.1, downgrade: {at: 0.000001, alias: cheap}}")
    raw = client(gateway).chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
    assert raw.headers["x-gateway-target"] == "mock/mock-model" and "x-gateway-budget-downgrade" not in raw.headers
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="cheap", messages=MESSAGES)


def test_cached_and_reasoning_tokens_are_priced_at_their_rates(
    start: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    gateway = start(accounting="always: true")
    raw = client(gateway).chat.completions.with_raw_response.create(model="detailed", messages=MESSAGES)
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens_details and usage.completion_tokens_details
    cached = usage.prompt_tokens // CACHED_SHARE
    assert usage.prompt_tokens_details.cached_tokens == cached > 0
    assert usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS
    expected = ((usage.prompt_tokens - cached) * 100 + cached * 10
                + (usage.completion_tokens - REASONING_TOKENS) * 1000 + REASONING_TOKENS * 2000) / 1e6
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(expected, abs=1e-6)
    metrics = gateway.metrics()
    assert f'gateway_tokens_total{{kind="cached_prompt",model="detailed"}} {float(cached)}' in metrics
    assert f'gateway_tokens_total{{kind="reasoning",model="detailed"}} {float(REASONING_TOKENS)}' in metrics


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_answers_cached_and_reasoning_tokens_are_priced_at_their_rates(
    start: Callable[..., RunningGateway], stream: bool,
) -> None:
    """The Responses API's `input_tokens_details.cached_tokens` and `output_tokens_details.reasoning_tokens`
    (the bill read neither: cached input at the full price, reasoning at the output price)."""
    gateway = start(accounting="always: true")
    prompt = "one two three four five six seven eight"
    if stream:
        with client(gateway).responses.stream(model="detailed", input=prompt) as events:
            usage = events.get_final_response().usage
    else:
        usage = client(gateway).responses.create(model="detailed", input=prompt).usage
    assert usage is not None
    cached, reasoning = usage.input_tokens_details.cached_tokens, usage.output_tokens_details.reasoning_tokens
    assert cached > 0 and reasoning > 0
    expected = ((usage.input_tokens - cached) * 100 + cached * 10
                + (usage.output_tokens - reasoning) * 1000 + reasoning * 2000) / 1e6
    assert usage_of(gateway, "model", "detailed")["cost_usd"] == pytest.approx(expected, abs=1e-6)
    metrics = gateway.metrics()
    assert f'gateway_tokens_total{{kind="cached_prompt",model="detailed"}} {float(cached)}' in metrics
    assert f'gateway_tokens_total{{kind="reasoning",model="detailed"}} {float(reasoning)}' in metrics


def test_streams_are_billed_also_without_upstream_usage(start: Callable[..., RunningGateway]) -> None:
    gateway = start(key="budget: {usd: 10}")
    sdk = client(gateway)
    for model in ("chat", "no-usage"):
        stream = sdk.chat.completions.create(model=model, messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    chat, no_usage = usage_of(gateway, "model", "chat"), usage_of(gateway, "model", "no-usage")
    assert chat["cost_usd"] == pytest.approx(0.02) and chat["completion_tokens"] == ANSWER_WORDS
    assert float(str(no_usage["cost_usd"])) > 0 and int(str(no_usage["completion_tokens"])) > 0  # counted
    assert usage_of(gateway, "key", "main")["requests"] == 2


@pytest.mark.parametrize("key", ["budget: {usd: 10}", ""])  # a stream billed; a stream only counted
def test_a_stream_without_usage_from_its_provider_is_billed_by_its_text(
    start: Callable[..., RunningGateway], key: str,
) -> None:
    """A provider with `stream_usage: false` sends no usage: the answer's tokens are counted from its text, as the
    access log's are, not from its chunk count (here 60 characters a chunk: a chunk count bills ~9x too little)."""
    gateway = start(key=key, accounting="always: true")
    text = " ".join(f"word{i} and more" for i in range(60))
    stream = client(gateway).chat.completions.create(
        model="quiet-echo", messages=[{"role": "user", "content": text}], stream=True,
        extra_body={"echo_chunk": 60})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    usage = usage_of(gateway, "model", "quiet-echo")
    tokens = gateway.gateway.tokens.count(text)
    assert tokens > 2 * (len(text) // 60 + 1)  # (what counting its chunks would have billed is far less)
    assert usage["completion_tokens"] == tokens
    assert float(str(usage["cost_usd"])) == pytest.approx(tokens * OUT_PER_MTOK / 1e6)


def test_a_hard_budget_cuts_a_stream_mid_way(start: Callable[..., RunningGateway]) -> None:
    # A request without max_tokens reserves 5 tokens ($0.005); past them it must reserve 5 more, and the
    # $0.008 budget has no room: the stream ends with finish_reason "length" and an error event.
    gateway = start(key="budget: {usd: 0.008}", accounting="default_max_tokens: 5")
    stream = client(gateway).chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    text, reasons = "", []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                reasons.append(choice.finish_reason)
    assert "budget" in str(caught.value.message)
    assert reasons[-1] == "length"
    assert 0 < len(text.split()) < ANSWER_WORDS
    spent = usage_of(gateway, "key", "main")["cost_usd"]
    assert 0 < float(str(spent)) <= 0.008


def test_a_hard_budget_cuts_a_responses_stream_with_the_responses_error_event(
    start: Callable[..., RunningGateway],
) -> None:
    """A Responses stream the budget cuts ends with the Responses API's `error` event, after the events it released:
    no chat-shaped `finish_reason: length` chunk, which no Responses client can read."""
    gateway = start(key="budget: {usd: 0.008}", accounting="default_max_tokens: 5")
    body = {"model": "chat", "input": "hello there", "stream": True}
    with httpx.stream("POST", gateway.base_url + "/responses", json=body, timeout=20,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    frames = [frame.split("\n") for frame in raw.split("\n\n") if frame]
    assert all(lines[0].startswith("event: ") for lines in frames), raw
    events = [json.loads(lines[-1].removeprefix("data: ")) for lines in frames]
    assert not any("choices" in event for event in events), raw
    assert events[-1]["type"] == "error" and "budget" in events[-1]["error"]["message"]
    assert any(event["type"] == "response.output_text.delta" for event in events[:-1])
    assert "[DONE]" not in raw


def _raw_stream(gateway: RunningGateway) -> bytes:
    """A streamed answer's body as the client gets it, without the mock's per-answer id and time."""
    body = {"model": "chat", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=20,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        raw = response.read()
    return re.sub(rb'"created":\s*\d+', b'"created":0', re.sub(rb'"id":\s*"[^"]*"', b'"id":""', raw))


@pytest.mark.parametrize("budget", ["0.008", "10"])
def test_a_budget_stream_is_polled_and_cut_or_extended_as_when_iterated(
    start: Callable[..., RunningGateway], monkeypatch: pytest.MonkeyPatch, budget: str,
) -> None:
    """A budget stream without max_tokens keeps the edge's polled path (`ReplyStream.reads`): the bill runs
    only on a batch past its reservation, and the client gets the bytes the iterated path sends: cut off
    when the budget has no room for another step ($0.008), extended to the whole answer when it has ($10)."""
    paths: list[str] = []
    iterate, hold = ReplyStream.__anext__, ReplyStream._pass

    async def iterated(self: ReplyStream) -> list[StreamEvent]:
        paths.append("iterated")
        return await iterate(self)

    async def held(self: ReplyStream, batch: list[StreamEvent]) -> None:
        paths.append("held")
        await hold(self, batch)

    monkeypatch.setattr(ReplyStream, "__anext__", iterated)
    monkeypatch.setattr(ReplyStream, "_pass", held)
    parts = {"key": f"budget: {{usd: {budget}}}", "accounting": "default_max_tokens: 5"}
    polled = _raw_stream(start(**parts))
    assert paths and set(paths) == {"held"}
    paths.clear()
    monkeypatch.setattr(ReplyStream, "reads", lambda self, sink=None: None)
    assert _raw_stream(start(**parts)) == polled
    assert paths and set(paths) == {"iterated"}
    if budget == "10":
        assert b'"finish_reason":"stop"' in polled.replace(b" ", b"") and b"budget" not in polled
    else:
        assert b'"finish_reason":"length"' in polled.replace(b" ", b"") and b"budget" in polled


def test_no_limits_no_stage(start: Callable[..., RunningGateway]) -> None:
    gateway = start()
    assert not gateway.policy.has_accounting
    raw = client(gateway).chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert "x-ratelimit-limit-requests" not in raw.headers
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(0.02)  # cost is shown without the stage
    assert not any(type(s).__name__ == "Accounting" for s in gateway.gateway.runtime.pipeline.stages)


def test_usage_api_refuses_bad_tokens_and_fields(start: Callable[..., RunningGateway]) -> None:
    gateway = start(key="budget: {usd: 1}")
    url = gateway.url + "/admin/usage"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {ADMIN}"}
    for params in ({"scope": "planet"}, {"period": "year"}, {"date": "yesterday"}, {"period": "month",
                                                                                      "date": "2026-13"}):
        response = httpx.get(url, params=params, headers=auth)
        assert response.status_code == 400, params
        assert response.json()["error"]["type"] == "invalid_request_error"
    listed = httpx.get(url, params={"scope": "model", "period": "month"}, headers=auth).json()
    assert {row["name"] for row in listed["usage"]} == {"chat", "cheap", "no-usage", "detailed", "slow", "broken",
                                                        "quiet-echo"}


# -- policy validation ---------------------------------------------------------------------------------


def _issues(upstream: MockUpstream, **parts: str) -> str:
    with pytest.raises(PolicyError) as caught:
        compile_text(accounting_policy(upstream, **parts), "acct.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    return str(caught.value)


@pytest.mark.parametrize(("parts", "expected"), [
    ({"key": "budget: {usd: -5}"}, "acct.yaml:9: keys[0].budget.usd: expected `float` > 0.0"),
    ({"key": "budget: {usd: 5, period: fortnight}"}, "keys[0].budget.period: unknown value `fortnight`"),
    ({"key": "budget: {usd: 5, window_s: 3600}"}, "keys[0].budget.window_s: `window_s` is only for"),
    ({"key": "budget: {usd: 5, period: rolling}"}, "keys[0].budget.period: `period: rolling` needs"),
    ({"tenant": "budget: {usd: 5, downgrade: {at: 0.5, alias: nowhere}}"},
     "tenants.acme.budget.downgrade.alias: unknown model alias `nowhere`"),
    ({"models": ", budget: {usd: 5, downgrade: {at: 0.5, alias: chat}}"}, "cannot downgrade an alias to itself"),
    ({"key": "limits: {rpm: 0}"}, "keys[0].limits.rpm: expected `int` >= 1"),
    ({"extra": "budgets: {nowhere: {usd: 1}}"}, "unknown field `budgets`"),
    ({"accounting": "lease_s: -1"}, "accounting.lease_s: expected `float` >= 1"),
    ({"accounting": "on_unavailable: maybe"}, "accounting.on_unavailable: unknown value `maybe`"),
    ({"state": "state: {backend: redis, url_env: GW_UNSET_REDIS}"},  # an error, not a crash
     "state.url_env: environment variable `GW_UNSET_REDIS` is not set"),
])
def test_policy_errors_name_file_line_and_field(upstream: MockUpstream, parts: dict[str, str], expected: str) -> None:
    assert expected in _issues(upstream, **parts)


def test_prices_file_is_read_relative_to_the_policy_and_overridden_inline(
    tmp_path: Path, upstream: MockUpstream,
) -> None:
    (tmp_path / "prices.yaml").write_text(textwrap.dedent("""\
        version: 1
        prices:
          mock-model: {input_per_mtok: 7, output_per_mtok: 9, date: "2025-08-01", source: "https://example.com"}
          only-in-file: {input_per_mtok: 1, output_per_mtok: 2, cached_input_per_mtok: 0.5}
        """))
    text = accounting_policy(upstream).replace("prices:\n", "prices_file: prices.yaml\nprices:\n", 1)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(text)
    from gateway.policy import load_policy

    policy = load_policy(policy_file, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN})
    assert policy.prices.price("mock", "mock-model").output_per_mtok == OUT_PER_MTOK  # type: ignore[union-attr]
    assert policy.prices.price("mock", "only-in-file").cached_input_per_mtok == 0.5  # type: ignore[union-attr]
    (tmp_path / "prices.yaml").write_text("version: 1\nprices:\n  x: {input_per_mtok: -1, output_per_mtok: 1}\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(policy_file, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN})
    assert f"{tmp_path / 'prices.yaml'}:3: prices.x.input_per_mtok: expected `float` >= 0" in str(caught.value)
    (tmp_path / "prices.yaml").unlink()
    with pytest.raises(PolicyError) as caught:
        load_policy(policy_file, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN})
    assert "prices_file: cannot read the prices file" in str(caught.value)


def test_an_unpriced_model_is_a_warning_not_an_error(upstream: MockUpstream) -> None:
    text = accounting_policy(upstream, key="budget: {usd: 1}").replace(
        "  cheap-model: {input_per_mtok: 0, output_per_mtok: 1}\n", "")
    policy = compile_text(text, "acct.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN})
    assert any("no price for `mock/cheap-model`" in w for w in policy.warnings)


@pytest.mark.parametrize("dynamic", [True, False])
def test_an_unpriced_model_is_a_warning_also_with_keys_made_at_run_time(upstream: MockUpstream,
                                                                      dynamic: bool) -> None:
    """No limit or budget in the policy, but keys created at run time may carry them: the stage is built, so
    a model it cannot price is worth the same warning. Without either, there is no accounting to warn about."""
    text = accounting_policy(upstream, extra="dynamic_keys: {enabled: true}" if dynamic else "")
    policy = compile_text(text, "acct.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN})
    assert not policy.has_accounting
    unpriced = [w for w in policy.warnings if "no price for `mock/fault-slow-stream-50`" in w]
    assert len(unpriced) == (1 if dynamic else 0)


def test_the_shipped_prices_file_loads() -> None:
    import msgspec
    import yaml

    from gateway.policy.accounting_check import PricesFileSpec

    data = yaml.safe_load((Path(__file__).parents[1] / "policies" / "prices.yaml").read_text())
    prices = msgspec.convert(data, PricesFileSpec).prices
    assert {"gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-pro"} <= set(prices)
    assert all(p.date and p.source and p.source.startswith("https://") for p in prices.values())


def test_gateway_usage_command_prints_the_same_figures(start: Callable[..., RunningGateway]) -> None:
    import subprocess
    import sys

    gateway = start(key="budget: {usd: 1}")
    client(gateway).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=20)
    command = [sys.executable, "-m", "gateway", "usage", "--url", gateway.url, "--scope", "key"]
    env = {"PATH": "/usr/bin:/bin", "GATEWAY_ADMIN_TOKEN": ADMIN}
    shown = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    line = next(row for row in shown.splitlines() if row.startswith("main "))
    assert line.split()[1:3] == ["0.020000", "1"]
    assert "second" in shown
    as_json = subprocess.run([*command, "--json", "--name", "main"], capture_output=True, text=True, env=env,
                             timeout=60, check=True).stdout
    assert '"cost_usd": 0.02' in as_json
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60,
                             env={**env, "GATEWAY_ADMIN_TOKEN": "wrong"})
    assert refused.returncode == 1 and "401" in refused.stderr
    missing = subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2 and "GATEWAY_ADMIN_TOKEN" in missing.stderr
    # a token mounted from a file ends in a newline: cleaned as the gateway cleans its own (it was sent as is,
    # refused by http.client, and the refusal printed with the token in it)
    mounted = subprocess.run(command, capture_output=True, text=True, timeout=60,
                             env={**env, "GATEWAY_ADMIN_TOKEN": ADMIN + "\n"})
    assert mounted.returncode == 0 and "main " in mounted.stdout
    bad = subprocess.run(command, capture_output=True, text=True, timeout=60,
                         env={**env, "GATEWAY_ADMIN_TOKEN": ADMIN + "\x01x"})
    assert bad.returncode == 2 and "GATEWAY_ADMIN_TOKEN" in bad.stderr and ADMIN not in bad.stderr


# -- usage an upstream gets wrong ----------------------------------------------------------------------


def _bad_usage(monkeypatch: pytest.MonkeyPatch, **fields: int) -> None:
    """The mock upstream reports `fields` in its usage (e.g. a negative completion count)."""
    from tests.support import mock_upstream

    real = mock_upstream.chat_usage

    def bad(prompt: int, completion: int, details: bool = False) -> dict[str, object]:
        return {**real(prompt, completion, details), **fields}

    monkeypatch.setattr(mock_upstream, "chat_usage", bad)


def _ask(gateway: RunningGateway, stream: bool) -> httpx.Response:
    body = {"model": "chat", "messages": MESSAGES, "stream": stream}
    with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=20,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        response.read()
    return response


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields", [{"completion_tokens": -100_000}, {"prompt_tokens": -7},
                                    {"completion_tokens": 10**18}, {"prompt_tokens_details": {"cached_tokens": -5}}])
def test_invalid_upstream_usage_is_estimated_and_releases_the_slot_and_the_reservation(
    start: Callable[..., RunningGateway], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    stream: bool, fields: dict[str, object],
) -> None:
    """Negative or absurd usage is no 500 and no leak: the answer passes (200), the bill is settled to the
    gateway's own estimate, and the concurrency slot and the budget reservation are given back."""
    _bad_usage(monkeypatch, **fields)  # type: ignore[arg-type]
    caplog.set_level("DEBUG", logger="gateway.accounting")
    gateway = start(key="limits: {concurrent: 1}\n" + " " * 12 + "budget: {usd: 10}")  # 4096 tokens: $4.096
    for _ in range(3):  # the slot of each answer is free for the next one
        response = _ask(gateway, stream)
        assert response.status_code == 200, response.text
        assert b"mock" in response.content
    usage = usage_of(gateway, "key", "main")
    assert usage["requests"] == 3
    assert 0 < float(str(usage["cost_usd"])) <= 3 * 0.03  # about 20 tokens an answer, at $0.001 each
    assert all(int(str(usage[field])) >= 0 for field in ("prompt_tokens", "cached_tokens", "completion_tokens"))
    raw = client(gateway).chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=20)
    assert raw.http_response.status_code == 200
    # what was reserved was given back: the budget holds only the settled spend
    left = re.search(r'gateway_budget_remaining_usd\{name="main",scope="key"\} ([0-9.e-]+)', gateway.metrics())
    assert left is not None and float(left.group(1)) >= 10 - 3 * 0.03 - 0.02
    logged = [r for r in caplog.records if "reported invalid usage" in r.getMessage()]
    assert [r.levelname for r in logged] == ["WARNING"] + ["DEBUG"] * 3  # once a target, then quieter
    assert "mock/mock-model" in logged[0].getMessage() and "hello" not in logged[0].getMessage()  # no prompt text


@pytest.mark.parametrize("limits", ["budget: {usd: 10}", "budget: {usd: 10, mode: soft}", "limits: {tpm: 1000}"])
def test_an_absurd_max_tokens_is_refused_or_served_never_a_500(
    start: Callable[..., RunningGateway], limits: str,
) -> None:
    """A client's `max_tokens` far past any model's is reserved as at most `MAX_TOKENS`: a hard budget or a
    token limit refuses it (429), a soft budget serves it; the store never sees an amount it cannot keep."""
    gateway = start(key=limits)
    response = httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "chat", "messages": MESSAGES, "max_tokens": 10**15}, timeout=20)
    assert response.status_code == (200 if "soft" in limits else 429), response.text


def test_a_responses_request_reserves_its_input_instructions_and_max_output_tokens(
    start: Callable[..., RunningGateway],
) -> None:
    """The tokens-per-minute window takes a Responses request's estimate: its instructions and input items
    counted as chat messages (not 0), plus `max_output_tokens` (not `default_max_tokens`)."""
    gateway = start(key="limits: {tpm: 100000}")
    body = {"model": "chat", "instructions": "Answer in one short sentence, please.", "max_output_tokens": 50,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello there, who are you?"}]}]}
    response = httpx.post(gateway.base_url + "/responses", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=20)
    assert response.status_code == 200, response.text
    reserved = 100_000 - int(response.headers["x-ratelimit-remaining-tokens"])
    assert 50 + 20 < reserved < 50 + 60  # two messages of a few words each, with their overhead, and the cap
