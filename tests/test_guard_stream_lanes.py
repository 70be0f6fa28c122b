"""Streamed lanes that a finding must not leave in part: a reasoning that resumes after the answer began, and a
date of birth whose context word follows it in a small window.

1. A choice's reasoning is released whole once its answer begins (content or a tool call): a client shows the
   reasoning before the answer. A reasoning that goes on after that (some servers interleave them) could finish
   a finding whose start had already left; the later scan redacted only its rest (`AKIAIOSFOD<AWS_ACCESS_KEY>`).
   A finding that reaches back into text a whole release sent now blocks the answer, counted as a block.
2. A date of birth is one only with a context word ("born"), which may follow it by half the recognizer's window;
   holds were looked for (and kept) only as far back as `window_chars`, so with `window_chars: 32` and text
   streamed a few characters at a time the date's start left before its "born" came (`12 <DATE_OF_BIRTH>`).

The upstream is scripted (by the request's model), the gateway real, and each test asserts the client's text.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
KEY = "AKIAIOSFODNN7EXAMPLQ"
EMAIL = "jane.doe@mailbox.org"
DOB = "Her date is 12 September 1984, then she was born there, nothing more to say here at all."
SCRIPTS: dict[str, list[dict[str, Any]]] = {}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


_CALL = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def _script(name: str, deltas: list[dict[str, Any]], finish: str = "stop") -> str:
    SCRIPTS[name] = [_chunk({"role": "assistant", "content": ""}), *map(_chunk, deltas), _chunk({}, finish)]
    return name


class _Upstream(ThreadedApp):
    """`/v1/chat/completions`, streaming the chunks of the request's model (`SCRIPTS`), each in a read of its own."""

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for chunk in SCRIPTS[body["model"]]:
                await response.write(b"data: %s\n\n" % json.dumps(chunk).encode())
                await asyncio.sleep(0.005)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

        app.router.add_post("/v1/chat/completions", handle)


def _policy(port: int, window: int) -> str:
    models = "\n".join(f"  {name}: {{provider: up, model: {name}}}" for name in SCRIPTS)
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY,
                timeouts: {{connect_s: 2, first_byte_s: 5, idle_s: 5, total_s: 20}}}}
        guards:
          stream: {{window_chars: {window}, step_chars: 8}}
          global:
            pii: {{kind: pii, places: [output], action: redact}}
            secrets: {{kind: secrets, places: [output], action: redact}}
        models:
        """) + models + "\n"


# -- the scripts (named before the gateways start: their policies list every model) -----------------------------

AFTER_CALL = _script("after-call", [{"reasoning_content": "The key is AKIAIOSFOD"}, _CALL,
                                    {"reasoning_content": "NN7EXAMPLQ ok"}], "tool_calls")
AFTER_CONTENT = _script("after-content", [{"reasoning_content": "I will write to jane.doe@"},
                                          {"content": "Working on it. "}, {"reasoning_content": "mailbox.org now"},
                                          {"content": "Done."}])
RESUMED_CLEAN = _script("resumed-clean", [{"reasoning_content": "I think so. "}, {"content": "Yes. "},
                                          {"reasoning_content": "Also mail jane.doe@mailbox.org later."},
                                          {"content": "Done."}])
ENDED = _script("ended", [{"reasoning_content": "The key is "}, {"reasoning_content": KEY + " ok"},
                          {"content": "Done."}])
DOB_PIECES = {size: _script(f"dob-{size}", [{"content": DOB[i:i + size]} for i in range(0, len(DOB), size)])
              for size in (1, 2, 3)}


@pytest.fixture(scope="module")
def gateways() -> Iterator[dict[int, RunningGateway]]:
    with _Upstream() as upstream:
        running = {window: RunningGateway(_policy(upstream.port, window), {"UP_KEY": UPSTREAM_KEY}).start()
                   for window in (48, 32)}
        yield running
        for gateway in running.values():
            gateway.stop()


def _stream(gw: RunningGateway, model: str) -> list[Any]:
    """The client's chunks (parsed), then "[DONE]"."""
    with httpx.stream("POST", gw.base_url + "/chat/completions", headers=AUTH, timeout=20,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    data = [block.removeprefix("data: ") for block in raw.split("\n\n") if block.strip()]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def _text(chunks: list[Any], field: str) -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if isinstance(c, dict) and c["choices"])


def _finish(chunks: list[Any]) -> str | None:
    return next((c["choices"][0]["finish_reason"] for c in reversed(chunks)
                 if isinstance(c, dict) and c["choices"] and c["choices"][0]["finish_reason"]), None)


# -- 1. a reasoning resumed after the answer began ------------------------------------------------------------------


def test_a_key_finished_by_reasoning_resumed_after_a_tool_call_blocks(gateways: dict[int, RunningGateway]) -> None:
    gw = gateways[48]
    chunks = _stream(gw, AFTER_CALL)
    # what left before the tool call is all the client gets of the reasoning: the key's rest never leaves
    assert _text(chunks, "reasoning_content") == "The key is AKIAIOSFOD"
    assert "NN7EXAMPLQ" not in json.dumps(chunks) and "<AWS_ACCESS_KEY>" not in json.dumps(chunks)
    assert (_finish(chunks), chunks[-1]) == ("content_filter", "[DONE]")
    assert ('gateway_guard_findings_total{action="block",entity="AWS_ACCESS_KEY",guard="secrets",mode="enforce",'
            'place="output"} 1.0') in gw.metrics()


def test_an_address_finished_by_reasoning_resumed_after_content_blocks(gateways: dict[int, RunningGateway]) -> None:
    chunks = _stream(gateways[48], AFTER_CONTENT)
    assert _text(chunks, "reasoning_content") == "I will write to jane.doe@"
    assert _text(chunks, "content") == "Working on it. "
    assert "mailbox" not in json.dumps(chunks) and "<EMAIL_ADDRESS>" not in json.dumps(chunks)
    assert (_finish(chunks), chunks[-1]) == ("content_filter", "[DONE]")


def test_a_resumed_reasoning_with_its_own_findings_goes_on(gateways: dict[int, RunningGateway]) -> None:
    chunks = _stream(gateways[48], RESUMED_CLEAN)
    assert _text(chunks, "reasoning_content") == "I think so. Also mail <EMAIL_ADDRESS> later."
    assert _text(chunks, "content") == "Yes. Done."
    assert (_finish(chunks), chunks[-1]) == ("stop", "[DONE]")


def test_a_reasoning_that_ends_before_the_answer_is_released_before_it(gateways: dict[int, RunningGateway]) -> None:
    chunks = _stream(gateways[48], ENDED)
    assert _text(chunks, "reasoning_content") == "The key is <AWS_ACCESS_KEY> ok"
    answering = next(i for i, c in enumerate(chunks) if isinstance(c, dict) and _text([c], "content"))
    assert not _text(chunks[answering + 1:], "reasoning_content")  # all of it came before the answer
    assert (_text(chunks, "content"), _finish(chunks)) == ("Done.", "stop")


# -- 2. a context word after the match, in a small window -----------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3])
def test_a_date_of_birth_waits_whole_for_its_context_in_a_small_window(gateways: dict[int, RunningGateway],
                                                                       size: int) -> None:
    chunks = _stream(gateways[32], DOB_PIECES[size])
    assert _text(chunks, "content") == DOB.replace("12 September 1984", "<DATE_OF_BIRTH>")
    assert (_finish(chunks), chunks[-1]) == ("stop", "[DONE]")
