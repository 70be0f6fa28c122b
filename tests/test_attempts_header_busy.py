"""`x-gateway-attempts` counts requests sent (or being sent) to an upstream: a target whose local connection pool
stayed full (`busy`) sent nothing, and is no attempt, as a target that lacks a field the request uses is not one
(tests/test_routing_faults.py). The access log still lists it, with its outcome: why the walk moved on.

End to end: provider `narrow` (one connection, a 0.2 s wait for it) held by a slow stream, then a request for an
alias that lists it first; the official openai SDK reads the headers of the error when every target was busy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_routing import AUTH, MESSAGES, chat, routing_policy, target

Make = Callable[..., RunningGateway]
NARROW = "pool_size: 1, pool_timeout_s: 0.2}\n"


def _policy(upstream: MockUpstream, upstream_b: MockUpstream) -> str:
    narrow = (f'  narrow: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY, '
              + NARROW)
    narrow2 = (f'  narrow2: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY, '
               + NARROW)
    return routing_policy(upstream, upstream_b, """\
        held: {provider: narrow, model: fault-slow-stream-100}
        held2: {provider: narrow2, model: fault-slow-stream-100}
        main:
          targets: [{provider: narrow, model: mock-model}, {provider: b, model: mock-model}]
        both:
          targets: [{provider: narrow, model: mock-model}, {provider: narrow2, model: mock-model}]
        """, providers=narrow + narrow2)


@pytest.fixture
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@contextmanager
def _holding(running: RunningGateway, alias: str) -> Iterator[None]:
    """The one connection of `alias`'s provider, taken by a slow stream until the block ends."""
    with httpx.stream("POST", running.base_url + "/chat/completions", headers=AUTH, timeout=20,
                      json={"model": alias, "messages": MESSAGES, "stream": True}) as held:
        pieces = held.iter_raw()  # (kept: a dropped iterator closes the stream)
        next(pieces)
        yield


def _access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    for record in caplog.records:
        fields: dict[str, Any] = getattr(record, "fields", {})
        if record.name == "gateway.access" and fields.get("request_id") == request_id:
            return fields
    raise AssertionError(f"no access line for {request_id}")


def test_a_busy_target_is_no_attempt(make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    running = make_gateway(_policy(upstream, upstream_b))
    with _holding(running, "held"):
        response = chat(running, "main")
    assert response.status_code == 200 and target(response) == "b/mock-model"
    assert response.headers["x-gateway-fallback-reason"] == "busy"
    assert [r.model for r in upstream.requests] == ["fault-slow-stream-100"]  # nothing else reached `narrow`
    assert response.headers["x-gateway-attempts"] == "1"  # one request was sent: to b
    logged = _access_line(caplog, response.headers["x-request-id"])
    outcomes = [(a["target"], a["outcome"]) for a in logged["attempts"]]
    assert outcomes == [("narrow/mock-model", "busy"), ("b/mock-model", "ok")]  # the walk, as it went


def test_every_target_busy_is_no_attempt_at_all(make_gateway: Make, upstream: MockUpstream,
                                                upstream_b: MockUpstream) -> None:
    running = make_gateway(_policy(upstream, upstream_b))
    client = openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0)
    with _holding(running, "held"), _holding(running, "held2"), pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="both", messages=MESSAGES)  # type: ignore[arg-type]
    assert failed.value.status_code == 503 and failed.value.code == "gateway_busy"
    assert failed.value.response.headers["x-gateway-attempts"] == "0"
    assert [r.model for r in upstream.requests] == ["fault-slow-stream-100"] * 2
