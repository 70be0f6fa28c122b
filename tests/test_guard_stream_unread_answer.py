"""What a guarded complete chat answer carried where no guard read it (the stream's counterpart:
`test_guard_stream_unread_fields.py`).

Under an enforcing output guard, a complete chat answer's choice `error` (OpenRouter's, `finish_reason: "error"`),
a field the gateway does not know on the answer, a choice or a message, a reasoning sent as a list of parts or an
object, a content sent as an object, and a tool call's name reached the client unread. Now the error's words are
withheld, unknown fields and texts of another type dropped, a list of parts read as its parts' text, a tool name
checked.

The upstream is scripted per model, the gateway real, the client httpx.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
KEY = "AKIAZ3MQ7XJ4K2PLW9QA"
MAIL = "jane.doe@mailbox.org"
TEXT = f"Failed: key {KEY} mail {MAIL} done."
WITHHELD = "its message withheld: output guards are on"
USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def _answer(message: dict[str, Any], finish: str = "stop", **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish,
              **extra.pop("choice", {})}
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "usage": USAGE, "choices": [choice],
            **extra}


ANSWERS: dict[str, dict[str, Any]] = {
    "choice-error": _answer({"content": "ok"}, "error", choice={"error": {"code": 502, "message": TEXT}}),
    "unknown-fields": _answer({"content": "ok", "note": TEXT}, choice={"note": TEXT}, note=TEXT),
    "content-object": _answer({"content": {"text": TEXT}}),
    "reasoning-parts": _answer({"content": "ok", "reasoning": [{"type": "text", "text": TEXT}]}),
    "tool-name": _answer({"content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": f"lookup {KEY}", "arguments": "{}"}}]},
        "tool_calls"),
    "known-fields": _answer({"content": "ok", "annotations": []}, choice={"native_finish_reason": "completed"},
                            provider="OpenAI"),
}


class _Upstream(ThreadedApp):
    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.Response:
            return web.json_response(ANSWERS[(await request.json())["model"]])

        app.router.add_post("/v1/chat/completions", handle)


def _policy(port: int) -> str:
    models = "".join(f"  {p}-{m}: {{provider: up, model: {m}}}\n" for m in ANSWERS for p in ("g", "o"))
    guarded = "".join(f"    g-{m}: {{pii: {{kind: pii, places: [output], action: redact}}, "
                      f"secrets: {{kind: secrets, places: [output], action: redact}}}}\n" for m in ANSWERS)
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY}}
        guards:
          models:
        """) + guarded + "models:\n" + models


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        running = RunningGateway(_policy(upstream.port), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _answer_of(gw: RunningGateway, alias: str) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(gw.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=30)
    assert response.status_code == 200
    return response


@pytest.mark.parametrize("model", [m for m in ANSWERS if m != "known-fields"])
def test_no_finding_leaves_a_complete_answer(gw: RunningGateway, model: str) -> None:
    assert KEY in _answer_of(gw, f"o-{model}").text  # the control: the text reaches an unguarded client
    text = _answer_of(gw, f"g-{model}").text
    assert KEY not in text and MAIL not in text


def test_a_choices_error_is_withheld(gw: RunningGateway) -> None:
    choice = _answer_of(gw, "g-choice-error").json()["choices"][0]
    assert choice["error"] == {"message": f"the upstream failed ({WITHHELD})", "code": 502}


def test_read_and_dropped(gw: RunningGateway) -> None:
    assert "note" not in _answer_of(gw, "g-unknown-fields").text
    message = _answer_of(gw, "g-reasoning-parts").json()["choices"][0]["message"]
    assert message["reasoning"] == "Failed: key <AWS_ACCESS_KEY> mail <EMAIL_ADDRESS> done."
    call = _answer_of(gw, "g-tool-name").json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup <AWS_ACCESS_KEY>"


def test_fields_real_servers_add_pass(gw: RunningGateway) -> None:
    answer = _answer_of(gw, "g-known-fields").json()
    assert answer["provider"] == "OpenAI" and answer["usage"] == USAGE
    assert answer["choices"][0]["native_finish_reason"] == "completed"
    assert answer["choices"][0]["message"]["annotations"] == []
