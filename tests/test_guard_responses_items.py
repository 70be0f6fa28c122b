"""A guarded Responses stream whose final response lists its items in other places than the stream streamed them.

The final `response.completed` event repeats every output item, and the guard checks those texts against the
lanes the deltas filled (`guards/responses.py`). It matched them by their place in `response.output`, which need
not be the `output_index` they streamed at: an item the final list leaves out (a reasoning item) or items listed
in another order put a message's text in the lane of another index. That lane had released nothing, so the
guard sent the whole (redacted) text again, as a delta with `item_id: ""` after `response.output_item.done`.
Items are now matched by their `id`.

The upstream is scripted (by the request's model), the gateway real, and each test asserts the events the client
gets: the upstream's, with the texts redacted, and nothing more (consecutive deltas of one text are joined, as
how the window cuts a text into deltas is not what is tested).
"""

from __future__ import annotations

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
EMAIL = "jane.doe@mailbox.org"
REDACTED = "<EMAIL_ADDRESS>"
ANSWER = f"Sure: contact {EMAIL} for more about the report."
SUMMARY = f"The user wants the address of {EMAIL}, which I know."

_DELTAS = frozenset({"response.output_text.delta", "response.reasoning_summary_text.delta"})


def _reasoning(summary: str | None) -> dict[str, Any]:
    parts = [] if summary is None else [{"type": "summary_text", "text": summary}]
    return {"id": "rs_1", "type": "reasoning", "summary": parts}


def _message(text: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}


def _events(summary: str | None, answer: str, final: list[str], pieces: int = 4) -> list[dict[str, Any]]:
    """A stream of a reasoning item (output_index 0; `summary`, if any, streamed) then a message (output_index 1,
    `answer` streamed in `pieces` deltas), whose `response.completed` lists the items named in `final` ("rs",
    "msg") in that order."""
    reasoning, message = _reasoning(summary), _message(answer)
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
                "output": [{"rs": reasoning, "msg": message}[name] for name in final], "usage": None}
    pending = {**response, "status": "in_progress", "output": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
        {"type": "response.output_item.added", "output_index": 0, "item": {**reasoning, "summary": []}},
    ]
    if summary is not None:
        place = {"item_id": "rs_1", "output_index": 0, "summary_index": 0}
        part = reasoning["summary"][0]
        events += [
            {"type": "response.reasoning_summary_part.added", **place, "part": {**part, "text": ""}},
            *({"type": "response.reasoning_summary_text.delta", **place, "delta": piece}
              for piece in _cut(summary, pieces)),
            {"type": "response.reasoning_summary_text.done", **place, "text": summary},
            {"type": "response.reasoning_summary_part.done", **place, "part": part},
        ]
    place = {"item_id": "msg_1", "output_index": 1, "content_index": 0}
    part = message["content"][0]
    events += [
        {"type": "response.output_item.done", "output_index": 0, "item": reasoning},
        {"type": "response.output_item.added", "output_index": 1,
         "item": {**message, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **place, "part": {**part, "text": ""}},
        *({"type": "response.output_text.delta", **place, "delta": piece, "logprobs": []}
          for piece in _cut(answer, pieces)),
        {"type": "response.output_text.done", **place, "text": answer, "logprobs": []},
        {"type": "response.content_part.done", **place, "part": part},
        {"type": "response.output_item.done", "output_index": 1, "item": message},
        {"type": "response.completed", "response": response},
    ]
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


def _cut(text: str, pieces: int) -> list[str]:
    size = -(-len(text) // pieces)
    return [text[i:i + size] for i in range(0, len(text), size)]


SCRIPTS = {
    # the hunt's case: a reasoning item (no text) the final response leaves out, the message listed first
    "unlisted": _events(None, ANSWER, ["msg"]),
    # both items have text, listed in the other order
    "swapped": _events(SUMMARY, ANSWER, ["msg", "rs"]),
    # as streamed: the common case
    "in-order": _events(SUMMARY, ANSWER, ["rs", "msg"]),
}


class _Upstream(ThreadedApp):
    """`/v1/responses`, streaming the script of the request's model (`SCRIPTS`) in OpenAI's framing."""

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
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
        models = "\n".join(f"  {name}: {{provider: up, model: {name}}}" for name in SCRIPTS)
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
              global:
                pii: {{kind: pii, places: [output], action: redact, entities: {{EMAIL_ADDRESS: {{}}}}}}
            models:
            """) + models + "\n"
        running = RunningGateway(text, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _received(gw: RunningGateway, model: str) -> list[dict[str, Any]]:
    """The events the client gets, numbered consecutively (checked, then left out), consecutive deltas of one text
    joined."""
    with httpx.stream("POST", gw.base_url + "/responses", headers=AUTH, timeout=20,
                      json={"model": model, "input": "hi", "stream": True}) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    events = [json.loads(block.partition("\ndata: ")[2]) for block in raw.split("\n\n") if block]
    assert [event.pop("sequence_number") for event in events] == list(range(len(events)))
    return _joined(events)


def _joined(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for event in events:
        last = out[-1] if out else {}
        if event["type"] in _DELTAS and {**last, "delta": ""} == {**event, "delta": ""}:
            last["delta"] += event["delta"]
        else:
            out.append(dict(event))
    return out


def _expected(model: str) -> list[dict[str, Any]]:
    """The upstream's events, deltas joined, with every text redacted."""
    events = _joined([{k: v for k, v in event.items() if k != "sequence_number"} for event in SCRIPTS[model]])
    return json.loads(json.dumps(events).replace(EMAIL, REDACTED))  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["unlisted", "swapped"])
def test_final_items_listed_in_other_places_are_checked_in_their_own_lanes(gw: RunningGateway, model: str) -> None:
    received = _received(gw, model)
    assert received == _expected(model)  # no stray delta (`item_id: ""`) after `response.output_item.done`
    assert not any(event["type"] in _DELTAS and not event["item_id"] for event in received)
    message = next(item for item in received[-1]["response"]["output"] if item["type"] == "message")
    assert message["content"][0]["text"] == ANSWER.replace(EMAIL, REDACTED)


def test_final_items_listed_as_streamed_are_unchanged_apart_from_the_redaction(gw: RunningGateway) -> None:
    assert _received(gw, "in-order") == _expected("in-order")
