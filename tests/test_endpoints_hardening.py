"""/v1/completions and /v1/embeddings, hardened: a completion's `suffix` is prompt, a semantic cache's embedder must
embed, the demo model's embeddings refuse what they cannot make (that they do not hold the event loop:
`test_demo_embeddings_loop.py`)."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.accounting.prompt import estimate_prompt
from gateway.auth.keys import hash_key
from gateway.policy import PolicyError, compile_text
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-endpoints-hardening-key-0000000000000000"
AUTH = {"Authorization": f"Bearer {KEY}"}
SUFFIX = " ".join(["word"] * 400)  # 400 tokens of prompt text after the insertion point


def _policy(upstream: MockUpstream, limits: str = "") -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}"{limits}}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          demo: {{kind: demo}}
        prices:
          fault-no-usage: {{input_per_mtok: 1000, output_per_mtok: 1000}}
        models:
          nousage: {{provider: mock, model: fault-no-usage}}
          demo: {{provider: demo, model: demo-1}}
        """)


@pytest.fixture
def start(upstream: MockUpstream) -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []

    def make(limits: str = "") -> RunningGateway:
        running = RunningGateway(_policy(upstream, limits), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


def _access(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ a completion's suffix is prompt


def test_the_prompt_estimate_counts_a_completions_suffix() -> None:
    tokens = TokenCounter()
    alone = estimate_prompt(tokens, {"prompt": "def f():"}, "gpt-4o-mini")
    with_suffix = estimate_prompt(tokens, {"prompt": "def f():", "suffix": SUFFIX}, "gpt-4o-mini")
    assert with_suffix == alone + tokens.count(SUFFIX, "gpt-4o-mini")
    ids = estimate_prompt(tokens, {"prompt": [1, 2, 3], "suffix": "x"}, "gpt-4o-mini")
    assert ids == 3 + tokens.count("x", "gpt-4o-mini")
    no_suffix = estimate_prompt(tokens, {"prompt": "a", "suffix": None}, None)
    assert no_suffix == estimate_prompt(tokens, {"prompt": "a"}, None)
    two = estimate_prompt(tokens, {"prompt": ["a", "b"], "suffix": SUFFIX}, "gpt-4o-mini")  # read with each prompt
    two_alone = estimate_prompt(tokens, {"prompt": ["a", "b"]}, "gpt-4o-mini")
    assert two == two_alone + 2 * tokens.count(SUFFIX, "gpt-4o-mini")


def test_the_demo_model_bills_a_completions_suffix(start: Callable[..., RunningGateway]) -> None:
    gw = start()
    body = {"model": "demo", "prompt": "def f():", "max_tokens": 5}
    alone = httpx.post(gw.base_url + "/completions", headers=AUTH, timeout=20, json=body).json()["usage"]
    with_suffix = httpx.post(gw.base_url + "/completions", headers=AUTH, timeout=20,
                             json={**body, "suffix": SUFFIX}).json()["usage"]
    assert with_suffix["prompt_tokens"] == alone["prompt_tokens"] + 400, (alone, with_suffix)
    two = httpx.post(gw.base_url + "/completions", headers=AUTH, timeout=20,
                     json={**body, "prompt": ["def f():", "def f():"], "suffix": SUFFIX}).json()["usage"]
    assert two["prompt_tokens"] == 2 * with_suffix["prompt_tokens"]


def test_a_suffix_is_billed_when_the_upstream_reports_no_usage(
        start: Callable[..., RunningGateway], upstream: MockUpstream, caplog: pytest.LogCaptureFixture) -> None:
    gw = start()
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        r = httpx.post(gw.base_url + "/completions", headers=AUTH, timeout=20,
                       json={"model": "nousage", "prompt": "def f():", "suffix": SUFFIX, "max_tokens": 20})
    assert r.status_code == 200
    assert upstream.requests[-1].json["suffix"] == SUFFIX  # the upstream got (and bills) the suffix
    line = _access(caplog)[-1]
    assert line["tokens_estimated"] is True
    assert line["prompt_tokens"] >= 400, line["prompt_tokens"]


def test_a_suffix_counts_against_a_tpm_limit(start: Callable[..., RunningGateway]) -> None:
    gw = start(limits=", limits: {tpm: 300}")
    as_suffix = httpx.post(gw.base_url + "/completions", headers=AUTH, timeout=20,
                           json={"model": "nousage", "prompt": "def f():", "suffix": SUFFIX, "max_tokens": 20})
    as_prompt = httpx.post(gw.base_url + "/completions", headers=AUTH, timeout=20,
                           json={"model": "nousage", "prompt": "def f():" + SUFFIX, "max_tokens": 20})
    assert as_prompt.status_code == 429  # ~420 tokens on a 300-token window: refused outright
    assert as_suffix.status_code == 429, (as_suffix.status_code, as_suffix.text[:200])


# ------------------------------------------------------------------ a semantic cache's embedder must embed


def _semantic_policy(embedder: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          claude: {{kind: anthropic, base_url: "http://127.0.0.1:9/v1", api_key_env: ANT}}
          gem: {{kind: gemini, base_url: "http://127.0.0.1:9/v1", api_key_env: ANT}}
          mock: {{kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: ANT}}
        models:
          embedder: {embedder}
          chat: {{provider: mock, model: gpt-4o-mini, cache: {{semantic: {{embeddings: embedder, threshold: 0.9}}}}}}
        """)


@pytest.mark.parametrize(("embedder", "kind"), [
    ("{provider: claude, model: claude-sonnet-4-5}", "anthropic"),
    ("{provider: gem, model: gemini-2.5-flash}", "gemini"),
    # the cache calls the first target only
    ("{targets: [{provider: claude, model: c}, {provider: mock, model: text-embedding-3-small}]}", "anthropic"),
])
def test_a_semantic_embedder_alias_that_cannot_embed_is_a_load_error(embedder: str, kind: str) -> None:
    with pytest.raises(PolicyError) as error:
        compile_text(_semantic_policy(embedder), "p.yaml", {"ANT": "x"})
    expected = (f"p.yaml:9: models.chat.cache.semantic.embeddings: the embeddings alias `embedder` calls provider "
                f"`{'gem' if kind == 'gemini' else 'claude'}` (kind `{kind}`), which serves no embeddings")
    assert [str(issue) for issue in error.value.issues] == [expected]
    for embeds in ("{provider: mock, model: text-embedding-3-small}",  # an embedder that can embed still loads
                   "{targets: [{provider: mock, model: text-embedding-3-small}, {provider: claude, model: c}]}"):
        policy = compile_text(_semantic_policy(embeds), "p.yaml", {"ANT": "x"})
        assert policy.cache.aliases["chat"].semantic is not None


# ------------------------------------------------------------------ the demo model's embeddings


@pytest.mark.parametrize("bad", [["a", 1], [1, "a"], [[1], 2]])  # lists the schema lets through
def test_demo_embeddings_refuse_an_input_they_cannot_read(start: Callable[..., RunningGateway], bad: list[Any]) -> None:
    gw = start()
    r = httpx.post(gw.base_url + "/embeddings", headers=AUTH, timeout=20, json={"model": "demo", "input": bad})
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"]["param"] == "input"
    for given, count in (("a", 1), ([1, 2, 3], 1), (["a", [1, 2]], 2), ([[1], [2, 3]], 2)):  # what it reads
        r = httpx.post(gw.base_url + "/embeddings", headers=AUTH, timeout=20, json={"model": "demo", "input": given})
        assert r.status_code == 200, (given, r.text)
        assert len(r.json()["data"]) == count


@pytest.mark.parametrize(("inputs", "dimensions"), [(2049, 8), (1024, 4096)])
def test_demo_embeddings_are_bounded(start: Callable[..., RunningGateway], inputs: int, dimensions: int) -> None:
    gw = start()
    r = httpx.post(gw.base_url + "/embeddings", headers=AUTH, timeout=20,
                   json={"model": "demo", "input": [f"t{i}" for i in range(inputs)], "dimensions": dimensions})
    assert r.status_code == 400, (r.status_code, r.text[:200])
    assert r.json()["error"]["param"] == "input"
