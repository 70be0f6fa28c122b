"""Every shape a text may take reaches the guards (`gateway/guards/texts.py`), or is refused when it cannot.

Each case was a way past the guards: a request or an answer carrying a text in a shape the guards did not
read (tool arguments as a JSON object, content as a list of parts, a legacy function call, a custom
tool's input, a refusal part, a predicted output, a completion's suffix, a prompt template's variables,
a tool output as parts) or could not read (a prompt as token ids). The mock upstream records what it got
and echoes the prompt back in the shape a case asks for.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
EMAIL = "jane.doe@mailbox.org"
SECRET = "AKIAIOSFODNN7EXAMPLQ"
TEXT = f"write to {EMAIL} about the plan"


def _policy(upstream_url: str) -> str:
    kinds = ("content-parts", "object-arguments", "custom-tool", "legacy-call")
    outputs = "".join(f"  out-{kind}: {{provider: mock, model: fault-{kind}}}\n" for kind in kinds)
    guarded = "".join(f"    out-{kind}: *out\n" for kind in kinds[1:])
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          in: {{provider: mock, model: mock-model}}
          open: {{provider: mock, model: mock-model}}
          embed: {{provider: mock, model: text-embedding-3-small}}
        """) + outputs + textwrap.dedent("""\
        guards:
          stream: {window_chars: 32, step_chars: 8}
          models:
            in: &both
              pii: {kind: pii, entities: {EMAIL_ADDRESS: {}}}
              secrets: {kind: secrets, action: block}
            embed: *both
            out-content-parts: &out
              pii: {kind: pii, places: [output], entities: {EMAIL_ADDRESS: {}}}
              secrets: {kind: secrets, places: [output], action: block}
        """) + guarded


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.base_url + path, headers=AUTH, json=body, timeout=20)


def _sent(upstream: MockUpstream) -> str:
    return upstream.requests[-1].body.decode()


# -- input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), [
    ("/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "send", "arguments": {"to": EMAIL}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
    ("/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "send", "arguments": json.dumps({"to": EMAIL})}},
        {"role": "function", "name": "send", "content": "ok"}]}),
    ("/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": f"I will not mail {EMAIL}"}]},
        {"role": "user", "content": "fine"}]}),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                           "prediction": {"type": "content", "content": TEXT}}),
    ("/completions", {"prompt": "Dear", "suffix": f" regards, {EMAIL}"}),
    ("/responses", {"input": [{"type": "function_call_output", "call_id": "c1",
                               "output": [{"type": "input_text", "text": TEXT}]}]}),
    ("/responses", {"input": [{"type": "function_call", "call_id": "c1", "name": "send",
                               "arguments": json.dumps({"to": EMAIL})},
                              {"type": "function_call_output", "call_id": "c1", "output": "ok"}]}),
    ("/responses", {"input": "hi", "prompt": {"id": "pmpt_1", "variables": {
        "who": EMAIL, "note": {"type": "input_text", "text": TEXT}}}}),
    ("/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "custom", "custom": {"name": "note", "input": TEXT}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
    ("/responses", {"input": [{"type": "custom_tool_call", "call_id": "c1", "name": "note", "input": TEXT},
                              {"type": "custom_tool_call_output", "call_id": "c1", "output": "ok"}]}),
    ("/responses", {"input": [{"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": TEXT}]},
                              {"role": "user", "content": "go on"}]}),
    ("/responses", {"input": [{"type": "shell_call_output", "call_id": "c1", "output": [
        {"stdout": f"config: {TEXT}\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}]}]}),
    ("/responses", {"input": [{"type": "shell_call_output", "call_id": "c1", "output": [
        {"stdout": "", "stderr": f"cannot reach {EMAIL}", "outcome": {"type": "exit", "exit_code": 1}}]}]}),
    ("/responses", {"input": [{"type": "shell_call", "call_id": "c1", "status": "completed",
                               "action": {"commands": ["cd /srv", f"mail {EMAIL} < plan.txt"]}}]}),
    ("/responses", {"input": [{"type": "mcp_call", "id": "mcp_1", "server_label": "crm", "name": "send",
                               "arguments": json.dumps({"to": EMAIL}), "output": "ok"}]}),
    ("/responses", {"input": [{"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": False,
                               "reason": f"do not write to {EMAIL}"}]}),
    ("/responses", {"input": [{"type": "code_interpreter_call", "id": "ci_1", "container_id": "c",
                               "code": f"send('{EMAIL}')", "outputs": []}]}),
    ("/responses", {"input": [{"type": "apply_patch_call", "call_id": "c1", "status": "completed", "operation": {
        "type": "update_file", "path": "a.txt", "diff": f"@@\n-old\n+{TEXT}\n"}}]}),
], ids=["object-arguments", "legacy-call", "refusal-part", "prediction", "suffix", "output-parts",
        "call-item", "prompt-variables", "custom-call", "custom-call-item", "reasoning-summary", "shell-stdout",
        "shell-stderr", "shell-commands", "mcp-call", "mcp-approval-reason", "code-interpreter", "patch-diff"])
def test_every_input_text_is_guarded(gw: RunningGateway, upstream: MockUpstream, path: str,
                                     body: dict[str, Any]) -> None:
    response = _post(gw, path, {"model": "in", **body})
    assert response.status_code == 200, response.text
    assert EMAIL not in _sent(upstream) and "EMAIL_ADDRESS" in _sent(upstream)
    _post(gw, path, {"model": "open", **body})  # no guards on the alias: as sent (the case carries the address)
    assert EMAIL in _sent(upstream)


@pytest.mark.parametrize(("path", "field", "ids"), [
    ("/completions", "prompt", [[9906, 1917]]),
    ("/completions", "prompt", [9906, 1917]),
    ("/embeddings", "input", [9906, 1917]),
])
def test_token_ids_are_refused_under_input_guards(gw: RunningGateway, upstream: MockUpstream, path: str,
                                                  field: str, ids: list[Any]) -> None:
    before = len(upstream.requests)
    model = "embed" if path == "/embeddings" else "in"
    response = _post(gw, path, {"model": model, field: ids})
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert len(upstream.requests) == before  # the upstream would decode them into any text
    assert _post(gw, path, {"model": "open", field: ids}).status_code == 200  # no input guards: as sent


# -- output ------------------------------------------------------------------------------------------


def _stream(gw: RunningGateway, model: str, text: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True}
    with httpx.stream("POST", gw.base_url + "/chat/completions", headers=AUTH, json=body, timeout=20) as response:
        assert response.status_code == 200
        return response.read().decode()


def _chunks(raw: str) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in raw.split("\n") if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def _joined(raw: str, path: tuple[str, ...]) -> str:
    """The pieces of one field of a stream's first choice's deltas (`path` under the delta; `tool_calls` entries
    as the first call), joined."""
    out = ""
    for chunk in _chunks(raw):
        value: Any = chunk["choices"][0]["delta"] if chunk.get("choices") else None
        for key in path:
            value = value[0] if isinstance(value, list) else value
            value = value.get(key) if isinstance(value, dict) else None
        out += value if isinstance(value, str) else ""
    return out


@pytest.mark.parametrize(("kind", "path"), [
    ("content-parts", ("content",)),
    ("object-arguments", ("tool_calls", "function", "arguments")),
    ("custom-tool", ("tool_calls", "custom", "input")),
    ("legacy-call", ("function_call", "arguments")),
])
def test_every_answer_text_is_guarded_whole_and_streamed(gw: RunningGateway, kind: str,
                                                         path: tuple[str, ...]) -> None:
    answer = _post(gw, "/chat/completions", {"model": f"out-{kind}", "messages": [{"role": "user", "content": TEXT}]})
    assert answer.status_code == 200 and EMAIL not in answer.text and "EMAIL_ADDRESS" in answer.text
    value: Any = answer.json()["choices"][0]["message"]
    for key in path:
        value = (value[0] if isinstance(value, list) else value)[key]
    assert isinstance(value, str)  # arguments sent as an object, or content as parts: a string, as OpenAI's are
    raw = _stream(gw, f"out-{kind}", TEXT)
    assert EMAIL not in raw
    streamed = _joined(raw, path)
    assert "<EMAIL_ADDRESS>" in streamed and streamed.count("about the plan") == 1


@pytest.mark.parametrize("kind", ["content-parts", "object-arguments", "custom-tool", "legacy-call"])
def test_a_secret_in_any_answer_text_blocks_it(gw: RunningGateway, kind: str) -> None:
    text = f"the key {SECRET} is here"
    answer = _post(gw, "/chat/completions", {"model": f"out-{kind}", "messages": [{"role": "user", "content": text}]})
    assert SECRET not in answer.text and answer.json()["choices"][0]["finish_reason"] == "content_filter"
    raw = _stream(gw, f"out-{kind}", text)
    assert SECRET not in raw and "AKIA" not in raw
    assert [c["choices"][0]["finish_reason"] for c in _chunks(raw) if c.get("choices")][-1] == "content_filter"
