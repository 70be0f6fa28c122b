"""Unit tests of the pure translation logic and the per-kind policy options (no network)."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import msgspec
import pytest

from gateway.errors import InvalidRequest, UpstreamError
from gateway.policy import PolicyError, compile_text
from gateway.policy.provider_schema import AnthropicSpec, AzureSpec
from gateway.schemas.events import Chunk, StreamDone, StreamError, UsageReport
from gateway.schemas.openai import Usage
from gateway.translate.anthropic_ingress import MessagesStream, chat_request
from gateway.translate.chat_to_anthropic import AnthropicEvents, anthropic_request
from gateway.translate.chat_to_gemini import GeminiEvents, gemini_request
from gateway.translate.common import StreamProtocolError

T = "the test target"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def event(kind: str, **fields: Any) -> bytes:
    return json.dumps({"type": kind, **fields}).encode()


# -- Chat -> Anthropic --------------------------------------------------------------------------------


def test_anthropic_request_merges_turns_and_maps_tools() -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "A"}, {"role": "developer", "content": "B"}, user("hi"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
    ], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                   "function": {"name": "f"}},
        "parallel_tool_calls": False, "stop": "END", "user": "u1"}
    out = anthropic_request(body, 99, T)
    assert out["system"] == "A\n\nB" and out["max_tokens"] == 99 and out["stop_sequences"] == ["END"]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][1]["content"][0]["input"] == {"x": 1} and out["messages"][1]["content"][1]["input"] == {}
    assert [b["tool_use_id"] for b in out["messages"][2]["content"]] == ["c1", "c2"]
    assert out["tool_choice"] == {"type": "tool", "name": "f", "disable_parallel_tool_use": True}
    assert out["tools"][0]["input_schema"] == {"type": "object", "properties": {}}
    assert out["metadata"] == {"user_id": "u1"}


@pytest.mark.parametrize(("extra", "param"), [
    ({"temperature": 1.5}, "temperature"), ({"n": 3}, "n"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"made_up_field": 1}, "made_up_field"), ({"tool_choice": "required"}, "tool_choice"),
])
def test_anthropic_request_refuses_what_it_cannot_express(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        anthropic_request({"model": "m", "messages": [user("x")], **extra}, 10, T)
    assert caught.value.param == param


def test_invalid_tool_arguments_are_a_400() -> None:
    with pytest.raises(InvalidRequest):
        anthropic_request({"model": "m", "messages": [user("x"), {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]}, 10, T)


def test_json_schema_mode_is_an_instruction_with_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    out = anthropic_request({"model": "m", "messages": [user("x")], "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}, 10, T)
    assert json.dumps(schema, separators=(",", ":")) in out["system"]


def test_anthropic_events_translate_as_they_arrive() -> None:
    events = AnthropicEvents(lambda detail: UpstreamError(str(detail.get("type"))))
    assert events.feed(event("message_start", message={"id": "msg_1", "model": "m",
                                                       "usage": {"input_tokens": 5, "cache_read_input_tokens": 2}}))\
        == []
    first = events.feed(event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
    assert [c.data()["choices"][0]["delta"] for c in first if isinstance(c, Chunk)] == [
        {"role": "assistant", "content": ""}]
    assert events.feed(event("ping")) == []
    text = events.feed(event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}))
    assert isinstance(text[0], Chunk) and text[0].data()["choices"][0]["delta"] == {"content": "Hi"}
    tool = events.feed(event("content_block_start", index=1, content_block={"type": "tool_use", "id": "t",
                                                                            "name": "f", "input": {}}))
    assert isinstance(tool[0], Chunk) and tool[0].data()["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    events.feed(event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": "{}"}))
    finish = events.feed(event("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 7}))
    assert isinstance(finish[0], Chunk) and finish[0].data()["choices"][0]["finish_reason"] == "tool_calls"
    last = events.feed(event("message_stop"))
    assert isinstance(last[0], UsageReport) and last[0].usage == Usage(7, 7, 14) and isinstance(last[1], StreamDone)


@pytest.mark.parametrize("sequence", [
    [event("content_block_start", index=0, content_block={"type": "text"})],
    [event("message_start", message={}), event("content_block_delta", index=0, delta={"type": "text_delta"})],
    [event("message_start", message={}), event("message_stop")],
    [event("message_start", message={}), event("message_start", message={})],
])
def test_anthropic_events_out_of_order_are_refused(sequence: list[bytes]) -> None:
    events = AnthropicEvents(lambda detail: UpstreamError("x"))
    with pytest.raises(StreamProtocolError):
        for payload in sequence:
            events.feed(payload)


def test_anthropic_error_event_and_early_end() -> None:
    events = AnthropicEvents(lambda detail: UpstreamError(str(detail.get("type"))))
    out = events.feed(event("error", error={"type": "overloaded_error", "message": "Overloaded"}))
    assert isinstance(out[0], StreamError) and out[0].error.message == "overloaded_error"
    with pytest.raises(StreamProtocolError):
        AnthropicEvents(lambda detail: UpstreamError("x")).end()


# -- Chat -> Gemini -----------------------------------------------------------------------------------


def test_gemini_tool_result_needs_its_call() -> None:
    with pytest.raises(InvalidRequest) as caught:
        gemini_request({"model": "m", "messages": [user("x"), {"role": "tool", "tool_call_id": "zz",
                                                                 "content": "r"}]}, T)
    assert caught.value.param == "messages.1.tool_call_id"


def test_gemini_generation_config() -> None:
    out = gemini_request({"model": "m", "messages": [user("x")], "n": 2, "seed": 3, "max_tokens": 9,
                          "stop": ["a"], "response_format": {"type": "json_object"}}, T)
    assert out["generationConfig"] == {"candidateCount": 2, "seed": 3, "maxOutputTokens": 9, "stopSequences": ["a"],
                                       "responseMimeType": "application/json"}


def test_gemini_stream_end_without_finish_is_refused() -> None:
    events = GeminiEvents()
    events.feed(json.dumps({"candidates": [{"content": {"parts": [{"text": "a"}]}, "index": 0}]}).encode())
    with pytest.raises(StreamProtocolError):
        events.end()


# -- Messages ingress ---------------------------------------------------------------------------------


def test_messages_request_becomes_a_chat_request() -> None:
    raw = msgspec.json.encode({
        "model": "a", "max_tokens": 5, "system": [{"type": "text", "text": "S"}], "stop_sequences": ["x"],
        "metadata": {"user_id": "u"}, "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "q"},
                     {"role": "assistant", "content": [{"type": "thinking", "thinking": "...", "signature": "s"},
                                                       {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                                                   "content": [{"type": "text", "text": "bad"}]},
                                                  {"type": "text", "text": "go on"}]}]})
    chat, _ = chat_request(raw)
    assert chat["messages"][0] == {"role": "system", "content": "S"}
    assert chat["messages"][2]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "Error: bad"}
    assert chat["messages"][4] == {"role": "user", "content": [{"type": "text", "text": "go on"}]}
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert chat["stop"] == ["x"] and chat["user"] == "u"


@pytest.mark.parametrize("raw", [b"", b"[]", b"{", b'{"model": "a", "max_tokens": 1, "messages": "no"}'])
def test_messages_bad_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        chat_request(raw)


def test_messages_stream_frames_text_then_a_tool_call() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> Chunk:
        return Chunk.of({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    framer = MessagesStream("alias")
    out = framer.frame([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}),
                        chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}]}),
                        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                        chunk({}, "tool_calls"), UsageReport(Usage(3, 4, 7)), StreamDone()])
    lines = out.decode().split("\n")
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    delta = json.loads(next(line[6:] for line in lines if '"message_delta"' in line))
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"] == {"input_tokens": 3, "output_tokens": 4}


# -- policy -------------------------------------------------------------------------------------------


def policy(provider: str) -> str:
    return textwrap.dedent("""\
        version: 1
        auth: none
        providers:
          p:
        """) + textwrap.indent(textwrap.dedent(provider), "    ") + "models:\n  m: {provider: p, model: x}\n"


def test_kind_defaults() -> None:
    claude = compile_text(policy("kind: anthropic\napi_key_env: K\n"), env={"K": "sk-ant"}).providers["p"]
    assert claude.base_url == "https://api.anthropic.com/v1" and claude.headers["x-api-key"] == "sk-ant"
    assert claude.options == AnthropicSpec()
    azure = compile_text(policy("kind: azure\nbase_url: https://r.openai.azure.com\napi_key_env: K\n"),
                         env={"K": "k1"}).providers["p"]
    assert azure.headers["api-key"] == "k1" and isinstance(azure.options, AzureSpec)
    entra = compile_text(policy("kind: azure\nbase_url: https://r.openai.azure.com\n"
                                "azure: {entra_token_env: T}\n"), env={"T": "tok"}).providers["p"]
    assert entra.headers["Authorization"] == "Bearer tok" and "tok" in entra.secrets
    gemini = compile_text(policy("kind: gemini\napi_key_env: K\n"), env={"K": "g"}).providers["p"]
    assert gemini.headers["x-goog-api-key"] == "g" and gemini.base_url.endswith("/v1beta")


@pytest.mark.parametrize(("provider", "message"), [
    ("kind: openai\nbase_url: http://x\nanthropic: {version: '2023-06-01'}\n", "apply to `kind: anthropic`"),
    ("kind: azure\n", "needs `base_url`"),
    ("kind: azure\nbase_url: https://r\napi_key_env: K\nazure: {entra_token_env: T}\n", "not both"),
    ("kind: anthropic\nanthropic: {default_max_tokens: 0}\n", "default_max_tokens"),
    ("kind: azure\nbase_url: https://r\nazure: {api_version: latest}\n", "api_version"),
])
def test_kind_options_are_checked(provider: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        compile_text(policy(provider), "p.yaml", env={"K": "k", "T": "t"})
    assert any(message in str(issue) for issue in caught.value.issues), caught.value.issues
