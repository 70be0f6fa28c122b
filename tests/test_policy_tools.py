"""The policy lifecycle commands: `gateway test` over every example policy's shipped cases, `explain`,
`diff`, bad case files, and the schema (every field described, every example valid, the docs current)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.auth.keys import VirtualKey
from gateway.dryrun.decide import Decider, DecisionRequest
from gateway.dryrun.decisions import Decisions, RouteDecision, TargetsDecision, disagreements
from gateway.policy import compile_text
from gateway.policy.accounting_schema import LimitSpec
from gateway.policy.reference import policy_schema, reference_markdown
from tests.conftest import REPO, SHARED

EXAMPLES = REPO / "policies" / "examples"
EXAMPLE_POLICIES = sorted(EXAMPLES.glob("*.yaml"))
NO_SECRETS = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_KEY"))}


def gateway_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env=NO_SECRETS)


def offline_copy(policy: Path, folder: Path) -> Path:
    """The guards example names spaCy's en_core_web_lg; offline tests use the shared pipeline instead."""
    text = policy.read_text()
    if "en_core_web_lg" not in text:
        return policy
    copy = folder / policy.name
    copy.write_text(text.replace("model: en_core_web_lg", f"model: {SHARED / 'models' / 'en_ner_sm_port-1.0.0'}"))
    return copy


@pytest.mark.parametrize("policy", EXAMPLE_POLICIES, ids=lambda p: p.stem)
def test_every_example_policy_passes_its_shipped_cases_without_credentials(policy: Path, tmp_path: Path) -> None:
    cases = sorted((EXAMPLES / "cases" / policy.stem).glob("*.yaml"))
    assert cases, f"no cases for {policy.name} in policies/examples/cases/{policy.stem}/"
    run = gateway_cli("test", str(offline_copy(policy, tmp_path)), *map(str, cases))
    assert run.returncode == 0, run.stdout + run.stderr
    count = sum(len(yaml.safe_load(case.read_text())["cases"]) for case in cases)
    assert run.stdout.strip().endswith(f"{count} passed, 0 failed")


def test_a_failing_case_exits_1_with_a_readable_diff(tmp_path: Path) -> None:
    cases = tmp_path / "wrong.yaml"
    cases.write_text("cases:\n  - name: wrong order\n    caller: {key_name: search-team}\n"
                     "    request: {model: cheap, messages: [{role: user, content: hi}]}\n"
                     "    expect: {targets: [azure/gpt-4o-mini], rule: nope, blocked: false}\n")
    run = gateway_cli("test", "policies/examples/routing.yaml", str(cases))
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"FAIL {cases}:2: wrong order",
        "     rule: expected nope, got null",
        '     targets: expected ["azure/gpt-4o-mini"], got ["openai/gpt-4o-mini","azure/gpt-4o-mini",'
        '"together/meta-llama/Llama-3.3-70B-Instruct-Turbo"]',
        "0 passed, 1 failed",
    ]


def test_a_bad_case_file_names_file_line_and_field(tmp_path: Path) -> None:
    cases = tmp_path / "bad.yaml"
    cases.write_text("cases:\n  - name: typo\n    request: {model: gpt-4o}\n    expct: {}\n"
                     "    expect: {blocked: maybe, targets: x}\n  - name: who\n    caller: {key_name: nobody}\n"
                     "    request: {model: gpt-4o}\n    expect: {}\n")
    run = gateway_cli("test", "policies/examples/openai.yaml", str(cases))
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"{cases}:4: cases[0].expct: unknown field `expct` (allowed: caller, endpoint, expect, headers, name, request)",
        f"{cases}:5: cases[0].expect.blocked: expected `bool`, got `str`",
        f"{cases}:5: cases[0].expect.targets: expected `array`, got `str`",
    ]
    cases.write_text("cases:\n  - name: who\n    caller: {key_name: nobody}\n    request: {model: gpt-4o}\n"
                     "    expect: {}\n")
    run = gateway_cli("test", "policies/examples/openai.yaml", str(cases))
    assert run.returncode == 1 and "caller: the policy has no key named `nobody`" in run.stdout
    cases.write_text("cases: []\n")
    assert gateway_cli("test", "policies/examples/openai.yaml", str(cases)).stderr.strip() == \
        f"{cases}:1: cases: a case file needs at least one case"


def test_explain_prints_every_decision(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
    run = gateway_cli("explain", "--policy", "policies/examples/teams.yaml", str(request), "--key-name", "search-app")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("policy:   policies/examples/teams.yaml (version ")
    assert lines[1:] == [
        "request:  /v1/chat/completions  model gpt-4o-mini",
        "auth:     key search-app, tenant search; may use gpt-4o-mini",
        "limits:   tenant search: rpm 1200, concurrent 50; alias gpt-4o-mini: rpm 6000; "
        "tenant search: budget $2000/month (soft), past 80% -> gpt-4o-mini",
        "          reserves 4104 tokens, $0.002459 at most; what is already counted decides (not read offline)",
        "route:    no rule matched -> gpt-4o-mini (priority)",
        "targets:  1. openai/gpt-4o-mini  2. azure/gpt-4o-mini",
        "outcome:  sent to the first target",
        "(offline: nothing was sent; breakers read as closed, latency and load as unknown)",
    ]
    run = gateway_cli("explain", "--policy", "policies/examples/routing.yaml", str(request), "--json")
    decided = json.loads(run.stdout)
    assert decided["blocked"] is True and decided["status"] == 401 and decided["blocked_by"] == "auth"


def test_explain_shows_the_cache_decision_and_its_reason(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "faq", "messages": [{"role": "user", "content": "hi"}],
                                   "temperature": 0.2}))
    policy = "policies/examples/cache.yaml"
    run = gateway_cli("explain", "--policy", policy, str(request), "--key-name", "support-bot")
    assert run.returncode == 0, run.stderr
    assert "cache:    lookup yes, exact and semantic, store yes (mode on)" in run.stdout.splitlines()
    run = gateway_cli("explain", "--policy", policy, str(request), "--key-name", "support-bot",
                      "--header", "Cache-Control: no-cache")
    assert "cache:    lookup no, store yes (mode on, Cache-Control: no-cache)" in run.stdout.splitlines()
    request.write_text(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                                   "temperature": 0.2}))
    run = gateway_cli("explain", "--policy", policy, str(request), "--key-name", "support-bot", "--json")
    assert json.loads(run.stdout)["cache"] == {
        "lookup": False, "store": False, "semantic": False,
        "reason": "not cacheable (temperature above the policy's, no seed)"}


def test_explain_refuses_a_request_no_counter_could_let_through(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 250_000}))
    run = gateway_cli("explain", "--policy", "policies/examples/accounting.yaml", str(request), "--key-name", "ci-bot")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.startswith("          reserves 250") and line.endswith(
        "more than the whole tpm of key ci-bot: refused whatever is counted") for line in lines), lines
    assert "outcome:  refused with 429 by limits: the request needs" in run.stdout
    assert "route:" not in run.stdout  # refused before routing
    # A hard budget smaller than the request's largest possible cost, with no tpm in the way.
    policy = tmp_path / "budget.yaml"
    policy.write_text("version: 1\nauth: none\nproviders: {openai: {kind: openai, base_url: http://127.0.0.1:9/v1}}\n"
                      "prices: {gpt-4o: {input_per_mtok: 2.5, output_per_mtok: 10}}\n"
                      "models: {gpt-4o: {provider: openai, model: gpt-4o, budget: {usd: 1, period: day}}}\n")
    request.write_text(json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 200_000}))
    run = gateway_cli("explain", "--policy", str(policy), str(request), "--json")
    decided = json.loads(run.stdout)
    assert (decided["status"], decided["blocked_by"]) == (429, "limits"), decided
    assert decided["limits"]["refused"] == "budget of alias gpt-4o" and decided["limits"]["max_usd"] > 1
    request.write_text(json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 50_000}))  # $0.5 at most: the counters decide
    decided = json.loads(gateway_cli("explain", "--policy", str(policy), str(request), "--json").stdout)
    assert decided["blocked"] is False and decided["limits"]["refused"] is None


def test_a_cache_mismatch_is_reported(tmp_path: Path) -> None:
    cases = tmp_path / "cache.yaml"
    cases.write_text("cases:\n  - name: no-store\n    caller: {key_name: support-bot}\n"
                     "    headers: {Cache-Control: no-store}\n"
                     "    request: {model: gpt-4o-mini, messages: [{role: user, content: hi}], temperature: 0}\n"
                     "    expect: {cache: {lookup: true, store: true}, limits_refused: tpm of key x}\n"
                     "  - name: no cache on an unknown alias\n    caller: {key_name: support-bot}\n"
                     "    request: {model: nope, messages: [{role: user, content: hi}]}\n"
                     "    expect: {cache: {lookup: true}}\n")
    run = gateway_cli("test", "policies/examples/cache.yaml", str(cases))
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"FAIL {cases}:2: no-store",
        '     limits_refused: expected tpm of key x, got null',
        '     cache: expected {"lookup":true,"store":true}, got {"lookup":true,"store":false}',
        f"FAIL {cases}:7: no cache on an unknown alias",
        '     cache: expected {"lookup":true}, got null',
        "0 passed, 2 failed",
    ]


def test_explain_shows_guard_verdicts_and_never_the_text(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    text = "mail jane.doe@acme-corp.com my key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789AB"
    request.write_text(json.dumps({"model": "demo", "messages": [{"role": "user", "content": text}]}))
    run = gateway_cli("explain", "--policy", str(offline_copy(EXAMPLES / "guards.yaml", tmp_path)), str(request))
    assert run.returncode == 0, run.stderr
    assert "guards:   block  (limits: allow, pii: redact [EMAIL_ADDRESS]" in run.stdout
    assert "secrets: block [OPENAI_KEY]" in run.stdout or "secrets: block [" in run.stdout
    assert "outcome:  refused with 400 by guards" in run.stdout
    assert "jane.doe" not in run.stdout and "sk-proj" not in run.stdout


def test_diff_lists_changes_by_section_and_never_a_hash(tmp_path: Path) -> None:
    old = EXAMPLES / "openai.yaml"
    new = tmp_path / "new.yaml"
    new.write_text(old.read_text()
                   .replace("4d0f6d8b4ac2a7bd0f43c6e7b5d53c5e3a3b2a8c3f6e8f0d1c2b3a4958677869", "ab" * 32)
                   .replace("models: [gpt-4o-mini, text-embedding-3-small]",
                            "models: [gpt-4o-mini]\n    limits: {rpm: 60}")
                   .replace("    model: gpt-4o-mini\n", "    model: gpt-4o-mini-2024-07-18\n")
                   + "prices:\n  gpt-4o: {input_per_mtok: 2.5, output_per_mtok: 10}\n")
    run = gateway_cli("diff", str(old), str(new))
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines() == [
        "~ aliases: gpt-4o-mini changed",
        "    model: gpt-4o-mini -> gpt-4o-mini-2024-07-18",
        "~ limits: search-team changed",
        '    limits: (unset) -> {"rpm":60,"tpm":null,"concurrent":null}',
        "+ prices: gpt-4o added",
        "~ keys: search-team changed",
        "    credential changed",
        '    models: ["gpt-4o-mini","text-embedding-3-small"] -> ["gpt-4o-mini"]',
    ]
    assert "sha256" not in run.stdout and "abab" not in run.stdout
    same = gateway_cli("diff", str(old), str(old))
    assert same.returncode == 0 and same.stdout.strip() == "no changes"
    as_json = json.loads(gateway_cli("diff", str(old), str(new), "--json").stdout)
    assert {(c["section"], c["name"], c["change"]) for c in as_json} >= {("prices", "gpt-4o", "added")}
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 2\n")
    assert gateway_cli("diff", str(old), str(broken)).returncode == 2


def test_diff_sees_every_settings_section_and_a_changed_prices_file(tmp_path: Path) -> None:
    """Every section that is not listed entry by entry is a `settings` change (none left out), and prices are
    compared as they take effect: a prices file's entries too, with the inline `prices:` winning."""
    base = (EXAMPLES / "openai.yaml").read_text() + "prices_file: prices.yaml\n"
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, price, extra in (
        (old, 0.15, ""),
        (new, 0.2, "dynamic_keys: {enabled: true, cache_ttl_s: 7}\naccounting: {default_max_tokens: 512}\n"
                   "telemetry: {quality: {enabled: true}}\ncache: {memory_max_bytes: 2097152}\n"
                   "prices:\n  gpt-4o: {input_per_mtok: 3, output_per_mtok: 10}\n"),
    ):
        folder.mkdir()
        (folder / "policy.yaml").write_text(base + extra)
        (folder / "prices.yaml").write_text(
            f"version: 1\nprices:\n  gpt-4o-mini: {{input_per_mtok: {price}, output_per_mtok: 0.6}}\n"
            "  gpt-4o: {input_per_mtok: 2.5, output_per_mtok: 10}\n")
    run = gateway_cli("diff", str(old / "policy.yaml"), str(new / "policy.yaml"))
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:4] == ["~ prices: gpt-4o changed", "    input_per_mtok: 2.5 -> 3.0",
                         "~ prices: gpt-4o-mini changed", "    input_per_mtok: 0.15 -> 0.2"], lines
    for section, detail in (("dynamic_keys", "cache_ttl_s: 5.0 -> 7"), ("accounting", "default_max_tokens: 4096"),
                            ("telemetry", "quality.enabled: false -> true"),
                            ("cache", "memory_max_bytes: 268435456 -> 2097152")):
        assert f"~ settings: {section} changed" in lines, section
        assert any(line.strip().startswith(detail) for line in lines), (section, lines)
    unchanged_file = gateway_cli("diff", str(old / "policy.yaml"), str(old / "policy.yaml"))
    assert unchanged_file.returncode == 0 and unchanged_file.stdout.strip() == "no changes"


def test_diff_sees_moved_rules_and_changed_targets(tmp_path: Path) -> None:
    old = EXAMPLES / "routing.yaml"
    text = old.read_text()
    first = "  - name: no-images-on-llama\n    when: {alias: [cheap], has_images: true}\n    alias: gpt-4o-mini\n"
    assert first in text
    new = tmp_path / "routing.yaml"  # the first rule goes last (rules is the file's last section), changed
    new.write_text(text.replace(first, "") + first.replace("alias: gpt-4o-mini", "alias: gpt-4o"))
    run = gateway_cli("diff", str(old), str(new))
    assert "~ rules: no-images-on-llama changed" in run.stdout
    assert "    alias: gpt-4o-mini -> gpt-4o" in run.stdout
    assert "~ rules: order moved" in run.stdout


def test_every_field_of_every_section_is_described() -> None:
    schema = policy_schema()
    missing = [f"{name}.{prop}" for name, definition in schema["$defs"].items()
               for prop, body in definition.get("properties", {}).items() if not body.get("description")]
    assert missing == []
    assert schema["$defs"]["ServerSpec"]["properties"]["shadow_policy"]["examples"] == ["candidate.yaml"]


def test_every_example_policy_is_valid_against_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(policy_schema())
    fragments = jsonschema.Draft202012Validator(policy_schema(fragment=True))
    for policy in EXAMPLE_POLICIES + [REPO / "policies" / "gateway.yaml"]:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(policy.read_text()))]
        assert errors == [], policy
    included = sorted((EXAMPLES / "teams").rglob("*.yaml"))
    assert included
    for fragment in included:
        assert [e.message for e in fragments.iter_errors(yaml.safe_load(fragment.read_text()))] == [], fragment
    # and it catches what the loader refuses
    bad = yaml.safe_load((EXAMPLES / "openai.yaml").read_text())
    bad["models"]["gpt-4o"]["strategy"] = "fastest"
    assert any("fastest" in e.message for e in validator.iter_errors(bad))


def test_the_committed_reference_and_schemas_are_current() -> None:
    doc = (REPO / "docs" / "policies.md").read_text()
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    assert doc[doc.index(start) + len(start):doc.index(end)] == reference_markdown(), \
        "docs/policies.md is stale: run `python -m gateway.policy.reference docs`"
    for name, fragment in (("policy.schema.json", False), ("policy-fragment.schema.json", True)):
        committed = json.loads((REPO / "docs" / name).read_text())
        assert committed == policy_schema(fragment=fragment), \
            f"docs/{name} is stale: run `python -m gateway.policy.reference docs`"


def test_disagreements_compare_kinds_and_targets_by_set_when_the_order_is_chance() -> None:
    base = Decisions(policy_version="a", endpoint="chat/completions", route=RouteDecision(route="x"),
                     targets=TargetsDecision(order=("a/1", "b/2")))
    same = Decisions(policy_version="b", endpoint="chat/completions", route=RouteDecision(route="x"),
                     targets=TargetsDecision(order=("a/1", "b/2")))
    assert disagreements(base, same) == []
    swapped = Decisions(policy_version="b", endpoint="chat/completions", route=RouteDecision(route="x"),
                        targets=TargetsDecision(order=("b/2", "a/1")))
    assert disagreements(base, swapped) == ["targets"]
    chance = Decisions(policy_version="b", endpoint="chat/completions", route=RouteDecision(route="x"),
                       targets=TargetsDecision(order=("b/2", "a/1"), deterministic=False))
    assert disagreements(base, chance) == []
    blocked = Decisions(policy_version="b", endpoint="chat/completions", blocked=True, status=404)
    assert disagreements(base, blocked) == ["outcome", "route", "targets"]


def test_a_run_time_key_is_accepted_only_by_a_policy_with_dynamic_keys() -> None:
    base = "version: 1\nauth: keys\nproviders: {d: {kind: demo}}\nmodels: {m: {provider: d, model: x}}\n"
    record = VirtualKey("app", "search", b"\x01" * 32, frozenset({"m"}), limits=LimitSpec(rpm=5))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = DecisionRequest(body, credential="gw-made-at-run-time", run_time_key=record)

    async def decide(text: str) -> Decisions:
        decider = Decider(compile_text(text, "p.yaml"))
        await decider.start()
        try:
            return await decider.decide(request)
        finally:
            await decider.aclose()

    accepted = asyncio.run(decide(base + "dynamic_keys: {enabled: true}\n"))
    assert not accepted.blocked and accepted.auth is not None and accepted.auth.tenant == "search"
    assert accepted.limits is not None and accepted.limits.limits[0].rpm == 5
    refused = asyncio.run(decide(base + "keys: [{name: k, tenant: t, hash: 'sha256:" + "0" * 64 + "'}]\n"))
    assert refused.blocked and refused.status == 401


def test_the_dry_run_shows_the_guards_of_the_alias_a_rule_sends_the_request_to() -> None:
    """As the guard stage runs them: a rule that moves a request from an unguarded alias to a guarded one brings that
    alias's guards (they were the named alias's: none, so a dry run said nothing would be redacted)."""
    text = ("version: 1\nauth: none\nproviders: {d: {kind: demo}}\n"
            "models: {local: {provider: d, model: x}, external: {provider: d, model: y}}\n"
            "rules: [{name: long, when: {alias: [local], prompt_tokens_over: 30}, alias: external}]\n"
            "guards: {models: {external: {pii: {kind: pii, engine: patterns}}}}\n")

    async def decide(content: str) -> Decisions:
        decider = Decider(compile_text(text, "p.yaml"))
        await decider.start()
        try:
            body = json.dumps({"model": "local", "messages": [{"role": "user", "content": content}]}).encode()
            return await decider.decide(DecisionRequest(body))
        finally:
            await decider.aclose()

    moved = asyncio.run(decide("please write to jane.doe@mailbox.org about the invoice for last month " * 3))
    assert moved.route is not None and moved.route.route == "external"
    assert moved.guards is not None and [(v.guard, v.verdict) for v in moved.guards.guards] == [("pii", "redact")]
    stayed = asyncio.run(decide("hi"))
    assert stayed.route is not None and stayed.route.route == "local" and stayed.guards is None
