"""Pseudonyms and JSON escapes, in tool call arguments, through a real gateway.

Python's `json.dumps` writes `ë` and `ß` as `\\u00eb` and `\\u00df`: a pseudonym made from a tool call's arguments
so written was keyed on (and restored as) the escaped text, so an answer's text got `zo\\u00eb@gmail.com` with its
backslash, a tool call's arguments `zo\\\\u00eb@...` (escaped twice), and the same address written plainly in a
message was another placeholder. Go's `json.Marshal` (Ollama's OpenAI-compatible API) writes `<` and `>` as `\\u003c`
and `\\u003e`: a placeholder so written in an answer's tool call arguments reached the client unrestored.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.guards.pseudonyms import Pseudonyms
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

ADDRESS = "Hauptstraße 5, 10115 Berlin"
EMAIL = "zoë@gmail.com"
GUARDS = {
    "both": "pii: {kind: pii, engine: patterns, action: pseudonymize}",
    # no output guard: the stream's window only restores placeholders (`Window.release` without guards)
    "input": "pii: {kind: pii, engine: patterns, places: [input], action: pseudonymize}",
}


@pytest.fixture(scope="module", params=sorted(GUARDS))
def env(request: pytest.FixtureRequest) -> Iterator[tuple[RunningGateway, MockUpstream]]:
    with MockUpstream(api_key=UPSTREAM_KEY) as up:
        text = policy_text(up.base_url) + textwrap.dedent(f"""\
            guards:
              global:
                {GUARDS[request.param]}
            """)
        gateway = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        try:
            yield gateway, up
        finally:
            gateway.stop()


def _post(gateway: RunningGateway, body: dict[str, Any]) -> httpx.Response:
    response = httpx.post(gateway.base_url + "/chat/completions", json=body,
                          headers={"authorization": f"Bearer {FULL_KEY}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def _content(response: httpx.Response, stream: bool) -> str:
    if not stream:
        return response.json()["choices"][0]["message"]["content"]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in _events(response) if e["choices"])


def _arguments(response: httpx.Response, stream: bool) -> str:
    if not stream:
        return response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    return "".join(call.get("function", {}).get("arguments") or "" for e in _events(response)
                   for choice in e["choices"] for call in choice["delta"].get("tool_calls") or [])


def _history(arguments: str, *, first: str = "x", last: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": first},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
            {"role": "user", "content": last}]


ESCAPED = json.dumps({"addr": ADDRESS, "mail": EMAIL})  # Python's default: `Hauptstra\u00dfe`, `zo\u00eb`


@pytest.mark.parametrize("stream", [False, True])
def test_a_pseudonym_of_escaped_arguments_comes_back_as_the_value_in_text(env, stream: bool) -> None:
    gateway, up = env
    assert "\\u00df" in ESCAPED and "\\u00eb" in ESCAPED
    # (the values again, plain: the same placeholders, which the echo writes back; a prompt's own placeholder-shaped
    # text is never issued, so the echo of one would stay that text)
    answer = _post(gateway, {"model": "fault-echo", "stream": stream,
                             "messages": _history(ESCAPED, last=f"repeat: {ADDRESS} / {EMAIL}")})
    sent = up.requests[-1].json["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert sent == '{"addr": "<STREET_ADDRESS_1>", "mail": "<EMAIL_ADDRESS_1>"}'
    assert up.requests[-1].json["messages"][-1]["content"] == "repeat: <STREET_ADDRESS_1> / <EMAIL_ADDRESS_1>"
    assert _content(answer, stream) == f"repeat: {ADDRESS} / {EMAIL}"  # no `Hauptstra\u00dfe`, backslash and all


@pytest.mark.parametrize("stream", [False, True])
def test_a_pseudonym_of_escaped_arguments_comes_back_escaped_once_in_arguments(env, stream: bool) -> None:
    gateway, _ = env
    answer = _post(gateway, {"model": "fault-echo-tool", "stream": stream,
                             "messages": _history(ESCAPED, last=f"{ADDRESS} and {EMAIL}")})
    arguments = _arguments(answer, stream)
    assert arguments == f'{{"text": "{ADDRESS} and {EMAIL}"}}'  # not `Hauptstra\\u00dfe` (escaped twice)
    assert json.loads(arguments) == {"text": f"{ADDRESS} and {EMAIL}"}


@pytest.mark.parametrize("stream", [False, True])
def test_the_same_value_escaped_in_arguments_and_plain_in_text_is_one_placeholder(env, stream: bool) -> None:
    gateway, up = env
    messages = _history(json.dumps({"mail": EMAIL}), first=f"Send it to {EMAIL}", last=f"Did it go to {EMAIL}?")
    answer = _post(gateway, {"model": "fault-echo", "stream": stream, "messages": messages})
    sent = up.requests[-1].json["messages"]
    assert sent[0]["content"] == "Send it to <EMAIL_ADDRESS_1>"
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"mail": "<EMAIL_ADDRESS_1>"}'
    assert sent[3]["content"] == "Did it go to <EMAIL_ADDRESS_1>?"
    assert _content(answer, stream) == f"Did it go to {EMAIL}?"


# What an upstream writing JSON as Go does sends back for `{"to": "<EMAIL_ADDRESS_1>", ...}`; `raw` holds a
# backslash and the letters `u003c...` (an escaped backslash): no placeholder.
GO_ARGUMENTS = ('{"to": "<EMAIL>", "cc": "\\u003cEMAIL_ADDRESS_1\\u003e", "bcc": "\\u003CEMAIL_ADDRESS_1\\u003E", '
                '"raw": "\\\\u003cEMAIL_ADDRESS_1\\\\u003e"}')


@pytest.mark.parametrize(("stream", "chunk"), [(False, None), (True, 1), (True, 4), (True, 5), (True, 7)])
def test_placeholders_escaped_as_go_writes_them_are_restored_in_arguments(env, stream: bool,
                                                                           chunk: int | None) -> None:
    gateway, up = env
    original = "jane.doe@gmail.com"
    body: dict[str, Any] = {"model": "fault-echo-tool", "stream": stream, "echo_raw_arguments": True,
                            "messages": [{"role": "user", "content": GO_ARGUMENTS.replace("<EMAIL>", original)}]}
    if chunk is not None:
        body["echo_chunk"] = chunk  # the escapes split at every offset across chunks
    answer = _post(gateway, body)
    assert up.requests[-1].json["messages"][-1]["content"] == GO_ARGUMENTS.replace("<EMAIL>", "<EMAIL_ADDRESS_1>")
    arguments = _arguments(answer, stream)
    assert arguments == (f'{{"to": "{original}", "cc": "{original}", "bcc": "{original}", '
                         '"raw": "\\\\u003cEMAIL_ADDRESS_1\\\\u003e"}')
    assert json.loads(arguments)["raw"] == "\\u003cEMAIL_ADDRESS_1\\u003e"


def test_an_escaped_placeholder_start_is_held_at_every_offset() -> None:
    """(pure logic) Every prefix of an escaped placeholder at a text's end may still become one: held whole."""
    written = "\\u003cEMAIL_ADDRESS_1\\u003e"
    for end in range(1, len(written)):
        assert Pseudonyms.open_tail('{"to": "' + written[:end]) == end
    assert Pseudonyms.open_tail('{"to": "' + written) == 0
    assert Pseudonyms.open_tail("C:\\temp") == 0  # a backslash that begins no `\u003c`
