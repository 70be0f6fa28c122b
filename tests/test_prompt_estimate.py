"""One estimate of a request's prompt: the reservation's, the usage the gateway bills when an upstream reports none,
and `/v1/messages/count_tokens` (`accounting.prompt.PromptEstimator.estimate_body`).

Through real gateways and the mock upstream: an upstream that sends no usage (`fault-no-usage`) and a provider
with `stream_usage: false`. A Messages client's `count_tokens` figure for a request with tools, a tool call, its
result, an image and thinking is the `usage.input_tokens` of the answer to the same request, streamed or not; the
ledger bills that figure (`/admin/usage`), and the tokens-per-minute window reserved it (`x-ratelimit-*`). Before,
the answer's estimate was the messages' text alone plus 3 tokens a message (64 where `count_tokens` says 414
for the request below).
"""

from __future__ import annotations

import base64
import json
import struct
import textwrap
import time
import zlib
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.accounting.prompt import PromptEstimator, estimate_prompt
from gateway.auth.keys import hash_key
from gateway.telemetry.tokens import TokenCounter
from gateway.translate.anthropic_ingress import chat_request, count_tokens_request
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-prompt-estimate-key-00000000000000000000"
ADMIN = "admin-token-for-prompt-estimate-tests"
TPM = 10_000_000  # the tokens-per-minute limit of each alias's own key: its first answer's headers show the reservation
MAX_TOKENS = 50
ALIASES = ("answer", "stream", "quiet", "chat", "large", "large-quiet")
# One key per alias, each with its own window (an alias's own limits are every tenant's: never in the headers).
ALIAS_KEYS = {alias: f"gw-prompt-estimate-{alias}-".ljust(43, "0") for alias in ALIASES}

TOOLS = [{"name": "lookup", "description": "Look a customer record up by its id and return every field of it.",
          "input_schema": {"type": "object", "properties": {
              "customer_id": {"type": "string", "description": "The customer's id, as printed on the invoice."},
              "fields": {"type": "array", "items": {"type": "string"}, "description": "Which fields to return."}},
              "required": ["customer_id"]},
          "cache_control": {"type": "ephemeral"}}]


def png(width: int, height: int) -> str:
    """A real PNG (black, RGB), base64."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + b"\x00" * 3 * width) * height
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    return base64.b64encode(data).decode()


def messages_request(question: str = "Find customer C-1042, and tell me what this picture shows.") -> dict[str, Any]:
    """A Messages request with what the old usage estimate left out: tools, a tool call and its result (with their
    id), an image, thinking in an earlier turn (not counted: Anthropic strips it) and in the current one."""
    return {"system": "You look customers up.", "tools": TOOLS, "messages": [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "An earlier turn's thought, which nobody counts.", "signature": "s0"},
            {"type": "text", "text": "Hello! How can I help?"}]},
        {"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png(400, 300)}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should look the customer up first.", "signature": "s1"},
            {"type": "redacted_thinking", "data": base64.b64encode(b"encrypted thought " * 8).decode()},
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "lookup",
             "input": {"customer_id": "C-1042", "fields": ["name", "plan", "since"]}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                                      "content": "Ada Lovelace, pro plan, customer since 2021"}]},
    ]}


def policy(upstream: MockUpstream) -> str:
    alias_keys = "".join(f'\n  - {{name: {alias}, tenant: acme, hash: "{hash_key(key)}", limits: {{tpm: {TPM}}}}}'
                         for alias, key in ALIAS_KEYS.items())
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: PE_ADMIN, max_body_bytes: 4194304}}
        auth: keys
        keys:
          - name: main
            tenant: acme
            hash: "{hash_key(KEY)}"
        accounting: {{always: true}}
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
          fault-no-usage: {{input_per_mtok: 1000, output_per_mtok: 0}}
          fault-slow-stream-100: {{input_per_mtok: 1000, output_per_mtok: 0}}
        models:
          answer: {{provider: mock, model: fault-no-usage}}
          stream: {{provider: mock, model: fault-no-usage}}
          quiet: {{provider: quiet, model: mock-model}}
          chat: {{provider: mock, model: fault-no-usage}}
          large: {{provider: mock, model: fault-no-usage}}
          large-quiet: {{provider: quiet, model: fault-slow-stream-100}}
        """).replace("\nkeys:", "\nkeys:" + alias_keys, 1)


@pytest.fixture(scope="module")
def gateway(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(policy(upstream), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "PE_ADMIN": ADMIN}).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sdk(gateway: RunningGateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0, timeout=30) as client:
        yield client


def billed(gateway: RunningGateway, alias: str) -> dict[str, Any]:
    """The alias's usage row, once its one request is settled (a stream's bill is settled after its last event)."""
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(gateway.url + "/admin/usage", params={"scope": "model", "name": alias},
                             headers={"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 200, response.text
        rows = response.json()["usage"]
        if (rows and rows[0]["requests"] == 1) or time.monotonic() > deadline:
            assert len(rows) == 1 and rows[0]["requests"] == 1, rows
            return dict(rows[0])
        time.sleep(0.02)


def reserved_prompt(headers: httpx.Headers) -> int:
    """The prompt the first request of an alias reserved: its window's tokens less the completion's cap."""
    return TPM - int(headers["x-ratelimit-remaining-tokens"]) - MAX_TOKENS


def test_count_tokens_is_the_usage_of_an_answer_without_usage(gateway: RunningGateway,
                                                              sdk: anthropic.Anthropic) -> None:
    request = messages_request()
    counted = sdk.messages.count_tokens(model="answer", **request).input_tokens  # type: ignore[arg-type]
    own = sdk.with_options(api_key=ALIAS_KEYS["answer"])
    raw = own.messages.with_raw_response.create(model="answer", max_tokens=MAX_TOKENS,
                                                **request)  # type: ignore[arg-type]
    answer = raw.parse()
    assert counted > 400  # the image (160 tokens by its size), tools, the call and its result, the thinking
    assert answer.usage.input_tokens == counted
    row = billed(gateway, "answer")
    assert row["prompt_tokens"] == counted
    assert float(row["cost_usd"]) == pytest.approx(counted / 1000)  # $0.001 a prompt token
    assert reserved_prompt(raw.http_response.headers) == counted


@pytest.mark.parametrize("alias", ["stream", "quiet"])  # an upstream that ignores include_usage; stream_usage: false
def test_count_tokens_is_the_usage_of_a_stream_without_usage(gateway: RunningGateway, sdk: anthropic.Anthropic,
                                                             alias: str) -> None:
    request = messages_request()
    counted = sdk.messages.count_tokens(model=alias, **request).input_tokens  # type: ignore[arg-type]
    own = sdk.with_options(api_key=ALIAS_KEYS[alias])
    with own.messages.stream(model=alias, max_tokens=MAX_TOKENS, **request) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
        headers = stream.response.headers
    assert final.content and final.usage.output_tokens > 0
    assert final.usage.input_tokens == counted
    assert billed(gateway, alias)["prompt_tokens"] == counted
    assert reserved_prompt(headers) == counted


def test_a_large_body_is_counted_the_same_in_a_thread(gateway: RunningGateway, sdk: anthropic.Anthropic) -> None:
    """Past 64 KiB, `count_tokens` and the usage estimate count in a thread; a stream's prompt from its start, so
    that its last event (written on the loop) carries the same figure as `count_tokens` and the bill."""
    request = messages_request(" ".join(f"customer C-{n} ordered item {n * 7}." for n in range(4000)))
    for alias in ("large", "large-quiet"):
        counted = sdk.messages.count_tokens(model=alias, **request).input_tokens  # type: ignore[arg-type]
        assert counted > 40_000
        if alias == "large":
            usage = sdk.messages.create(model=alias, max_tokens=MAX_TOKENS, **request).usage  # type: ignore[arg-type]
        else:  # 50 chunks 100 ms apart: the prompt's count (milliseconds) is done long before the last event
            with sdk.messages.stream(model=alias, max_tokens=MAX_TOKENS, **request) as stream:  # type: ignore[arg-type]
                usage = stream.get_final_message().usage
        assert usage.input_tokens == counted, alias
        assert billed(gateway, alias)["prompt_tokens"] == counted


def test_a_chat_with_tools_and_tool_calls_is_billed_at_its_reservation(gateway: RunningGateway) -> None:
    """An OpenAI client's chat without usage from its upstream: billed at the estimate it reserved (tool
    definitions, tool calls with their ids and arguments, the result), not at the text of its messages alone."""
    messages = [
        {"role": "system", "content": "You look customers up."},
        {"role": "user", "content": "Find customer C-1042"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_Vn3dKq8x2RfZ", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"customer_id": "C-1042", "fields": ["plan"]})}}]},
        {"role": "tool", "tool_call_id": "call_Vn3dKq8x2RfZ", "content": "Ada Lovelace, pro plan"},
    ]
    tools = [{"type": "function", "function": {"name": "lookup", "description": TOOLS[0]["description"],
                                               "parameters": TOOLS[0]["input_schema"]}}]
    client = openai.OpenAI(base_url=gateway.base_url, api_key=ALIAS_KEYS["chat"], max_retries=0, timeout=20)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages,  # type: ignore[arg-type]
                                                           tools=tools, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    assert raw.parse().choices
    expected = estimate_prompt(gateway.gateway.tokens, {"messages": messages, "tools": tools}, "fault-no-usage")
    text_only = sum(gateway.gateway.tokens.count(m["content"]) for m in messages if m["content"]) + 3 * 5
    assert expected > text_only + 80  # (what the old estimate billed: far less)
    assert reserved_prompt(raw.headers) == expected
    assert billed(gateway, "chat")["prompt_tokens"] == expected


def test_the_shared_estimate_of_a_messages_request_and_of_its_count_agree() -> None:
    """The chat a `/v1/messages` request becomes keeps every turn's thinking (an Anthropic upstream checks it) and
    `cache_control`; a `count_tokens` request's drops earlier turns' thinking and every `cache_control`. The one
    estimate counts the current turn's thinking only, and tools without `cache_control`: both agree, and the
    reservation's estimator (which keeps recent counts) says the same as one that keeps nothing."""
    tokens = TokenCounter()
    tokens.load(["gpt-4o"])
    raw = json.dumps({"model": "x", "max_tokens": MAX_TOKENS, **messages_request()}).encode()
    sent, _ = chat_request(raw)
    count = count_tokens_request(raw)
    assert "reasoning_content" in sent["messages"][2] and "cache_control" in sent["tools"][0]
    reservation = PromptEstimator(tokens)
    for model in ("gpt-4o", "claude-sonnet-4", None):
        expected = estimate_prompt(tokens, count, model)
        assert reservation.estimate_body(sent, model) == reservation.estimate_body(count, model) == expected
        thought = tokens.count("I should look the customer up first.", model)
        earlier = tokens.count("An earlier turn's thought, which nobody counts.", model)
        assert thought > 0 and earlier > 0
        assert expected == (tokens.count_messages(count["messages"], model) + thought
                            + (len(base64.b64encode(b"encrypted thought " * 8)) * 3 // 4 + 3) // 4  # redacted
                            + 2 * tokens.count("toolu_01A09q90qw90lq917835lq9", model)  # the call's and result's id
                            + 160  # the 400 x 300 image: 120,000 px / 750
                            + tokens.count(json.dumps([{"type": "function", "function": {
                                "name": "lookup", "parameters": TOOLS[0]["input_schema"],
                                "description": TOOLS[0]["description"]}}], separators=(",", ":")), model))
