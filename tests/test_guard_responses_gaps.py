"""Output guards on Responses texts the stream guard did not read, or read in the wrong place (`guards/responses.py`,
`guards/responses_answer.py`).

- A lifecycle event (`response.created`, `.queued`, `.in_progress`) whose `response.output` lists the output so far
  reached the client as the upstream sent it: its texts are now written as released so far.
- A `...done` text that does not go on from the deltas (another string) had its rest checked as if it did: a key
  after 18 characters of other text went out cut, unrecognised. Only a rest that goes on from the deltas is sent.
- A key cut in two between two `output_text` parts of one message: each part was checked alone, while the client
  reads them joined (`output_text`). A message's output text parts are now one text (one lane in the stream; one
  `Joined` text in a complete answer).

The upstream is scripted (by the request's model) and replays exact SSE frames (or a complete answer); the gateway
is real, and the client the openai SDK (`responses.stream`, `responses.create`) or plain HTTP for the raw events.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
KEY = "AKIAZ3MQ7XJ4K2PLW9QA"
EMAIL = "jane.doe@mailbox.org"
TEXT = f"Here is the key {KEY} and mail {EMAIL} done. "
BENIGN = "A short and harmless answer about the weather today. "
RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m",
            "output": []}
ITEM = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
PLACE = {"output_index": 0, "item_id": "msg_1"}
USAGE = {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 14}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _delta(text: str, index: int = 0) -> dict[str, Any]:
    return {"type": "response.output_text.delta", **PLACE, "content_index": index, "delta": text, "logprobs": []}


def _stream(texts: list[tuple[list[str], str]], in_progress: bool = False) -> list[dict[str, Any]]:
    """A message whose output text parts are `texts`: each its deltas and the text its done events repeat; with
    `in_progress`, a `response.in_progress` after the first part's deltas that lists the output so far."""
    done = {**ITEM, "status": "completed", "content": [_part(full) for _, full in texts]}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": RESPONSE},
                                    {"type": "response.output_item.added", "output_index": 0, "item": ITEM}]
    for index, (pieces, full) in enumerate(texts):
        place = {**PLACE, "content_index": index}
        events += [{"type": "response.content_part.added", **place, "part": _part("")},
                   *(_delta(piece, index) for piece in pieces)]
        if in_progress and not index:
            events.append({"type": "response.in_progress", "response": {
                **RESPONSE, "output": [{**ITEM, "content": [_part("".join(pieces))]}],
                "output_text": "".join(pieces)}})
        events += [{"type": "response.output_text.done", **place, "text": full, "logprobs": []},
                   {"type": "response.content_part.done", **place, "part": _part(full)}]
    events += [{"type": "response.output_item.done", "output_index": 0, "item": done},
               {"type": "response.completed", "response": {
                   **RESPONSE, "status": "completed", "output": [done],
                   "output_text": "".join(full for _, full in texts), "usage": USAGE}}]
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


SCRIPTS: dict[str, list[dict[str, Any]]] = {
    "in-progress": _stream([(list(TEXT), TEXT)], in_progress=True),
    "done-differs": _stream([(list("benign text here. "), TEXT)]),
    "split": _stream([(["key ", "AKIAZ3MQ"], "key AKIAZ3MQ"), (["7XJ4K2PLW9QA", " end"], "7XJ4K2PLW9QA end")]),
    "split-done-only": _stream([([], "key AKIAZ3MQ"), ([], "7XJ4K2PLW9QA end")]),
    "benign": _stream([(list(BENIGN), BENIGN)]),
    "benign-parts": _stream([(["First part. "], "First part. "), (["Second part."], "Second part.")]),
    "benign-done-only": _stream([([], BENIGN)]),
}
# Complete answers (`stream: false`), by model.
ANSWERS: dict[str, dict[str, Any]] = {
    "split": {**RESPONSE, "status": "completed", "usage": USAGE, "output": [
        {**ITEM, "status": "completed", "content": [_part("key AKIAZ3MQ"), _part("7XJ4K2PLW9QA end")]}]},
    "split-mail": {**RESPONSE, "status": "completed", "usage": USAGE, "output": [
        {**ITEM, "status": "completed", "content": [_part("mail jane.doe@mail"), _part("box.org ok"),
                                                    _part(" bye")]}]},
    "benign-parts": {**RESPONSE, "status": "completed", "usage": USAGE, "output": [
        {**ITEM, "status": "completed", "content": [_part("First part. "), _part("Second part.")]}]},
}


class _Upstream(ThreadedApp):
    """`/v1/responses`: the script of the request's model streamed frame by frame, or its complete answer."""

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if not body.get("stream"):
                return web.json_response(ANSWERS[body["model"]])
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in SCRIPTS[body["model"]]:
                await response.write(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode()))
            await response.write_eof()
            return response

        app.router.add_post("/v1/responses", handle)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        models = "\n".join(f"  {name}: {{provider: up, model: {name}}}" for name in {*SCRIPTS, *ANSWERS})
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
              stream: {{window_chars: 48, step_chars: 24}}
              global:
                pii: {{kind: pii, places: [output], action: redact, entities: {{EMAIL_ADDRESS: {{}}}}}}
                secrets: {{kind: secrets, places: [output], action: redact}}
            models:
            """) + models + "\n"
        running = RunningGateway(text, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=20)


def _raw(gw: RunningGateway, model: str) -> str:
    with httpx.stream("POST", gw.base_url + "/responses", headers=AUTH, timeout=20,
                      json={"model": model, "input": "hi", "stream": True}) as response:
        assert response.status_code == 200
        return response.read().decode()


def _events(raw: str) -> list[dict[str, Any]]:
    return [json.loads(block.partition("\ndata: ")[2]) for block in raw.split("\n\n") if block]


def _leaks(raw: str) -> list[str]:
    """Any of the secret or the address, or a long piece of either, that reached the client."""
    return [value for value in (KEY, EMAIL, KEY[2:], KEY[:8] + KEY[8:12], "mailbox") if value in raw]


def _streamed(gw: RunningGateway, model: str) -> tuple[str, Any]:
    """The text the SDK's stream reader put together from the deltas, and its final response."""
    with _client(gw).responses.stream(model=model, input="hi") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        return text, stream.get_final_response()


def test_a_lifecycle_event_listing_the_output_so_far_carries_it_as_released(gw: RunningGateway) -> None:
    raw = _raw(gw, "in-progress")
    assert _leaks(raw) == []
    listed = next(event for event in _events(raw) if event["type"] == "response.in_progress")["response"]
    released = listed["output"][0]["content"][0]["text"]
    assert listed["output_text"] == released
    redacted = TEXT.replace(KEY, "<AWS_ACCESS_KEY>").replace(EMAIL, "<EMAIL_ADDRESS>")
    # (what the deltas before it released: the text before the key, or past it, redacted, as the batches fell)
    assert redacted.startswith(released)
    text, final = _streamed(gw, "in-progress")
    assert text == final.output_text == redacted


def test_a_done_text_that_does_not_go_on_from_the_deltas_releases_none_of_its_rest(gw: RunningGateway) -> None:
    raw = _raw(gw, "done-differs")
    assert _leaks(raw) == [] and "Here is" not in raw
    events = _events(raw)
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    assert deltas == "benign text here. "
    completed = events[-1]["response"]
    assert completed["output"][0]["content"][0]["text"] == completed["output_text"] == deltas
    assert [event["text"] for event in events if event["type"] == "response.output_text.done"] == [deltas]
    text, final = _streamed(gw, "done-differs")
    assert text == final.output_text == deltas


@pytest.mark.parametrize("model", ["split", "split-done-only"])
def test_a_key_cut_between_two_text_parts_of_a_message_stream_never_leaves_whole(gw: RunningGateway,
                                                                               model: str) -> None:
    raw = _raw(gw, model)
    assert KEY not in raw and KEY[8:] not in raw
    last = _events(raw)[-1]
    assert last["type"] == "response.incomplete"  # (the key reaches back into the part released whole: blocked)
    last = last["response"]
    assert last["incomplete_details"] == {"reason": "content_filter"}
    joined = "".join(part["text"] for item in last["output"] for part in item["content"])
    assert KEY not in joined and last.get("output_text", "") == (joined if "output_text" in last else "")


def test_a_key_cut_between_two_text_parts_of_a_complete_answer_is_redacted_as_one(gw: RunningGateway) -> None:
    answer = _client(gw).responses.create(model="split", input="hi")
    assert [part.text for part in answer.output[0].content] == ["key <AWS_ACCESS_KEY>", " end"]  # type: ignore[union-attr]
    assert answer.output_text == "key <AWS_ACCESS_KEY> end"
    answer = _client(gw).responses.create(model="split-mail", input="hi")
    assert [part.text for part in answer.output[0].content] == ["mail <EMAIL_ADDRESS>", " ok", " bye"]  # type: ignore[union-attr]


@pytest.mark.parametrize("model", ["benign", "benign-parts", "benign-done-only"])
def test_a_benign_stream_reaches_the_client_as_the_upstream_sent_it(gw: RunningGateway, model: str) -> None:
    def texts(events: list[dict[str, Any]]) -> list[Any]:
        return [(event["type"], event.get("text"), event.get("part"), event.get("item"), event.get("response"))
                for event in events if not event["type"].endswith(".delta")]

    events = _events(_raw(gw, model))
    script = [{k: v for k, v in event.items() if k != "sequence_number"} for event in SCRIPTS[model]]
    assert texts(events) == texts(script)
    for index in (0, 1):
        sent = "".join(event["delta"] for event in events
                       if event["type"] == "response.output_text.delta" and event["content_index"] == index)
        assert sent == "".join(event["delta"] for event in script
                               if event["type"] == "response.output_text.delta" and event["content_index"] == index) \
            or model == "benign-done-only"
    text, final = _streamed(gw, model)
    assert text == final.output_text == "".join(part.text for part in final.output[0].content)


def test_a_complete_answer_of_benign_text_parts_is_unchanged(gw: RunningGateway) -> None:
    answer = _client(gw).responses.create(model="benign-parts", input="hi")
    assert [part.text for part in answer.output[0].content] == ["First part. ", "Second part."]  # type: ignore[union-attr]
