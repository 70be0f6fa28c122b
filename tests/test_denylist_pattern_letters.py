"""A deny list's regex is searched in the folded text, as written: a non-ASCII letter in it never matches, and the
policy check says so.

The text a deny list reads is folded (accents removed, `ß` as `ss`, Cyrillic and Greek look-alikes as Latin
letters), so `café\\s+secret` let "le café secret" through. Folding the pattern alike was tried and given up: it
made a linear pattern backtrack without end (`gro[sß]+e` as `gro(?:[s]|ss)+e`) and refused patterns that loaded
before. The check warns instead, naming the letters; written folded, the pattern matches the accented text.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import httpx
import pytest

from gateway.policy import compile_text
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream


def _policy(upstream_url: str, pattern: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: "{upstream_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: mock-model}}
        guards:
          global:
            deny: {{kind: denylist, places: [input], action: block, patterns: ['{pattern}']}}
        """)


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.mark.parametrize(("pattern", "letters"), [("café\\s+secret", "é"), ("stra(ß|ss)e\\s+\\d+", "ß"),
                                                  ("пароль\\s*\\d+", "\u0430")])  # (Cyrillic a)
def test_a_pattern_with_letters_folding_changes_is_warned_of(upstream: MockUpstream, pattern: str,
                                                            letters: str) -> None:
    policy = compile_text(_policy(upstream.base_url, pattern), "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    (warning,) = [w for w in policy.warnings if "patterns" in w]
    assert "p.yaml:" in warning and letters in warning and "folded" in warning


def test_an_ascii_pattern_is_not_warned_of(upstream: MockUpstream) -> None:
    policy = compile_text(_policy(upstream.base_url, "cafe\\s+secret"), "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    assert not [w for w in policy.warnings if "patterns" in w]


def test_a_pattern_written_folded_blocks_the_accented_text(upstream: MockUpstream) -> None:
    running = RunningGateway(_policy(upstream.base_url, "cafe\\s+secret"), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        for text, status in (("le café secret", 400), ("le CAFÉ  secret", 400), ("le thé secret", 200)):
            response = httpx.post(f"{running.base_url}/chat/completions", timeout=30, json={
                "model": "chat", "messages": [{"role": "user", "content": text}]})
            assert response.status_code == status, (text, response.text)
    finally:
        running.stop()
