"""A key glued to the word before it by `-`, `_` or `/` (`id_AKIA...`, `token-ghp_...`, `creds -sk-...`) is a key: the
secrets guard's detectors took a token to start only after a character that is no letter, digit, `-` or `_`, so
these reached the upstream (input) and the client (output, streamed or not) whole. A key glued to a letter or a
digit is still part of a longer word (no finding: `xAKIA...` is not an AWS key).

Through a real gateway: the mock upstream records what it received, and `fault-echo` answers with the request's
text (word by word when streamed).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
AWS = "AKIAZ3MQ7XJ4K2PLW9QA"
GITHUB = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
GLUED = {"hyphen": f"creds -{AWS} end", "underscore": f"id_{AWS} end", "slash": f"path/{AWS} end",
         "github-hyphen": f"token-{GITHUB} end", "after-key": f"{AWS}-prod end"}


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    text = policy_text(upstream.base_url) + textwrap.dedent("""\
          blocked: {provider: mock, model: mock-model}
          echoed: {provider: mock, model: fault-echo}
        guards:
          models:
            blocked:
              secrets: {kind: secrets, action: block}
            echoed:
              secrets: {kind: secrets, action: redact, places: [output]}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _chat(gw: RunningGateway, model: str, text: str, stream: bool = False) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", headers=AUTH, timeout=30,
                      json={"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]})


@pytest.mark.parametrize("case", list(GLUED))
def test_a_glued_key_in_a_prompt_is_blocked(gw: RunningGateway, upstream: MockUpstream, case: str) -> None:
    upstream.clear()
    answer = _chat(gw, "blocked", GLUED[case])
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "content_policy_violation"
    assert not upstream.requests


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
@pytest.mark.parametrize("case", list(GLUED))
def test_a_glued_key_in_an_answer_is_redacted(gw: RunningGateway, case: str, stream: bool) -> None:
    answer = _chat(gw, "echoed", GLUED[case], stream)
    assert answer.status_code == 200, answer.text
    if stream:
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in answer.text.splitlines()
                       if line.startswith("data: {") and json.loads(line[6:])["choices"])
    else:
        text = answer.json()["choices"][0]["message"]["content"]
    assert "end" in text and AWS not in text and GITHUB not in text, text
    assert AWS[4:12] not in text and GITHUB[4:12] not in text, text  # no piece of it either


def test_a_key_glued_to_a_letter_is_part_of_a_longer_word(gw: RunningGateway, upstream: MockUpstream) -> None:
    upstream.clear()
    assert _chat(gw, "blocked", f"word x{AWS} end").status_code == 200
    assert upstream.requests
