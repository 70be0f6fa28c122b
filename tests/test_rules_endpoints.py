"""Rule conditions read each endpoint's own fields: a Responses request's `instructions`, `input` items and their
parts, `input_image` parts and `text.format`; a completion's prompt given as token ids.

Each alias below has one rule on one condition that sends it to `big` (provider b); the target header says which
way the request went. A chat request's facts are tested in `test_routing.py`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_routing import AUTH, routing_policy

LONG = "word " * 400  # about 400 tokens: over the rules' 100
SMALL, BIG = "a/mock-model", "b/mock-model"
# No fault here needs a short timeout: a 1 s first byte once cut a loaded suite's request off with a 504
PATIENT = "timeouts: {connect_s: 5, first_byte_s: 20, idle_s: 20, total_s: 30}"
IMAGE = "data:image/png;base64,iVBORw0KGgo="

RULES = """\
rules:
  - {name: long, when: {alias: [long], prompt_tokens_over: 100}, alias: big}
  - {name: images, when: {alias: [images], has_images: true}, alias: big}
  - {name: json, when: {alias: [json], json_response: true}, alias: big}
"""


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture
def gateway(make_gateway: Any, upstream: MockUpstream, upstream_b: MockUpstream) -> RunningGateway:
    running: RunningGateway = make_gateway(routing_policy(upstream, upstream_b, """\
        long: {provider: a, model: mock-model}
        images: {provider: a, model: mock-model}
        json: {provider: a, model: mock-model}
        big: {provider: b, model: mock-model}
        """, extra=RULES, timeouts=PATIENT))
    return running


def target(gateway: RunningGateway, path: str, body: dict[str, Any]) -> str:
    response = httpx.post(gateway.base_url + path, headers=AUTH, timeout=30, json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-gateway-target"]


def responses(gateway: RunningGateway, model: str, input_: object, **extra: object) -> str:
    return target(gateway, "/responses", {"model": model, "input": input_, **extra})


@pytest.mark.parametrize("content", [LONG, [{"type": "input_text", "text": LONG}]], ids=["text", "parts"])
def test_a_long_responses_item_list_is_a_long_prompt(gateway: RunningGateway, content: object) -> None:
    assert responses(gateway, "long", [{"role": "user", "content": "hello"}]) == SMALL
    # the same 400 tokens as a message item were counted as 1 token
    assert responses(gateway, "long", [{"role": "user", "content": content}]) == BIG


def test_long_responses_instructions_make_a_long_prompt(gateway: RunningGateway) -> None:
    assert responses(gateway, "long", "hello", instructions="be brief") == SMALL
    assert responses(gateway, "long", "hello", instructions=LONG) == BIG


def test_a_function_call_output_item_counts_its_output(gateway: RunningGateway) -> None:
    items = [{"role": "user", "content": "look it up"},
             {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": LONG}]
    assert responses(gateway, "long", items) == BIG


def test_a_completion_prompt_of_token_ids_is_counted_by_its_ids(gateway: RunningGateway) -> None:
    assert target(gateway, "/completions", {"model": "long", "prompt": [[1] * 10]}) == SMALL
    assert target(gateway, "/completions", {"model": "long", "prompt": [[1] * 400]}) == BIG


def test_has_images_sees_a_responses_input_image(gateway: RunningGateway) -> None:
    text = {"type": "input_text", "text": "what is this"}
    assert responses(gateway, "images", [{"role": "user", "content": [text]}]) == SMALL
    image = {"type": "input_image", "image_url": IMAGE}
    assert responses(gateway, "images", [{"role": "user", "content": [text, image]}]) == BIG


@pytest.mark.parametrize("text_format", [
    {"type": "json_object"},
    {"type": "json_schema", "name": "answer", "schema": {"type": "object", "properties": {}}},
], ids=["json_object", "json_schema"])
def test_json_response_sees_the_responses_text_format(gateway: RunningGateway, text_format: object) -> None:
    assert responses(gateway, "json", "give me json", text={"format": {"type": "text"}}) == SMALL
    assert responses(gateway, "json", "give me json", text={"format": text_format}) == BIG
