"""A routing rule that sends a request to another alias does not apply to a caller whose key may not use that alias
(its `models`): a client could otherwise meet the rule's conditions (a header it sends) and be answered by an alias
it gets 404 for when it names it. Such a rule is skipped: the next rule the key may use applies, else the strategy of
the alias asked for. The router, the guard stage and the offline tools (`gateway route`, `gateway explain`) all
decide it the same way. Real gateway and mock upstream: the target that answered and what it received are asserted."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.auth.keys import hash_key
from gateway.cli import main
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

NARROW_KEY = "gw-test-rule-hop-narrow-33333333333333333333"  # models: [chat]
MIDDLE_KEY = "gw-test-rule-hop-middle-44444444444444444444"  # models: [chat, mid]
WIDE_KEY = "gw-test-rule-hop-wide-5555555555555555555555"  # every alias
BETA = {"X-Beta": "1"}
SECRET_WORD = "zqfrobnitz"  # redacted by `mid`'s guard, and only by it


def policy(providers: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: narrow, tenant: acme, hash: "{hash_key(NARROW_KEY)}", models: [chat]}}
          - {{name: middle, tenant: acme, hash: "{hash_key(MIDDLE_KEY)}", models: [chat, mid]}}
          - {{name: wide, tenant: acme, hash: "{hash_key(WIDE_KEY)}"}}
        providers:
          {providers}
        models:
          chat: {{provider: p, model: chat-model}}
          mid: {{provider: p, model: mid-model}}
          big: {{provider: p, model: big-model}}
        rules:
          - name: beta-to-big
            when: {{alias: [chat], header: {{X-Beta: ["*"]}}}}
            alias: big
          - name: beta-to-mid
            when: {{alias: [chat], header: {{X-Beta: ["*"]}}}}
            alias: mid
        guards:
          models:
            mid:
              words: {{kind: denylist, action: redact, topics: {{hop_test_topic: [{SECRET_WORD}]}}}}
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    providers = f"p: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}"
    running = RunningGateway(policy(providers), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def chat(gw: RunningGateway, key: str, alias: str, headers: dict[str, str] | None = None,
         text: str = "hello") -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions",
                      headers={"Authorization": f"Bearer {key}", **(headers or {})},
                      json={"model": alias, "messages": [{"role": "user", "content": text}]}, timeout=10)


def test_a_rule_to_an_alias_the_key_may_not_use_does_not_apply(gw: RunningGateway) -> None:
    assert chat(gw, NARROW_KEY, "big").status_code == 404  # the key may not use `big`
    assert chat(gw, NARROW_KEY, "mid").status_code == 404  # nor `mid`
    hop = chat(gw, NARROW_KEY, "chat", BETA)
    assert hop.status_code == 200, hop.text
    assert hop.headers["x-gateway-target"] == "p/chat-model"  # the alias asked for, by its own strategy


def test_the_next_rule_the_key_may_use_applies(gw: RunningGateway) -> None:
    hop = chat(gw, MIDDLE_KEY, "chat", BETA)
    assert hop.status_code == 200, hop.text
    assert hop.headers["x-gateway-target"] == "p/mid-model"
    wide = chat(gw, WIDE_KEY, "chat", BETA)  # a key that may use every alias: the first rule, as before
    assert wide.status_code == 200 and wide.headers["x-gateway-target"] == "p/big-model"
    assert chat(gw, MIDDLE_KEY, "chat").headers["x-gateway-target"] == "p/chat-model"  # no header: no rule


def test_the_guard_stage_runs_the_guards_of_the_alias_the_router_picks(gw: RunningGateway,
                                                                       upstream: MockUpstream) -> None:
    upstream.requests.clear()
    answer = chat(gw, MIDDLE_KEY, "chat", BETA, text=f"say {SECRET_WORD} twice")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-target"] == "p/mid-model"
    sent = [r for r in upstream.requests if r.model == "mid-model"]
    assert len(sent) == 1
    assert SECRET_WORD not in sent[0].body.decode(), "the request reached `mid` past `mid`'s guards"


def test_gateway_route_and_explain_decide_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "p.yaml"
    file.write_text(policy("p: {kind: demo}"))
    request = tmp_path / "r.json"
    request.write_text('{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}')
    cases = [(NARROW_KEY, "rule: none matched", "route: chat"), (MIDDLE_KEY, "rule: beta-to-mid", "route: mid"),
             (WIDE_KEY, "rule: beta-to-big", "route: big")]
    for key, rule, route in cases:
        assert main(["route", "--policy", str(file), str(request), "--key", key, "--header", "X-Beta: 1"]) == 0
        out = capsys.readouterr().out
        assert rule in out and route in out, out
    explained = {}
    for key, _, _ in cases:
        assert main(["explain", "--policy", str(file), str(request), "--key", key, "--header", "X-Beta: 1"]) == 0
        explained[key] = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("route:"))
    assert explained == {NARROW_KEY: "route:    no rule matched -> chat (priority)",
                         MIDDLE_KEY: "route:    rule beta-to-mid -> mid (priority)",
                         WIDE_KEY: "route:    rule beta-to-big -> big (priority)"}
