"""Values in tool call arguments written with JSON escapes that stand for a slash, a quote or a space: found as in text.

The guards read a tool call's arguments with their escapes as the characters they stand for (`guards/json_view.py`),
but a two-character escape was read as its character twice and a `\\u0020` as six spaces: `https:\\/\\/` read
`https:////`, so a Slack webhook, a LinkedIn URL or a connection string written by an encoder that escapes every `/`
(PHP's `json_encode` by default) reached the upstream and the client; `key=\\"...\\"` read `key=""...`, no quoted
key; and `4111\\u00201111 1111 1111` no card. Checked on a request's tool calls, a whole answer's and a streamed one's.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.guards.json_view import json_view
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

WEBHOOK = "https://hooks.slack.com/services/T0123ABCD/B0123ABCD/abcdefghijklmnopqrstuvwx"
PROFILE = "https://www.linkedin.com/in/jane-doe-12345"
DATABASE = "postgres://admin:Tr0ub4dor-3xq@10.0.0.5:5432/app"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CARD = "4111 1111 1111 1111"


def _slashed(value: str) -> str:
    """`{"v": value}` as PHP's `json_encode` writes it: every `/` escaped."""
    return json.dumps({"v": value}).replace("/", "\\/")


# (what the value is, the raw arguments, the secret that must not be left, the placeholder that must stand for it)
CASES = [
    ("webhook", _slashed(WEBHOOK), WEBHOOK, "<SLACK_WEBHOOK>"),
    ("profile", _slashed(PROFILE), "jane-doe-12345", "<PERSONAL_URL>"),
    ("database", _slashed(DATABASE), "Tr0ub4dor-3xq", "<CONNECTION_STRING>"),
    ("quoted key", _slashed(f'aws_secret_access_key="{SECRET}"'), SECRET, "<AWS_SECRET_KEY>"),
    ("escaped space", '{"v": "card 4111\\u00201111 1111 1111 ok"}', "1111 1111", "<CREDIT_CARD>"),
]
IDS = [case[0] for case in CASES]


def _policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          tool: {{provider: mock, model: fault-echo-tool}}
          echo: {{provider: mock, model: fault-echo}}
        guards:
          models:
            tool:
              pii: {{kind: pii, places: [output]}}
              secrets: {{kind: secrets, places: [output], action: redact}}
            echo:
              pii: {{kind: pii, places: [input]}}
              secrets: {{kind: secrets, places: [input], action: redact}}
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _answered(gw: RunningGateway, arguments: str, stream: bool, chunk: int) -> str:
    """The arguments of the tool call `fault-echo-tool` answers with (`arguments` as they are), as the client got
    them: whole, or streamed `chunk` characters a piece."""
    body: dict[str, Any] = {"model": "tool", "messages": [{"role": "user", "content": arguments}], "stream": stream,
                            "echo_raw_arguments": True, "echo_chunk": chunk}
    if not stream:
        answer = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    out = ""
    for line in raw.split("\n"):
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices") or ():
                for call in choice["delta"].get("tool_calls") or ():
                    out += (call.get("function") or {}).get("arguments") or ""
    return out


def _rewritten(arguments: str, secret: str, placeholder: str) -> None:
    value = json.loads(arguments)["v"]  # still JSON
    assert secret not in value and placeholder in value, arguments


@pytest.mark.parametrize(("name", "arguments", "secret", "placeholder"), CASES, ids=IDS)
@pytest.mark.parametrize(("stream", "chunk"), [(False, 5), (True, 1), (True, 3), (True, 7), (True, 64)])
def test_an_escaped_value_in_answer_tool_arguments_is_redacted(
        gw: RunningGateway, name: str, arguments: str, secret: str, placeholder: str, stream: bool, chunk: int) -> None:
    assert secret in json.loads(arguments)["v"]  # (the arguments as sent hold it)
    _rewritten(_answered(gw, arguments, stream, chunk), secret, placeholder)


@pytest.mark.parametrize(("name", "arguments", "secret", "placeholder"), CASES, ids=IDS)
def test_an_escaped_value_in_a_requests_tool_call_is_redacted(
        gw: RunningGateway, upstream: MockUpstream, name: str, arguments: str, secret: str, placeholder: str) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "save", "arguments": arguments}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "save it"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "saved"},
    ]
    answer = httpx.post(gw.url + "/v1/chat/completions", json={"model": "echo", "messages": messages}, timeout=30)
    assert answer.status_code == 200, answer.text
    sent = upstream.requests[-1].json
    _rewritten(sent["messages"][1]["tool_calls"][0]["function"]["arguments"], secret, placeholder)


def test_each_escape_reads_as_its_character_once() -> None:
    """The view keeps every offset (one character for each of the raw text's), and each escape is its character
    followed by zero-width spaces, which the guards drop as they read: never the character twice or six times."""
    raw = r'{"a": "x\ny\t\"q\" \/\/ caf\u00e9 \ud83d\ude00 \u00a0 \u0020 C:\Users \\n"}'
    view, escapes = json_view(raw)
    assert len(view) == len(raw)
    fill = "\u200b"
    for escape, char in [(r"\n", "\n"), (r"\t", "\t"), (r"\"", '"'), (r"\/", "/"), (r"\\", "\\")]:
        assert view[raw.index(escape):][:2] == char + fill, escape
    for escape, char in [(r"\u00e9", "\u00e9"), (r"\u00a0", "\u00a0"), (r"\u0020", " ")]:
        assert view[raw.index(escape):][:6] == char + fill * 5, escape
    assert view[raw.index(r"\ud83d"):][:12] == fill * 12  # surrogates: no part of any finding
    assert view[raw.index(r"\Users"):][:6] == r"\Users"  # no escape: read as it is
    assert view.replace(fill, "").count("/") == 2  # `\/\/`: two slashes, not four
    assert [raw[start:end] for start, end in escapes] == [
        r"\n", r"\t", r"\"", r"\"", r"\/", r"\/", r"\u00e9", r"\ud83d", r"\ude00", r"\u00a0", r"\u0020", r"\\"]
