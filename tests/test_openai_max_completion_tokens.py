"""A chat request's output cap goes to OpenAI's own API as `max_completion_tokens`.

OpenAI's reasoning models (o1, o3, o4-mini, gpt-5) refuse `max_tokens` ("Unsupported parameter: 'max_tokens' ...
Use 'max_completion_tokens' instead"), and OpenAI takes `max_completion_tokens` for every chat model. Behind an alias
a client cannot know which model answers, and a `/v1/messages` client's `max_tokens` becomes chat's `max_tokens`. So
a provider whose base_url is OpenAI's API sends the cap as `max_completion_tokens`; other OpenAI-compatible servers
(Ollama, LM Studio, older vLLM) know only `max_tokens` and get it unchanged; an Azure provider can choose
(`azure.max_tokens_field`). The mock upstream records what it was sent: a provider compiled for api.openai.com is
pointed at it, its choice made at compile time as for the real host.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import anthropic
import openai
import pytest

from gateway.auth.keys import hash_key
from gateway.policy import compile_text
from gateway.providers.base import Call
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.schemas.endpoints import Endpoint
from gateway.upstream.client import ConnectionGate
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

UPSTREAM_KEY = "sk-upstream-test"  # the mock's own


def provider_policy(kind: str, base_url: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          up:
            kind: {kind}
            base_url: "{base_url}"
            api_key_env: UP_KEY
        {extra}
        models:
          chat: {{provider: up, model: m}}
        """)


def sent(upstream: MockUpstream) -> dict[str, Any]:
    body = upstream.requests[-1].json
    assert isinstance(body, dict)
    return body


@pytest.mark.parametrize(("kind", "base_url", "field"), [
    ("openai", "https://api.openai.com/v1", "max_completion_tokens"),
    ("openai", "https://us.api.openai.com/v1", "max_completion_tokens"),  # OpenAI's data residency hosts
    ("openai", "http://localhost:11434/v1", "max_tokens"),  # Ollama
    ("openai", "http://vllm.internal:8000/v1", "max_tokens"),
    ("openai", "https://api.groq.com/openai/v1", "max_tokens"),
    ("openai", "https://openai.com.example.net/v1", "max_tokens"),  # not OpenAI's host
    ("azure", "https://res.openai.azure.com", "max_tokens"),
])
def test_the_field_is_chosen_once_by_host(kind: str, base_url: str, field: str) -> None:
    config = compile_text(provider_policy(kind, base_url), "p.yaml", {"UP_KEY": UPSTREAM_KEY}).providers["up"]
    assert getattr(config.options, "max_tokens_field", None) == field


async def test_a_provider_for_openais_api_sends_max_completion_tokens(upstream: MockUpstream) -> None:
    """The provider compiled for api.openai.com, pointed at the mock: chat's cap is renamed (the client's own
    `max_completion_tokens` kept when it sent both: never both); completions and responses are left as they are."""
    config = compile_text(provider_policy("openai", "https://api.openai.com/v1"), "p.yaml",
                          {"UP_KEY": UPSTREAM_KEY}).providers["up"]
    provider = OpenAICompatProvider(replace(config, base_url=upstream.base_url), ConnectionGate("up", 4, 5.0, None))
    await provider.start()
    try:
        messages = [{"role": "user", "content": "hi"}]
        await provider.complete(Call(Endpoint.CHAT, {"model": "m", "messages": messages, "max_tokens": 7}, False, "r1"))
        body = sent(upstream)
        assert body["max_completion_tokens"] == 7 and "max_tokens" not in body and body["messages"] == messages
        both = {"model": "m", "messages": messages, "max_tokens": 7, "max_completion_tokens": 9}
        await provider.complete(Call(Endpoint.CHAT, both, False, "r2"))
        assert sent(upstream)["max_completion_tokens"] == 9 and "max_tokens" not in sent(upstream)
        assert both["max_tokens"] == 7  # the client's body itself is not changed (a fallback target reads it)
        null = {"model": "m", "messages": messages, "max_tokens": 5, "max_completion_tokens": None}
        await provider.complete(Call(Endpoint.CHAT, null, False, "r3"))  # (the cap accounting read: 5)
        assert sent(upstream)["max_completion_tokens"] == 5 and "max_tokens" not in sent(upstream)
        streamed = {**both, "max_completion_tokens": None, "stream": True}
        stream = await provider.open_stream(Call(Endpoint.CHAT, streamed, True, "r4"))
        async for _ in stream:
            pass
        assert sent(upstream)["max_completion_tokens"] == 7 and "max_tokens" not in sent(upstream)
        await provider.complete(Call(Endpoint.COMPLETIONS, {"model": "m", "prompt": "hi", "max_tokens": 7}, False,
                                     "r5"))
        assert sent(upstream)["max_tokens"] == 7 and "max_completion_tokens" not in sent(upstream)
    finally:
        await provider.close()


@pytest.fixture(scope="module")
def gateways() -> Iterator[tuple[MockUpstream, RunningGateway]]:
    """An Azure provider that chose `max_completion_tokens`, and an OpenAI-compatible one left as it is, both on the
    mock upstream."""
    with MockUpstream(api_key=UPSTREAM_KEY) as upstream:
        running = RunningGateway(textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              azure:
                kind: azure
                base_url: "http://127.0.0.1:{upstream.port}"
                api_key_env: UP_KEY
                azure: {{max_tokens_field: max_completion_tokens}}
              local: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: UP_KEY}}
            models:
              reasoning: {{provider: azure, model: o4-mini}}
              local: {{provider: local, model: llama}}
            """), {"UP_KEY": UPSTREAM_KEY}).start()
        try:
            yield upstream, running
        finally:
            running.stop()


def test_a_messages_clients_max_tokens_reaches_a_reasoning_deployment_as_max_completion_tokens(
        gateways: tuple[MockUpstream, RunningGateway]) -> None:
    upstream, running = gateways
    with anthropic.Anthropic(base_url=running.url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        answer = client.messages.create(model="reasoning", max_tokens=12, messages=[{"role": "user", "content": "hi"}])
        assert answer.content and answer.usage.output_tokens > 0
        body = sent(upstream)
        assert upstream.requests[-1].path.startswith("/openai/deployments/o4-mini/")
        assert body["max_completion_tokens"] == 12 and "max_tokens" not in body
        client.messages.create(model="local", max_tokens=12, messages=[{"role": "user", "content": "hi"}])
        body = sent(upstream)  # an OpenAI-compatible server elsewhere: as the client sent it
        assert body["max_tokens"] == 12 and "max_completion_tokens" not in body
    with openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        sdk.chat.completions.create(model="reasoning", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert sent(upstream)["max_completion_tokens"] == 3 and "max_tokens" not in sent(upstream)

