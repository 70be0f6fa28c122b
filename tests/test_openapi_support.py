"""Self-tests of tests/support/openapi_spec.py.

They pin down that realistic OpenAI payloads pass and broken ones fail, so a
failing gateway test means the gateway is wrong, not the validator (spec
quirks such as OpenAPI 3.0 ``nullable`` in a 3.1 document are the risk).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from jsonschema import ValidationError

from tests.support.openapi_spec import errors, spec_path, validate

USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
CHAT = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I help?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}
CHAT_TOOL_CALL = {
    **CHAT,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
}
CHAT_MINIMAL = {k: CHAT[k] for k in ("id", "object", "created", "model", "choices")}
_CHUNK_HEAD = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
}
CHUNK_ROLE = {
    **_CHUNK_HEAD,
    "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
         "logprobs": None, "finish_reason": None}
    ],
    "usage": None,
    "obfuscation": "r4N7vQ2m",
}
CHUNK_CONTENT = {
    **_CHUNK_HEAD,
    "choices": [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}],
}
CHUNK_LOGPROBS = {
    **_CHUNK_HEAD,
    "choices": [
        {
            "index": 0,
            "delta": {"content": "Hi"},
            "logprobs": {
                "content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}],
                "refusal": None,
            },
            "finish_reason": None,
        }
    ],
}
CHUNK_STOP = {**_CHUNK_HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
CHUNK_USAGE_ONLY = {**_CHUNK_HEAD, "choices": [], "usage": USAGE}
COMPLETION = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None,
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}
EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 1, 0]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}
EMBEDDINGS_BASE64 = {
    **EMBEDDINGS,
    "data": [{"object": "embedding", "index": 0, "embedding": "AACAPwAAAEA="}],
}
MODEL = {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}
MODELS = {"object": "list", "data": [MODEL, {**MODEL, "id": "local-llama", "owned_by": "gateway"}]}
ERROR = {
    "error": {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


def _without(obj: dict[str, Any], *path: str | int) -> dict[str, Any]:
    """Deep copy of ``obj`` with the key at ``path`` removed."""
    out = copy.deepcopy(obj)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


@pytest.mark.parametrize(
    ("component", "instance"),
    [
        ("CreateChatCompletionResponse", CHAT),
        ("CreateChatCompletionResponse", CHAT_TOOL_CALL),
        ("CreateChatCompletionResponse", CHAT_MINIMAL),
        ("CreateChatCompletionStreamResponse", CHUNK_ROLE),
        ("CreateChatCompletionStreamResponse", CHUNK_CONTENT),
        ("CreateChatCompletionStreamResponse", CHUNK_LOGPROBS),
        ("CreateChatCompletionStreamResponse", CHUNK_STOP),
        ("CreateChatCompletionStreamResponse", CHUNK_USAGE_ONLY),
        ("CreateCompletionResponse", COMPLETION),
        ("CreateEmbeddingResponse", EMBEDDINGS),
        ("ListModelsResponse", MODELS),
        ("Model", MODEL),
        ("ErrorResponse", ERROR),
        ("ErrorResponse", {"error": {"message": "m", "type": "t", "param": "model", "code": None}}),
    ],
)
def test_valid_samples(component: str, instance: object) -> None:
    assert errors(component, instance) == []
    validate(component, instance)


@pytest.mark.parametrize(
    ("component", "instance", "expected"),
    [
        ("CreateChatCompletionResponse", _without(CHAT, "choices"), "$: 'choices' is a required"),
        ("CreateChatCompletionResponse", {**CHAT, "object": "chat.completion.chunk"}, "$.object:"),
        ("CreateChatCompletionResponse", {**CHAT, "created": "1741570283"}, "$.created:"),
        ("CreateChatCompletionStreamResponse", {**CHUNK_CONTENT, "object": "chat.completion"},
         "$.object:"),
        ("CreateChatCompletionStreamResponse",
         {**CHUNK_STOP, "choices": [{"index": 0, "delta": {}, "finish_reason": "done"}]},
         "$.choices[0].finish_reason:"),
        ("CreateChatCompletionStreamResponse", {**CHUNK_USAGE_ONLY, "usage": {"prompt_tokens": 1}},
         "$.usage: 'completion_tokens' is a required"),
        ("CreateCompletionResponse", {**COMPLETION, "object": "chat.completion"}, "$.object:"),
        ("CreateEmbeddingResponse", _without(EMBEDDINGS, "usage"), "$: 'usage' is a required"),
        ("ListModelsResponse", {**MODELS, "object": "models"}, "$.object:"),
        ("ErrorResponse", _without(ERROR, "error", "message"), "$.error: 'message' is a required"),
    ],
)
def test_invalid_samples(component: str, instance: object, expected: str) -> None:
    found = errors(component, instance)
    assert any(expected in line for line in found), found
    with pytest.raises(ValidationError, match=component):
        validate(component, instance)


def test_spec_strictness_worth_knowing() -> None:
    """Things real-world servers do that the spec rejects; the gateway must not do them."""
    assert errors("CreateEmbeddingResponse", EMBEDDINGS_BASE64)  # base64 strings not in spec
    assert errors("CreateChatCompletionResponse", {**CHAT, "system_fingerprint": None})
    assert errors("ErrorResponse", _without(ERROR, "error", "param"))  # param/code required
    assert errors("CreateChatCompletionResponse", _without(CHAT, "choices", 0, "logprobs"))


def test_validate_message_names_component_and_path() -> None:
    with pytest.raises(ValidationError) as info:
        validate("CreateChatCompletionResponse", {**CHAT, "created": "soon"})
    assert str(info.value).startswith("CreateChatCompletionResponse: $.created: 'soon' is not of")
    assert list(info.value.path) == ["created"]


def test_unknown_component() -> None:
    with pytest.raises(KeyError, match="NoSuchThing"):
        errors("NoSuchThing", {})


def test_spec_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_OPENAPI_SPEC", raising=False)
    assert spec_path() == Path(__file__).resolve().parents[2] / "shared/openai-openapi/openapi.yaml"
    monkeypatch.setenv("OPENAI_OPENAPI_SPEC", "/elsewhere/openapi.yaml")
    assert spec_path() == Path("/elsewhere/openapi.yaml")
