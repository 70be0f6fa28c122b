"""Texts of a guarded Responses answer that the output guards did not read, and so passed unchanged.

- An audio answer's transcript streams in `response.audio.transcript.delta` events (a type of the SDK's): the guard
  passed every event type it did not know as it was, so the transcript reached the client a character at a time,
  a key, an e-mail address and a denied phrase in it whole. It is now a lane of its own, checked as the answer's text.
- Any other event of a type the guard does not know that carries text is withheld under an enforcing guard; an event
  without text, and the hosted tools' events (whose texts no guard reads, by design), pass as before.
- A message part of type `text` (some servers write `output_text` so) was read neither in a complete answer nor in
  the stream's events that repeat a part (`response.content_part.done`, `response.output_item.done`, the final
  response): it is now read as output text.

The upstream is scripted (by the request's model), the gateway real.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.test_guard_responses_items_split import (
    EMAIL,
    GUARDS,
    KEY,
    Upstream,
    complete,
    delta_text,
    message,
    message_events,
    policy,
    stream_of,
    streamed,
)

SAID = f"My key is {KEY} and mail {EMAIL} about project falcon ok."
REDACTED = "My key is <AWS_ACCESS_KEY> and mail <EMAIL_ADDRESS> about <DENIED_TERM> ok."
TRANSCRIPT_DELTA = "response.audio.transcript.delta"
VENDOR_DELTA = "response.vendor_text.delta"  # a type no guard knows, with text
HEARTBEAT = {"type": "response.vendor.heartbeat", "output_index": 0, "item_id": "msg_1"}  # one without
CODE = {"type": "response.code_interpreter_call_code.delta", "output_index": 0, "item_id": "ci_1", "delta": "print(1)"}

ANSWERS: dict[str, list[dict[str, Any]]] = {
    "transcript": [],
    "vendor": [message(1, "Fine.")],
    "textpart": [message(1, "mail " + EMAIL, kind="text")],
}
STREAMS = {
    "transcript": stream_of([], [
        *({"type": TRANSCRIPT_DELTA, "delta": character} for character in SAID),
        {"type": "response.audio.transcript.done"},
    ]),
    "vendor": stream_of(ANSWERS["vendor"], [
        *message_events(0, ANSWERS["vendor"][0]), HEARTBEAT, CODE,
        {"type": VENDOR_DELTA, "output_index": 0, "item_id": "msg_1", "delta": SAID},
    ]),
}
SETS = {**GUARDS, "shd": "{pii: {kind: pii, mode: shadow, entities: {EMAIL_ADDRESS: {}}}}"}


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with Upstream(ANSWERS, STREAMS) as upstream:
        running = RunningGateway(policy(upstream.port, list(ANSWERS), SETS), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def test_a_streamed_audio_transcript_is_checked_as_text(gw: RunningGateway) -> None:
    raw, events = streamed(gw, "red-transcript")
    assert not any(value in raw for value in (KEY, EMAIL, "project falcon"))
    assert delta_text(events, TRANSCRIPT_DELTA) == REDACTED
    done = [event for event in events if event["type"] == "response.audio.transcript.done"]
    assert done == [{"type": "response.audio.transcript.done"}]  # (OpenAI's carries no text: none is added)
    assert not any("item_id" in event for event in events if event["type"] == TRANSCRIPT_DELTA)
    assert events[-1]["type"] == "response.completed"


def test_a_streamed_audio_transcript_blocks(gw: RunningGateway) -> None:
    raw, events = streamed(gw, "blk-transcript")
    assert KEY not in raw and KEY not in delta_text(events, TRANSCRIPT_DELTA)
    assert (events[-1]["type"], events[-1]["response"]["incomplete_details"]) == (
        "response.incomplete", {"reason": "content_filter"})


def test_an_unknown_event_with_text_is_withheld_under_an_enforcing_guard(gw: RunningGateway) -> None:
    raw, events = streamed(gw, "red-vendor")
    assert KEY not in raw and EMAIL not in raw
    kinds = [event["type"] for event in events]
    assert VENDOR_DELTA not in kinds
    assert HEARTBEAT in events and CODE in events  # no text; a hosted tool's, read by no guard: passed as they were
    assert kinds[-1] == "response.completed"


def test_an_unknown_event_passes_without_an_enforcing_guard(gw: RunningGateway) -> None:
    _, events = streamed(gw, "shd-vendor")
    assert {"type": VENDOR_DELTA, "output_index": 0, "item_id": "msg_1", "delta": SAID} in events


def test_a_text_part_of_a_complete_answer_is_read_as_output_text(gw: RunningGateway) -> None:
    answer = complete(gw, "red-textpart")
    assert answer["output"][0]["content"][0]["text"] == "mail <EMAIL_ADDRESS>"


def test_a_text_part_of_a_streamed_answer_is_read_as_output_text(gw: RunningGateway) -> None:
    raw, events = streamed(gw, "red-textpart")
    assert EMAIL not in raw
    done = next(event for event in events if event["type"] == "response.content_part.done")
    assert done["part"]["text"] == "mail <EMAIL_ADDRESS>"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "mail <EMAIL_ADDRESS>"
