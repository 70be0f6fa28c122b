"""`gateway explain` and `gateway test` make their decisions in serving's order. A rule that moves a request to an
alias with `limits` of its own has the request counted against them by the router (`Router._enter`), after the guards
and the cache: the dry run checked that alias's tpm window at admission, so a request the moved-to alias's guards
block (400 by `guards` when served) was reported refused 429 by `limits`. Each case runs the CLI in a subprocess and
sends the same request to a real gateway in front of the mock upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.auth.keys import hash_key
from tests.conftest import REPO, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-b23-hop-order-key-00000000000000000000"
AWS = "AKIAIOSFODNN7EXAMPLE"


def _policy(url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: k2, tenant: t2, hash: "{hash_key(KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "{url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: up, model: model-a}}
          big: {{provider: up, model: model-big, limits: {{tpm: 5000}}}}
          cached:
            provider: up
            model: model-c
            cache: {{mode: on, ttl_s: 60, when: {{max_temperature: 0}}}}
        rules:
          - {{name: t2-big, when: {{tenant: [t2], alias: [chat]}}, alias: big}}
          - {{name: bob-big, when: {{alias: [cached], user: [bob]}}, alias: big}}
        guards:
          models:
            big: {{sec: {{kind: secrets}}}}
        """)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MOCK_UPSTREAM_KEY"}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=180, env=env)


def _explain(policy: Path, body: dict[str, Any], folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    request = folder / "request.json"
    request.write_text(json.dumps(body))
    return _cli("explain", "--policy", str(policy), str(request), "--key-name", "k2", *extra)


def _served(running: RunningGateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(running.base_url + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"})


def test_a_request_the_hop_alias_guards_block_is_refused_by_guards_as_served(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream, tmp_path: Path,
) -> None:
    text = _policy(upstream.base_url)
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    body = {"model": "chat", "max_tokens": 6000, "messages": [{"role": "user", "content": f"key {AWS}"}]}

    running = make_gateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    served = _served(running, body)
    assert served.status_code == 400, served.text[:500]
    assert served.json()["error"]["code"] == "content_policy_violation"
    assert upstream.requests == []

    run = _explain(policy, body, tmp_path, "--json")
    assert run.returncode == 0, run.stderr
    decided = json.loads(run.stdout)
    assert (decided["blocked"], decided["status"], decided["blocked_by"]) == (True, 400, "guards"), decided
    assert decided["error"] == served.json()["error"]["message"]  # the live answer's message, word for word
    assert decided["guards"]["verdict"] == "block"
    # the limits of the alias the rule moves it to still apply (listed), but were not what refused it
    applied = [(lim["name"], lim["tpm"], lim["by_rule"]) for lim in decided["limits"]["limits"]]
    assert applied == [("big", 5000, "t2-big")]
    assert decided["limits"].get("refused") is None
    assert decided.get("route") is None  # refused before the router

    text_run = _explain(policy, body, tmp_path)
    assert "outcome:  refused with 400 by guards" in text_run.stdout, text_run.stdout

    cases = tmp_path / "cases.yaml"
    cases.write_text(textwrap.dedent(f"""\
        cases:
          - name: t2's request with an AWS key, more tokens than big's window
            caller: {{key_name: k2}}
            request: {{model: chat, max_tokens: 6000, messages: [{{role: user, content: "key {AWS}"}}]}}
            expect: {{blocked: true, status: 400, blocked_by: guards}}
        """))
    tested = _cli("test", str(policy), str(cases))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_clean_request_too_large_for_the_hop_alias_is_refused_at_the_route_as_served(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream, tmp_path: Path,
) -> None:
    text = _policy(upstream.base_url)
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    body = {"model": "chat", "max_tokens": 6000, "messages": [{"role": "user", "content": "hello"}]}

    running = make_gateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    served = _served(running, body)
    assert served.status_code == 429, served.text[:500]
    assert upstream.requests == []

    run = _explain(policy, body, tmp_path, "--json")
    assert run.returncode == 0, run.stderr
    decided = json.loads(run.stdout)
    assert (decided["blocked"], decided["status"], decided["blocked_by"]) == (True, 429, "limits"), decided
    assert decided["limits"]["refused"] == "tpm of alias big"
    assert decided["guards"]["verdict"] == "allow"  # the guards ran first
    route = decided["route"]  # then the router refused
    assert (route["rule"], route["route"], route["denied"]) == ("t2-big", "big", None), route


def test_the_cache_is_decided_before_the_hop_alias_refuses(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream, tmp_path: Path,
) -> None:
    """The cache stage looks a request up before the router takes the hop alias's limits: the dry run decides the
    cache too, and says that a stored answer would be served before the refusal."""
    text = _policy(upstream.base_url)
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    body = {"model": "cached", "user": "bob", "temperature": 0, "max_tokens": 6000,
            "messages": [{"role": "user", "content": "hello"}]}

    running = make_gateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    served = _served(running, body)
    assert served.status_code == 429, served.text[:500]

    run = _explain(policy, body, tmp_path, "--json")
    assert run.returncode == 0, run.stderr
    decided = json.loads(run.stdout)
    assert (decided["status"], decided["blocked_by"]) == (429, "limits"), decided
    assert decided["cache"]["lookup"] is True and decided["cache"]["store"] is True
    assert decided["route"]["route"] == "big"
    text_run = _explain(policy, body, tmp_path)
    outcome = next(line for line in text_run.stdout.splitlines() if line.startswith("outcome:"))
    assert outcome.startswith("outcome:  refused with 429 by limits: the request needs"), outcome
    assert outcome.endswith("(unless the cache answers it first)"), outcome
