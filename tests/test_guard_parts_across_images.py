"""A value split across two text parts with an image (an audio clip, a file) between them is found by the input guards.

The input guards read a message's text parts as one text (`gateway/guards/joined.py`), but a part without text ended
the run: `["my key is sk-proj-abc", <image>, "def123..."]` was checked as two texts, the key found in neither, and
both halves reached the upstream in one message. Now a part without text is passed over: the texts on either side of
it are read as one, what the guards rewrite goes back onto the text parts, and the image part goes on as sent. The mock
upstream records what it received; each case is asserted on exactly that.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
ANTHROPIC = {"x-api-key": FULL_KEY, "anthropic-version": "2023-06-01"}
KEY_START, KEY_REST = "my key is sk-proj-abc", "def123456789ghijklmnop now"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}}
BETWEEN = [[IMAGE], [AUDIO], [FILE], [IMAGE, IMAGE]]
BETWEEN_IDS = ["image", "audio", "file", "two-images"]


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
              pii: {kind: pii, action: block}
            red:
              secrets: {kind: secrets, action: redact}
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


def _sent(upstream: MockUpstream) -> list[Any]:
    """The last message the upstream received: each text part's text, each other part as it is."""
    content = upstream.requests[-1].json["messages"][-1]["content"]
    return [part["text"] if part.get("type") == "text" else part for part in content]


@pytest.mark.parametrize("between", BETWEEN, ids=BETWEEN_IDS)
def test_key_split_around_a_part_without_text_is_blocked(gw: RunningGateway, upstream: MockUpstream,
                                                         between: list[dict[str, Any]]) -> None:
    before = len(upstream.requests)
    response = _post(gw, "/chat/completions", {"model": "block", "messages": [
        {"role": "user", "content": _chat([KEY_START, *between, KEY_REST])}]})
    assert response.status_code == 400, response.text
    assert "secrets" in response.text
    assert len(upstream.requests) == before  # never sent on


def test_email_split_around_an_image_is_blocked(gw: RunningGateway, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    response = _post(gw, "/chat/completions", {"model": "block", "messages": [
        {"role": "user", "content": _chat(["write to jane.doe", IMAGE, "@gmail.com today"])}]})
    assert response.status_code == 400, response.text
    assert len(upstream.requests) == before


def test_key_split_around_an_image_is_redacted_in_its_parts(gw: RunningGateway, upstream: MockUpstream) -> None:
    """The replacement goes in the part where the key starts, its rest leaves the part after the image; the image
    part goes on as sent."""
    response = _post(gw, "/chat/completions", {"model": "red", "messages": [
        {"role": "user", "content": _chat([KEY_START, IMAGE, KEY_REST])}]})
    assert response.status_code == 200, response.text
    assert _sent(upstream) == ["my key is <OPENAI_API_KEY>", IMAGE, " now"]


def test_key_split_around_an_image_is_blocked_on_messages(gw: RunningGateway, upstream: MockUpstream) -> None:
    """A /v1/messages `image` block arrives as an `image_url` part: the text blocks around it are read as one."""
    before = len(upstream.requests)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    response = httpx.post(gw.url + "/v1/messages", headers=ANTHROPIC, timeout=30, json={
        "model": "block", "max_tokens": 64, "messages": [{"role": "user", "content": [
            {"type": "text", "text": KEY_START}, image, {"type": "text", "text": KEY_REST}]}]})
    assert response.status_code == 400, response.text
    assert len(upstream.requests) == before


def test_key_split_around_an_image_is_blocked_on_responses(gw: RunningGateway, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    response = _post(gw, "/responses", {"model": "block", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": KEY_START}, {"type": "input_image", "image_url": IMAGE["image_url"]["url"]},
        {"type": "input_text", "text": KEY_REST}]}]})
    assert response.status_code == 400, response.text
    assert len(upstream.requests) == before


def test_email_split_around_an_image_is_pseudonymized_and_restored(gw: RunningGateway,
                                                                    upstream: MockUpstream) -> None:
    response = _post(gw, "/chat/completions", {"model": "pseudo", "messages": [
        {"role": "user", "content": _chat(["mail jane.doe", IMAGE, "@gmail.com now"])}]})
    assert response.status_code == 200, response.text
    assert _sent(upstream) == ["mail <EMAIL_ADDRESS_1>", IMAGE, " now"]
    answer = response.json()["choices"][0]["message"]["content"]  # (the echo: what the upstream got, restored)
    assert "jane.doe@gmail.com" in answer and "<EMAIL_ADDRESS" not in answer


def test_a_refusal_part_still_ends_the_run(gw: RunningGateway, upstream: MockUpstream) -> None:
    """A refusal part holds a text of its own, read on its own: the text parts on either side of it stay apart."""
    parts = [{"type": "text", "text": "tell me about sk-proj-abc"}, {"type": "refusal", "refusal": "no."},
             {"type": "text", "text": "def123456789ghijklmnop"}]
    response = _post(gw, "/chat/completions", {"model": "block", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": parts},
        {"role": "user", "content": "go on"}]})
    assert response.status_code == 200, response.text


def test_parts_without_a_finding_go_on_as_sent(gw: RunningGateway, upstream: MockUpstream) -> None:
    parts = _chat(["look at", IMAGE, " this", AUDIO, " and that"])
    response = _post(gw, "/chat/completions", {"model": "red", "messages": [{"role": "user", "content": parts}]})
    assert response.status_code == 200, response.text
    assert upstream.requests[-1].json["messages"][-1]["content"] == parts


def test_value_ending_at_an_image_is_still_found(gw: RunningGateway, upstream: MockUpstream) -> None:
    """Joined, `jane.doe@gmail.com` and the `or` after the image read `gmail.comor`, no address: the text is read cut
    at the image too, as the model reads it, and each address is redacted in its part."""
    response = _post(gw, "/chat/completions", {"model": "red", "messages": [
        {"role": "user", "content": _chat(["mail jane.doe@gmail.com", IMAGE, "or john@example.org", " today"])}]})
    assert response.status_code == 200, response.text
    assert _sent(upstream) == ["mail <EMAIL_ADDRESS>", IMAGE, "or <EMAIL_ADDRESS>", " today"]


@pytest.mark.parametrize(("parts", "count"), [
    ([f"key sk-proj-{'a1B2' * 6}", IMAGE, "thanks"], 1),  # found in its stretch only: not again in the whole
    ([KEY_START, IMAGE, KEY_REST], 1),  # found across the image only
    ([f"key sk-proj-{'a1B2' * 6}", IMAGE, KEY_START, IMAGE, KEY_REST], 2),
], ids=["in-one-part", "across", "both"])
def test_each_finding_is_counted_once(gw: RunningGateway, parts: list[Any], count: int) -> None:
    response = _post(gw, "/chat/completions", {"model": "block", "messages": [
        {"role": "user", "content": _chat(parts)}]})
    assert response.status_code == 400, response.text
    assert f"secrets.block={count}" in response.headers["x-gateway-guards"]
