"""A body of millions of arrays is refused before it is decoded, not decoded and walked on the event loop.

A ~4 MiB body of empty arrays nested 126 deep (within the depth limit), repeated, held the event loop for
seconds: 0.8 s to decode its 2 million lists, as long again to walk them for their depth, every other request
of the process waiting (a `/healthz` 3.8 s). Its `[` and `{` are counted first now (`stages.check_containers`,
only for a body long enough to hold more than `MAX_JSON_CONTAINERS`): more than that is a 400.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from gateway.errors import InvalidRequest
from gateway.pipeline import stages
from gateway.pipeline.stages import MAX_JSON_CONTAINERS, TOO_MANY_CONTAINERS, check_containers, decode_body
from gateway.schemas.endpoints import Endpoint
from tests.conftest import FULL_KEY, RunningGateway

AUTH = {"Authorization": f"Bearer {FULL_KEY}", "Content-Type": "application/json"}
_UNIT = b"[" * 125 + b"]" * 125  # with the body's object and `x`: 127 deep, within the limit of 128


def _nested(size: int, head: bytes = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], ') -> bytes:
    """The hunter's body, `size` bytes or so: arrays nested 125 deep, repeated."""
    return head + b'"x": [' + b",".join([_UNIT] * (size // (len(_UNIT) + 1))) + b"]}"


def _flat(containers: int) -> bytes:
    """A body of exactly `containers` arrays and objects: its object, `x`, and empty arrays in it."""
    return b'{"x": [' + b",".join([b"[]"] * (containers - 2)) + b"]}"


def _count(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(_count(item) for item in value.values())
    if isinstance(value, list):
        return 1 + sum(_count(item) for item in value)
    return 0


def test_the_count_refuses_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(raw: bytes) -> Any:
        raise AssertionError("decoded")

    monkeypatch.setattr(stages, "_decode_json", never)
    with pytest.raises(InvalidRequest, match="more than 50000 arrays and objects"):
        decode_body(_nested(4 * 1024 * 1024), Endpoint.CHAT)


def test_the_limit_is_exact_and_counts_structure_not_brackets() -> None:
    check_containers(_flat(MAX_JSON_CONTAINERS))
    with pytest.raises(InvalidRequest) as refused:
        check_containers(_flat(MAX_JSON_CONTAINERS + 1))
    assert refused.value.message == TOO_MANY_CONTAINERS
    # brackets inside strings are no arrays: escaped quotes and backslashes do not end a string, `\\` before a
    # quote does
    texts = ["[{" * 60_000, '\\"[[' * 30_000, '\\\\' + "[" * 70_000, 'a\\"b\\\\"c[{' * 20_000]
    for text in texts:
        raw = json.dumps({"model": "chat", "messages": [{"role": "user", "content": text}], "tags": [text, [text]],
                          "nested": [[[]] * 1_000]}).encode()
        assert raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS  # told apart, not only counted
        assert stages._containers(raw) == _count(json.loads(raw)) == 1_007
        decode_body(raw, Endpoint.CHAT)


def test_the_largest_real_bodies_pass() -> None:
    """2,048 embedding inputs as token arrays; a long conversation with tools."""
    embeddings = json.dumps({"model": "embed", "input": [list(range(100)) for _ in range(2_048)]}).encode()
    decode_body(embeddings, Endpoint.EMBEDDINGS)
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "array", "items": {"type": "string"}} for i in range(20)}}}}
    turns = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}]} for i in range(2_000)]
    chat = json.dumps({"model": "chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                                                     *turns], "tools": [tool] * 128}).encode()
    assert len(chat) > 2 * MAX_JSON_CONTAINERS
    decode_body(chat, Endpoint.CHAT)


def test_the_hunters_body_is_a_400_and_the_gateway_keeps_answering(gateway: RunningGateway) -> None:
    body = _nested(1_000_000)  # the test policy's limit is 1 MiB: half a million arrays
    answers: list[int] = []

    def probe() -> None:
        answers.append(httpx.get(gateway.url + "/healthz", timeout=30).status_code)

    prober = threading.Thread(target=probe)
    prober.start()
    response = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=body, timeout=30)
    prober.join(30)
    assert response.status_code == 400, response.text[:200]
    assert response.json()["error"]["message"] == TOO_MANY_CONTAINERS
    assert answers == [200]
    messages = httpx.post(gateway.url + "/v1/messages", content=_nested(1_000_000, b'{"model": "chat", '
                          b'"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], '),
                          headers={"x-api-key": FULL_KEY, "content-type": "application/json"}, timeout=30)
    assert messages.status_code == 400 and TOO_MANY_CONTAINERS in messages.text
    ok = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, timeout=30,
                    json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
