"""How a chat answer's end reaches a `/v1/messages` client (an OpenAI-compatible upstream, translated), and the
Anthropic SDK's tool runner with its default settings (H50).

1. A tool call whose choice ends with `finish_reason: "stop"` (OpenAI's own API does so when `tool_choice` names a
   function, which Anthropic's `tool_choice: {"type": "tool"}` becomes; vLLM, SGLang and Ollama for any call) is
   `stop_reason: "tool_use"`, not `end_turn`, which the SDK's tool runner takes for the end of the loop (the tool
   never ran).
2. A choice that failed (`finish_reason: "error"` with OpenRouter's choice `error`), an answer without a finish
   reason (a stream that reaches `[DONE]` without one) and an answer without a choice are no clean `end_turn`: a
   complete one is a 502 `api_error` (retried and fallen back from), a stream ends with its `error` event; under an
   enforcing output guard the upstream's words are withheld.
3. The tool runner sends `thread: {"type": "create"}` by default; the gateway's 400 carries Anthropic's
   `details` for a request it cannot thread, on which the SDK goes on without it.

A scripted OpenAI-compatible upstream (aiohttp, in a thread), the suite's `RunningGateway`, the real anthropic SDK
and httpx for the raw events.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import httpx2  # (the anthropic SDK's own HTTP client)
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, RunningGateway

Answer = Callable[[dict[str, Any]], tuple[dict[str, Any] | None, list[dict[str, Any] | str] | None]]
HEADERS = {"x-api-key": FULL_KEY, "anthropic-version": "2023-06-01"}
SECRET = "AKIAZ3MQ7XJ4K2PLW9QA"  # an AWS key id the output guard would redact
WITHHELD = "its message withheld: output guards are on"


class ScriptedChat:
    """An OpenAI-compatible `/v1/chat/completions` whose answer (complete, or the stream's chunks) `answer` picks."""

    def __init__(self) -> None:
        self.answer: Answer = lambda body: (None, None)
        self.bodies: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _serve(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def start(self) -> ScriptedChat:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        whole, chunks = self.answer(body)
        if not body.get("stream"):
            return web.json_response(whole)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks or ():
            data = chunk if isinstance(chunk, str) else json.dumps(chunk)
            await response.write(f"data: {data}\n\n".encode())
        await response.write_eof()
        return response


def _chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}]}


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
USAGE_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
               "usage": USAGE}


def _whole(message: dict[str, Any] | None, finish: str | None, **choice: Any) -> dict[str, Any]:
    choices = [] if message is None else [{"index": 0, "message": message, "finish_reason": finish, **choice}]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": choices,
            "usage": USAGE}


def _text(text: str) -> tuple[dict[str, Any], list[dict[str, Any] | str]]:
    return (_whole({"role": "assistant", "content": text}, "stop"),
            [_chunk({"role": "assistant", "content": text}), _chunk({}, "stop"), USAGE_CHUNK, "[DONE]"])


@pytest.fixture(scope="module")
def chat() -> Iterator[ScriptedChat]:
    scripted = ScriptedChat().start()
    yield scripted
    scripted.stop()


@pytest.fixture(scope="module")
def gw(chat: ScriptedChat) -> Iterator[RunningGateway]:
    # `gpt`: one target; `g-gpt`: the same, under an enforcing output guard; `fallback`: the upstream's `broken`
    # model first (tried once), then `m`.
    text = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          oai: {{kind: openai, base_url: "http://127.0.0.1:{chat.port}/v1", api_key_env: K1}}
        guards:
          models:
            g-gpt: {{secrets: {{kind: secrets, places: [output], action: redact}}}}
        models:
          gpt: {{provider: oai, model: m}}
          g-gpt: {{provider: oai, model: m}}
          fallback:
            targets:
              - {{provider: oai, model: broken, retry: {{attempts: 1, backoff_s: 0.001, backoff_max_s: 0.001}}}}
              - {{provider: oai, model: m}}
        """)
    running = RunningGateway(text, {"K1": "sk-upstream-h50"}).start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _cleared(chat: ScriptedChat) -> None:
    chat.bodies.clear()


def _ask(gw: RunningGateway, stream: bool, **ask: Any) -> anthropic.types.Message:
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=30) as sdk:
        if stream:
            with sdk.messages.stream(**ask) as events:
                return events.get_final_message()
        message: anthropic.types.Message = sdk.messages.create(**ask)
        return message


def _events(gw: RunningGateway, alias: str) -> list[tuple[str, dict[str, Any]]]:
    """A streamed `/v1/messages` answer's events, raw: (event name, data)."""
    body = {"model": alias, "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(gw.url + "/v1/messages", headers=HEADERS, json=body, timeout=30)
    assert response.status_code == 200, response.text
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


TOOLS: Any = [{"name": "lookup", "description": "Look a word up",
               "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "gateway"}'}}


def _call_ending(finish: str) -> Answer:
    """A tool call ending with `finish` (and the final text once the tool's result came back)."""

    def answer(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any] | str]]:
        if any(message.get("role") == "tool" for message in body["messages"]):
            return _text("Done.")
        return (_whole({"role": "assistant", "content": None, "tool_calls": [CALL]}, finish),
                [_chunk({"role": "assistant", "content": None, "tool_calls": [{"index": 0, **CALL}]}),
                 _chunk({}, finish), USAGE_CHUNK, "[DONE]"])

    return answer


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_a_forced_tool_call_ends_its_turn_with_tool_use(gw: RunningGateway, chat: ScriptedChat,
                                                        stream: bool) -> None:
    """OpenAI's answer to a named `tool_choice`: the call, and `finish_reason: "stop"`."""
    chat.answer = _call_ending("stop")
    message = _ask(gw, stream, model="gpt", max_tokens=100, tools=TOOLS,
                   tool_choice={"type": "tool", "name": "lookup"},
                   messages=[{"role": "user", "content": "Look up 'gateway'."}])
    assert chat.bodies[-1]["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert [block.type for block in message.content] == ["tool_use"]
    assert message.stop_reason == "tool_use"  # was "end_turn"


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_a_tool_call_cut_by_the_length_keeps_max_tokens(gw: RunningGateway, chat: ScriptedChat,
                                                        stream: bool) -> None:
    chat.answer = _call_ending("length")
    message = _ask(gw, stream, model="gpt", max_tokens=100, tools=TOOLS,
                   messages=[{"role": "user", "content": "Look up 'gateway'."}])
    assert message.stop_reason == "max_tokens"


def _lookup(ran: list[str]) -> Any:
    @anthropic.beta_tool
    def lookup(word: str) -> str:
        """Look a word up.

        Args:
            word: the word
        """
        ran.append(word)
        return "a reverse proxy"

    return lookup


def test_the_sdk_tool_runner_runs_the_forced_tool(gw: RunningGateway, chat: ScriptedChat) -> None:
    chat.answer = _call_ending("stop")
    ran: list[str] = []
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=30) as sdk:
        runner = sdk.beta.messages.tool_runner(model="gpt", max_tokens=100, tools=[_lookup(ran)],
                                               tool_choice={"type": "tool", "name": "lookup"}, thread=False,
                                               messages=[{"role": "user", "content": "Look up 'gateway'."}])
        last = runner.until_done()
    assert ran == ["gateway"]  # was []: the runner stopped at the `end_turn`, the call unrun
    assert last.content[0].type == "text"


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_the_sdk_tool_runner_with_its_defaults_runs_the_tool(gw: RunningGateway, chat: ScriptedChat,
                                                             stream: bool) -> None:
    """The runner's first request carries `thread: {"type": "create"}` and the `message-threads-...` beta; the
    gateway's 400 says the request cannot be threaded (`error.details`), and the runner sends it again without,
    then runs the tool and sends its result (was: `BadRequestError` "`thread` is not supported", the run over)."""
    chat.answer = _call_ending("tool_calls")
    ran: list[str] = []
    sent: list[tuple[dict[str, Any], str]] = []  # what the SDK sent: body, `anthropic-beta`
    answered: list[int] = []

    def record(request: Any) -> None:
        sent.append((json.loads(request.content), request.headers.get("anthropic-beta", "")))

    def status(response: Any) -> None:
        answered.append(response.status_code)

    hooks: dict[str, Any] = {"request": [record], "response": [status]}
    with httpx2.Client(event_hooks=hooks, timeout=30) as http, \
            anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, http_client=http) as sdk:
        runner = sdk.beta.messages.tool_runner(model="gpt", max_tokens=100, tools=[_lookup(ran)], stream=stream,
                                               messages=[{"role": "user", "content": "Look up 'gateway'."}])
        if stream:
            for turn in runner:
                for _ in turn:
                    pass
            last = runner.until_done()
        else:
            last = runner.until_done()
    assert ran == ["gateway"]
    assert [block.type for block in last.content] == ["text"] and last.content[0].text == "Done."  # type: ignore[union-attr]
    assert sent[0][0]["thread"] == {"type": "create"} and "message-threads-" in sent[0][1]
    assert answered[0] == 400
    assert len(sent) == 3 and all("thread" not in body for body, _ in sent[1:])  # unthreaded from then on
    assert answered[1:] == [200, 200]
    assert len(chat.bodies) == 2  # the refused request never reached the upstream


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_a_thread_is_refused_with_the_details_the_sdk_reads(gw: RunningGateway, path: str) -> None:
    body = {"model": "gpt", "max_tokens": 100, "thread": {"type": "create"},
            "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(gw.url + path, headers=HEADERS, json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "`thread`" in error["message"]
    assert error["details"] == {"error_code": "thread_unsupported_request", "unsupported": ["thread"]}
    assert response.json()["request_id"] == response.headers["request-id"]


def _failed_choice(words: str = "Provider disconnected") -> Answer:
    """OpenRouter's failed generation: some text, then the choice's `finish_reason: "error"` with its `error`."""
    error = {"code": 502, "message": words}

    def answer(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any] | str]]:
        return (_whole({"role": "assistant", "content": "The answer is"}, "error", error=error),
                [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "The answer is"}),
                 _chunk({"content": ""}, "error", error=error), USAGE_CHUNK, "[DONE]"])

    return answer


def _no_finish(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any] | str]]:
    """A stream that reaches `[DONE]` with no finish reason at all (complete: `finish_reason: null`)."""
    return (_whole({"role": "assistant", "content": "The answer is"}, None),
            [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "The answer is"}), USAGE_CHUNK,
             "[DONE]"])


def _no_choices(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any] | str]]:
    """An answer without any choice (a stream of only its usage)."""
    return _whole(None, None), [USAGE_CHUNK, "[DONE]"]


UNFINISHED = {"error": (_failed_choice(), "failed (its finish reason is `error`): Provider disconnected"),
              "no-finish": (_no_finish, "ended without a finish reason"),
              "no-choice": (_no_choices, "holds no choice")}


@pytest.mark.parametrize("case", list(UNFINISHED))
def test_an_unfinished_complete_answer_is_a_502(gw: RunningGateway, chat: ScriptedChat, case: str) -> None:
    chat.answer, said = UNFINISHED[case]
    with pytest.raises(anthropic.APIStatusError) as raised:  # was: a 200 `end_turn` message
        _ask(gw, False, model="gpt", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 502
    error = raised.value.body["error"]  # type: ignore[index]
    assert error["type"] == "api_error" and said in error["message"]


@pytest.mark.parametrize("case", list(UNFINISHED))
def test_an_unfinished_stream_ends_with_an_error_event(gw: RunningGateway, chat: ScriptedChat, case: str) -> None:
    chat.answer, said = UNFINISHED[case]
    events = _events(gw, "gpt")
    names = [name for name, _ in events]
    assert names[-1] == "error" and "message_delta" not in names and "message_stop" not in names
    error = events[-1][1]["error"]
    assert error["type"] == "api_error" and said in error["message"]
    if case != "no-choice":  # what came before the end, written before the error
        assert names[:-1] == ["message_start", "content_block_start", "content_block_delta"]
        assert events[2][1]["delta"]["text"] == "The answer is"
    with pytest.raises(anthropic.APIStatusError):  # the SDK raises it (was: a final `end_turn` message)
        _ask(gw, True, model="gpt", max_tokens=100, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("case", list(UNFINISHED))
def test_an_unfinished_complete_answer_falls_back(gw: RunningGateway, chat: ScriptedChat, case: str) -> None:
    unfinished = UNFINISHED[case][0]
    chat.answer = lambda body: unfinished(body) if body["model"] == "broken" else _text("Fine.")
    message = _ask(gw, False, model="fallback", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert [body["model"] for body in chat.bodies] == ["broken", "broken", "m"]  # retried, then fallen back from
    assert message.content[0].text == "Fine." and message.stop_reason == "end_turn"  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_a_failed_choices_words_are_withheld_under_an_enforcing_output_guard(gw: RunningGateway, chat: ScriptedChat,
                                                                            stream: bool) -> None:
    words = f"Failed to parse tool call output: the key is {SECRET}"
    chat.answer = _failed_choice(words)
    body = {"model": "g-gpt", "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    text = httpx.post(gw.url + "/v1/messages", headers=HEADERS, json=body, timeout=30).text
    assert SECRET not in text and "tool call output" not in text
    assert WITHHELD in text and "failed (its finish reason is `error`)" in text
    body["model"] = "gpt"  # without a guard, the upstream's words (sanitized) are told
    assert "tool call output" in httpx.post(gw.url + "/v1/messages", headers=HEADERS, json=body, timeout=30).text
