"""Values in a tool call's arguments after a JSON escape: found as in text, redacted with the arguments left JSON.

Arguments are JSON text: a line break in a string is `\\n`. Read raw, a key on the line after `Details:` was
`nAKIA...` (the secrets patterns want no letter before a key) and a card or an SSN had an `n` glued to it: all of
them reached the client, streamed or not, and went upstream in a request's tool calls. An address was found as
`njane@...` and redacted with the `n`, leaving `\\<EMAIL_ADDRESS>`: arguments no client could parse. The guards now
read the arguments with their escapes as the characters they stand for (`guards/json_view.py`).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.guards.base import Finding
from gateway.guards.json_view import json_view, whole_escapes
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

AWS_KEY = "AKIAIOSFODNN7EXAMPLQ"
OPENAI_KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz012345"
CARD = "4111 1111 1111 1111"
SSN = "078-05-1120"
EMAIL = "jane.doe@mailbox.org"


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
              secrets: {{kind: secrets, places: [input]}}
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _arguments(gw: RunningGateway, content: str, stream: bool, raw: bool = False, chunk: int = 5) -> str:
    """The arguments of the tool call `fault-echo-tool` makes of `content` (`{"text": content}`; `raw`: `content`
    itself), as the client got them (streamed in pieces of `chunk` characters)."""
    body: dict[str, Any] = {"model": "tool", "messages": [{"role": "user", "content": content}], "stream": stream}
    if raw:
        body["echo_raw_arguments"] = True
    if chunk != 5:
        body["echo_chunk"] = chunk
    if not stream:
        answer = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    arguments = ""
    for line in raw.split("\n"):
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices") or ():
                for call in choice["delta"].get("tool_calls") or ():
                    arguments += (call.get("function") or {}).get("arguments") or ""
    return arguments


@pytest.mark.parametrize("value", [AWS_KEY, OPENAI_KEY, CARD, SSN, EMAIL])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("before", ["\n", "\t", '"', "\\"])
def test_a_value_after_an_escape_in_tool_arguments_is_redacted_and_the_arguments_stay_json(
        gw: RunningGateway, value: str, stream: bool, before: str) -> None:
    arguments = _arguments(gw, f"Details:{before}{value}{before}thanks", stream)
    text = json.loads(arguments)["text"]  # still JSON
    assert value not in text and text.startswith(f"Details:{before}<") and text.endswith(f">{before}thanks"), text


def test_a_key_after_an_escape_in_a_requests_tool_call_is_refused(gw: RunningGateway, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "save", "arguments": json.dumps({"note": f"Details:\n{AWS_KEY}"})}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "save my note"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "saved"},
    ]
    answer = httpx.post(gw.url + "/v1/chat/completions", json={"model": "echo", "messages": messages}, timeout=30)
    assert answer.status_code == 400, answer.text
    assert AWS_KEY not in answer.text and len(upstream.requests) == before


def test_the_view_keeps_every_offset_and_reads_each_escape() -> None:
    raw = r'{"a": "x\ny\t\"q\" caf\u00e9 \ud83d\ude00 \u00a0 C:\Users \\n \/"}'
    view, escapes = json_view(raw)
    assert len(view) == len(raw)
    assert view[raw.index(r"\n"):][:2] == "\n\u200b" and view[raw.index(r"\t"):][:2] == "\t\u200b"
    assert view[raw.index(r"\u00e9"):][:6] == "\u00e9" + "\u200b" * 5
    assert view[raw.index(r"\ud83d"):][:12] == "\u200b" * 12  # surrogates: no part of any finding
    assert view[raw.index(r"\u00a0"):][:6] == "\u00a0" + "\u200b" * 5
    assert view[raw.index(r"\Users"):][:6] == r"\Users"  # no escape: read as it is
    assert view[raw.index(r"\\n"):][:3] == "\\\u200bn"  # an escaped backslash, then a letter
    assert [raw[start:end] for start, end in escapes] == [
        r"\n", r"\t", r"\"", r"\"", r"\u00e9", r"\ud83d", r"\ude00", r"\u00a0", r"\\", r"\/"]
    assert json_view("no escapes") == ("no escapes", [])
    assert json_view("a lone \\") == ("a lone \\", [])


def test_a_finding_that_would_split_an_escape_covers_it_whole() -> None:
    raw = r"ab\ncd\u00e9f"
    _, escapes = json_view(raw)
    found = Finding("g", "T", 3, 8, 1.0, "r", "redact")  # from the `n` of `\n` to inside `\u00e9`
    assert [(f.start, f.end) for f in whole_escapes([found], escapes)] == [(2, 12)]
    inside = Finding("g", "T", 0, 2, 1.0, "r", "redact")
    assert whole_escapes([inside], escapes) == [inside]


@pytest.mark.parametrize("chunk", [3, 5, 64])
@pytest.mark.parametrize("stream", [False, True])
def test_a_card_written_as_a_json_number_in_tool_arguments_becomes_a_json_string(
        gw: RunningGateway, stream: bool, chunk: int) -> None:
    """`{"card": 4111111111111111}`: its placeholder in place of the number was no JSON; streamed, the arguments come
    in pieces, none a JSON text of its own (`json_view.JsonPieces` follows them). A number inside a string, and the
    other numbers, are left as they are."""
    content = '{"note": "call 4111111111111111 \\" 7", "card": 4111111111111111, "n": [1, -2.5e3]}'
    arguments = json.loads(_arguments(gw, content, stream, raw=True, chunk=chunk))  # still JSON
    assert arguments["card"] == "<CREDIT_CARD>" and arguments["n"] == [1, -2500.0], arguments
    assert "4111111111111111" not in json.dumps(arguments) and arguments["note"].startswith("call <"), arguments
