"""A deny list's own regexes with non-ASCII letters: matched after the same folding as the text, as documented.

The deny list searches the folded text (`normalize.fold`: accents dropped, `ß` as `ss`, Cyrillic look-alikes as Latin
letters), but compiled a policy's `patterns` as written: `café\\s+secret`, `straße\\s+\\d+` and `пароль\\s*\\d+` could
never match (the text searched held no `é`, `ß` or Cyrillic a any more), and `gateway check` said the policy was
fine. Their letters are now folded as the text is, when they are compiled (`normalize.fold_pattern`); one that cannot
be folded (`[^ß]`: a negated class of a letter that folds to two) is refused by the policy check.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.guards.normalize import fold, fold_pattern
from gateway.policy import PolicyError, compile_text
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

PATTERNS = [r"пароль\s*\d+", r"café\s+secret", r"straße\s+\d+", r"Project-[A-Z]{3}"]
# A text each pattern must block (as written, and in the other forms the folding makes one), and one it must not.
BLOCKED = ["мой пароль 12345", "МОЙ ПАРОЛЬ 12345", "le café secret", "le CAFE Secret", "Hauptstraße 12",
           "HAUPTSTRASSE 12", "Project-ABC"]
ALLOWED = ["le café ouvert", "пароль без цифр", "Hauptstraße ohne Nummer", "Project-AB"]


def _policy(upstream_url: str) -> str:
    patterns = json.dumps(PATTERNS)
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          asks: {{provider: mock, model: fault-echo}}
          says: {{provider: mock, model: fault-echo}}
        guards:
          models:
            asks:
              deny: {{kind: denylist, patterns: {patterns}}}
            says:
              deny: {{kind: denylist, patterns: {patterns}, places: [output], action: redact}}
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _asked(gw: RunningGateway, text: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                      json={"model": "asks", "messages": [{"role": "user", "content": text}]})


@pytest.mark.parametrize("text", BLOCKED)
def test_a_request_matching_a_pattern_is_blocked(gw: RunningGateway, upstream: MockUpstream, text: str) -> None:
    before = len(upstream.requests)
    answer = _asked(gw, text)
    assert answer.status_code == 400 and "DENIED_PATTERN" in answer.text, answer.text
    assert len(upstream.requests) == before


@pytest.mark.parametrize("text", ALLOWED)
def test_a_request_matching_no_pattern_goes_through(gw: RunningGateway, text: str) -> None:
    answer = _asked(gw, text)
    assert answer.status_code == 200, answer.text


def _said(gw: RunningGateway, text: str, chunk: int | None) -> str:
    """What the client got of `fault-echo` saying `text`: whole (`chunk` None) or streamed, `chunk` characters a
    piece."""
    body: dict[str, Any] = {"model": "says", "messages": [{"role": "user", "content": text}], "echo_chunk": chunk or 5}
    if chunk is None:
        answer = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["message"]["content"])
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    return "".join((choice.get("delta") or {}).get("content") or ""
                   for line in raw.split("\n") if line.startswith("data: {")
                   for choice in json.loads(line[6:]).get("choices") or ())


@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
@pytest.mark.parametrize(("said", "left"), [
    ("Write to Hauptstraße 12 today.", "Write to Haupt<DENIED_PATTERN> today."),
    ("Le café secret est là.", "Le <DENIED_PATTERN> est là."),
    ("Мой пароль 12345 тут.", "Мой <DENIED_PATTERN> тут."),
    ("See Project-XYZ now.", "See <DENIED_PATTERN> now."),
])
def test_an_answer_matching_a_pattern_is_redacted_whole_and_streamed(
        gw: RunningGateway, said: str, left: str, chunk: int | None) -> None:
    assert _said(gw, said, chunk) == left


@pytest.mark.parametrize("pattern", [r"Project-[A-Z]{3}", r"\bfoo\s+(?P<n>\d+)\b(?=x)\1?", r"[\w.+-]+@x\.com",
                                     r"a{2,3}|[^-\]]|\\u00e9|(?#c)", r"(?i)x\x41\101\N{LATIN SMALL LETTER A}"])
def test_an_ascii_pattern_is_compiled_as_written(pattern: str) -> None:
    assert fold_pattern(pattern) == pattern


@pytest.mark.parametrize(("pattern", "text"), [
    (r"caf\u00e9", "CAFÉ"), (r"[éè]t[ée]", "été"), ("[\u0430-\u044f]+ \\d", "пароль 1"), (r"stra[ßs]+e", "STRASSE"),
    (r"\N{LATIN SMALL LETTER E WITH ACUTE}t\351", "été"), (r"(?<=ß)x", "ssx"), (r"ﬁle", "file"),
])
def test_a_folded_pattern_matches_the_folded_text(pattern: str, text: str) -> None:
    assert re.search(fold_pattern(pattern), fold(text)[0], re.IGNORECASE), (pattern, fold_pattern(pattern))


UNFOLDABLE = [r"[^ß]x", r"(?<=[aß])x", r"[\u0080-\U0010ffff]"]


@pytest.mark.parametrize("pattern", UNFOLDABLE)
def test_a_pattern_that_cannot_be_folded_is_refused_by_the_policy_check(upstream: MockUpstream, pattern: str) -> None:
    with pytest.raises(ValueError, match="cannot be matched on the folded text"):
        fold_pattern(pattern)
    text = _policy(upstream.base_url).replace(json.dumps(PATTERNS), json.dumps([pattern]))
    with pytest.raises(PolicyError) as caught:
        compile_text(text, "p.yaml", {"MOCK_UPSTREAM_KEY": "x"})
    issues = [str(issue) for issue in caught.value.issues]
    assert any("guards.models.asks.deny.patterns[0]" in i and "folded text" in i for i in issues), issues
