"""A bad-input sweep: whatever a client sends, the answer is a 4xx with an OpenAI error body, never a 500."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from gateway.errors import InvalidRequest
from tests.conftest import FULL_KEY, RunningGateway

AUTH = {"Authorization": f"Bearer {FULL_KEY}", "Content-Type": "application/json"}

BAD_BODIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"{model: chat"),
    ("truncated", b'{"model": "chat", "messages": ['),
    ("array", b"[1, 2, 3]"),
    ("string", b'"hello"'),
    ("null", b"null"),
    ("no messages", b'{"model": "chat"}'),
    ("empty messages", b'{"model": "chat", "messages": []}'),
    ("messages not a list", b'{"model": "chat", "messages": "hi"}'),
    ("message not an object", b'{"model": "chat", "messages": ["hi"]}'),
    ("bad role", b'{"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}'),
    ("no role", b'{"model": "chat", "messages": [{"content": "x"}]}'),
    ("content a number", b'{"model": "chat", "messages": [{"role": "user", "content": 5}]}'),
    ("model a number", b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}'),
    ("model empty", b'{"model": "", "messages": [{"role": "user", "content": "x"}]}'),
    ("no model", b'{"messages": [{"role": "user", "content": "x"}]}'),
    ("stream a string", b'{"model": "chat", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}'),
    ("temperature a string",
     b'{"model": "chat", "temperature": "hot", "messages": [{"role": "user", "content": "x"}]}'),
    ("temperature out of range",
     b'{"model": "chat", "temperature": 9, "messages": [{"role": "user", "content": "x"}]}'),
    ("n zero", b'{"model": "chat", "n": 0, "messages": [{"role": "user", "content": "x"}]}'),
    ("max_tokens negative", b'{"model": "chat", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}'),
    ("stream_options wrong", b'{"model": "chat", "stream_options": 3, "messages": [{"role": "user", "content": "x"}]}'),
    ("invalid utf-8", b'{"model": "chat", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("deep nesting",
     b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("huge number", b'{"model": "chat", "seed": 1' + b"0" * 400 + b', "messages": [{"role": "user", "content": "x"}]}'),
]


@pytest.mark.parametrize(("name", "body"), BAD_BODIES, ids=[n for n, _ in BAD_BODIES])
def test_bad_chat_bodies_get_400(gateway: RunningGateway, name: str, body: bytes) -> None:
    response = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/completions", b'{"model": "chat"}'),
        ("/completions", b'{"model": "chat", "prompt": 5}'),
        ("/completions", b'{"model": "chat", "prompt": []}'),
        ("/embeddings", b'{"model": "embed"}'),
        ("/embeddings", b'{"model": "embed", "input": {"a": 1}}'),
        ("/embeddings", b'{"model": "embed", "input": "x", "encoding_format": "hex"}'),
        ("/embeddings", b'{"model": "embed", "input": "x", "dimensions": 0}'),
    ],
)
def test_bad_bodies_on_other_endpoints(gateway: RunningGateway, path: str, body: bytes) -> None:
    response = httpx.post(gateway.base_url + path, headers=AUTH, content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def _nested(levels: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    """A chat body whose field `x` nests `levels` arrays (or objects `{"a": ...}`): the body `levels` + 1 deep."""
    return (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "x": '
            + opener * levels + b"1" + closer * levels + b"}")


@pytest.mark.parametrize(("opener", "closer"), [(b"[", b"]"), (b'{"a":', b"}")])
def test_bodies_nested_past_the_limit_get_400(gateway: RunningGateway, opener: bytes, closer: bytes) -> None:
    # 980 passed ingress, then re-encoding the body further down the stack raised RecursionError: a 500
    for levels in (128, 200, 980):
        response = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH,
                              content=_nested(levels, opener, closer))
        assert response.status_code == 400, response.text[:200]
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "more than 128 deep" in error["message"]
    within = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=_nested(127, opener, closer))
    assert within.status_code == 200, within.text[:200]  # the body's own object and 127 more: 128


def test_the_depth_check_counts_structure_not_brackets() -> None:
    from gateway.pipeline.stages import MAX_JSON_DEPTH, check_depth, decode_body
    from gateway.schemas.endpoints import Endpoint

    many = [{"role": "user", "content": "[{" * 300} for _ in range(300)]  # thousands of `{` and `[`, shallow
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(99)]
    raw = json.dumps({"model": "m", "messages": many, "tools": tools, "x": "]]]}}}" * 100}).encode()
    decode_body(raw, Endpoint.CHAT)
    at_limit = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    check_depth(b"{}" * 1000, {"x": json.loads(at_limit)})  # walked: 128 deep
    over = json.loads("[" + at_limit + "]")
    with pytest.raises(InvalidRequest, match="128 deep"):
        check_depth(b"[]" * (MAX_JSON_DEPTH + 1), {"x": over})
    check_depth(b"{}", {"x": over})  # a body this short cannot be that deep: not even looked at


def test_the_error_names_the_bad_field(gateway: RunningGateway) -> None:
    body = b'{"model": "chat", "temperature": "hot", "messages": [{"role": "user", "content": "x"}]}'
    error = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=body).json()["error"]
    assert error["param"] == "temperature"


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "chat"}', "messages"),
    (b'{"model": "chat", "messages": [{"content": "x"}]}', "messages[0].role"),
])
def test_a_missing_field_is_the_errors_param(gateway: RunningGateway, body: bytes, param: str) -> None:
    error = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=body).json()["error"]
    assert error["param"] == param and "missing required field" in error["message"]


def test_a_completion_of_no_tokens_scores_a_prompt(gateway: RunningGateway) -> None:
    """`max_tokens: 0` with `echo` (and `logprobs`): the legacy way to score a prompt, which OpenAI takes."""
    body = {"model": "chat", "prompt": "score me", "max_tokens": 0, "echo": True, "logprobs": 1}
    assert httpx.post(gateway.base_url + "/completions", headers=AUTH, json=body).status_code == 200
    body["max_tokens"] = -1
    error = httpx.post(gateway.base_url + "/completions", headers=AUTH, json=body).json()["error"]
    assert error["param"] == "max_tokens"


def test_a_10_mb_body_gets_413(gateway: RunningGateway) -> None:
    big = b'{"model": "chat", "messages": [{"role": "user", "content": "' + b"a" * (10 * 1024 * 1024) + b'"}]}'
    response = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=big, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_chunked_body_over_the_limit_gets_413(gateway: RunningGateway) -> None:
    def pieces():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "chat", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}]}'

    response = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=pieces(), timeout=30)
    assert response.status_code == 413


def test_wrong_method_and_unknown_paths(gateway: RunningGateway) -> None:
    wrong = httpx.get(gateway.base_url + "/chat/completions", headers=AUTH)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    missing = httpx.post(gateway.base_url + "/nothing/here", headers=AUTH, content=b"{}")
    assert missing.status_code == 404 and "error" in missing.json()
    put_models = httpx.put(gateway.base_url + "/models", headers=AUTH)
    assert put_models.status_code == 405 and "error" in put_models.json()


def test_odd_auth_headers(gateway: RunningGateway) -> None:
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "x"}]}'
    for value in ("Bearer", "Basic Zm9vOmJhcg==", "Bearer " + "x" * 5000, "bearer  " + FULL_KEY + "\u00e9"):
        response = httpx.post(gateway.base_url + "/chat/completions", content=body,
                              headers={"Authorization": value.encode("latin-1"), "Content-Type": "application/json"})
        assert response.status_code == 401, value
    ok = httpx.post(gateway.base_url + "/chat/completions", content=body, headers={"api-key": FULL_KEY})
    assert ok.status_code == 200


def _raw(gateway: RunningGateway, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_oversized_headers_get_a_4xx(gateway: RunningGateway) -> None:
    huge = b"X-Big: " + b"a" * (200 * 1024) + b"\r\n"
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "x"}]}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
               + FULL_KEY.encode()
               + b"\r\n" + huge + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    reply = _raw(gateway, request)
    assert reply.split(b" ", 2)[1] == b"431", reply[:200]
    assert b'"code":"headers_too_large"' in reply


def test_bad_content_length_gets_400(gateway: RunningGateway) -> None:
    reply = _raw(gateway, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          b"Content-Length: abc\r\n\r\n{}")
    assert reply.split(b" ", 2)[1].startswith(b"4")


def test_odd_but_valid_text_is_not_an_error(gateway: RunningGateway) -> None:
    def post(content: bytes) -> httpx.Response:
        body = b'{"model": "chat", "messages": [{"role": "user", "content": ' + content + b"}]}"
        return httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=body)

    for content in (b'"\\u0000"', '"\u202e\U0001f600"'.encode()):
        assert post(content).status_code == 200
    assert post(b'"\\ud800"').status_code == 400  # a lone surrogate is not text


def test_the_gateway_still_answers_after_the_sweep(gateway: RunningGateway) -> None:
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "x"}]}'
    assert httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, content=body).status_code == 200
    assert 'status="500"' not in gateway.metrics()


def test_the_proxied_paths_answer_alike_directly_and_through_the_router(gateway: RunningGateway) -> None:
    # exact paths skip litestar's router (`direct_routes`); other spellings and bad Host headers still reach it
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    direct = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, json=body)
    routed = httpx.post(gateway.base_url + "/chat/completions/", headers=AUTH, json=body)
    assert direct.status_code == routed.status_code == 200
    assert direct.json()["choices"] == routed.json()["choices"]
    assert direct.headers["x-request-id"] != routed.headers["x-request-id"]
    refused = httpx.post(gateway.base_url + "/chat/completions", headers={**AUTH, "Host": "bad host"}, json=body)
    assert refused.status_code == 400 and "error" in refused.json()
    unauthorized = httpx.post(gateway.base_url + "/chat/completions", json=body)
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "missing_api_key"


def test_the_served_app_reaches_the_proxied_paths_without_litestar(gateway: RunningGateway) -> None:
    # `app.served_app`: the direct routes in front of litestar return the handler's own coroutine (no frame
    # of theirs or litestar's for a stream's task to resume through); anything else is litestar's
    from litestar import Litestar

    from gateway.api.proxy import ProxyEndpoint
    from gateway.app import served_app

    served = served_app(gateway.app)
    http = {"type": "http", "path": "/v1/chat/completions", "headers": [(b"host", b"localhost")]}
    for scope, code in ((http, ProxyEndpoint.__call__.__code__), ({"type": "lifespan"}, Litestar.__call__.__code__),
                        ({**http, "path": "/v1/chat/completions/"}, Litestar.__call__.__code__)):
        coroutine = served(scope, None, None)
        assert coroutine.cr_code is code  # type: ignore[attr-defined]
        coroutine.close()  # type: ignore[attr-defined]
    plain = Litestar()
    assert served_app(plain) is plain  # an app without the direct routes is served as it is
