"""A value cut between two assistant `message` items of one Responses answer, through the output guards.

The client reads a Responses answer's text as every message item's output text joined: the OpenAI SDK's
`Response.output_text` joins the `output_text` parts of all the message items, with nothing between them. The guards
read the parts of one item joined, but each item on its own (`responses_answer._checked_texts`; streamed, a lane per
`output_index`: `responses._lane_key`), so a key, an e-mail address or a denied phrase cut at an item's end passed
every output guard (block, redact, pseudonymize), whole and streamed, and the client read it whole. The items' output
texts are now read as one text: a complete answer's with a seam between the items (a value that ends at one is still
found), a stream's in one lane, where a value reaching back from the next item into one already released blocks.

The upstream is scripted (by the request's model), the gateway real.
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
KEY = "AKIAZ3MQ7XJ4K2PLW9QA"
EMAIL = "jane.doe@mailbox.org"
DENIED = "project falcon"
GUARDS = {
    "red": "{pii: {kind: pii, action: redact, entities: {EMAIL_ADDRESS: {}}}, secrets: {kind: secrets, action: redact},"
           " deny: {kind: denylist, terms: ['project falcon'], action: redact}}",
    "blk": "{pii: {kind: pii, action: block, entities: {EMAIL_ADDRESS: {}}}, secrets: {kind: secrets, action: block},"
           " deny: {kind: denylist, terms: ['project falcon'], action: block}}",
    "psd": "{pii: {kind: pii, action: pseudonymize, entities: {EMAIL_ADDRESS: {}}}}",
}


def message(number: int, *texts: str, kind: str = "output_text") -> dict[str, Any]:
    """A completed assistant message item (`msg_<number>`) with a text part for each of `texts`."""
    parts = [{"type": kind, "text": text, "annotations": []} for text in texts]
    return {"id": f"msg_{number}", "type": "message", "role": "assistant", "status": "completed", "content": parts}


def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    """A response of the Responses API's shape."""
    usage = {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 2}
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": status, "model": "m", "output": output,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}


def message_events(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    """The events that stream a message item at `index`: each part added, its text in one delta, done."""
    pending = {**item, "status": "in_progress", "content": []}
    events: list[dict[str, Any]] = [{"type": "response.output_item.added", "output_index": index, "item": pending}]
    for position, part in enumerate(item["content"]):
        place = {"item_id": item["id"], "output_index": index, "content_index": position}
        events += [
            {"type": "response.content_part.added", **place, "part": {**part, "text": ""}},
            {"type": "response.output_text.delta", **place, "delta": part["text"], "logprobs": []},
            {"type": "response.output_text.done", **place, "text": part["text"], "logprobs": []},
            {"type": "response.content_part.done", **place, "part": part},
        ]
    return [*events, {"type": "response.output_item.done", "output_index": index, "item": item}]


def stream_of(output: list[dict[str, Any]], middle: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A stream of the message items `output` (`middle`: the events instead of the items', if given), numbered."""
    events = [{"type": "response.created", "response": response("in_progress", [])}]
    if middle is None:
        middle = [event for index, item in enumerate(output) for event in message_events(index, item)]
    events += middle
    events.append({"type": "response.completed", "response": response("completed", output)})
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


# Two message items, a value cut at the first one's end.
SPLIT = {
    "mail": ["Write to " + EMAIL[:9], EMAIL[9:] + " today."],
    "key": ["Key: " + KEY[:10], KEY[10:] + " ok."],
    "deny": ["about project", " falcon ok."],
}
NEEDLE = {"mail": EMAIL, "key": KEY, "deny": DENIED}
ANSWERS: dict[str, list[dict[str, Any]]] = {
    **{name: [message(1, first), message(2, second)] for name, (first, second) in SPLIT.items()},
    # a value that ends where the first item ends: found as before (the seam is read cut, too)
    "ends": [message(1, "mail " + EMAIL), message(2, "or call.")],
    # a value inside the second item, the first clean: each item's text as it was, the value redacted
    "second": [message(1, "Hello there. "), message(2, f"Mail {EMAIL} now.")],
    # two text parts in one item and a third in the next: one text
    "parts": [message(1, "Key: AKIAZ3", "MQ7X"), message(2, "J4K2PLW9QA ok.")],
}


class Upstream(ThreadedApp):
    """`/v1/responses`: the answer of the request's model (`answers`), complete or streamed as asked (`streams`: a
    model's own events, else its answer's items streamed one after the other)."""

    def __init__(self, answers: dict[str, list[dict[str, Any]]],
                 streams: dict[str, list[dict[str, Any]]] | None = None) -> None:
        super().__init__()
        self.answers = answers
        self.streams = streams or {}

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            model = body["model"]
            if not body.get("stream"):
                return web.json_response(response("completed", self.answers[model]))
            reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await reply.prepare(request)
            for event in self.streams.get(model) or stream_of(self.answers[model]):
                await reply.write(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode()))
            await reply.write_eof()
            return reply

        app.router.add_post("/v1/responses", handle)


def policy(port: int, models: list[str], sets: dict[str, str] = GUARDS) -> str:
    """Each model served under an alias per guard set (`sets`): `<guards>-<model>`, the guards on output."""
    aliases = [(f"{guards}-{model}", model, guards) for model in models for guards in sets]
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
          stream: {{window_chars: 32, step_chars: 8}}
          models:
        """) + "".join(f"    {alias}: {sets[guards]}\n" for alias, _, guards in aliases) \
        + "models:\n" + "".join(f"  {alias}: {{provider: up, model: {model}}}\n" for alias, model, _ in aliases)


def complete(gw: RunningGateway, model: str) -> dict[str, Any]:
    reply = httpx.post(gw.base_url + "/responses", headers=AUTH, timeout=20, json={"model": model, "input": "hi"})
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def streamed(gw: RunningGateway, model: str) -> tuple[str, list[dict[str, Any]]]:
    """The stream's raw text and its events (numbered consecutively: checked, then left out)."""
    with httpx.stream("POST", gw.base_url + "/responses", headers=AUTH, timeout=20,
                      json={"model": model, "input": "hi", "stream": True}) as reply:
        assert reply.status_code == 200
        raw = reply.read().decode()
    events = [json.loads(block.partition("data: ")[2]) for block in raw.split("\n\n") if "data: " in block]
    assert [event.pop("sequence_number") for event in events] == list(range(len(events)))
    return raw, events


def output_text(answer: dict[str, Any]) -> str:
    """What the client reads as the answer's text: the OpenAI SDK's `Response.output_text`, every message item's
    `output_text` parts joined (the SDK's model itself is not used: each version asks for other usage fields)."""
    return "".join(part["text"] for item in answer["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def delta_text(events: list[dict[str, Any]], kind: str = "response.output_text.delta") -> str:
    return "".join(event["delta"] for event in events if event["type"] == kind)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with Upstream(ANSWERS) as upstream:
        running = RunningGateway(policy(upstream.port, list(ANSWERS)), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


@pytest.mark.parametrize(("guards", "case"), [*(("red", case) for case in SPLIT), ("psd", "mail")])
def test_a_value_cut_between_two_message_items_is_rewritten(gw: RunningGateway, guards: str, case: str) -> None:
    answer = complete(gw, f"{guards}-{case}")
    assert answer["status"] == "completed"
    assert NEEDLE[case] not in output_text(answer), output_text(answer)
    if guards == "red":
        placeholder = {"mail": "<EMAIL_ADDRESS>", "key": "<AWS_ACCESS_KEY>", "deny": "<DENIED_TERM>"}[case]
        assert placeholder in output_text(answer)


@pytest.mark.parametrize("case", list(SPLIT))
def test_a_value_cut_between_two_message_items_blocks(gw: RunningGateway, case: str) -> None:
    answer = complete(gw, f"blk-{case}")
    assert (answer["status"], answer["incomplete_details"]) == ("incomplete", {"reason": "content_filter"})
    assert output_text(answer) == ""


def test_a_value_that_ends_with_the_first_item_is_still_found(gw: RunningGateway) -> None:
    answer = complete(gw, "red-ends")
    texts = [item["content"][0]["text"] for item in answer["output"]]
    assert texts == ["mail <EMAIL_ADDRESS>", "or call."]


def test_text_parts_of_one_item_and_the_next_item_are_one_text(gw: RunningGateway) -> None:
    assert output_text(complete(gw, "red-parts")) == "Key: <AWS_ACCESS_KEY> ok."


@pytest.mark.parametrize("case", list(SPLIT))
@pytest.mark.parametrize("guards", ["red", "blk"])
def test_a_streamed_value_cut_between_two_message_items_never_leaves_whole(
    gw: RunningGateway, case: str, guards: str,
) -> None:
    raw, events = streamed(gw, f"{guards}-{case}")
    assert NEEDLE[case] not in raw
    assert NEEDLE[case] not in delta_text(events)
    last = events[-1]
    assert (last["type"], last["response"]["incomplete_details"]) == ("response.incomplete",
                                                                       {"reason": "content_filter"})


def test_a_streamed_answer_of_two_items_keeps_each_item_s_text(gw: RunningGateway) -> None:
    """The items share a lane: each item's deltas still carry its own text, under its own id and index."""
    _, events = streamed(gw, "red-second")
    by_item: dict[tuple[str, int], str] = {}
    for event in events:
        if event["type"] == "response.output_text.delta":
            place = (event["item_id"], event["output_index"])
            by_item[place] = by_item.get(place, "") + event["delta"]
    assert by_item == {("msg_1", 0): "Hello there. ", ("msg_2", 1): "Mail <EMAIL_ADDRESS> now."}
    final = events[-1]["response"]
    assert (final["status"], output_text(final)) == ("completed", "Hello there. Mail <EMAIL_ADDRESS> now.")
