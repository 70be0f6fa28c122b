"""The gateway's responses validate against OpenAI's own OpenAPI spec (../shared/openai-openapi)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import FULL_KEY, RunningGateway
from tests.support.openapi_spec import validate

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = [{"role": "user", "content": "hello"}]


def post(gateway: RunningGateway, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(gateway.base_url + path, headers=AUTH, json=body, timeout=20)


def stream_chunks(gateway: RunningGateway, body: dict[str, object], path: str = "/chat/completions",
                  ) -> list[dict[str, Any]]:
    with httpx.stream("POST", gateway.base_url + path, headers=AUTH, json=body) as response:
        text = response.read().decode()
    payloads = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize("model", ["chat", "demo"])
def test_chat_completion_matches_the_spec(gateway: RunningGateway, model: str) -> None:
    response = post(gateway, "/chat/completions", {"model": model, "messages": MESSAGES})
    validate("CreateChatCompletionResponse", response.json())


@pytest.mark.parametrize("model", ["chat", "demo"])
def test_stream_chunks_match_the_spec(gateway: RunningGateway, model: str) -> None:
    chunks = stream_chunks(gateway, {"model": model, "messages": MESSAGES, "stream": True,
                                     "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)


@pytest.mark.parametrize("model", ["chat", "demo"])
def test_completion_matches_the_spec(gateway: RunningGateway, model: str) -> None:
    validate("CreateCompletionResponse", post(gateway, "/completions", {"model": model, "prompt": "hi"}).json())


@pytest.mark.parametrize("model", ["embed", "demo"])
def test_embeddings_match_the_spec(gateway: RunningGateway, model: str) -> None:
    body = post(gateway, "/embeddings", {"model": model, "input": ["a", "b"], "encoding_format": "float"}).json()
    validate("CreateEmbeddingResponse", body)


def test_models_match_the_spec(gateway: RunningGateway) -> None:
    listing = httpx.get(gateway.base_url + "/models", headers=AUTH).json()
    validate("ListModelsResponse", listing)
    validate("Model", httpx.get(gateway.base_url + "/models/chat", headers=AUTH).json())


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/chat/completions", {"model": "chat"}, AUTH),
        ("/chat/completions", {"model": "chat", "messages": MESSAGES}, {}),
        ("/chat/completions", {"model": "nope", "messages": MESSAGES}, AUTH),
        ("/chat/completions", {"model": "fault-status-500", "messages": MESSAGES}, AUTH),
        ("/chat/completions", {"model": "fault-status-429", "messages": MESSAGES}, AUTH),
        ("/embeddings", {"model": "embed"}, AUTH),
    ],
)
def test_error_bodies_match_the_spec(gateway: RunningGateway, path: str, body: dict[str, object],
                                     headers: dict[str, str]) -> None:
    response = httpx.post(gateway.base_url + path, headers=headers, json=body, timeout=20)
    assert 400 <= response.status_code < 600
    validate("ErrorResponse", response.json())


def test_mid_stream_error_event_matches_the_spec(gateway: RunningGateway) -> None:
    with httpx.stream("POST", gateway.base_url + "/chat/completions", headers=AUTH, timeout=20,
                      json={"model": "fault-reset-after-3", "messages": MESSAGES, "stream": True}) as response:
        last = [e for e in response.read().decode().split("\n\n") if e][-1]
    validate("ErrorResponse", json.loads(last.removeprefix("data: ")))


@pytest.mark.parametrize("stream", [False, True])
def test_the_demo_model_answers_each_prompt_of_a_list(gateway: RunningGateway, stream: bool) -> None:
    """`prompt` as a list: `n` choices for each prompt, each answering its own, and every usage count written (it
    answered one choice for neither prompt, with `prompt_tokens` left out)."""
    body = {"model": "demo", "prompt": ["first prompt here", "second prompt"], "n": 2}
    if stream:
        chunks = stream_chunks(gateway, {**body, "stream": True, "stream_options": {"include_usage": True}},
                               "/completions")
        texts: dict[int, str] = {}
        for chunk in chunks:
            for choice in chunk["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        usage = chunks[-1]["usage"]
        finished = {c["index"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"] == "stop"}
        assert finished == {0, 1, 2, 3}
    else:
        answer = post(gateway, "/completions", body).json()
        validate("CreateCompletionResponse", answer)
        texts = {choice["index"]: choice["text"] for choice in answer["choices"]}
        usage = answer["usage"]
    assert sorted(texts) == [0, 1, 2, 3]
    assert "first prompt here" in texts[0] and "first prompt here" in texts[1] and "second prompt" in texts[3]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
