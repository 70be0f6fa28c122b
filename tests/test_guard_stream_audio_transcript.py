"""A streamed audio answer's transcript goes through the output guards, as a complete answer's does.

A chat answer with `modalities: ["text", "audio"]` streams its text as `delta.audio.transcript` pieces (beside the
audio's `data`), not as `content`. The stream guard opened no lane for them: with a `pii` guard blocking on output,
"Write to jane.doe@mailbox.org today" reached the client whole, the stream ending `stop`, while the same answer not
streamed ended `content_filter`. Now the transcript is a lane of its own, as the refusal is: held, scanned, rewritten
or blocking, its rest released at the choice's end (or at the upstream's end, when it sends no finish_reason).

The upstream is a scripted OpenAI server (the request's model names the script: the transcript split in pieces of
some size); the client reads the wire with httpx.
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

EMAIL = "jane.doe@mailbox.org"
SAID = f"Write to {EMAIL} today, please."
REDACTED = "Write to <EMAIL_ADDRESS> today, please."
CLEAN = "Nothing personal in this one at all."
SIZES = (0, 1, 3, 7)
# model (the script's name) -> (the transcript, the size of its pieces (0: whole), whether a finish chunk ends it)
SCRIPTS: dict[str, tuple[str, int, bool]] = {
    f"{label}-{size}-{int(finished)}": (text, size, finished)
    for label, text in (("mailed", SAID), ("clean", CLEAN)) for size in SIZES for finished in (True, False)}
ASK: dict[str, Any] = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"},
                       "messages": [{"role": "user", "content": "say it"}], "stream": True}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _chunks(text: str, size: int, finished: bool) -> list[dict[str, Any]]:
    """OpenAI's audio stream: the role and the audio's id, then the transcript's pieces each with some audio."""
    pieces = [text[i:i + size] for i in range(0, len(text), size)] if size else [text]
    return [_chunk({"role": "assistant", "content": None,
                    "audio": {"id": "audio_1", "data": "", "expires_at": 1, "transcript": ""}}),
            *(_chunk({"audio": {"transcript": piece, "data": "AAAA"}}) for piece in pieces),
            *([_chunk({}, "stop")] if finished else [])]


class _Upstream(ThreadedApp):
    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            chunks = _chunks(*SCRIPTS[(await request.json())["model"]])
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                for chunk in chunks:
                    await response.write(b"data: %s\n\n" % json.dumps(chunk).encode())
                    await asyncio.sleep(0.002)
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except ConnectionResetError:  # a blocked answer: the gateway stopped reading
                pass
            return response

        app.router.add_post("/v1/chat/completions", handle)


def _policy(port: int) -> str:
    """`r-<script>`: a pii guard redacts e-mail addresses on output; `b-<script>`: it blocks."""
    models = "".join(f"  {guard}-{name}: {{provider: up, model: {name}}}\n" for name in SCRIPTS for guard in "rb")
    pii = "{kind: pii, places: [output], action: %s, entities: {EMAIL_ADDRESS: {}}}"
    guards = "".join(f"    {guard}-{name}: {{pii: {pii % action}}}\n"
                     for name in SCRIPTS for guard, action in (("r", "redact"), ("b", "block")))
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY,
                timeouts: {{connect_s: 2, first_byte_s: 10, idle_s: 10, total_s: 30}}}}
        models:
        """) + models + "guards:\n  stream: {window_chars: 32, step_chars: 8}\n  models:\n" + guards


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        running = RunningGateway(_policy(upstream.port), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _stream(gw: RunningGateway, model: str) -> tuple[str, list[str], str | None]:
    """The transcript the client got, the audio data pieces, and the finish reason."""
    transcript, data, finish = [], [], None
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", json={**ASK, "model": model}, timeout=30,
                      headers={"Authorization": f"Bearer {FULL_KEY}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                audio = choice["delta"].get("audio") or {}
                transcript.append(audio.get("transcript") or "")
                data.append(audio.get("data") or "")
                finish = choice.get("finish_reason") or finish
    return "".join(transcript), [piece for piece in data if piece], finish


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_streamed_transcript_is_redacted(gw: RunningGateway, script: str) -> None:
    text, size, finished = SCRIPTS[script]
    transcript, data, finish = _stream(gw, f"r-{script}")
    assert transcript == (REDACTED if text == SAID else text)
    assert len(data) == (len(range(0, len(text), size)) if size else 1)  # the audio itself goes on as it came
    assert finish == ("stop" if finished else None)


@pytest.mark.parametrize("script", sorted(name for name in SCRIPTS if name.startswith("mailed")))
def test_a_streamed_transcript_with_a_finding_blocks(gw: RunningGateway, script: str) -> None:
    transcript, _, finish = _stream(gw, f"b-{script}")
    assert finish == "content_filter"
    assert "@" not in transcript and "mailbox" not in transcript and "jane" not in transcript


@pytest.mark.parametrize("script", ["clean-3-1", "clean-0-0"])
def test_a_clean_streamed_transcript_is_not_blocked(gw: RunningGateway, script: str) -> None:
    assert _stream(gw, f"b-{script}")[0::2] == (CLEAN, "stop" if script.endswith("1") else None)
