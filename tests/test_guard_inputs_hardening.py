"""Input guards: a card or phone number written as a JSON number in tool call arguments stays JSON once redacted;
the history texts of the Responses API's hosted tools and a chat assistant turn's `refusal` are read; a limits
guard counts a large request's tokens off the event loop."""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from gateway.guards.limits import LimitsGuard
from gateway.policy.guard_schema import LimitsGuardSpec
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
KEY = "AKIAIOSFODNN7EXAMPLQ"


def _policy(url: str, anthropic_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {url}, api_key_env: MOCK_UPSTREAM_KEY}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          g: {{provider: mock, model: fault-echo}}
          c: {{provider: claude, model: claude-sonnet-4-5}}
          big: {{provider: mock, model: fault-echo}}
        guards:
          global:
            pii: {{kind: pii, places: [input]}}
            secrets: {{kind: secrets, places: [input], action: redact}}
          models:
            big:
              pii: {{kind: pii, mode: off}}
              secrets: {{kind: secrets, mode: off}}
              limits: {{kind: limits, max_tokens: 2000000}}
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Any:
    with MockAnthropic("sk-ant-test") as claude:
        running = RunningGateway(_policy(upstream.base_url, claude.base_url),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": "sk-ant-test"}).start()
        yield running
        running.stop()


def _history(model: str, arguments: str) -> dict[str, Any]:
    return {"model": model, "messages": [
        {"role": "user", "content": "pay my order"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "pay", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "paid"},
        {"role": "user", "content": "thanks"}]}


def _sent_arguments(upstream: MockUpstream) -> dict[str, Any]:
    sent = upstream.requests[-1].json["messages"][1]["tool_calls"][0]["function"]["arguments"]
    return json.loads(sent)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("arguments", "field", "kept"), [
    ('{"card": 4111111111111111, "cvv": 123}', "card", {"cvv": 123}),
    ('{"phone": 14155550132}', "phone", {}),
    ('{"to": [14155550132, 7], "note": "card 4111111111111111"}', "to", {"note": "card <CREDIT_CARD>"}),
])
def test_a_number_in_tool_arguments_is_redacted_as_a_json_string(gw: RunningGateway, upstream: MockUpstream,
                                                                  arguments: str, field: str, kept: dict) -> None:
    r = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, json=_history("g", arguments), timeout=20)
    assert r.status_code == 200, r.text
    sent = _sent_arguments(upstream)  # was `{"card": <CREDIT_CARD>, "cvv": 123}`: no JSON
    value = sent[field][0] if isinstance(sent[field], list) else sent[field]
    assert isinstance(value, str) and value.startswith("<") and value.endswith(">"), sent
    assert {k: sent[k] for k in kept} == kept
    if isinstance(sent[field], list):
        assert sent[field][1] == 7


def test_an_anthropic_upstream_gets_the_redacted_arguments(gw: RunningGateway) -> None:
    r = httpx.post(gw.base_url + "/chat/completions", headers=AUTH,
                   json=_history("c", '{"card": 4111111111111111}'), timeout=20)
    assert r.status_code == 200, r.text  # was a 400: "arguments is not valid JSON", blaming the client


def test_a_messages_tool_use_input_number(gw: RunningGateway, upstream: MockUpstream) -> None:
    body = {"model": "g", "max_tokens": 10, "messages": [
        {"role": "user", "content": "pay"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "pay",
                                           "input": {"card": 4111111111111111}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]}
    r = httpx.post(gw.base_url + "/messages", headers=AUTH, json=body, timeout=20)
    assert r.status_code == 200, r.text
    assert _sent_arguments(upstream) == {"card": "<CREDIT_CARD>"}


def test_a_responses_function_call_arguments_number(gw: RunningGateway, upstream: MockUpstream) -> None:
    items = [{"type": "function_call", "call_id": "c1", "name": "pay", "arguments": '{"phone": 14155550132}'},
             {"type": "function_call_output", "call_id": "c1", "output": "ok"}]
    r = httpx.post(gw.base_url + "/responses", headers=AUTH, json={"model": "g", "input": items}, timeout=20)
    assert r.status_code == 200, r.text
    sent = upstream.requests[-1].json
    calls = [item for item in sent.get("input") or sent.get("messages") or () if "function_call" in json.dumps(item)
             or "tool_calls" in item]
    arguments = calls[0].get("arguments") or calls[0]["tool_calls"][0]["function"]["arguments"]
    assert isinstance(json.loads(arguments)["phone"], str)


def test_a_number_in_a_plain_message_is_redacted_as_before(gw: RunningGateway, upstream: MockUpstream) -> None:
    body = {"model": "g", "messages": [{"role": "user", "content": "my card: 4111111111111111, thanks"}]}
    r = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, json=body, timeout=20)
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].json["messages"][0]["content"] == "my card: <CREDIT_CARD>, thanks"


# -- history texts of hosted tools (each: the item, and where its text is in what the upstream gets)

HOSTED = [
    {"type": "code_interpreter_call", "id": "ci_1", "status": "completed", "container_id": "cntr_1", "code": "print(1)",
     "outputs": [{"type": "logs", "logs": "AWS key " + KEY}]},
    {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["who has " + KEY],
     "results": [{"file_id": "file_1", "filename": "notes.txt", "score": 0.9, "text": "AWS key " + KEY}]},
    {"type": "web_search_call", "id": "ws_1", "status": "completed",
     "action": {"type": "search", "query": "who " + KEY}},
    {"type": "mcp_call", "id": "mcp_1", "server_label": "s", "name": "read", "arguments": "{}",
     "error": "AWS key " + KEY, "output": "also " + KEY},
    {"type": "computer_call", "id": "cc_1", "call_id": "c1", "status": "completed",
     "action": {"type": "type", "text": KEY}, "pending_safety_checks": []},
]


@pytest.mark.parametrize("item", HOSTED, ids=lambda item: item["type"])
def test_hosted_tool_history_texts_are_read(gw: RunningGateway, upstream: MockUpstream, item: dict) -> None:
    r = httpx.post(gw.base_url + "/responses", headers=AUTH,
                   json={"model": "g", "input": [item, {"role": "user", "content": "go on"}]}, timeout=20)
    assert r.status_code == 200, r.text
    sent = json.dumps(upstream.requests[-1].json)
    assert KEY not in sent, f"{item['type']}: the key reached the upstream"


def test_a_chat_assistant_refusal_is_read(gw: RunningGateway, upstream: MockUpstream) -> None:
    body = {"model": "g", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "refusal": "I cannot use the key " + KEY},
        {"role": "user", "content": "ok"}]}
    r = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, json=body, timeout=20)
    assert r.status_code == 200, r.text
    assert KEY not in json.dumps(upstream.requests[-1].json)


# -- a limits guard's token count


def _worst_healthz(gw: RunningGateway, body: dict[str, Any]) -> tuple[int, float]:
    """The request's status, and the longest a /healthz probe waited while it was served."""
    result: dict[str, int] = {}

    def send() -> None:
        reply = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, json=body, timeout=120)
        result["status"] = reply.status_code

    worker = threading.Thread(target=send)
    worker.start()
    time.sleep(0.3)  # the body is read and the count begins
    worst = 0.0
    while worker.is_alive():
        started = time.monotonic()
        httpx.get(gw.url + "/healthz", timeout=60)
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
    worker.join()
    return result["status"], worst


def test_a_limits_guard_counts_a_large_request_off_the_loop(gw: RunningGateway) -> None:
    """3.8 MB without a space takes tiktoken seconds: counted on the loop, /healthz waited all that time."""
    status, worst = _worst_healthz(gw, {"model": "big", "messages": [{"role": "user", "content": "a" * 3_800_000}]})
    assert status == 200
    # Counted on the loop, the probe waits seconds; off it, about 0.15 s here, and up to 0.6 s in two full suites on
    # a loaded machine (the 3.8 MB body and its echo are read and written on the loop)
    assert worst < 1.0, f"/healthz waited {worst:.1f} s behind the limits guard's count"


def test_check_request_off_loop_leaves_the_loop_free() -> None:
    """The same count, the guard alone: the loop's ticks go on while it counts, and the verdict is the same."""
    tokens = TokenCounter()
    tokens.load()
    guard = LimitsGuard("limits", LimitsGuardSpec(max_tokens=400_000), tokens.count)
    texts = ["a" * 3_800_000]  # 475,000 tokens

    async def run() -> tuple[bool, float]:
        worst = 0.0

        async def tick() -> None:
            nonlocal worst
            while True:
                started = time.perf_counter()
                await asyncio.sleep(0.01)
                worst = max(worst, time.perf_counter() - started)

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.02)
        found = await guard.check_request_off_loop(texts, 1)
        ticker.cancel()
        return [f.type for f in found] == ["MAX_TOKENS"], worst

    over, worst = asyncio.run(run())
    assert over
    assert worst < 0.3, f"the loop waited {worst:.1f} s"
    assert guard.check_request(["a" * 100], 1) == []
