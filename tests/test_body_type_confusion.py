"""A request field of the wrong JSON type is a 400 naming it, or is read as holding no text: never a 500.

Each case was a 500 (a `TypeError` traceback), found by a fuzzer: a stage that reads the body looked a client's
object up in a set (a content part's or an input item's `type`), or iterated a number (`tool_calls`, a reasoning
item's `summary`, a hosted tool's `outputs` or `results`). Each policy below turns on the one stage that read it:

- a key with a budget (the accounting stage estimates the prompt: `accounting.prompt`);
- a rule on the prompt's size, on images, on JSON mode (`routing.rules`);
- one input guard (the guards read the request's texts: `guards.texts`);
- the payload log alone (it reads the same texts, after the upstream answered);
- an upstream that reports no usage (the prompt is estimated after it answered and billed: `telemetry.usage`).

Ingress refuses what OpenAI refuses and the gateway looks up (a chat content part's `type`, a Responses input
item's `type`, when not a string); any other mistyped field goes upstream as sent, its texts unread, for the
upstream to judge (the mock here takes anything).
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
CHAT, RESPONSES = "/v1/chat/completions", "/v1/responses"
HI = {"role": "user", "content": "hi"}


def _policy(upstream: MockUpstream, kind: str, tmp: Path) -> str:
    key_extra = ", budget: {usd: 100, period: day}" if kind == "budget" else ""
    model = "fault-no-usage" if kind == "no usage" else "mock-model"
    extra = {
        "rule": "rules: [{name: big, when: {prompt_tokens_over: 100000}, alias: chat}]\n",
        "match rules": "rules:\n  - {name: images, when: {has_images: true}, alias: chat}\n"
                       "  - {name: json, when: {json_response: true}, alias: chat}\n",
        "guard": "guards: {global: {secrets: {kind: secrets}}}\n",
        "payload log": f"telemetry: {{payload_log: {{enabled: true, path: '{tmp / 'payloads.jsonl'}'}}}}\n",
    }.get(kind, "")
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, watch_policy: false}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"{key_extra}}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          {model}: {{input_per_mtok: 1, output_per_mtok: 2}}
        models:
          chat: {{provider: mock, model: {model}}}
        """) + extra


@pytest.fixture(scope="module")
def gateways(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        Callable[[str], RunningGateway]]:
    """A gateway per policy kind, started when a case first needs it, all stopped after the module."""
    started: dict[str, RunningGateway] = {}
    tmp = tmp_path_factory.mktemp("type-confusion")

    def gateway(kind: str) -> RunningGateway:
        if kind not in started:
            started[kind] = RunningGateway(_policy(upstream, kind, tmp), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        return started[kind]

    yield gateway
    for running in started.values():
        running.stop()


class _Errors(logging.Handler):
    """The gateway's log records at ERROR and above (an unhandled error's traceback is one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@pytest.fixture
def errors() -> Iterator[_Errors]:
    handler = _Errors()
    logging.getLogger("gateway").addHandler(handler)
    yield handler
    logging.getLogger("gateway").removeHandler(handler)


def _chat_part(kind: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": [{"type": kind, "text": "hi"}]}]}


def _responses_item(kind: Any) -> dict[str, Any]:
    return {"model": "chat", "input": [{"type": kind, "role": "user", "content": "hi"}]}


RESPONSES_PART_TYPE = {"model": "chat", "input": [{"role": "user", "content": [{"type": [], "text": "hi"}]}]}
TOOL_CALLS_NUMBER = {"model": "chat", "messages": [{"role": "assistant", "content": "x", "tool_calls": 5}, HI]}
SUMMARY_NUMBER = {"model": "chat", "input": [{"type": "reasoning", "id": "rs_1", "summary": 1}, HI]}
OUTPUTS_NUMBER = {"model": "chat", "input": [
    {"type": "code_interpreter_call", "id": "ci_1", "code": "x", "outputs": 1}, HI]}
RESULTS_TRUE = {"model": "chat", "input": [{"type": "file_search_call", "id": "fs_1", "queries": [], "results": True},
                                           HI]}
CHAT_FORMAT_TYPE = {"model": "chat", "messages": [HI], "response_format": {"type": {}}}
RESPONSES_FORMAT_TYPE = {"model": "chat", "input": "hi", "text": {"format": {"type": []}}}

# (policy, path, body, the `param` of its 400)
REFUSED: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "budget: chat content part type an object": ("budget", CHAT, _chat_part({}), "messages[0].content[0].type"),
    "rule: chat content part type an object": ("rule", CHAT, _chat_part({}), "messages[0].content[0].type"),
    "no usage: chat content part type a list": ("no usage", CHAT, _chat_part([]), "messages[0].content[0].type"),
    "plain: chat content part type null": ("plain", CHAT, _chat_part(None), "messages[0].content[0].type"),
    "guard: responses input item type an object": ("guard", RESPONSES, _responses_item({}), "input[0].type"),
    "payload log: responses input item type a list": ("payload log", RESPONSES, _responses_item([]),
                                                      "input[0].type"),
}
# (policy, path, body): answered, the mistyped field holding no text to read
ANSWERED: dict[str, tuple[str, str, dict[str, Any]]] = {
    "budget: responses content part type a list": ("budget", RESPONSES, RESPONSES_PART_TYPE),
    "rule: responses content part type a list": ("rule", RESPONSES, RESPONSES_PART_TYPE),
    "has_images rule: responses content part type a list": ("match rules", RESPONSES, RESPONSES_PART_TYPE),
    "json_response rule: chat response_format type an object": ("match rules", CHAT, CHAT_FORMAT_TYPE),
    "json_response rule: responses text.format type a list": ("match rules", RESPONSES, RESPONSES_FORMAT_TYPE),
    "guard: chat tool_calls a number": ("guard", CHAT, TOOL_CALLS_NUMBER),
    "guard: responses reasoning summary a number": ("guard", RESPONSES, SUMMARY_NUMBER),
    "guard: responses code_interpreter_call outputs a number": ("guard", RESPONSES, OUTPUTS_NUMBER),
    "guard: responses file_search_call results true": ("guard", RESPONSES, RESULTS_TRUE),
    "payload log: chat tool_calls a number": ("payload log", CHAT, TOOL_CALLS_NUMBER),
    "payload log: responses reasoning summary a number": ("payload log", RESPONSES, SUMMARY_NUMBER),
    "payload log: responses file_search_call results true": ("payload log", RESPONSES, RESULTS_TRUE),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_mistyped_type_is_a_400_naming_it(gateways: Callable[[str], RunningGateway], upstream: MockUpstream,
                                            errors: _Errors, case: str) -> None:
    kind, path, body, param = REFUSED[case]
    running = gateways(kind)
    response = httpx.post(running.url + path, json=body, headers=AUTH, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert not upstream.requests  # refused at ingress: nothing sent, nothing billed
    assert not errors.seen


@pytest.mark.parametrize("case", list(ANSWERED))
def test_a_mistyped_field_holds_no_text(gateways: Callable[[str], RunningGateway], upstream: MockUpstream,
                                        errors: _Errors, case: str) -> None:
    kind, path, body = ANSWERED[case]
    running = gateways(kind)
    response = httpx.post(running.url + path, json=body, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    assert len(upstream.requests) == 1
    assert not errors.seen


@pytest.mark.parametrize(("kind", "path", "body"), [
    ("guard", CHAT, TOOL_CALLS_NUMBER),
    ("payload log", CHAT, TOOL_CALLS_NUMBER),
    ("guard", RESPONSES, SUMMARY_NUMBER),
    ("payload log", RESPONSES, OUTPUTS_NUMBER),
], ids=["guard chat", "payload log chat", "guard responses", "payload log responses"])
def test_a_mistyped_field_streams_to_its_end(gateways: Callable[[str], RunningGateway], upstream: MockUpstream,
                                             errors: _Errors, kind: str, path: str, body: dict[str, Any]) -> None:
    with httpx.stream("POST", gateways(kind).url + path, json={**body, "stream": True}, headers=AUTH,
                      timeout=10) as response:
        status, text = response.status_code, response.read().decode()
    assert status == 200, text
    if path == CHAT:
        assert text.endswith("data: [DONE]\n\n") and 'data: {"error"' not in text
    else:
        assert "event: response.completed" in text and "event: error" not in text
    assert not errors.seen


def test_no_usage_estimate_after_the_answer(gateways: Callable[[str], RunningGateway], upstream: MockUpstream,
                                            errors: _Errors) -> None:
    """An upstream that reports no usage: the prompt is estimated once it answered (and billed). A part whose
    `type` is a list turned that paid answer into a 500; now it is counted as holding no image."""
    response = httpx.post(gateways("no usage").url + RESPONSES, json=RESPONSES_PART_TYPE, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    assert len(upstream.requests) == 1 and "usage" not in response.json()
    assert not errors.seen
