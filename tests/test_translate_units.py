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
from gateway.schemas.openai import PromptTokensDetails, Usage
from gateway.translate.anthropic_answer import MessagesStream, messages_response
from gateway.translate.anthropic_ingress import chat_request
from gateway.translate.chat_to_anthropic import AnthropicEvents, anthropic_request, chat_usage
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
    assert isinstance(last[0], UsageReport) and isinstance(last[1], StreamDone)
    assert last[0].usage == Usage(7, 7, 14, PromptTokensDetails(cached_tokens=2, cache_write_tokens=0))


def test_a_tool_streamed_without_input_has_empty_object_arguments() -> None:
    """Anthropic streams a tool without input as one `partial_json: ""`: its arguments are `{}`, as in the
    complete answer (the OpenAI SDK's stream helper parses `""` and fails); a tool with input gets nothing more."""
    events = AnthropicEvents(lambda detail: UpstreamError("x"))
    events.feed(event("message_start", message={"id": "msg_1", "model": "m", "usage": {"input_tokens": 5}}))
    streamed: list[str] = []
    for index, pieces in enumerate(([""], ['{"a"', ": 1}"])):
        events.feed(event("content_block_start", index=index,
                          content_block={"type": "tool_use", "id": f"t{index}", "name": "f", "input": {}}))
        out = [c for piece in pieces for c in events.feed(
            event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": piece}))]
        out += events.feed(event("content_block_stop", index=index))
        streamed.append("".join(c.data()["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                                for c in out if isinstance(c, Chunk)))
    assert streamed == ["{}", '{"a": 1}']


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


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> Chunk:
    return Chunk.of({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def call_piece(index: int, arguments: str, name: str | None = None) -> Chunk:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if name is not None:
        call.update(id=f"c{index}", type="function", function={"name": name, "arguments": arguments})
    return chat_chunk({"tool_calls": [call]})


def framed(out: bytes) -> list[dict[str, Any]]:
    """The events of framed bytes, each `event:` line checked against its data's type."""
    events = []
    for frame in out.decode().split("\n\n"):
        if frame:
            name, data = frame.split("\n")
            events.append(json.loads(data.removeprefix("data: ")))
            assert name == "event: " + events[-1]["type"]
    return events


def test_messages_stream_writes_interleaved_tool_calls_whole_one_block_after_another() -> None:
    framer = MessagesStream("alias")
    out = framer.frame([chat_chunk({"role": "assistant", "content": "Let me"}), chat_chunk({"content": " look."}),
                        call_piece(0, '{"x":', "get"), call_piece(1, '{"y":', "put"), call_piece(0, " 1}"),
                        chat_chunk({"content": "And then"}), call_piece(1, " 2}"), chat_chunk({}, "tool_calls"),
                        StreamDone()])
    events = framed(out)
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("content_block_start", 3), ("content_block_delta", 3), ("content_block_stop", 3),
        ("message_delta", None), ("message_stop", None)]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert [(s["type"], s.get("id"), s.get("name")) for s in starts] == [
        ("text", None, None), ("tool_use", "c0", "get"), ("tool_use", "c1", "put"), ("text", None, None)]
    assert [d.get("text", d.get("partial_json")) for d in deltas] == ["Let me", " look.", '{"x":1}', '{"y":2}',
                                                                      "And then"]


def test_messages_stream_text_before_a_tool_call_goes_as_it_comes() -> None:
    framer = MessagesStream("alias")
    first = framed(framer.frame([chat_chunk({"role": "assistant", "content": "Hi"})]))
    assert [e["type"] for e in first] == ["message_start", "content_block_start", "content_block_delta"]
    held = framer.frame([call_piece(0, "{", "f")])
    assert [e["type"] for e in framed(held)] == ["content_block_stop"]  # the text is over; the call is held
    assert framer.frame([call_piece(0, "}")]) == b""


@pytest.mark.parametrize(("arguments", "expected"), [
    (['{"a": ', "1}"], {"a": 1}), (['{"a": '], {"_raw_arguments": '{"a": '}), (["[1,", "2]"], {"value": [1, 2]}),
    ([], {}),
])
def test_messages_stream_tool_input_is_the_whole_answers(arguments: list[str], expected: dict[str, Any]) -> None:
    framer = MessagesStream("alias")
    pieces = [call_piece(0, arguments[0] if arguments else "", "f"), *(call_piece(0, a) for a in arguments[1:])]
    events = framed(framer.frame([*pieces, chat_chunk({}, "tool_calls"), StreamDone()]))
    partial = next(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta")
    assert json.loads(partial) == expected
    body = json.dumps({"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "tool_calls": [{"id": "c0", "function": {"name": "f",
                                                                      "arguments": "".join(arguments)}}]}}]})
    assert json.loads(messages_response(body.encode(), "alias"))["content"][0]["input"] == expected


def test_messages_stream_pings_while_it_holds_blocks() -> None:
    framer = MessagesStream("alias")
    framer.frame([call_piece(0, "", "f")])
    quiet = [framer.frame([call_piece(0, "x")]) for _ in range(200)]
    pings = [out for out in quiet if out]
    assert len(pings) == 3 and all(framed(out) == [{"type": "ping"}] for out in pings)


def test_messages_stream_usage_on_a_content_chunk_keeps_the_cache_split() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
             "prompt_tokens_details": {"cached_tokens": 80, "cache_write_tokens": 10}}
    framer = MessagesStream("alias")
    typed = msgspec.convert(usage, Usage)
    out = framer.frame([chat_chunk({"content": "hey"}), chat_chunk({}, "stop", usage=usage),
                        UsageReport(typed), StreamDone()])  # the usage rode on a content chunk: no payload
    delta = next(e for e in framed(out) if e["type"] == "message_delta")
    split = {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 80, "cache_creation_input_tokens": 10}
    assert delta["usage"] == split
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hey"}, "finish_reason": "stop"}],
              "usage": usage}  # (an answer without a choice is none: `anthropic_answer._failure`)
    assert json.loads(messages_response(json.dumps(answer).encode(), "a"))["usage"] == split


def test_messages_answers_report_the_estimate_when_the_upstream_sent_no_usage() -> None:
    framer = MessagesStream("alias", lambda: Usage(12, 3, 15))
    out = framer.frame([chat_chunk({"content": "hey"}, "stop"), StreamDone()])
    assert next(e for e in framed(out) if e["type"] == "message_delta")["usage"] == {"input_tokens": 12,
                                                                                     "output_tokens": 3}
    reported = MessagesStream("alias", lambda: Usage(12, 3, 15))
    out = reported.frame([chat_chunk({"content": "hey"}, "stop"), UsageReport(Usage(7, 2, 9)), StreamDone()])
    assert next(e for e in framed(out) if e["type"] == "message_delta")["usage"] == {"input_tokens": 7,
                                                                                     "output_tokens": 2}
    body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": [
        {"type": "text", "text": "in "}, {"type": "text", "text": "parts"}]}, "finish_reason": "stop"}]}).encode()
    answer = json.loads(messages_response(body, "alias", Usage(12, 3, 15)))
    assert answer["usage"] == {"input_tokens": 12, "output_tokens": 3}
    assert answer["content"] == [{"type": "text", "text": "in parts"}]


def test_tool_result_images_become_image_parts_of_the_tool_message() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}

    def tool_message(result: dict[str, Any]) -> Any:
        raw = msgspec.json.encode({"model": "a", "max_tokens": 5, "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", **result}]}]})
        return chat_request(raw)[0]["messages"][2]["content"]

    assert tool_message({"content": [{"type": "text", "text": "a"}, image]}) == [{"type": "text", "text": "a"}, part]
    assert tool_message({"content": [image], "is_error": True}) == [{"type": "text", "text": "Error:"}, part]
    assert tool_message({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == "a\n\nb"
    with pytest.raises(InvalidRequest):
        tool_message({"content": [{"type": "document"}]})
    sent = anthropic_request({"model": "m", "max_tokens": 5, "messages": [
        user("q"), {"role": "assistant", "tool_calls": [{"id": "t1", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": [part]}]}, 10, T)
    assert sent["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]


def test_anthropic_usage_keeps_its_cache_details_in_the_gateways_usage() -> None:
    usage, shape = chat_usage({"input_tokens": 5, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2,
                               "output_tokens": 4})
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (10, 3, 2)
    assert shape["prompt_tokens_details"] == {"cached_tokens": 3, "cache_write_tokens": 2}
    assert chat_usage({"input_tokens": 5, "output_tokens": 4})[0] == Usage(5, 4, 9)  # no details: none


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


def test_a_messages_streams_estimate_counts_no_long_text_on_the_loop() -> None:
    """The estimate a stream's last event carries is made on the event loop: a text past 64 KiB is taken at four
    characters a token (`CountTokens` counts such a text in a thread), a shorter one is counted."""
    from gateway.telemetry.tokens import TokenCounter
    from gateway.telemetry.usage import count_on_loop as _count_here

    class Counting(TokenCounter):
        def count(self, text: str) -> int:
            raise AssertionError("counted on the loop")

    assert _count_here(Counting(), "a" * 70_000) == 17_500
    assert _count_here(TokenCounter(), "hello world") > 0
