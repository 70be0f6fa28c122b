"""End to end through the official `openai` SDK: gateway on a real port, mock upstream behind it."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, LIMITED_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

MESSAGES = [{"role": "user", "content": "Say hello to the gateway"}]


def client(gateway: RunningGateway, key: str = FULL_KEY, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, **kwargs)  # type: ignore[arg-type]


def test_chat_completion(gateway: RunningGateway, upstream: MockUpstream) -> None:
    result = client(gateway).chat.completions.create(model="chat", messages=MESSAGES)  # type: ignore[arg-type]
    assert result.choices[0].message.content == upstream.reply_text
    assert result.usage is not None and result.usage.completion_tokens == 20
    assert result.usage.total_tokens == result.usage.prompt_tokens + 20
    sent = upstream.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["model"] == "mock-model"  # alias mapped to the upstream's name
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the gateway's credential, not the client's
    assert sent.headers["x-gateway-test"] == "yes"
    assert FULL_KEY not in str(sent.headers)


def test_streamed_chat_reassembles_text_and_usage(gateway: RunningGateway, upstream: MockUpstream) -> None:
    stream = client(gateway).chat.completions.create(
        model="chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == upstream.reply_text
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 20
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}


def test_stream_without_usage_request_hides_the_usage_chunk(gateway: RunningGateway, upstream: MockUpstream) -> None:
    with httpx.stream("POST", gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": "chat", "messages": MESSAGES, "stream": True}) as response:
        body = response.read().decode()
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in body.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert '"choices":[]' not in body.replace(" ", "")  # the usage-only chunk was for accounting only
    # ...but the gateway asked the upstream for it, so it can count tokens
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
    assert 'gateway_tokens_total{kind="completion",model="chat"}' in gateway.metrics()


def test_completions_plain_and_streamed(gateway: RunningGateway, upstream: MockUpstream) -> None:
    api = client(gateway)
    result = api.completions.create(model="chat", prompt="Once upon a time")
    assert result.choices[0].text == upstream.reply_text
    pieces = [c.choices[0].text for c in api.completions.create(model="chat", prompt="Once", stream=True) if c.choices]
    assert "".join(pieces) == upstream.reply_text


def test_embeddings_float_and_base64(gateway: RunningGateway) -> None:
    api = client(gateway)
    as_floats = api.embeddings.create(model="embed", input=["alpha", "beta"], encoding_format="float")
    as_base64 = api.embeddings.create(model="embed", input=["alpha", "beta"])  # the SDK asks for base64
    assert len(as_floats.data) == 2
    assert [d.embedding for d in as_floats.data] == [d.embedding for d in as_base64.data]
    assert as_floats.usage.prompt_tokens > 0


def test_models_list_and_retrieve_follow_the_key(gateway: RunningGateway) -> None:
    full = {m.id for m in client(gateway).models.list()}
    assert {"chat", "embed", "demo", "fault-status-500"} <= full
    limited = [m.id for m in client(gateway, LIMITED_KEY).models.list()]
    assert limited == ["chat"]
    assert client(gateway).models.retrieve("embed").id == "embed"
    with pytest.raises(openai.NotFoundError):
        client(gateway, LIMITED_KEY).models.retrieve("embed")


def test_demo_model_through_the_sdk(gateway: RunningGateway) -> None:
    api = client(gateway)
    result = api.chat.completions.create(model="demo", messages=MESSAGES)  # type: ignore[arg-type]
    content = result.choices[0].message.content or ""
    assert "demo model" in content and "Say hello to the gateway" in content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in api.chat.completions.create(model="demo", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        if c.choices
    )
    assert streamed == content
    assert result.usage is not None and result.usage.prompt_tokens > 0


def test_fields_the_gateway_does_not_interpret_are_forwarded(gateway: RunningGateway, upstream: MockUpstream) -> None:
    extra = {
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "seed": 7,
        "logprobs": True,
        "n": 2,
        "a_field_from_the_future": {"nested": [1, 2, 3]},
    }
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]}]
    response = httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                          json={"model": "chat", "messages": messages, **extra})
    assert response.status_code == 200
    assert len(response.json()["choices"]) == 2
    sent = upstream.requests[-1].json
    for field, value in extra.items():
        assert sent[field] == value
    assert sent["messages"] == messages


def test_request_id_is_echoed_or_made(gateway: RunningGateway, upstream: MockUpstream) -> None:
    headers = {"Authorization": f"Bearer {FULL_KEY}"}
    body = {"model": "chat", "messages": MESSAGES}
    given = httpx.post(gateway.base_url + "/chat/completions", headers={**headers, "x-request-id": "abc-123"},
                       json=body)
    assert given.headers["x-request-id"] == "abc-123"
    assert upstream.requests[-1].headers["x-request-id"] == "abc-123"
    insane = httpx.post(gateway.base_url + "/chat/completions",
                        headers={**headers, "x-request-id": "bad id\twith spaces"}, json=body)
    assert insane.headers["x-request-id"].startswith("req_")
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/nowhere"):
        assert httpx.get(gateway.url + path, headers=headers).headers["x-request-id"]
    error = httpx.post(gateway.base_url + "/chat/completions", json=body)
    assert error.status_code == 401 and error.headers["x-request-id"].startswith("req_")


def test_access_log_has_the_facts_and_no_prompt_or_key(make_gateway, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    running = make_gateway(access_log="true")
    secret_prompt = "my passport number is X1234567"
    with caplog.at_level("INFO", logger="gateway.access"):
        client(running).chat.completions.create(model="chat", messages=[{"role": "user", "content": secret_prompt}])
        with pytest.raises(openai.NotFoundError):
            client(running).chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    records = [r for r in caplog.records if r.name == "gateway.access"]
    assert len(records) == 2
    fields = records[0].fields  # type: ignore[attr-defined]
    assert fields["model"] == "chat" and fields["tenant"] == "acme" and fields["status"] == 200
    assert fields["prompt_tokens"] > 0 and fields["request_id"].startswith("req_")
    assert records[1].fields["status"] == 404 and records[1].fields["model"] == "unknown"  # type: ignore[attr-defined]
    logged = " ".join(str(r.__dict__) for r in caplog.records)
    assert secret_prompt not in logged and FULL_KEY not in logged and UPSTREAM_KEY not in logged


def test_azure_style_provider_sends_query_and_api_key_header(make_gateway) -> None:  # type: ignore[no-untyped-def]
    with MockUpstream(api_key=None) as azure:
        text = f"""\
version: 1
auth: none
providers:
  azure:
    kind: openai
    base_url: {azure.base_url}
    query: {{api-version: "2024-10-21"}}
    api_key_env: AZURE_KEY
    api_key_header: api-key
models:
  gpt-4o: {{provider: azure, model: gpt-4o}}
"""
        running = make_gateway(text, env={"AZURE_KEY": "azure-secret-value"})
        answer = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == azure.reply_text
        sent = azure.requests[-1]
        assert sent.path == "/v1/chat/completions"
        assert sent.query == {"api-version": "2024-10-21"}
        assert sent.headers["api-key"] == "azure-secret-value"
        assert "authorization" not in sent.headers
