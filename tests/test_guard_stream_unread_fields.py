"""What a guarded chat stream carries where no guard read it.

Under an enforcing output guard (redact, block, pseudonymize), a chat chunk's text outside the fields the window
reads left verbatim: a choice's `error` (OpenRouter's, with `finish_reason: "error"`), an upstream's error written as
a chunk without choices (`{"message": ...}`, `{"detail": ...}`, an `event: error`'s data: the provider passes those
as chunks), a reasoning or refusal sent as a list of parts or as an object, a content sent as an object, a tool
call's name, a field the gateway does not know on the chunk, a choice or a delta, and a usage chunk's. Now an error's
words are withheld, as any upstream error's are; a list of parts is read as its parts' text; a text of another type
and an unknown field are dropped (`stream.CHUNK_FIELDS`, `CHOICE_FIELDS`, `DELTA_FIELDS`); a tool name is checked
whole. The fields real servers add that hold no answer text (OpenRouter's `provider` and `native_finish_reason`,
`annotations`) pass, and without an enforcing guard the stream is the upstream's.

The upstream is scripted per model, the gateway real, the client httpx (raw bytes: what leaves, in any field).
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
KEY = "AKIAZ3MQ7XJ4K2PLW9QA"
MAIL = "jane.doe@mailbox.org"
TEXT = f"Failed to parse tool call output: Here is the key {KEY} and mail {MAIL} done."
WITHHELD = "its message withheld: output guards are on"
CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def _frame(data: dict[str, Any], event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra.pop("choice", {})}
    return _frame({**CHUNK, "choices": [choice], **extra})


HEAD = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hello "})]
END = [_chunk({}, "stop"), b"data: [DONE]\n\n"]
DONE = b"data: [DONE]\n\n"

# upstream model -> SSE frames
ANSWERS: dict[str, list[bytes]] = {
    "choice-error": [*HEAD, _chunk({}, "error", choice={"error": {"code": 502, "message": TEXT}}), DONE],
    "message": [*HEAD, _frame({"message": TEXT})],
    "detail": [*HEAD, _frame({"detail": TEXT})],
    "event-error": [*HEAD, _frame({"message": TEXT}, "error")],
    "content-object": [*HEAD, _chunk({"content": {"text": TEXT}}), *END],
    "reasoning-parts": [_chunk({"role": "assistant", "reasoning": [{"type": "text", "text": TEXT}]}),
                        _chunk({"content": "Hello"}), *END],
    "reasoning-object": [_chunk({"role": "assistant", "reasoning": {"text": TEXT}}), _chunk({"content": "Hi"}), *END],
    "refusal-list": [_chunk({"role": "assistant", "refusal": [TEXT]}), *END],
    "tool-name": [*HEAD, _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                 "function": {"name": f"lookup {KEY}", "arguments": "{}"}}]}),
                  _chunk({}, "tool_calls"), DONE],
    "unknown-fields": [*HEAD, _chunk({"content": "there", "note": TEXT}, choice={"note": TEXT}, note=TEXT), *END],
    "usage-field": [*HEAD, _chunk({}, "stop"),
                    _frame({**CHUNK, "choices": [], "usage": {**USAGE, "note": TEXT}, "note": TEXT}), DONE],
    "known-fields": [_chunk({"role": "assistant", "content": ""}, provider="OpenAI"),
                     _chunk({"content": "See the docs.", "annotations": [
                         {"type": "url_citation", "url_citation": {"url": "https://example.com/docs"}}]},
                         provider="OpenAI"),
                     _chunk({}, "stop", choice={"native_finish_reason": "completed"}, provider="OpenAI"), DONE],
}


class _Upstream(ThreadedApp):
    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            answer = ANSWERS[(await request.json())["model"]]
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for frame in answer:
                await response.write(frame)
                await asyncio.sleep(0.002)
            await response.write_eof()
            return response

        app.router.add_post("/v1/chat/completions", handle)


def _policy(port: int) -> str:
    # `g-<model>`: output guards that redact; `o-<model>`: none
    models = "".join(f"  {p}-{m}: {{provider: up, model: {m}}}\n" for m in ANSWERS for p in ("g", "o"))
    guarded = "".join(f"    g-{m}: {{pii: {{kind: pii, places: [output], action: redact}}, "
                      f"secrets: {{kind: secrets, places: [output], action: redact}}}}\n" for m in ANSWERS)
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY}}
        guards:
          models:
        """) + guarded + "models:\n" + models


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        running = RunningGateway(_policy(upstream.port), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _stream(gw: RunningGateway, alias: str) -> str:
    body = {"model": alias, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(gw.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=30)
    assert response.status_code == 200
    return response.text


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line[6:].strip() != "[DONE]"]


def _clean(text: str, read: bool = False) -> None:
    """Nothing of `TEXT` in `text`, or (`read`: the guards read it) none of its findings."""
    assert KEY not in text and MAIL not in text
    assert read or "tool call output" not in text


@pytest.mark.parametrize("model", list(ANSWERS))
def test_without_an_enforcing_guard_the_upstream_text_passes(gw: RunningGateway, model: str) -> None:
    """The control: the scripted text reaches an unguarded client (so a guarded one's lacking it is the guard's)."""
    text = _stream(gw, f"o-{model}")
    assert (KEY in text) is (model != "known-fields")


def test_a_choices_error_keeps_its_code_not_the_upstreams_words(gw: RunningGateway) -> None:
    text = _stream(gw, "g-choice-error")
    _clean(text)
    last = [e for e in _events(text) if e.get("choices")][-1]["choices"][0]
    assert last["finish_reason"] == "error"
    assert last["error"] == {"message": f"the upstream failed ({WITHHELD})", "code": 502}


@pytest.mark.parametrize("model", ["message", "detail", "event-error"])
def test_an_error_written_as_a_chunk_ends_the_stream_withheld(gw: RunningGateway, model: str) -> None:
    """An error without choices (`{"message": ...}`, `{"detail": ...}`, an `event: error`) ends the stream with the
    gateway's error for an upstream failing mid-stream, as a chunk's `error` does, its words withheld."""
    text = _stream(gw, f"g-{model}")
    _clean(text)  # ("Hello " may be held still when the error comes: dropped with it)
    assert _events(text)[-1]["error"]["message"] == f"upstream `up` failed mid-stream ({WITHHELD})"


@pytest.mark.parametrize("model", ["reasoning-parts", "refusal-list"])
def test_a_text_sent_as_a_list_is_read_as_its_parts_text(gw: RunningGateway, model: str) -> None:
    text = _stream(gw, f"g-{model}")
    _clean(text, read=True)
    field = "reasoning" if model == "reasoning-parts" else "refusal"
    sent = "".join(c["delta"].get(field) or "" for e in _events(text) for c in e.get("choices") or ())
    assert sent == TEXT.replace(KEY, "<AWS_ACCESS_KEY>").replace(MAIL, "<EMAIL_ADDRESS>")


@pytest.mark.parametrize("model", ["content-object", "reasoning-object"])
def test_a_text_of_another_type_is_dropped(gw: RunningGateway, model: str) -> None:
    text = _stream(gw, f"g-{model}")
    _clean(text)
    assert ("Hello" if model == "content-object" else "Hi") in text


def test_a_tool_calls_name_is_checked(gw: RunningGateway) -> None:
    text = _stream(gw, "g-tool-name")
    _clean(text, read=True)
    names = [call["function"]["name"] for e in _events(text) for c in e.get("choices") or ()
             for call in c["delta"].get("tool_calls") or () if "name" in call.get("function", {})]
    assert names == ["lookup <AWS_ACCESS_KEY>"]


def test_unknown_fields_are_dropped_known_ones_kept(gw: RunningGateway) -> None:
    text = _stream(gw, "g-unknown-fields")
    _clean(text)
    assert "note" not in text and "there" in text


def test_a_usage_chunk_keeps_its_figures_only(gw: RunningGateway) -> None:
    text = _stream(gw, "g-usage-field")
    _clean(text)
    usage = [e for e in _events(text) if e.get("usage")]
    assert len(usage) == 1 and usage[0]["usage"] == USAGE and "note" not in usage[0]


def test_fields_real_servers_add_pass(gw: RunningGateway) -> None:
    """OpenRouter's `provider` and `native_finish_reason`, a citation's `annotations`: no answer text, kept."""
    events = _events(_stream(gw, "g-known-fields"))
    assert all(e.get("provider") == "OpenAI" for e in events if e.get("choices"))
    deltas = [c["delta"] for e in events for c in e.get("choices") or ()]
    assert any("annotations" in d for d in deltas)
    assert any(c.get("native_finish_reason") == "completed" for e in events for c in e.get("choices") or ())
