"""An answer's restored originals replace only the placeholders the gateway issued for the prompt.

Two collisions, through a real gateway and a mock upstream that echoes what it was sent (`fault-echo`):

- An output guard that pseudonymizes hides a value the answer wrote (`bob@example.org` became `<EMAIL_ADDRESS_1>`),
  but the placeholder it issued was restorable: the same `<EMAIL_ADDRESS_1>` written by the model after that finding
  (on its own, or guessed from the placeholders it saw) was restored into the very value the guard hid, and the client
  read it. A placeholder issued for the answer's own finding now stays a placeholder everywhere.
- A prompt that already held a placeholder-shaped text (`<EMAIL_ADDRESS_1>` in a template, or in an earlier turn's
  reasoning sent back, whose placeholders are kept: `pseudonyms.py`) got that same name issued for one of its values:
  the model could not tell them apart, and the answer's `<EMAIL_ADDRESS_1>` echoing the client's own text came back as
  the client's address. Names already in the prompt are now skipped (`<EMAIL_ADDRESS_2>`).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.guards.pseudonyms import Pseudonyms
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
BOB = "bob@example.org"


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    text = policy_text(upstream.base_url) + textwrap.dedent("""\
          out-pseudo: {provider: mock, model: fault-echo}
          in-pseudo: {provider: mock, model: fault-echo}
          mixed-pseudo: {provider: mock, model: fault-echo}
        guards:
          models:
            out-pseudo:
              pii: {kind: pii, engine: patterns, places: [output], action: pseudonymize}
            in-pseudo:
              pii: {kind: pii, engine: patterns, places: [input], action: pseudonymize}
            mixed-pseudo:
              phones: {kind: pii, engine: patterns, places: [input], action: pseudonymize,
                       entities: {PHONE_NUMBER: {}}}
              mails: {kind: pii, engine: patterns, places: [output], action: pseudonymize,
                      entities: {EMAIL_ADDRESS: {}}}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _chat(gw: RunningGateway, model: str, messages: list[dict[str, Any]], stream: bool = False,
          **extra: Any) -> str:
    response = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, timeout=30,
                          json={"model": model, "messages": messages, "stream": stream, **extra})
    assert response.status_code == 200, response.text
    if not stream:
        return str(response.json()["choices"][0]["message"]["content"])
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def _sent(upstream: MockUpstream) -> str:
    return str(upstream.requests[-1].json["messages"][-1]["content"])


# -- a placeholder issued for the answer's own finding is never restored ----------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_answer_placeholder_after_its_finding_is_not_restored(gw: RunningGateway, stream: bool) -> None:
    """The answer writes an address, then `<EMAIL_ADDRESS_1>` (the name the output guard gives that address): the
    guard's placeholder hides the address, and the model's own `<EMAIL_ADDRESS_1>` is never restored into it."""
    prompt = f"{BOB} is the one; write to <EMAIL_ADDRESS_1> today"
    answer = _chat(gw, "out-pseudo", [{"role": "user", "content": prompt}], stream)
    assert BOB not in answer, answer
    assert answer == "<EMAIL_ADDRESS_1> is the one; write to <EMAIL_ADDRESS_1> today"


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_prompt_placeholders_restore_and_answer_ones_stay(gw: RunningGateway, upstream: MockUpstream,
                                                          stream: bool) -> None:
    """An input guard pseudonymizes the phone number, an output guard the answer's addresses: the prompt's placeholder
    is restored, the answer's address hidden under a name the prompt did not hold, and the prompt's own
    `<EMAIL_ADDRESS_1>` stays the text the client wrote."""
    prompt = f"call 212-555-0100 or mail {BOB}, not <EMAIL_ADDRESS_1>"
    answer = _chat(gw, "mixed-pseudo", [{"role": "user", "content": prompt}], stream)
    assert _sent(upstream) == f"call <PHONE_NUMBER_1> or mail {BOB}, not <EMAIL_ADDRESS_1>"
    assert answer == "call 212-555-0100 or mail <EMAIL_ADDRESS_2>, not <EMAIL_ADDRESS_1>"


def test_responses_answer_placeholder_after_its_finding_is_not_restored(gw: RunningGateway) -> None:
    response = httpx.post(gw.base_url + "/responses", headers=AUTH, timeout=30, json={
        "model": "out-pseudo", "store": False, "input": f"{BOB} is the one; write to <EMAIL_ADDRESS_1> today"})
    assert response.status_code == 200, response.text
    text = "".join(part.get("text", "") for item in response.json()["output"] if item.get("type") == "message"
                   for part in item["content"])
    assert BOB not in text, text
    assert "write to <EMAIL_ADDRESS_1> today" in text


# -- a name already in the prompt is never issued for one of its values ------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_prompt_placeholder_text_is_not_issued_again(gw: RunningGateway, upstream: MockUpstream, stream: bool) -> None:
    prompt = f"fill in the <EMAIL_ADDRESS_1> field; mine is {BOB}"
    answer = _chat(gw, "in-pseudo", [{"role": "user", "content": prompt}], stream)
    assert _sent(upstream) == "fill in the <EMAIL_ADDRESS_1> field; mine is <EMAIL_ADDRESS_2>"
    assert answer == prompt  # the client's own `<EMAIL_ADDRESS_1>` stays; its address comes back


def test_placeholder_in_earlier_reasoning_is_not_issued_again(gw: RunningGateway, upstream: MockUpstream) -> None:
    """An earlier turn's reasoning, sent back with its placeholders kept (they are never restored into reasoning),
    names `<PERSON_1>` as that turn's value: this turn's values get other names."""
    messages = [{"role": "user", "content": "who wrote?"},
                {"role": "assistant", "content": "Someone did.",
                 "reasoning_content": "The mail came from <EMAIL_ADDRESS_1>."},
                {"role": "user", "content": f"was it {BOB}?"}]
    answer = _chat(gw, "in-pseudo", messages)
    assert _sent(upstream) == "was it <EMAIL_ADDRESS_2>?"
    assert answer == f"was it {BOB}?"


def test_placeholder_escaped_by_the_client_encoder_is_reserved(gw: RunningGateway, upstream: MockUpstream) -> None:
    """A client whose JSON encoder writes `<` and `>` as `\\u003c` and `\\u003e` (Go's) sends the same text."""
    raw = b'{"model": "in-pseudo", "messages": [{"role": "user", "content": ' \
          b'"and bob@example.org, not \\u003cEMAIL_ADDRESS_1\\u003e"}]}'
    response = httpx.post(gw.base_url + "/chat/completions", content=raw, timeout=30,
                          headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert _sent(upstream) == "and <EMAIL_ADDRESS_2>, not <EMAIL_ADDRESS_1>"
    assert response.json()["choices"][0]["message"]["content"] == f"and {BOB}, not <EMAIL_ADDRESS_1>"


# -- the pseudonyms on their own -------------------------------------------------------------------------------------

def test_pseudonyms_skip_reserved_names_and_keep_answer_ones() -> None:
    pseudonyms = Pseudonyms()
    # `\\u003c` in the body is a `<`; `\\\\u003c` a backslash and letters (Go-escaped JSON inside a string)
    pseudonyms.reserve(b'{"a": "see <EMAIL_ADDRESS_1> and \\u003cEMAIL_ADDRESS_3\\u003e, <PERSON_2>",'
                       b' "b": "\\\\u003cEMAIL_ADDRESS_4\\\\u003e"}')
    assert pseudonyms.placeholder("EMAIL_ADDRESS", "a@b.org") == "<EMAIL_ADDRESS_2>"
    assert pseudonyms.placeholder("EMAIL_ADDRESS", "c@d.org") == "<EMAIL_ADDRESS_4>"
    assert pseudonyms.placeholder("PERSON", "Jane") == "<PERSON_1>"
    pseudonyms.reserve(b'"again <EMAIL_ADDRESS_2>"')  # (issued already: its own, still restored)
    pseudonyms.seal()
    assert pseudonyms.placeholder("EMAIL_ADDRESS", "a@b.org") == "<EMAIL_ADDRESS_2>"  # the prompt's: the same name
    assert pseudonyms.placeholder("EMAIL_ADDRESS", "e@f.org") == "<EMAIL_ADDRESS_5>"  # the answer's own
    assert pseudonyms.restore("<EMAIL_ADDRESS_1> <EMAIL_ADDRESS_2> <EMAIL_ADDRESS_5> <PERSON_1>") == \
        "<EMAIL_ADDRESS_1> a@b.org <EMAIL_ADDRESS_5> Jane"
