"""A provider's credential split by an invisible character never reaches a client, in two halves or whole.

docs/security.md promises the removal of a configured secret "also when white space, a line break or an invisible
character splits it". The removal read across a list of some such characters only; any other one (a bidi isolate,
the Mongolian vowel separator, the Arabic number sign, a tag character, a Hangul filler, a variation selector, ...)
kept the secret whole to the removal, and then the message's display turned the (non-printable) character into a
space: the key reached the client in two readable halves, in a non-streamed error, a chat stream's mid-stream
error and the metadata of a failed Responses answer. Now the removal reads across every control, format,
separator, private-use, unassigned and default-ignorable character, the very class the display shows as a space.

End to end: a running gateway in front of the mock OpenAI upstream, which for a model `gap-<path>-<hex>` echoes the
key it was sent split by the character U+<hex>. Units: `sanitize_upstream_message` over every format (Cf) and
default-ignorable code point, and the display's class over every code point Python does not call printable.
"""

from __future__ import annotations

import json
import sys
import textwrap
import unicodedata
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.sanitize import sanitize_upstream_message
from gateway.secret_removal import spaced
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream, responses_answer, sse

KEY = "plain0upstream0credential0042"  # not key-shaped, not an opaque run: only its removal by value takes it out
HALVES = (KEY[:len(KEY) // 2], KEY[len(KEY) // 2:])
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
# Default_Ignorable_Code_Point, as Unicode's DerivedCoreProperties.txt lists it (written out, not read from the
# `regex` module whose class the gateway uses: the test would otherwise check that module against itself).
DEFAULT_IGNORABLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
                     (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
                     (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
                     (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
# A sample for the end-to-end tests: each of the kinds the hunt found leaking.
SAMPLE = (0x2066, 0x2069, 0x206A, 0x206F, 0x180E, 0x061C, 0x0600, 0x06DD, 0x070F, 0xFFF9, 0xE0001, 0xE0020, 0xE007F,
          0x1D173, 0x115F, 0x1160, 0x3164, 0xFFA0, 0xFE0F, 0xE0100, 0x034F)


def split_key(key: str, char: str) -> str:
    return HALVES[0] + char + HALVES[1] if key == KEY else key  # (any other key: the mock's auth refuses it)


def assert_no_half(text: str) -> None:
    found = [half for half in HALVES if half in text]
    assert not found, (found, text)


def format_and_ignorable_code_points() -> list[int]:
    ignorable = {code for first, last in DEFAULT_IGNORABLE for code in range(first, last + 1)}
    return sorted(ignorable | {code for code in range(sys.maxunicode + 1)
                               if unicodedata.category(chr(code)) == "Cf"})


# -- units ---------------------------------------------------------------------------------------------------------


def test_every_format_or_default_ignorable_character_splitting_a_key_is_read_across() -> None:
    leaked = []
    for code in format_and_ignorable_code_points():
        shown = sanitize_upstream_message(f"invalid api key {split_key(KEY, chr(code))} given", secrets=(KEY,))
        if any(half in shown for half in HALVES) or "[redacted]" not in shown:
            leaked.append(f"U+{code:04X}")
    assert not leaked, f"{len(leaked)} characters let a key through: {leaked[:40]}"


def test_every_character_python_calls_unprintable_is_read_across() -> None:
    """Every assigned character Python does not call printable (the display's rule before: control, format,
    surrogate, private-use, separator) is one the removal reads across, and the display shows it as a space; so
    are the default-ignorable ones Python prints (a Hangul filler, a variation selector)."""
    unprintable = "".join(chr(code) for code in range(sys.maxunicode + 1)
                          if not chr(code).isprintable() and unicodedata.category(chr(code)) != "Cn")
    assert spaced(unprintable) == " "
    assert spaced("a\u3164b\ufe0fc\u034f d") == "a b c d"


# Characters Python 3.11 (Unicode 14) calls unassigned, so not printable, that a later Unicode (the `regex`
# module's) assigns: the display once showed them as a space, which the removal did not read across.
NEWER_THAN_PYTHON = (0x0897, 0x1ACF, 0x2FFC, 0x31E4, 0x1B4E)


@pytest.mark.parametrize("code", NEWER_THAN_PYTHON, ids=lambda code: f"U+{code:04X}")
def test_a_character_the_removal_does_not_read_across_is_never_shown_as_a_space(code: int) -> None:
    char = chr(code)
    shown = sanitize_upstream_message(f"invalid api key {split_key(KEY, char)} given", secrets=(KEY,))
    assert f"{HALVES[0]} {HALVES[1]}" not in shown
    assert "[redacted]" in shown or f"{HALVES[0]}{char}{HALVES[1]}" in shown  # removed, or split as it came


# -- end to end ----------------------------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SplittingUpstream(MockUpstream):
    """The mock OpenAI upstream; a model `gap-<path>-<hex>` echoes the key it was sent split by U+<hex>:
    `gap-500-` in a 500's message, `gap-mid-` in a chat stream's error after its first content, `gap-failed-` in
    a failed Responses answer's error and its metadata. Everything else is the mock's own behaviour."""

    def _route(self, build: Any) -> Handler:
        handle = super()._route(build)

        async def route(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(model, str) or not model.startswith("gap-"):
                return await handle(request)
            _, path, code = model.split("-")
            echoed = split_key(request.headers.get("Authorization", "").removeprefix("Bearer "), chr(int(code, 16)))
            if path == "500":
                return web.json_response({"error": {"message": f"invalid api key {echoed}", "type": "server_error",
                                                    "param": None, "code": None}}, status=500)
            if path == "mid":
                return await _stream_then_fail(request, model, f"key {echoed} refused")
            answer = responses_answer({**body, "stream": False}, ["unused"], 1)
            assert isinstance(answer, dict)
            return web.json_response({**answer, "status": "failed", "output": [], "metadata": {"note": echoed},
                                      "error": {"code": "server_error", "message": f"bad key {echoed}"}})

        return route


async def _stream_then_fail(request: web.Request, model: str, message: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(sse({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                              "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                           "finish_reason": None}]}))
    await response.write(sse({"error": {"message": message, "type": "server_error"}}))
    await response.write_eof()
    return response


def model_name(path: str, code: int) -> str:
    return f"gap-{path}-{code:x}"


def splitting_policy(url: str) -> str:
    models = "".join(f"  {model_name(path, code)}: {{provider: splitting, model: {model_name(path, code)}}}\n"
                     for path in ("500", "mid", "failed") for code in SAMPLE)
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          splitting: {{kind: openai, base_url: {url}, api_key_env: SPLIT_KEY}}
        models:
        """) + models


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with SplittingUpstream(api_key=KEY) as upstream:
        running = RunningGateway(splitting_policy(upstream.base_url), {"SPLIT_KEY": KEY}).start()
        try:
            yield running
        finally:
            running.stop()


def post(gateway: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gateway.base_url + path, headers=AUTH, json=body, timeout=30)


@pytest.mark.parametrize("code", SAMPLE, ids=lambda code: f"U+{code:04X}")
def test_a_split_key_in_an_upstream_error_is_removed(gateway: RunningGateway, code: int) -> None:
    response = post(gateway, "/chat/completions",
                    {"model": model_name("500", code), "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502, response.text
    message = response.json()["error"]["message"]
    assert_no_half(message)
    assert "[redacted]" in message


@pytest.mark.parametrize("code", SAMPLE, ids=lambda code: f"U+{code:04X}")
def test_a_split_key_in_a_mid_stream_error_is_removed(gateway: RunningGateway, code: int) -> None:
    response = post(gateway, "/chat/completions", {"model": model_name("mid", code), "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    errors = [json.loads(line.removeprefix("data: "))["error"]["message"] for line in response.text.splitlines()
              if line.startswith("data: {") and '"error"' in line]
    assert errors, response.text  # the stream ended in the upstream's error, after its content
    assert_no_half(response.text)
    assert "[redacted]" in errors[0]


@pytest.mark.parametrize("code", SAMPLE, ids=lambda code: f"U+{code:04X}")
def test_a_split_key_in_a_failed_responses_answer_is_removed(gateway: RunningGateway, code: int) -> None:
    response = post(gateway, "/responses", {"model": model_name("failed", code), "input": "hi"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == "failed"
    assert_no_half(response.text)
    assert "[redacted]" in answer["error"]["message"]
    assert answer["metadata"]["note"] == "[redacted]"
