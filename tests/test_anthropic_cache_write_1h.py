"""Writes to Anthropic's 1-hour prompt cache are billed at their own rate, through a real gateway and a mock Anthropic.

A client's `cache_control: {type: ephemeral, ttl: "1h"}` goes to Anthropic as it is, and Anthropic bills those
writes at twice the input price ($6 per million for Sonnet 4.5), where a 5-minute write is 1.25 times it ($3.75).
It reports the split in `usage.cache_creation` (`ephemeral_5m_input_tokens`, `ephemeral_1h_input_tokens`), in a
complete answer and in a stream's `message_start`. The gateway priced every write at the 5-minute rate: its
`x-gateway-cost-usd`, budgets, usage counters and `gateway_cost_usd_total` came to 62.5% of the bill for a prompt
written to the 1-hour cache. Now each write is billed at the rate of its cache: `cache_write_1h_per_mtok` (in
`policies/prices.yaml` for Anthropic's models), or, where a price does not give it, twice the input price for an
Anthropic target and the cache write rate for any other. A wrong value of the field is refused with its place.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.policy import PolicyError, compile_text
from tests.conftest import RunningGateway
from tests.support.billing import access_line, usage_row
from tests.support.mock_anthropic import MockAnthropic, _event
from tests.support.mock_upstream import _RECORD, _deliver_json, _deliver_stream

KEY = "gw-cache-1h-key-0000000000000000000000000"
ADMIN = "admin-cache-1h"
ANTHROPIC_KEY = "sk-ant-cache-1h"
PRICES_FILE = Path(__file__).resolve().parents[1] / "policies" / "prices.yaml"
FRESH = 10  # the mock's uncached prompt tokens
HOUR_WRITE = 100_000  # tokens the mock writes for each breakpoint with `ttl: "1h"`
FIVE_MINUTE_WRITE = 20_000  # ... and for each with the default 5 minutes
WORDS = ["cached", "answer", "here"]  # the mock's reply: 3 output tokens
# claude-sonnet-4-5 in policies/prices.yaml: input, 5-minute write, 1-hour write, output (USD per million tokens)
IN, WRITE, WRITE_1H, OUT = 3.0, 3.75, 6.0, 15.0


class CacheTtlAnthropic(MockAnthropic):
    """The Anthropic mock, reporting the prompt cache writes of a request's breakpoints as the real API does: in
    `cache_creation_input_tokens`, split by lifetime in `cache_creation` (a complete answer's usage and a stream's
    `message_start`; `message_delta` repeats the totals without the split, as the real API's does)."""

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = request[_RECORD].json or {}
        usage = _usage(_ttls(body))
        base = {"id": "msg_cache1h", "type": "message", "role": "assistant", "model": body["model"]}
        if not body.get("stream"):
            answer = {**base, "content": [{"type": "text", "text": " ".join(WORDS)}], "stop_reason": "end_turn",
                      "stop_sequence": None, "usage": usage}
            return await _deliver_json(request, answer, None)
        stream = self._stream(base, WORDS, usage, False, None)
        totals = {key: value for key, value in usage.items() if key != "cache_creation"}
        stream.events[-2] = _event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                                   usage=totals)  # (the mock's own carries the output tokens alone)
        return await _deliver_stream(request, stream, None)


def _ttls(body: dict[str, Any]) -> list[str]:
    """Each `cache_control` breakpoint's lifetime, in the system blocks and the messages' blocks."""
    blocks = list(body.get("system") or []) if isinstance(body.get("system"), list) else []
    for message in body.get("messages") or ():
        if isinstance(message.get("content"), list):
            blocks += message["content"]
    return [block["cache_control"].get("ttl", "5m") for block in blocks
            if isinstance(block, dict) and isinstance(block.get("cache_control"), dict)]


def _usage(ttls: list[str]) -> dict[str, Any]:
    hour = HOUR_WRITE * ttls.count("1h")
    five = FIVE_MINUTE_WRITE * (len(ttls) - ttls.count("1h"))
    return {"input_tokens": FRESH, "cache_creation_input_tokens": five + hour, "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": hour},
            "output_tokens": len(WORDS)}


def _bill(five: int, hour: int, write_1h: float = WRITE_1H) -> float:
    """Anthropic's bill, by hand: fresh input, 5-minute writes, 1-hour writes, output."""
    return (FRESH * IN + five * WRITE + hour * write_1h + len(WORDS) * OUT) / 1e6


ALIASES = ("messages-whole", "messages-streamed", "chat-whole", "chat-streamed", "no-1h-rate")


def _policy(claude: CacheTtlAnthropic) -> str:
    aliases = "\n".join(f"  {alias}: {{provider: claude, model: claude-sonnet-4-5}}" for alias in ALIASES[:-1])
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
        routing: {{breaker: {{enabled: false}}}}
        prices_file: {PRICES_FILE}
        providers:
          claude: {{kind: anthropic, base_url: {claude.base_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          no-1h-rate:
            targets:
              - provider: claude
                model: claude-sonnet-4-5
                price: {{input_per_mtok: {IN}, cache_write_per_mtok: {WRITE}, output_per_mtok: {OUT}}}
        """) + aliases + "\n"


@pytest.fixture(scope="module")
def claude() -> Iterator[CacheTtlAnthropic]:
    mock = CacheTtlAnthropic(ANTHROPIC_KEY)
    mock.start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def gw(claude: CacheTtlAnthropic) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(claude), {"ANTHROPIC_KEY": ANTHROPIC_KEY, "ADMIN_TOK": ADMIN}).start()
    yield running
    running.stop()


HOUR = {"type": "ephemeral", "ttl": "1h"}
FIVE_MINUTES = {"type": "ephemeral"}


def _messages_body(alias: str, stream: bool) -> dict[str, Any]:
    """A Messages request with a system prompt for the 1-hour cache and a user turn for the 5-minute one."""
    return {"model": alias, "max_tokens": 50, "stream": stream,
            "system": [{"type": "text", "text": "a long document", "cache_control": HOUR}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a long question",
                                                        "cache_control": FIVE_MINUTES}]}]}


def _chat_body(alias: str, stream: bool) -> dict[str, Any]:
    """The same request in Chat Completions, `cache_control` on the text parts (where LiteLLM's clients put it)."""
    return {"model": alias, "max_tokens": 50, "stream": stream,
            "messages": [{"role": "system", "content": [{"type": "text", "text": "a long document",
                                                         "cache_control": HOUR}]},
                         {"role": "user", "content": [{"type": "text", "text": "a long question",
                                                       "cache_control": FIVE_MINUTES}]}]}


def _send(gw: RunningGateway, alias: str, stream: bool) -> httpx.Response:
    if alias.startswith("messages"):
        path, body, headers = "/v1/messages", _messages_body(alias, stream), {"x-api-key": KEY}
    else:
        path, body, headers = "/v1/chat/completions", _chat_body(alias, stream), {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(gw.url + path, json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response


def _metric(gw: RunningGateway, alias: str) -> float:
    prefix = f'gateway_cost_usd_total{{model="{alias}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in gw.metrics().splitlines() if line.startswith(prefix))


def _billed(gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str, expected: float) -> None:
    """The access log, the usage counters (the budgets' figure) and the cost metric all show Anthropic's bill."""
    assert access_line(caplog, alias)["cost_usd"] == pytest.approx(expected, abs=1e-9)
    row = usage_row(gw.url, ADMIN, alias)
    assert row["prompt_tokens"] == FRESH + FIVE_MINUTE_WRITE + HOUR_WRITE, row
    assert row["cost_usd"] == pytest.approx(expected, abs=2e-6)  # (whole millionths)
    assert _metric(gw, alias) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("alias", ["messages-whole", "chat-whole"])
def test_a_complete_answer_bills_1_hour_writes_at_their_rate(
    gw: RunningGateway, claude: CacheTtlAnthropic, caplog: pytest.LogCaptureFixture, alias: str,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    response = _send(gw, alias, stream=False)
    sent: dict[str, Any] = claude.requests[-1].json or {}
    assert sent["system"][0]["cache_control"] == HOUR  # forwarded as the client wrote it
    expected = _bill(FIVE_MINUTE_WRITE, HOUR_WRITE)  # $0.675075; at the 5-minute rate it was $0.450075
    assert float(response.headers["x-gateway-cost-usd"]) == pytest.approx(expected, abs=1e-9)
    _billed(gw, caplog, alias, expected)
    if alias == "chat-whole":  # the split is shown where the gateway shows cache writes
        details = response.json()["usage"]["prompt_tokens_details"]
        assert details == {"cached_tokens": 0, "cache_write_tokens": FIVE_MINUTE_WRITE + HOUR_WRITE,
                           "cache_write_1h_tokens": HOUR_WRITE}, details
    else:
        assert response.json()["usage"]["cache_creation_input_tokens"] == FIVE_MINUTE_WRITE + HOUR_WRITE


@pytest.mark.parametrize("alias", ["messages-streamed", "chat-streamed"])
def test_a_stream_bills_message_start_s_1_hour_writes_at_their_rate(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    text = _send(gw, alias, stream=True).text
    assert "answer" in text and "here" in text, text
    _billed(gw, caplog, alias, _bill(FIVE_MINUTE_WRITE, HOUR_WRITE))


def test_an_anthropic_price_without_a_1_hour_rate_bills_twice_the_input(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    response = _send(gw, "no-1h-rate", stream=False)
    expected = _bill(FIVE_MINUTE_WRITE, HOUR_WRITE, write_1h=2 * IN)
    assert float(response.headers["x-gateway-cost-usd"]) == pytest.approx(expected, abs=1e-9)
    _billed(gw, caplog, "no-1h-rate", expected)


def test_another_kind_s_price_without_a_1_hour_rate_bills_the_cache_write_rate() -> None:
    """The rule is decided per target when the policy is compiled: one price, two kinds of provider."""
    policy = compile_text(textwrap.dedent("""\
        version: 1
        auth: none
        providers:
          claude: {kind: anthropic, base_url: "http://127.0.0.1:9/v1", api_key_env: AK}
          relay: {kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: OK}
          own: {kind: anthropic, base_url: "http://127.0.0.1:9/v1", api_key_env: AK}
        prices:
          claude-x: {input_per_mtok: 3.0, cache_write_per_mtok: 3.75, output_per_mtok: 15.0}
          own/claude-x: {input_per_mtok: 3.0, cache_write_per_mtok: 3.75, cache_write_1h_per_mtok: 5.0,
                         output_per_mtok: 15.0}
        models:
          direct: {provider: claude, model: claude-x}
          relayed: {provider: relay, model: claude-x}
          own-rate: {provider: own, model: claude-x}
        """), "p.yaml", {"AK": "sk-ant-x", "OK": "sk-x"})

    def hour_cost(alias: str) -> float:
        price = policy.models[alias].targets[0].price
        assert price is not None
        return price.cost(1_000_000, 0, cache_write=1_000_000, cache_write_1h=1_000_000)

    assert hour_cost("direct") == pytest.approx(6.0)  # Anthropic's: twice the input
    assert hour_cost("relayed") == pytest.approx(3.75)  # the cache write rate
    assert hour_cost("own-rate") == pytest.approx(5.0)  # the price's own
    # without 1-hour writes, every kind bills its writes and plain tokens as before
    price = policy.models["direct"].targets[0].price
    assert price is not None and price.cost(100, 10, cache_write=40) == pytest.approx((60 * 3 + 40 * 3.75 + 150) / 1e6)


BASE = "version: 1\nauth: none\nproviders:\n  d: {kind: demo}\nmodels:\n  chat: {provider: d, model: demo-1}\n"


@pytest.mark.parametrize(("value", "message"), [
    ('"six"', "expected `float`, got `str`"),
    ("-1", "expected `float` >= 0.0"),
    ("[6]", "expected `float`, got `array`"),
    ("true", "expected `float`, got `bool`"),
])
def test_a_wrong_1_hour_rate_is_refused_with_its_place(value: str, message: str) -> None:
    text = BASE + "prices:\n  demo-1:\n    input_per_mtok: 1\n    output_per_mtok: 2\n" \
        f"    cache_write_1h_per_mtok: {value}\n"
    with pytest.raises(PolicyError) as caught:
        compile_text(text, "p.yaml", require_env=False)
    found = [(issue.file, issue.line, issue.path, issue.message) for issue in caught.value.issues]
    assert found == [("p.yaml", 11, "prices.demo-1.cache_write_1h_per_mtok", message)], found


def test_the_shipped_prices_give_anthropic_s_1_hour_rate() -> None:
    """Every Anthropic model of `policies/prices.yaml` has its 1-hour write rate: twice its input price."""
    policy = compile_text(BASE + f"prices_file: {PRICES_FILE}\n", "p.yaml", require_env=False)
    claude = {name: price for name, price in policy.prices.entries().items() if name.startswith("claude")}
    assert claude, "no Anthropic model in the prices file"
    for name, price in claude.items():
        assert price.cache_write_1h_per_mtok == pytest.approx(2 * price.input_per_mtok), name
