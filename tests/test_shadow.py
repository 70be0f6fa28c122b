"""Shadow policies: a candidate decided beside the live policy never changes a response, never calls an
upstream, counts its disagreements by kind correctly under load, drops (and counts) what its queue cannot
hold, and is promoted by a reload."""

from __future__ import annotations

import asyncio
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from gateway.app import Gateway
from gateway.auth.keys import hash_key
from gateway.dryrun.shadow import Shadow
from gateway.policy import PolicyError, compile_text
from gateway.schemas.endpoints import Endpoint
from gateway.telemetry.metrics import Metrics
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

ACME = "gw-shadow-test-acme-000000000000000000000"
GLOBEX = "gw-shadow-test-globex-1111111111111111111"
SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH"


def policy(upstream_url: str, *, candidate: bool, shadow: str | None = None) -> str:
    """The live policy sends everyone to mock-a; the candidate sends globex to mock-b and blocks secrets."""
    rules = textwrap.indent(textwrap.dedent("""\
        rules:
          - {name: globex-to-b, when: {tenant: [globex]}, targets: [{provider: up, model: model-b}]}
        guards:
          global:
            secrets: {kind: secrets, action: block}
        """), "") if candidate else ""
    server = f"server: {{shadow_policy: {shadow}, shadow_queue: 10000}}\n" if shadow else ""
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: acme, tenant: acme, hash: "{hash_key(ACME)}"}}
          - {{name: globex, tenant: globex, hash: "{hash_key(GLOBEX)}"}}
        providers:
          up: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: up, model: model-a}}
        """) + server + rules


@pytest.fixture
def shadowed(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    (tmp_path / "candidate.yaml").write_text(policy(upstream.base_url, candidate=True))
    running = RunningGateway(policy(upstream.base_url, candidate=False, shadow="candidate.yaml"),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    yield running
    running.stop()


def counter(metrics: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}{{{re.escape(wanted)}}} (\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


def wait_compared(running: RunningGateway, count: int) -> str:
    deadline = time.monotonic() + 60
    while True:
        metrics = running.metrics()
        if counter(metrics, "gateway_shadow_requests_total", result="compared") >= count:
            return metrics
        assert time.monotonic() < deadline, "the shadow policy did not compare every request"
        time.sleep(0.1)


async def send_all(base_url: str, requests: list[tuple[str, str]]) -> list[httpx.Response]:
    limits = asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        async def one(key: str, text: str) -> httpx.Response:
            async with limits:
                body = {"model": "chat", "messages": [{"role": "user", "content": text}]}
                return await client.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})

        return await asyncio.gather(*(one(key, text) for key, text in requests))


def test_disagreements_are_counted_by_kind_under_load_and_responses_do_not_change(
    shadowed: RunningGateway, upstream: MockUpstream,
) -> None:
    requests = [(ACME if i % 2 else GLOBEX, f"question {i}") for i in range(200)]
    responses = asyncio.run(send_all(shadowed.base_url, requests))
    assert [r.status_code for r in responses] == [200] * 200
    assert {r.headers["x-gateway-target"] for r in responses} == {"up/model-a"}  # the live policy's choice
    # exactly one upstream call per request, all to the live target: the shadow called nothing
    assert len(upstream.requests) == 200 and {r.model for r in upstream.requests} == {"model-a"}
    metrics = wait_compared(shadowed, 200)
    assert counter(metrics, "gateway_shadow_requests_total", result="compared") == 200
    assert counter(metrics, "gateway_shadow_requests_total", result="dropped") == 0
    assert counter(metrics, "gateway_shadow_disagreements_total", kind="route") == 100  # globex's half
    assert counter(metrics, "gateway_shadow_disagreements_total", kind="targets") == 100
    assert counter(metrics, "gateway_shadow_disagreements_total", kind="guards") == 200  # candidate-only guard
    assert counter(metrics, "gateway_shadow_disagreements_total", kind="outcome") == 0
    assert counter(metrics, "gateway_shadow_disagreements_total", kind="auth") == 0
    # the shadow's guards count nothing in the live guard metrics
    assert "gateway_guard_verdicts_total{" not in metrics


def test_a_request_the_candidate_would_block_is_still_answered(
    shadowed: RunningGateway, upstream: MockUpstream,
) -> None:
    responses = asyncio.run(send_all(shadowed.base_url, [(ACME, f"my key is {SECRET}")] * 10))
    assert [r.status_code for r in responses] == [200] * 10
    assert len(upstream.requests) == 10
    metrics = wait_compared(shadowed, 10)
    assert counter(metrics, "gateway_shadow_disagreements_total", kind="outcome") == 10
    assert counter(metrics, "gateway_shadow_disagreements_total", kind="guards") == 10


def test_a_cache_disagreement_is_counted_as_cache(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both cache the alias; the candidate also caches sampled requests (up to temperature 1)."""
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    live = policy(upstream.base_url, candidate=False, shadow="candidate.yaml").replace(
        "model: model-a}", "model: model-a, cache: {when: {max_temperature: 0, seed: false}}}")
    (tmp_path / "candidate.yaml").write_text(policy(upstream.base_url, candidate=False).replace(
        "model: model-a}", "model: model-a, cache: {when: {max_temperature: 1, seed: false}}}"))
    running = RunningGateway(live, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    try:
        with httpx.Client(base_url=running.base_url, timeout=30) as client:
            for i in range(10):
                body = {"model": "chat", "messages": [{"role": "user", "content": f"q {i}"}],
                        "temperature": 0.5 if i % 2 else 0}
                reply = client.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {ACME}"})
                assert reply.status_code == 200 and reply.headers["x-gateway-cache"] == ("bypass" if i % 2 else "miss")
        metrics = wait_compared(running, 10)
        assert counter(metrics, "gateway_shadow_disagreements_total", kind="cache") == 5  # the sampled half
        assert counter(metrics, "gateway_shadow_disagreements_total", kind="outcome") == 0
        assert counter(metrics, "gateway_shadow_disagreements_total", kind="route") == 0
    finally:
        running.stop()


def test_promoting_the_candidate_is_a_reload(shadowed: RunningGateway, upstream: MockUpstream) -> None:
    source = shadowed.gateway.source
    assert source is not None and shadowed.gateway.loop is not None
    source.write_text(policy(upstream.base_url, candidate=True))  # the candidate, live, with no shadow
    result = asyncio.run_coroutine_threadsafe(shadowed.gateway.reload("test"), shadowed.gateway.loop).result(30)
    assert result["result"] == "ok"
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(shadowed.base_url + "/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {GLOBEX}"})
    assert answer.status_code == 200 and answer.headers["x-gateway-target"] == "up/model-b"
    assert shadowed.gateway.runtime.policy.shadow is None


def test_an_invalid_shadow_policy_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "candidate.yaml").write_text("version: 1\nmodels: {}\n")
    root = tmp_path / "gateway.yaml"
    with pytest.raises(PolicyError) as caught:
        compile_text(policy("http://127.0.0.1:9", candidate=False, shadow="candidate.yaml"), str(root),
                     {"MOCK_UPSTREAM_KEY": "x"})
    found = [str(issue) for issue in caught.value.issues]
    assert f"{root}:10: server.shadow_policy: the shadow policy {tmp_path / 'candidate.yaml'} is invalid" in found
    assert f"{tmp_path / 'candidate.yaml'}:1: missing required field `providers`" in found


def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    live = compile_text(policy("http://127.0.0.1:9", candidate=False) + "server: {shadow_queue: 2}\n", "p.yaml",
                        {"MOCK_UPSTREAM_KEY": "x"})
    metrics = Metrics()
    shadow = Shadow(live, live, metrics, None)  # not started: nothing takes requests off the queue
    head = SimpleNamespace(credential=ACME, raw_headers=())
    ctx: Any = SimpleNamespace(raw_body=b'{"model":"chat","messages":[]}', endpoint=Endpoint.CHAT, head=head,
                               key=None, dialect=None)
    for _ in range(5):
        shadow.submit(ctx)
    assert shadow.queue.qsize() == 2
    rendered = metrics.render().decode()
    assert counter(rendered, "gateway_shadow_requests_total", result="dropped") == 3


def test_no_shadow_policy_no_stage() -> None:
    live = compile_text(policy("http://127.0.0.1:9", candidate=False), "p.yaml", {"MOCK_UPSTREAM_KEY": "x"})
    stages = [stage.name for stage in Gateway(live).runtime.pipeline.stages]
    assert "shadow" not in stages
