"""A streamed Responses answer reaches the client framed as OpenAI frames it (`api/responses_frames.py`).

OpenAI writes each Responses event as `event: <type>` then `data: {...}`, and no `[DONE]`: the stream ends
after `response.completed` (`.incomplete`, `.failed`). The gateway wrote `data:` lines only and added a
`[DONE]`: the openai SDK coped, but a client that listens by event name (a browser's `EventSource`,
`addEventListener("response.output_text.delta", ...)`) received nothing. A failure after the stream
started is the Responses API's `error` event, which the SDK raises as `APIError` as it did the chat-style
`data: {"error": ...}`.

The upstream here is scripted (`_Upstream`, by the request's model): OpenAI's own framing, a server that
writes `data:` lines only with `type` not first and a `[DONE]`, a stream that stops or is reset half-way,
an upstream `error` event, a slow stream for the drain deadline, and an echo of a text for the guards. The
clients are httpx (the raw bytes, and a browser-like dispatcher by event name) and the openai SDK, whose
bytes are kept (`_Tee`) to show what it read.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
PIECES = ["Hello", " from", " the", " gateway"]
TEXT = "".join(PIECES)
EMAIL = "jane.doe@mailbox.org"
SECRET = "AKIAIOSFODNN7EXAMPLQ"
OPENING = 4  # events before the first delta: created, in_progress, output_item.added, content_part.added

# -- the scripted upstream -----------------------------------------------------------------------------------------


def _events(model: str, pieces: list[str]) -> list[dict[str, Any]]:
    """A whole Responses stream's events (as OpenAI sends them), numbered from 0."""
    text = "".join(pieces)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": model,
                "output": [item], "error": None, "incomplete_details": None, "tools": [], "tool_choice": "auto",
                "parallel_tool_calls": True, "usage": {"input_tokens": 3, "output_tokens": len(pieces),
                                                       "total_tokens": 3 + len(pieces)}}
    pending = {**response, "status": "in_progress", "output": [], "usage": None}
    place = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **place, "part": {**part, "text": ""}},
        *({"type": "response.output_text.delta", **place, "delta": piece, "logprobs": []} for piece in pieces),
        {"type": "response.output_text.done", **place, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **place, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": response},
    ]
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


def _openai_frame(event: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event, separators=(",", ":")).encode())


def _script(model: str, prompt: str) -> list[bytes]:
    """What the upstream writes for a model (`_Upstream` resets the connection after `resets`' events, and pauses
    between `slow`'s deltas)."""
    if model == "plain-data":  # `data:` lines only, `type` after `sequence_number`, then a `[DONE]`
        events = [{"sequence_number": e.pop("sequence_number"), **e} for e in _events(model, PIECES)]
        return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
    if model == "echo":  # the prompt, a few characters a delta (for the guards)
        return [_openai_frame(e) for e in _events(model, [prompt[i:i + 5] for i in range(0, len(prompt), 5)])]
    frames = [_openai_frame(e) for e in _events(model, PIECES)]
    cut = OPENING + 2  # two deltas, then the failure
    if model in ("stops", "resets"):  # the body ends (cleanly, or with an RST) before `response.completed`
        return frames[:cut]
    if model == "done-early":  # a `[DONE]` (as chat-style servers write) before `response.completed`
        return [*frames[:cut], b"data: [DONE]\n\n"]
    if model == "fails":  # OpenAI's own `error` event, its message naming the key the gateway sent
        return [*frames[:cut], _openai_frame({"type": "error", "sequence_number": cut, "error": {
            "type": "server_error", "code": "server_error", "message": f"backend refused key {UPSTREAM_KEY}",
            "param": None}})]
    return frames


class _Upstream(ThreadedApp):
    """`/v1/responses` on a loop in a thread of its own, answering every request by its script (`_script`)."""

    def __init__(self) -> None:
        super().__init__()

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                for index, frame in enumerate(_script(body["model"], str(body.get("input")))):
                    if body["model"] == "slow" and index >= OPENING:
                        await asyncio.sleep(0.2)
                    await response.write(frame)
            except ConnectionResetError:  # the gateway left (a stream cut at the drain deadline)
                return response
            if body["model"] == "resets" and request.transport is not None:
                await asyncio.sleep(0.05)  # the events leave first, then the RST (SO_LINGER 0)
                sock = request.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                request.transport.abort()
                return response
            await response.write_eof()
            return response

        app.router.add_post("/v1/responses", handle)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        models = "\n".join(f"  {name}: {{provider: up, model: {name}}}"
                           for name in ("openai", "plain-data", "stops", "done-early", "resets", "fails", "slow",
                                        "echo"))
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1}}
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              up: {{kind: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", api_key_env: UP_KEY,
                    timeouts: {{connect_s: 2, first_byte_s: 5, idle_s: 5, total_s: 20}}}}
            guards:
              stream: {{window_chars: 32, step_chars: 8}}
              models:
                guarded:
                  pii: {{kind: pii, places: [output], entities: {{EMAIL_ADDRESS: {{}}}}}}
                  secrets: {{kind: secrets, places: [output], action: block}}
            models:
              guarded: {{provider: up, model: echo}}
            """) + models + "\n"
        running = RunningGateway(text, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


# -- clients -------------------------------------------------------------------------------------------------------


def _raw(gw: RunningGateway, model: str, prompt: str = "hi") -> bytes:
    with httpx.stream("POST", gw.base_url + "/responses", headers=AUTH, timeout=20,
                      json={"model": model, "input": prompt, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return response.read()


def _frames(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Each frame's `event:` name and JSON data: every frame is named by its data's `type`, as OpenAI names it,
    and there is no `[DONE]` (a frame of anything else fails the test)."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    out: list[tuple[str, dict[str, Any]]] = []
    for block in raw.decode().split("\n\n")[:-1]:
        name, _, data = block.partition("\ndata: ")
        assert name.startswith("event: ") and "\n" not in data, block
        out.append((name.removeprefix("event: "), json.loads(data)))
        assert out[-1][0] == out[-1][1]["type"], block
    return out


def _dispatch(raw: bytes) -> dict[str, list[dict[str, Any]]]:
    """What a browser's `EventSource` hands each listener: events by name (WHATWG HTML, "dispatch the event":
    an event without an `event:` field is a `message`)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for block in raw.decode().split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data and data != ["[DONE]"]:
            by_name.setdefault(name, []).append(json.loads("\n".join(data)))
    return by_name


class _Tee(httpx2.BaseTransport):
    """The SDK's transport, keeping the bytes of the body it read (to show the framing it was given)."""

    def __init__(self) -> None:
        self.inner = httpx2.HTTPTransport()
        self.seen = bytearray()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.inner.handle_request(request)
        inner, seen = response.stream, self.seen

        class Kept(httpx2.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for part in inner:  # type: ignore[union-attr]
                    seen.extend(part)
                    yield part

            def close(self) -> None:
                inner.close()  # type: ignore[union-attr]

        return httpx2.Response(response.status_code, headers=response.headers, stream=Kept(),
                               extensions=response.extensions)


def _sdk(gw: RunningGateway) -> tuple[openai.OpenAI, _Tee]:
    tee = _Tee()
    client = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0,
                           http_client=httpx2.Client(transport=tee))
    return client, tee


# -- the framing ---------------------------------------------------------------------------------------------------


def test_each_event_carries_its_name_and_the_stream_ends_after_response_completed(gw: RunningGateway) -> None:
    raw = _raw(gw, "openai")
    frames = _frames(raw)
    assert [data for _, data in frames] == _events("openai", PIECES)  # every event, as the upstream sent it
    assert frames[-1][0] == "response.completed"
    assert b"[DONE]" not in raw


def test_a_client_listening_by_event_name_receives_the_text_and_the_final_response(gw: RunningGateway) -> None:
    by_name = _dispatch(_raw(gw, "openai"))
    assert "message" not in by_name  # nothing unnamed
    assert "".join(e["delta"] for e in by_name["response.output_text.delta"]) == TEXT
    assert [e["response"]["status"] for e in by_name["response.completed"]] == ["completed"]


def test_an_upstreams_done_and_unnamed_events_are_framed_as_openai_frames_them(gw: RunningGateway) -> None:
    """A server writing `data:` lines only (its `type` not first in the JSON), then `[DONE]`: each event goes out
    named by its `type`, and the `[DONE]` is not forwarded."""
    raw = _raw(gw, "plain-data")
    frames = _frames(raw)
    assert [data["type"] for _, data in frames] == [e["type"] for e in _events("x", PIECES)]
    assert b"[DONE]" not in raw


# -- the openai SDK ------------------------------------------------------------------------------------------------


def test_the_sdk_streams_the_text_and_the_final_response(gw: RunningGateway) -> None:
    client, tee = _sdk(gw)
    events = list(client.responses.create(model="openai", input="hi", stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == TEXT
    assert events[-1].type == "response.completed" and events[-1].response.output_text == TEXT
    assert events[-1].response.usage is not None and events[-1].response.usage.output_tokens == len(PIECES)
    frames = _frames(bytes(tee.seen))  # what it read: OpenAI's framing
    assert len(frames) == len(events)


def test_the_sdks_stream_helper_reads_the_text_and_the_final_response(gw: RunningGateway) -> None:
    client, tee = _sdk(gw)
    with client.responses.stream(model="openai", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == TEXT
    assert final.output_text == TEXT and final.status == "completed"
    _frames(bytes(tee.seen))  # what it read: OpenAI's framing


# -- a failure after the stream started ----------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "message"), [
    ("stops", "ended the stream before the response completed"),
    ("done-early", "ended the stream before the response completed"),
    ("resets", "mid-stream"),
    ("fails", "backend refused key"),
])
def test_a_mid_stream_failure_is_the_responses_error_event(gw: RunningGateway, model: str, message: str) -> None:
    frames = _frames(_raw(gw, model))
    name, error = frames[-1]
    assert name == "error" and error["type"] == "error"
    assert error["sequence_number"] == frames[-2][1]["sequence_number"] + 1 == OPENING + 2
    assert set(error["error"]) == {"type", "code", "message", "param"}
    assert message in error["error"]["message"] and UPSTREAM_KEY not in error["error"]["message"]
    assert [data["delta"] for _, data in frames if data["type"] == "response.output_text.delta"] == PIECES[:2]


@pytest.mark.parametrize("model", ["stops", "done-early", "resets", "fails"])
def test_the_sdk_raises_api_error_for_a_mid_stream_failure(gw: RunningGateway, model: str) -> None:
    client, tee = _sdk(gw)
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        for event in client.responses.create(model=model, input="hi", stream=True):
            received.append(event.type)
    assert type(raised.value) is openai.APIError  # not a status error: the stream had started
    name, error = _frames(bytes(tee.seen))[-1]
    assert name == "error" and raised.value.body == error["error"]  # the error object, as before the framing
    assert raised.value.message == raised.value.body["message"]  # type: ignore[index]
    assert received.count("response.output_text.delta") == 2
    with pytest.raises(openai.APIError), client.responses.stream(model=model, input="hi") as stream:
        stream.get_final_response()


def test_a_stream_cut_at_the_drain_deadline_ends_with_the_error_event(gw: RunningGateway) -> None:
    received = b""
    with httpx.stream("POST", gw.base_url + "/responses", headers=AUTH, timeout=20,
                      json={"model": "slow", "input": "hi", "stream": True}) as response:
        for piece in response.iter_raw():
            received += piece
            if received.count(b"\n\n") == OPENING + 1:
                assert gw.gateway.loop is not None
                gw.gateway.loop.call_soon_threadsafe(gw.gateway.cut_all)
    frames = _frames(received)
    name, error = frames[-1]
    assert name == "error" and error["error"]["code"] == "shutting_down"
    assert error["sequence_number"] == frames[-2][1]["sequence_number"] + 1


# -- guards --------------------------------------------------------------------------------------------------------


def test_events_a_guard_rewrites_or_adds_keep_their_names(gw: RunningGateway) -> None:
    prompt = f"Please write to {EMAIL} about the report by Friday"
    raw = _raw(gw, "guarded", prompt)
    assert EMAIL.encode() not in raw
    frames = _frames(raw)
    redacted = prompt.replace(EMAIL, "<EMAIL_ADDRESS>")
    by_name = _dispatch(raw)
    assert "".join(e["delta"] for e in by_name["response.output_text.delta"]) == redacted
    assert by_name["response.completed"][0]["response"]["output"][0]["content"][0]["text"] == redacted
    numbers = [data["sequence_number"] for _, data in frames]
    assert numbers == list(range(len(numbers)))
    client, tee = _sdk(gw)
    with client.responses.stream(model="guarded", input=prompt) as stream:
        assert stream.get_final_response().output_text == redacted
    _frames(bytes(tee.seen))  # what it read: OpenAI's framing


def test_a_blocked_stream_ends_with_a_named_response_incomplete(gw: RunningGateway) -> None:
    raw = _raw(gw, "guarded", f"Remember the key {SECRET} for later")
    assert SECRET.encode() not in raw
    frames = _frames(raw)
    name, last = frames[-1]
    assert name == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_an_event_name_is_its_type_or_none_when_no_event_line_can_carry_it() -> None:
    from gateway.api.responses_frames import event_name  # (the module the fix added)

    assert event_name(b'{"type":"response.created","response":{}}') == b"response.created"
    assert event_name(b'{"type": "response.created", "response": {}}') == b"response.created"
    assert event_name(b'{"sequence_number":1,"type":"response.created"}') == b"response.created"
    assert event_name(b'{"type":"response.\\u0063reated"}') == b"response.created"  # an escape: decoded
    assert event_name(b'{"type":"a\\nb"}') is None  # a line break would end the `event:` line
    assert event_name(b'{"type":7}') is None and event_name(b'{"delta":"x"}') is None
    assert event_name(b"not json") is None
