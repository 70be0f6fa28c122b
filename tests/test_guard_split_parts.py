"""A value split across the text parts of one message is found by the input guards (`gateway/guards/joined.py`).

The model reads a message's text parts as one text, joined as they are. Each part was checked on its own, so a key,
a denied term, a card number or an address cut in two (`["key AKIAZ3MQ", "7XJ4K2PLW9QA"]`) was found in neither
part and reached the upstream whole. Now adjacent text parts are checked as one text: a block blocks, and a
rewrite (redact, pseudonymize) rewrites each part's piece of the finding, so that no piece of it is sent on. The
mock upstream records what it received; each case is asserted on exactly that.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.guards.base import Finding
from gateway.guards.joined import TEXT, Joined
from gateway.guards.pseudonyms import Pseudonyms
from gateway.guards.verdict import apply
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
KEY = "AKIAZ3MQ7XJ4K2PLW9QA"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    text = policy_text(upstream.base_url) + textwrap.dedent("""\
          block: {provider: mock, model: mock-model}
          red: {provider: mock, model: mock-model}
          pseudo: {provider: mock, model: fault-echo}
        guards:
          models:
            block:
              secrets: {kind: secrets, action: block}
              deny: {kind: denylist, terms: [project falcon]}
              pii: {kind: pii, action: block}
            red:
              secrets: {kind: secrets, action: redact}
              deny: {kind: denylist, terms: [project falcon], action: redact}
              pii: {kind: pii, action: redact}
            pseudo:
              pii: {kind: pii, action: pseudonymize, entities: {EMAIL_ADDRESS: {}}}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.base_url + path, headers=AUTH, json=body, timeout=30)


def _chat(parts: list[Any]) -> list[dict[str, Any]]:
    return [part if isinstance(part, dict) else {"type": "text", "text": part} for part in parts]


def _sent_parts(upstream: MockUpstream) -> list[Any]:
    """The text of each part of the last message the upstream received (None for a part without text)."""
    content = upstream.requests[-1].json["messages"][-1]["content"]
    return [part.get("text") for part in content]


SPLIT_BLOCKED = [
    ["key AKIAZ3MQ", "7XJ4K2PLW9QA"],
    ["tell me about project", " falcon"],
    ["card 4111 1111", " 1111 1111"],
    ["mail jane.doe", "@gmail.com"],
    ["key AKIA", "Z3MQ7XJ4", "K2PLW9QA now"],
]
SPLIT_IDS = ["secret", "denylist", "card", "email", "secret-three-parts"]


@pytest.mark.parametrize("parts", SPLIT_BLOCKED, ids=SPLIT_IDS)
def test_split_value_is_blocked_on_chat(gw: RunningGateway, upstream: MockUpstream, parts: list[str]) -> None:
    before = len(upstream.requests)
    response = _post(gw, "/chat/completions", {"model": "block", "messages": [
        {"role": "user", "content": _chat(parts)}]})
    assert response.status_code == 400, response.text
    assert len(upstream.requests) == before  # never sent on
    whole = _post(gw, "/chat/completions", {"model": "block", "messages": [
        {"role": "user", "content": _chat(["".join(parts)])}]})
    assert whole.status_code == 400  # one part: as before
    assert len(upstream.requests) == before


@pytest.mark.parametrize("parts", SPLIT_BLOCKED, ids=SPLIT_IDS)
def test_split_value_is_blocked_on_messages(gw: RunningGateway, upstream: MockUpstream, parts: list[str]) -> None:
    before = len(upstream.requests)
    response = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": FULL_KEY, "anthropic-version": "2023-06-01"},
                          json={"model": "block", "max_tokens": 64, "messages": [
                              {"role": "user", "content": [{"type": "text", "text": part} for part in parts]}]},
                          timeout=30)
    assert response.status_code == 400, response.text
    assert len(upstream.requests) == before


@pytest.mark.parametrize("parts", SPLIT_BLOCKED, ids=SPLIT_IDS)
def test_split_value_is_blocked_on_responses(gw: RunningGateway, upstream: MockUpstream, parts: list[str]) -> None:
    before = len(upstream.requests)
    response = _post(gw, "/responses", {"model": "block", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": part} for part in parts]}]})
    assert response.status_code == 400, response.text
    assert len(upstream.requests) == before


def test_split_tool_output_parts_are_blocked_on_responses(gw: RunningGateway, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    response = _post(gw, "/responses", {"model": "block", "input": [
        {"type": "function_call", "call_id": "c1", "name": "read", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "aws_access_key_id = AKIAZ3MQ"},
            {"type": "input_text", "text": "7XJ4K2PLW9QA"}]}]})
    assert response.status_code == 400, response.text
    assert len(upstream.requests) == before


def test_parts_without_a_finding_go_on_as_sent(gw: RunningGateway, upstream: MockUpstream) -> None:
    parts = ["tell me about project", " sparrow", IMAGE, "and the falcon"]
    response = _post(gw, "/chat/completions", {"model": "block", "messages": [
        {"role": "user", "content": _chat(parts)}]})
    assert response.status_code == 200, response.text
    assert upstream.requests[-1].json["messages"][-1]["content"] == _chat(parts)


def test_separate_prompts_stay_separate(gw: RunningGateway, upstream: MockUpstream) -> None:
    """A completion's prompts are separate texts (each its own completion): never joined."""
    response = _post(gw, "/completions", {"model": "block", "prompt": ["tell me about project", " falcon"]})
    assert response.status_code == 200, response.text
    assert upstream.requests[-1].json["prompt"] == ["tell me about project", " falcon"]


@pytest.mark.parametrize(("parts", "sent"), [
    (["mail jane.doe", "@gmail.com please"], ["mail <EMAIL_ADDRESS>", " please"]),
    (["mail jane", ".doe@gmail", ".com now"], ["mail <EMAIL_ADDRESS>", "", " now"]),
    (["key AKIAZ3MQ", "7XJ4K2PLW9QA ok"], None),
    (["about project", " falcon, and jane.doe", "@gmail.com"], ["about <DENIED_TERM>", ", and <EMAIL_ADDRESS>", ""]),
    (["card 4111 1111", " 1111 1111 thanks"], ["card <CREDIT_CARD>", " thanks"]),
    (["mail jane.doe@gmail.com", " now"], ["mail <EMAIL_ADDRESS>", " now"]),
], ids=["email-two-parts", "email-three-parts", "secret", "denylist-and-email", "card", "whole-in-one-part"])
def test_split_value_is_redacted_in_every_part(gw: RunningGateway, upstream: MockUpstream, parts: list[str],
                                               sent: list[str] | None) -> None:
    whole = _post(gw, "/chat/completions", {"model": "red", "messages": [
        {"role": "user", "content": _chat(["".join(parts)])}]})
    assert whole.status_code == 200, whole.text
    redacted = _sent_parts(upstream)[0]
    assert redacted != "".join(parts)
    response = _post(gw, "/chat/completions", {"model": "red", "messages": [
        {"role": "user", "content": _chat(parts)}]})
    assert response.status_code == 200, response.text
    received = _sent_parts(upstream)
    assert len(received) == len(parts)
    assert "".join(received) == redacted  # the parts joined: the text redacted as one
    if sent is not None:
        assert received == sent
    assert KEY[:8] not in "".join(received) and "7XJ4K2PLW9QA" not in "".join(received)


def test_redaction_ends_at_an_image(gw: RunningGateway, upstream: MockUpstream) -> None:
    """Text parts apart from each other are read apart; each one's own findings are still redacted."""
    parts = ["mail jane.doe@gmail.com", IMAGE, "or john@example.org", " today"]
    response = _post(gw, "/chat/completions", {"model": "red", "messages": [
        {"role": "user", "content": _chat(parts)}]})
    assert response.status_code == 200, response.text
    assert _sent_parts(upstream) == ["mail <EMAIL_ADDRESS>", None, "or <EMAIL_ADDRESS>", " today"]


def test_split_value_is_redacted_on_messages(gw: RunningGateway, upstream: MockUpstream) -> None:
    response = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": FULL_KEY, "anthropic-version": "2023-06-01"},
                          json={"model": "red", "max_tokens": 64, "messages": [{"role": "user", "content": [
                              {"type": "text", "text": "mail jane"}, {"type": "text", "text": ".doe@gmail"},
                              {"type": "text", "text": ".com now"}]}]}, timeout=30)
    assert response.status_code == 200, response.text
    assert _sent_parts(upstream) == ["mail <EMAIL_ADDRESS>", "", " now"]


def test_split_value_is_redacted_on_responses(gw: RunningGateway, upstream: MockUpstream) -> None:
    response = _post(gw, "/responses", {"model": "red", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "mail jane.doe"}, {"type": "input_text", "text": "@gmail.com please"}]}]})
    assert response.status_code == 200, response.text
    content = upstream.requests[-1].json["input"][0]["content"]
    assert [part["text"] for part in content] == ["mail <EMAIL_ADDRESS>", " please"]


def test_split_value_is_pseudonymized_and_restored(gw: RunningGateway, upstream: MockUpstream) -> None:
    parts = ["mail jane.doe", "@gmail.com and", " jane.doe@gmail.com again, and bob@example.", "org"]
    response = _post(gw, "/chat/completions", {"model": "pseudo", "messages": [
        {"role": "user", "content": _chat(parts)}]})
    assert response.status_code == 200, response.text
    assert _sent_parts(upstream) == ["mail <EMAIL_ADDRESS_1>", " and",
                                     " <EMAIL_ADDRESS_1> again, and <EMAIL_ADDRESS_2>", ""]
    answer = response.json()["choices"][0]["message"]["content"]  # (the echo: what the upstream got, restored)
    assert "jane.doe@gmail.com" in answer and "bob@example.org" in answer and "<EMAIL_ADDRESS" not in answer


def test_split_value_is_pseudonymized_on_responses(gw: RunningGateway, upstream: MockUpstream) -> None:
    response = _post(gw, "/responses", {"model": "pseudo", "store": False, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "mail jane"}, {"type": "input_text", "text": ".doe@gmail"},
        {"type": "input_text", "text": ".com now"}]}]})
    assert response.status_code == 200, response.text
    content = upstream.requests[-1].json["input"][0]["content"]
    assert [part["text"] for part in content] == ["mail <EMAIL_ADDRESS_1>", "", " now"]


# -- the write-back, on its own (pure logic: `Joined.rewrite` against `verdict.apply`) -----------------------------

def _finding(kind: str, start: int, end: int, action: str) -> Finding:
    return Finding("g", kind, start, end, 1.0, "test", action)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "findings", "covered"), [
    ("mail jane.doe@gmail.com and bob@example.org now", [("EMAIL_ADDRESS", 5, 23, "pseudonymize"),
                                                         ("EMAIL_ADDRESS", 28, 43, "redact")], [(5, 23), (28, 43)]),
    ('{"card": 4111111111111111, "to": "x"}', [("CREDIT_CARD", 13, 25, "redact")], [(9, 25)]),  # a JSON number: whole
    ("keep <EMAIL_ADDRESS_1> and card 4111 1111 1111 1111", [("EMAIL_ADDRESS", 5, 22, "redact"),
                                                             ("CREDIT_CARD", 32, 51, "mask")], [(32, 51)]),
    ("overlap abcdefghij end", [("A", 8, 14, "redact"), ("B", 10, 18, "redact"), ("C", 0, 3, "block")], [(10, 18)]),
], ids=["two-findings", "json-number", "placeholder-kept", "overlap"])
def test_rewrite_is_apply_at_every_split(text: str, findings: list[tuple[str, int, int, str]],
                                         covered: list[tuple[int, int]]) -> None:
    """At every pair of cut points, the parts joined are `apply`'s text, each kept character stays in its part, and
    no part keeps a character of a replaced span."""
    found = [_finding(*f) for f in findings]
    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1, 3):
            pieces = [text[:first], text[first:second], text[second:]]
            pseudonyms = Pseudonyms()
            new = apply(text, found, pseudonyms)
            joined = Joined([{"type": "text", "text": piece} for piece in pieces])
            assert joined[TEXT] == text
            joined.rewrite(new, found, pseudonyms)
            written = [part[TEXT] for part in joined.parts]
            assert "".join(written) == new
            at = 0
            for piece, out in zip(pieces, written, strict=True):  # what no rewriting finding covers stays in its part
                kept = [c for offset, c in enumerate(piece, at)
                        if not any(start <= offset < end for start, end in covered)]
                assert _subsequence(kept, out), (pieces, written)
                at += len(piece)
            assert all(KEY not in out for out in written)


def _subsequence(wanted: list[str], text: str) -> bool:
    rest = iter(text)
    return all(c in rest for c in wanted)
