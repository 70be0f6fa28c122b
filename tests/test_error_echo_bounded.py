"""A 400 that quotes what the client sent quotes it bounded and printable, on every endpoint.

Messages quoted client text whole: a megabyte in a chat message's `role` or in `encoding_format` (msgspec's
`Invalid enum value '…'`), in a field name or a block's `type` on `/v1/messages` (with its escape sequences and
line breaks, raw), in an unknown field of `/admin/keys` or `/v1/feedback` (bodies of 64 KiB at most there), came
back in a 400 as large. Every such value now goes through `sanitize.printable` (64 characters, `?` for what is not
printable), msgspec's messages through `sanitize.validation_error`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import msgspec
import pytest

from gateway.sanitize import printable, validation_error
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

ADMIN_TOKEN = "admin-token-for-echo-tests-0123456789"
HUGE = "\x1b[2J\x1b[31mFAKE NOTICE\x1b[0m\r\n" + "Z" * 1_000_000  # a megabyte, with escape sequences and CR LF
LARGE = HUGE[:50_000]  # where the body may hold at most 64 KiB (the admin API, feedback)
BEARER = {"Authorization": f"Bearer {FULL_KEY}"}
ANTHROPIC = {"x-api-key": FULL_KEY, "anthropic-version": "2023-06-01"}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def echo_gateway(upstream: MockUpstream) -> Iterator[RunningGateway]:
    policy = policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN") + textwrap.dedent("""\
        dynamic_keys: {enabled: true}
        telemetry: {feedback: {enabled: true}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN}).start()
    yield running
    running.stop()


CASES: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
    ("chat role", "/v1/chat/completions", BEARER, {"model": "chat", "messages": [{"role": HUGE, "content": "hi"}]}),
    ("embeddings encoding_format", "/v1/embeddings", BEARER,
     {"model": "embed", "input": "x", "encoding_format": HUGE}),
    ("messages unknown field", "/v1/messages", ANTHROPIC,
     {"model": "chat", "max_tokens": 5, "messages": MESSAGES, HUGE: 1}),
    ("messages block type", "/v1/messages", ANTHROPIC,
     {"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": HUGE}]}]}),
    ("messages block type not a string", "/v1/messages", ANTHROPIC,
     {"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": [HUGE]}]}]}),
    ("count_tokens unknown field", "/v1/messages/count_tokens", ANTHROPIC,
     {"model": "chat", "messages": MESSAGES, HUGE: 1}),
    ("count_tokens block type", "/v1/messages/count_tokens", ANTHROPIC,
     {"model": "chat", "messages": [{"role": "user", "content": [{"type": HUGE}]}]}),
    ("admin keys unknown field", "/admin/keys", {"Authorization": f"Bearer {ADMIN_TOKEN}"},
     {"tenant": "acme", LARGE: 1}),
    ("admin keys enum", "/admin/keys", {"Authorization": f"Bearer {ADMIN_TOKEN}"},
     {"tenant": "acme", "budget": {"usd": 1, "period": LARGE}}),
    ("feedback unknown field", "/v1/feedback", BEARER, {"request_id": "req_1", "score": 1, LARGE: 1}),
]


@pytest.mark.parametrize(("path", "headers", "body"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_megabyte_value_is_quoted_short_and_printable(
    echo_gateway: RunningGateway, path: str, headers: dict[str, str], body: dict[str, Any],
) -> None:
    response = httpx.post(echo_gateway.url + path, headers=headers, content=msgspec.json.encode(body), timeout=30)
    assert response.status_code == 400, response.text[:300]
    assert len(response.content) < 2048, response.content[:300]
    error = response.json()["error"]
    quoted = [error["message"], error.get("param") or ""]
    assert all(text.isprintable() for text in quoted), quoted  # no ESC, CR or LF, not even JSON-escaped
    assert "ZZZZ" in error["message"] or "FAKE" in error["message"], error  # still recognisable


def test_a_short_value_is_quoted_as_it_was(echo_gateway: RunningGateway) -> None:
    chat = {"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}
    error = httpx.post(echo_gateway.base_url + "/chat/completions", headers=BEARER, json=chat).json()["error"]
    assert error["message"] == "invalid request: Invalid enum value 'wizard' at `messages[0].role`"
    assert error["param"] == "messages[0].role"
    body = {"model": "chat", "max_tokens": 5, "messages": MESSAGES, "colour": 1}
    error = httpx.post(echo_gateway.url + "/v1/messages", headers=ANTHROPIC, json=body).json()["error"]
    assert error["message"] == "`colour` is not supported by this gateway's /v1/messages"


def test_validation_error_bounds_msgspec_quotes() -> None:
    class Shape(msgspec.Struct, forbid_unknown_fields=True):
        kind: str = "a"

    class Strict(msgspec.Struct):
        role: Literal["user", "assistant"] = "user"

    def error(value: Any, kind: type[Any]) -> tuple[str, str]:
        with pytest.raises(msgspec.ValidationError) as caught:
            msgspec.convert(value, kind)
        return validation_error(caught.value)

    message, path = error({"role": HUGE}, Strict)
    assert message == "Invalid enum value '" + repr(HUGE)[1:65] + "...'"  # msgspec's repr, its first 64 characters
    assert path == "role"
    message, path = error({HUGE: 1}, Shape)  # a field name, quoted as it is by msgspec: no path follows
    assert message == "Object contains unknown field `" + printable(HUGE) + "`" and path == ""
    message, path = error({"x - at `$evil`": 1}, Shape)  # what looks like a path in the client's own text
    assert message.startswith("Object contains unknown field ") and len(path) <= 200
    assert error({"role": "it's"}, Strict) == ("Invalid enum value \"it's\"", "role")
    assert error({"kind": 5}, Shape) == ("Expected `str`, got `int`", "kind")  # no value quoted: unchanged


def test_printable() -> None:
    assert printable("gpt-4o") == "gpt-4o"
    assert printable("a\x1bb\r\n") == "a?b??"
    assert printable("x" * 65) == "x" * 64 + "..."
    assert printable("x" * 64) == "x" * 64
    assert printable("\x00" * 300, 200) == "?" * 200 + "..."
