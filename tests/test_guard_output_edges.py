"""Output guards, at three edges where part of a finding, or text no guard read, reached the client.

1. A JSON number in a streamed tool call's arguments split by the window's cut: compact arguments (no white space)
   past `max_hold_chars` are cut anywhere, and a cut before a card or phone number written as a JSON number left the
   number's start (`-` of `-4111111111111111`, `12.` of the coordinate `12.14155552671`) in a piece of its own, then
   the finding as a JSON string: `"lat":-"<CREDIT_CARD>"`, digits outside the string and arguments no client parses
   (checked whole: `"lat":"<CREDIT_CARD>"`).
2. An e-mail address whose held text reached `max_hold_chars` while its top-level domain was still being written
   (`jane@...example.c`: no address to presidio's check of the domain): cut at the bound, its start left in clear
   (`jane@xxxx...`) and the rest as `<EMAIL_ADDRESS>`. The cut now waits, a label's length at most, for the domain.
3. A complete (not streamed) chat answer with a choice-level `delta` or `text` beside its `message` (as some
   OpenAI-compatible servers send): only the message was read and rewritten, the stray fields reached the client
   unread. They are dropped under an enforcing output guard, as a stream's unread fields are.

The upstream is scripted (one answer per requested model), the gateway real, the clients the openai SDK and httpx;
the window's edges are also driven chunk by chunk through the stream stage with the real guards.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.guards.runtime import GuardRuntime
from gateway.guards.session import GuardSession
from gateway.guards.stream import StreamGuard
from gateway.guards.window import ANSWER, TOOL
from gateway.policy.guard_schema import GuardsSpec, StreamScanSpec
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import DONE, Chunk
from gateway.telemetry.metrics import Metrics
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
EMAIL = "jane.doe@mailbox.org"
BASE = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
SPEC = StreamScanSpec(window_chars=48, step_chars=24, max_hold_chars=64)  # the smallest bound a policy may set
# A JSON string without white space (the arguments are one run, cut anywhere past the bound) and a number whose finding
# starts inside it, as a whole check reads it (the card after `-`, the phone after `12.`), where the cuts split it.
NUMBERS = [(64, "-4111111111111111"), (106, "12.14155552671"), (64, "-14155552671")]
ARGUMENTS = [f'{{"notes":"{"a" * notes}","lat":{number},"lng":-122.0841}}' for notes, number in NUMBERS]
ANSWERS: dict[str, Any] = {}  # model -> the upstream's answer: a JSON body, or SSE frames


def _frame(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _tool_stream(arguments: str, size: int) -> list[bytes]:
    """A chat stream of one tool call whose arguments come `size` characters a chunk."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    start = {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                  "function": {"name": "save", "arguments": ""}}]}
    deltas = [start, *({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + size]}}]}
                       for i in range(0, len(arguments), size))]
    frames = [_frame({**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in deltas]
    frames.append(_frame({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    return [*frames, b"data: [DONE]\n\n"]


for _n, _arguments in enumerate(ARGUMENTS):
    ANSWERS[f"number-{_n}"] = _tool_stream(_arguments, 2)
_TEXT = f"Write to {EMAIL} today."
ANSWERS["stray-chat"] = {
    "id": "c", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": _TEXT},
                 "delta": {"role": "assistant", "content": _TEXT}, "text": _TEXT}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}}
ANSWERS["stray-completion"] = {
    "id": "c", "object": "text_completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "text": _TEXT, "logprobs": None,
                 "message": {"role": "assistant", "content": _TEXT}, "delta": {"content": _TEXT}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}}


class _Upstream(ThreadedApp):
    """Chat Completions and Completions: the answer of the request's model (`ANSWERS`), SSE frames one a read."""

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            answer = ANSWERS[(await request.json())["model"]]
            if isinstance(answer, dict):
                return web.json_response(answer)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for frame in answer:
                await response.write(frame)
                await asyncio.sleep(0.002)
            await response.write_eof()
            return response

        for path in ("/v1/chat/completions", "/v1/completions"):
            app.router.add_post(path, handle)


def _policy(port: int) -> str:
    models = "\n".join(f"  {name}: {{provider: up, model: {name}}}" for name in ANSWERS)
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY}}
        guards:
          stream: {{window_chars: 48, step_chars: 24, max_hold_chars: 64}}
          global:
            pii: {{kind: pii, places: [output]}}
        models:
        """) + models + "\n"


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        running = RunningGateway(_policy(upstream.port), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


@pytest.fixture(scope="module")
def runtime() -> Iterator[GuardRuntime]:
    built = GuardRuntime(msgspec.convert({"global": {"pii": {"kind": "pii", "places": ["output"]}}}, GuardsSpec),
                         Metrics(), len)
    asyncio.run(built.start())
    yield built
    asyncio.run(built.aclose())


def _streamed(runtime: GuardRuntime, pieces: list[str], tool: bool) -> str:
    """What the client gets of `pieces` streamed as a chat answer's content, or as a tool call's arguments."""
    stage = StreamGuard(runtime, runtime.resolve("t", "a").output, GuardSession(runtime.metrics), SPEC,
                        Endpoint.CHAT, "m")

    def delta(piece: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if tool else {"content": piece}

    chunks = [Chunk.of({**BASE, "choices": [{"index": 0, "delta": delta(p), "finish_reason": None}]}) for p in pieces]
    end = Chunk.of({**BASE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})

    async def run() -> str:
        out = ""
        for events in [*([c] for c in chunks), [end, DONE]]:
            for event in await stage.on_events(None, events):  # type: ignore[arg-type]
                for choice in event.data()["choices"] if isinstance(event, Chunk) else ():
                    d = choice["delta"]
                    out += (d.get("content") or "") + "".join(
                        call["function"].get("arguments") or "" for call in d.get("tool_calls") or ())
        return out

    return asyncio.run(run())


def _whole(runtime: GuardRuntime, text: str, tool: bool) -> str:
    guards = runtime.resolve("t", "a").output
    return asyncio.run(runtime.check(guards, text, TOOL if tool else ANSWER, GuardSession(runtime.metrics))).text


def _split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


# 1. a JSON number split by the window's cut


@pytest.mark.parametrize("arguments", ARGUMENTS)
def test_a_json_number_is_never_split_by_the_cut(runtime: GuardRuntime, arguments: str) -> None:
    whole = _whole(runtime, arguments, True)
    assert '"lat":"<' in whole  # the number, replaced whole by a JSON string
    for size in (1, 2, 3, 5, 8):
        sent = _streamed(runtime, _split(arguments, size), True)
        assert sent == whole, (size, sent)  # was `"lat":-"<CREDIT_CARD>"`, `"lat":12."<PHONE_NUMBER>"`


@pytest.mark.parametrize("model", [f"number-{n}" for n in range(len(ARGUMENTS))])
def test_streamed_tool_arguments_with_a_card_as_a_number_stay_json(gw: RunningGateway, model: str) -> None:
    client = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=30)
    arguments = ""
    for chunk in client.chat.completions.create(model=model, stream=True,
                                                messages=[{"role": "user", "content": "save it"}]):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                arguments += (call.function.arguments or "") if call.function else ""
    value = json.loads(arguments)  # a client could not parse `-"<CREDIT_CARD>"`
    assert value["lat"] in ("<CREDIT_CARD>", "<PHONE_NUMBER>") and value["lng"] == -122.0841, arguments
    assert "4111" not in arguments and "4155" not in arguments


# 2. an address whose top-level domain is still being written at the bound


@pytest.mark.parametrize("text", ["Mail jane@" + "x" * 65 + ".example.com ok",
                                  "Mail jane@" + "x" * 72 + ".example.org, ok"])
def test_an_address_at_the_bound_is_not_cut_inside_its_domain(runtime: GuardRuntime, text: str) -> None:
    assert "<EMAIL_ADDRESS>" in _whole(runtime, text, False)
    for size in (1, 3, 4, 7):
        sent = _streamed(runtime, _split(text, size), False)
        assert "jane" not in sent and "xxx" not in sent, (size, sent)  # was `Mail jane@xxxxxxxx<EMAIL_ADDRESS> ok`
        assert sent.startswith("Mail <EMAIL_ADDRESS>"), (size, sent)
    # A long run with no address in it is cut at the bound as before: it leaves as it is.
    run = "Data " + "ab.cd" * 60 + " ok"
    assert _streamed(runtime, _split(run, 4), False) == run


# 3. a complete answer's stray copies of its text


def test_a_complete_chat_answers_stray_delta_and_text_are_dropped(gw: RunningGateway) -> None:
    raw = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, timeout=30,
                     json={"model": "stray-chat", "messages": [{"role": "user", "content": "hi"}]})
    assert raw.status_code == 200
    assert EMAIL not in raw.text and "mailbox" not in raw.text, raw.text  # `delta` and `text` carried it out
    choice = raw.json()["choices"][0]
    assert "delta" not in choice and "text" not in choice
    client = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=30)
    answer = client.chat.completions.create(model="stray-chat", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Write to <EMAIL_ADDRESS> today."


def test_a_complete_completions_answers_stray_message_and_delta_are_dropped(gw: RunningGateway) -> None:
    raw = httpx.post(gw.base_url + "/completions", headers=AUTH, timeout=30,
                     json={"model": "stray-completion", "prompt": "hi"})
    assert raw.status_code == 200
    assert EMAIL not in raw.text and "mailbox" not in raw.text, raw.text
    choice = raw.json()["choices"][0]
    assert choice["text"] == "Write to <EMAIL_ADDRESS> today."
    assert "message" not in choice and "delta" not in choice
