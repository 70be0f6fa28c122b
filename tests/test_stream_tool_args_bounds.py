"""A streamed tool call's arguments are not kept whole and unbounded, and a stream that alternates two calls costs what
its bytes cost.

Three readers of a chat stream kept every piece of a tool call's arguments until the stream ended, with no cap (an
upstream's 400 MB of arguments: 1.3 GB of the gateway's memory):

- the quality signals (`telemetry.quality`) kept them beside the text, whose `max_text_bytes` capped only the text:
  now the arguments count toward it, and past it no call is kept (its arguments are not checked, as a text past the cap
  is not: an answer whose large arguments are not JSON counts no `malformed_tool_call`);
- the streamed output guard kept them to tell whether a call's arguments were whole JSON when another call began, and
  joined and parsed all of them at each switch: two calls whose pieces alternate cost time quadratic in their size, on
  the event loop (/healthz waited seconds). It now follows each call's brackets and strings piece by piece, keeping
  none of the text;
- `/v1/messages` in front of a chat upstream holds the tool calls to write them whole at the end: a call's arguments
  past `HELD_CALL_CHARS` (8 MiB), or all that is held past `HELD_CHARS`, now end the stream with Anthropic's `error`
  event.

A real gateway (in this process, on a real port) in front of a small aiohttp upstream whose model name says what it
streams: `tool-N-K` one call `{"a": "x..."}` in N pieces of K characters, `inter-N-K` two such calls taking turns,
`bad-N-K` one call whose arguments are not JSON (`{"a": xxx...}`), `calls-C-N-K` C calls one after the other; each
stream ends with its usage (as OpenAI's with `include_usage`), so that the gateway does not count the answer's tokens
itself.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.guards import json_end as json_end_module
from gateway.guards import stream as stream_module
from gateway.telemetry import quality, quality_reading, quality_responses
from gateway.translate import anthropic_answer
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}} for name in ("f", "g")]
LIMIT = 1024  # the quality signals' `max_text_bytes` here (its least)
MODELS = ("tool-1024-1024", "inter-16384-100", "bad-16-50", "bad-64-1024", "tool-64-1024", "tool-128-65536",
          "calls-3-8-65536", "thinking-4-524288", "names-4-524288", "empties-1-20000", "rbad-16-50", "rbad-64-1024")


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _piece(index: int, arguments: str, name: str | None = None) -> bytes:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if name is not None:
        call.update(id=f"call_{index}", type="function")
        call["function"]["name"] = name
    return _chunk({"tool_calls": [call]})


class _Upstream(ThreadedApp):
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)
        app.router.add_post("/v1/responses", self._response)

    async def _response(self, request: web.Request) -> web.StreamResponse:
        """`rbad-N-K`: a `response` whose one `function_call` item (of `f`) has arguments that are not JSON
        (`{"a": xxx...}`, N times K characters); streamed, only its `response.completed` event."""
        body = await request.json()
        _, count, size = body["model"].split("-")
        item = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "f",
                "arguments": '{"a": ' + "x" * (int(count) * int(size)) + "}"}
        answer = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
                  "output": [item], "usage": {"input_tokens": 5, "output_tokens": 9, "total_tokens": 14}}
        if not body.get("stream"):
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = {"type": "response.completed", "sequence_number": 0, "response": answer}
        await response.write(b"event: response.completed\ndata: " + json.dumps(event).encode() + b"\n\n")
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        kind, *sizes = (await request.json())["model"].split("-")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk({"role": "assistant", "content": None}))
        count, size = int(sizes[-2]), int(sizes[-1])
        piece = "x" * size
        if kind in ("thinking", "names", "empties"):  # after a first call (of `f`, `{}`), what /v1/messages holds
            await response.write(_chunk({"tool_calls": [{"index": 0, "id": "t0", "type": "function",
                                                         "function": {"name": "f", "arguments": "{}"}}]}))
            if kind == "thinking":  # redacted thinking blocks of K characters each
                for _ in range(count):
                    await response.write(_chunk({"reasoning_blocks": [{"type": "redacted_thinking", "data": piece}]}))
            elif kind == "names":  # calls named with K characters, without arguments
                for call in range(1, count + 1):
                    await response.write(_chunk({"tool_calls": [{"index": call, "id": f"t{call}", "type": "function",
                                                                 "function": {"name": "n" * size}}]}))
            else:  # one event of K calls of `f` without arguments, each with an index and an id of its own
                await response.write(_chunk({"tool_calls": [{"index": call, "id": f"t{call}", "function": {"name": "f"}}
                                                            for call in range(1, size + 1)]}))
        elif kind == "calls":
            for call in range(int(sizes[0])):
                await response.write(_piece(call, '{"a": "', "f"))
                for _ in range(count):
                    await response.write(_piece(call, piece))
                await response.write(_piece(call, '"}'))
        else:
            calls = 2 if kind == "inter" else 1
            opening = '{"a": ' if kind == "bad" else '{"a": "'
            for call in range(calls):
                await response.write(_piece(call, opening, "fg"[call]))
            batch = b"".join(_piece(call, piece) for call in range(calls)) * 16
            for _ in range(count // 16):
                await response.write(batch)
            for call in range(calls):
                await response.write(_piece(call, "}" if kind == "bad" else '"}'))
        await response.write(_chunk({}, "tool_calls"))
        usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}
        await response.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        return response


def _policy(port: int, extra: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          wire: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY,
                  timeouts: {{connect_s: 2, first_byte_s: 30, idle_s: 30, total_s: 120}}}}
        models:
        """) + "".join(f"  {name}: {{provider: wire, model: {name}}}\n" for name in MODELS) + textwrap.dedent(extra)


@pytest.fixture(scope="module")
def wire() -> Iterator[_Upstream]:
    with _Upstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def guarded(wire: _Upstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(wire.port, """\
        guards:
          global:
            secrets: {kind: secrets, places: [output], action: block}
        """), {"UP_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def plain(wire: _Upstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(wire.port, f"""\
        telemetry:
          quality: {{enabled: true, max_text_bytes: {LIMIT}}}
        """), {"UP_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _chat_stream(gw: RunningGateway, model: str) -> tuple[dict[int, str], str | None]:
    """The streamed answer's tool calls' arguments (by index), and its finish reason."""
    arguments: dict[int, list[str]] = {}
    finish = None
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "call"}], "tools": TOOLS}
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices") or ():
                finish = choice.get("finish_reason") or finish
                for call in choice["delta"].get("tool_calls") or ():
                    arguments.setdefault(call["index"], []).append((call.get("function") or {}).get("arguments") or "")
    return {index: "".join(parts) for index, parts in arguments.items()}, finish


def _kept_chars(value: Any, seen: set[int]) -> int:
    """The characters of the strings `value` holds (through containers and objects' attributes)."""
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_kept_chars(k, seen) + _kept_chars(v, seen) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return sum(_kept_chars(v, seen) for v in value)
    attributes = [getattr(value, name) for name in getattr(type(value), "__slots__", ()) if hasattr(value, name)]
    attributes += list(getattr(value, "__dict__", {}).values())
    return sum(_kept_chars(v, seen) for v in attributes if not callable(v))


# -- the streamed output guard


def test_the_guard_keeps_no_arguments_history(guarded: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the stream, the guard's chunk adapter holds next to nothing of 1 MB of a call's arguments (its window,
    bounded by `window_chars`, aside)."""
    adapters: list[Any] = []
    init = stream_module.ChatChunks.__init__

    def record(self: Any, *args: Any) -> None:
        init(self, *args)
        adapters.append(self)

    monkeypatch.setattr(stream_module.ChatChunks, "__init__", record)
    arguments, finish = _chat_stream(guarded, "tool-1024-1024")
    assert finish == "tool_calls"
    assert json.loads(arguments[0]) == {"a": "x" * 1024 * 1024}
    [adapter] = adapters
    kept = _kept_chars({k: v for k, v in vars(adapter).items() if k not in ("window", "meta")}
                       if hasattr(adapter, "__dict__") else adapter, set())
    assert kept < 10_000, kept


def test_alternating_calls_cost_their_bytes(guarded: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two calls whose 100-character pieces alternate (2 x 1.6 MB): each switch no longer joins and parses all of the
    other call's arguments so far (what the adapter parses as JSON stays within their size, not quadratic in it); the
    calls arrive whole, and /healthz answers all along."""
    parsed = [0]

    def loads(text: str | bytes, *args: Any, **kwargs: Any) -> Any:
        parsed[0] += len(text)
        return json.loads(text, *args, **kwargs)

    monkeypatch.setattr(json_end_module, "json", SimpleNamespace(loads=loads))
    done = threading.Event()
    health: list[int] = []

    def probe() -> None:
        while not done.is_set():
            health.append(httpx.get(f"{guarded.url}/healthz", timeout=30).status_code)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        arguments, finish = _chat_stream(guarded, "inter-16384-100")
    finally:
        done.set()
        prober.join()
    assert finish == "tool_calls"
    assert [json.loads(arguments[i]) for i in (0, 1)] == [{"a": "x" * 1_638_400}] * 2
    assert parsed[0] <= 2 * 1_638_400, parsed[0]
    assert health and set(health) == {200}


def test_json_end_follows_pieces() -> None:
    """The completeness the guard reads off the pieces is `json.loads`'s for JSON values and their beginnings,
    however the text is cut."""
    texts = ['{"a": "x}\\"]\\\\", "b": [1, {"c": null}]}', ' [1, "]"] ', '"\\\\"', "12", "true", '{"a": 1} x',
             '{"a": 1}}', "[[]", "", "  ", '{"a": "\\', "nul"]
    for text in texts:
        for cut in range(len(text) + 1):
            for second in range(cut, len(text) + 1):
                ends = json_end_module.JsonEnd()
                for piece in (text[:cut], text[cut:second], text[second:]):
                    ends.feed(piece)
                try:
                    json.loads(text)
                    whole = True
                except ValueError:
                    whole = False
                assert ends.complete() == whole, (text, cut, second)


# -- the quality signals


def _counts(gw: RunningGateway) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(gw.metrics()):
        for sample in family.samples:
            if sample.name == "gateway_quality_checked_total":
                counts["checked"] = counts.get("checked", 0) + sample.value
            elif sample.name == "gateway_quality_signals_total":
                counts[sample.labels["signal"]] = counts.get(sample.labels["signal"], 0) + sample.value
    return counts


def _signals(gw: RunningGateway, model: str) -> set[str]:
    before = _counts(gw)
    _, finish = _chat_stream(gw, model)
    assert finish == "tool_calls"
    after = _counts(gw)
    assert after.get("checked", 0) == before.get("checked", 0) + 1
    return {name for name, value in after.items() if name != "checked" and value > before.get(name, 0)}


def test_quality_keeps_arguments_up_to_the_text_cap(plain: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arguments past `max_text_bytes` are not kept, and not checked: not JSON, they count no `malformed_tool_call`
    (within the cap they do)."""
    answers: list[Any] = []

    class Recorded(quality_reading.Answer):
        def __init__(self) -> None:
            super().__init__()
            answers.append(self)

    monkeypatch.setattr(quality_reading, "Answer", Recorded)
    assert _signals(plain, "bad-16-50") == {"malformed_tool_call"}  # 800 characters: read and checked
    answers.clear()
    assert _signals(plain, "bad-64-1024") == set()  # 64 KiB: past the cap, not checked
    assert answers
    for answer in answers:
        assert answer.overflow
        assert sum(len(part) for parts in answer.tool_calls.values() for part in parts) <= LIMIT


# -- /v1/messages in front of a chat upstream


def _messages_events(gw: RunningGateway, model: str) -> list[tuple[str, dict[str, Any]]]:
    body = {"model": model, "stream": True, "max_tokens": 100, "messages": [{"role": "user", "content": "call"}],
            "tools": [{"name": name, "input_schema": {"type": "object"}} for name in ("f", "g")]}
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, timeout=120,
                      headers={"anthropic-version": "2023-06-01"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def test_messages_writes_a_call_within_the_cap_whole(plain: RunningGateway) -> None:
    events = _messages_events(plain, "tool-64-1024")
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "message_stop" and "error" not in kinds
    [delta] = [data["delta"]["partial_json"] for kind, data in events if kind == "content_block_delta"]
    assert json.loads(delta) == {"a": "x" * 65536}


def test_messages_ends_a_call_past_its_cap_with_an_error(plain: RunningGateway) -> None:
    """A call of 8 MiB and more of arguments (its 8 MiB in pieces of 64 KiB, and its JSON around them): the stream's
    last event is Anthropic's `error`; no tool_use block is written, no `message_stop`."""
    events = _messages_events(plain, "tool-128-65536")
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "error", kinds[-3:]
    assert "message_stop" not in kinds and "content_block_start" not in kinds
    assert events[-1][1]["error"]["type"] == "api_error" and "8 MiB" in events[-1][1]["error"]["message"]


def test_messages_ends_what_it_holds_past_its_cap(plain: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls each within their cap, together past what a stream holds (`HELD_CHARS`, made 1 MiB here): an `error`."""
    monkeypatch.setattr(anthropic_answer, "HELD_CHARS", 1024 * 1024, raising=False)
    events = _messages_events(plain, "calls-3-8-65536")  # 3 calls of 512 KiB
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "error", kinds[-3:]
    assert "message_stop" not in kinds


@pytest.mark.parametrize("model", ["thinking-4-524288", "names-4-524288", "empties-1-20000"])
def test_messages_counts_all_it_holds(plain: RunningGateway, monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    """After the first tool call, what a stream holds counts toward `HELD_CHARS` (made 1 MiB here) whatever it is:
    redacted thinking's data (4 x 512 KiB), calls' names (4 x 512 KiB, no arguments), and the blocks themselves
    (20,000 calls of `f` without arguments, in one event): each ends the stream with an `error`."""
    monkeypatch.setattr(anthropic_answer, "HELD_CHARS", 1024 * 1024, raising=False)
    events = _messages_events(plain, model)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "error", kinds[-3:]
    assert "message_stop" not in kinds and "content_block_start" not in kinds
    assert events[-1][1]["error"]["type"] == "api_error" and "1 MiB" in events[-1][1]["error"]["message"]


def test_messages_writes_what_it_holds_within_the_cap(plain: RunningGateway) -> None:
    """The same streams within the cap (64 MiB) are written whole: the thinking after the call, the named calls."""
    events = _messages_events(plain, "thinking-4-524288")
    assert [kind for kind, _ in events][-1] == "message_stop"
    blocks = [data["content_block"] for kind, data in events if kind == "content_block_start"]
    assert [block["type"] for block in blocks] == ["tool_use"] + ["redacted_thinking"] * 4
    assert all(block["data"] == "x" * 524288 for block in blocks[1:])
    events = _messages_events(plain, "names-4-524288")
    blocks = [data["content_block"] for kind, data in events if kind == "content_block_start"]
    assert [block["name"] for block in blocks] == ["f"] + ["n" * 524288] * 4


# -- the quality signals of a Responses answer


def _response_signals(gw: RunningGateway, model: str, stream: bool) -> set[str]:
    before = _counts(gw)
    body = {"model": model, "input": "call", "stream": stream,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}
    with httpx.stream("POST", f"{gw.base_url}/responses", json=body, timeout=120) as response:
        assert response.status_code == 200
        response.read()
    after = _counts(gw)
    assert after.get("checked", 0) == before.get("checked", 0) + 1
    return {name for name, value in after.items() if name != "checked" and value > before.get(name, 0)}


@pytest.mark.parametrize("stream", [False, True])
def test_quality_reads_responses_arguments_up_to_the_text_cap(plain: RunningGateway, monkeypatch: pytest.MonkeyPatch,
                                                              stream: bool) -> None:
    """A Responses answer's `function_call` arguments count toward `max_text_bytes` as a chat answer's do: within it
    they are checked (not JSON: `malformed_tool_call`), past it the call is not read (the request offered a tool: no
    signal), and none of its arguments are kept."""
    answers: list[Any] = []
    original = quality_responses.answer_of

    def recorded(*args: Any) -> Any:
        answer = original(*args)
        answers.append(answer)
        return answer

    monkeypatch.setattr(quality_responses, "answer_of", recorded)
    monkeypatch.setattr(quality, "answer_of", recorded)
    assert _response_signals(plain, "rbad-16-50", stream) == {"malformed_tool_call"}  # 800 characters: checked
    answers.clear()
    assert _response_signals(plain, "rbad-64-1024", stream) == set()  # 64 KiB: past the cap, not checked
    assert answers
    for answer in answers:
        assert answer.overflow
        assert sum(len(part) for parts in answer.tool_calls.values() for part in parts) <= LIMIT
