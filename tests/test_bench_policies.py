"""The benchmarks' policies load: each kind of gateway `bench/instructions.py` and `bench/features.py` start, and
the templates of `bench/run.py`. A policy the gateway refuses (a validation added later) would leave a benchmark
waiting for a gateway that never came up."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bench import instructions
from bench.run import render_policy
from gateway.policy import compile_text

BENCH = Path(__file__).resolve().parents[1] / "bench"
ENV = {"BENCH_UPSTREAM_KEY": "sk-bench", "BENCH_REDIS_URL": "redis://127.0.0.1:6379/15"}
HASH = "sha256:" + hashlib.sha256(b"sk-bench").hexdigest()


@pytest.mark.parametrize("gateway", ["main", "telemetry", "logged", "quality", "bare"])
def test_every_gateway_of_the_feature_benchmarks_loads(gateway: str) -> None:
    policy = compile_text(instructions.policy_text(gateway, 8001, 8002), "policy.features.yaml", ENV)
    assert policy.models and not any("never applies" in warning for warning in policy.warnings)


def test_the_feature_benchmarks_redis_gateway_loads() -> None:
    state = 'state: {backend: redis, url_env: BENCH_REDIS_URL, key_prefix: "gwinstr:test:"}'
    assert compile_text(instructions.policy_text("main", 8001, 8002, state), "policy.features.yaml", ENV).models


@pytest.mark.parametrize(("template", "extra"), [
    ("policy.template.yaml", {}),
    ("policy.scale.template.yaml", {"{pool_size}": "256", "{pool_timeout_s}": "5"}),
])
def test_the_run_templates_load(template: str, extra: dict[str, str | None]) -> None:
    text = render_policy(BENCH / template, upstream_port=8001, gateway_port=8002, hash_=HASH, extra=extra)
    assert compile_text(text, template, ENV).models
