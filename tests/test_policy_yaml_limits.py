"""A policy file's YAML, read safely and as documented: a file over the size limit is refused before it is
parsed (fast, in bounded memory), all the files of a policy counting together; a recursive alias and a too
deep nesting are errors with file and line, never a traceback; `on`/`off` are the strings the docs write.

The `gateway` CLI runs as a subprocess, as an operator or a CI job runs it."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.policy import PolicyError, compile_text, load_policy
from gateway.policy.includes import MAX_POLICY_BYTES
from gateway.policy.yaml_nodes import MAX_DEPTH
from tests.conftest import FULL_KEY, REPO, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

BASE = "version: 1\nauth: none\nproviders:\n  d: {kind: demo}\nmodels:\n  chat: {provider: d, model: demo-1}\n"
ALIAS_LINE = "  a{}: {{provider: d, model: demo-1}}\n"
# Runs `gateway` as a child and prints the child's peak memory (KB), which `getrusage` gives only to its parent.
MEASURED = ("import resource, subprocess, sys\n"
            "run = subprocess.run([sys.executable, '-m', 'gateway', *sys.argv[1:]], capture_output=True, text=True)\n"
            "sys.stderr.write(run.stderr)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.exit(run.returncode)\n")


def gateway_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def measured_check(policy: Path) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """`gateway check policy`, its wall time and its peak memory in KB."""
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", MEASURED, "check", policy.name], capture_output=True, text=True,
                         cwd=policy.parent, timeout=300)
    return run, time.monotonic() - started, int(run.stdout.strip().splitlines()[-1])


def issues(text: str, file: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyError) as caught:
        compile_text(text, file, require_env=False)
    return [str(issue) for issue in caught.value.issues]


def padded(text: str, size: int) -> str:
    """`text` and a comment, `size` bytes in all: as big as a real file, cheap to parse."""
    return text + "#" + "x" * (size - len(text.encode()) - 2) + "\n"


# --- size ---------------------------------------------------------------------------------------------------------


def test_a_50_mb_policy_is_refused_at_once_in_bounded_memory(tmp_path: Path) -> None:
    (tmp_path / "small.yaml").write_text(BASE)
    _, _, baseline_kb = measured_check(tmp_path / "small.yaml")
    aliases = "".join(ALIAS_LINE.format(i) for i in range(25_000))  # ~1 MB: before the limit, 11 s and 200 MB
    (tmp_path / "big.yaml").write_text(BASE + aliases * 50)  # ~50 MB: before, still parsing after 300 s at 4 GB

    run, took, peak_kb = measured_check(tmp_path / "big.yaml")

    assert run.returncode == 1, run.stderr
    assert run.stderr.strip() == (f"big.yaml:1: big.yaml is over 2 MiB ({MAX_POLICY_BYTES:,} bytes), the most a "
                                  "policy may be; refused before it is parsed (see docs/policies.md)")
    assert took < 30, f"took {took:.1f}s"  # (the interpreter's start included; the refusal itself is instant)
    assert peak_kb < baseline_kb + 16 * 1024, (peak_kb, baseline_kb)  # the file is never read whole


def test_a_policy_of_exactly_the_limit_loads_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(padded(BASE, MAX_POLICY_BYTES))
    assert policy.stat().st_size == MAX_POLICY_BYTES
    assert load_policy(policy).models.keys() == {"chat"}

    policy.write_text(padded(BASE, MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    assert [issue.message for issue in caught.value.issues] == [
        f"{policy} is over 2 MiB ({MAX_POLICY_BYTES:,} bytes), the most a policy may be; refused before it is "
        "parsed (see docs/policies.md)"]
    # the same text given directly (the admin API's and the tests' way in)
    assert issues(policy.read_text()) == [
        f"p.yaml:1: p.yaml is over 2 MiB ({MAX_POLICY_BYTES:,} bytes), the most a policy may be; refused before it "
        "is parsed (see docs/policies.md)"]


def test_the_included_files_count_with_the_root_one_named_at_their_include_entry(tmp_path: Path) -> None:
    third = MAX_POLICY_BYTES // 3
    (tmp_path / "root.yaml").write_text(padded(BASE + "include:\n  - one.yaml\n  - two.yaml\n", third))
    (tmp_path / "one.yaml").write_text(padded("prices: {}\n", third))
    (tmp_path / "two.yaml").write_text(padded("tenants: {}\n", third + 1024))  # each file alone is well under

    run = gateway_cli("check", "root.yaml", cwd=tmp_path)

    assert run.returncode == 1
    assert run.stderr.strip() == (
        f"root.yaml:9: two.yaml takes the policy's files together over 2 MiB ({MAX_POLICY_BYTES:,} bytes), the most "
        "a policy may be; refused before it is parsed (see docs/policies.md)")


def test_the_prices_file_counts_too(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(padded(BASE + "prices_file: prices.yaml\n", MAX_POLICY_BYTES - 1000))
    (tmp_path / "prices.yaml").write_text(padded("version: 1\nprices: {}\n", 2000))

    run = gateway_cli("check", "p.yaml", cwd=tmp_path)

    assert run.returncode == 1
    assert run.stderr.strip() == (
        f"p.yaml:7: prices.yaml takes the policy's files together over 2 MiB ({MAX_POLICY_BYTES:,} bytes), the most "
        "a policy may be; refused before it is parsed (see docs/policies.md)")


@pytest.fixture
def served(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    text = policy_text(upstream.base_url, watch_policy="false", access_log="false")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    yield running
    running.stop()


def test_a_reload_of_an_oversized_file_is_refused_at_once_and_the_policy_in_force_keeps_serving(
    served: RunningGateway,
) -> None:
    source, version = served.gateway.source, served.gateway.runtime.policy.version
    assert source is not None
    text = source.read_text()
    source.write_text(text + "".join(ALIAS_LINE.format(i) for i in range(200_000)))  # ~7 MB of aliases
    loop = served.gateway.loop
    assert loop is not None

    started = time.monotonic()
    result = asyncio.run_coroutine_threadsafe(served.gateway.reload("test"), loop).result(60)
    took = time.monotonic() - started

    assert result["result"] == "invalid" and result["version"] == version
    assert result["errors"] == [f"{source}:1: {source} is over 2 MiB ({MAX_POLICY_BYTES:,} bytes), the most a "
                                "policy may be; refused before it is parsed (see docs/policies.md)"]
    assert took < 2, f"the refusal took {took:.2f}s"
    api = openai.OpenAI(base_url=served.base_url, api_key=FULL_KEY, max_retries=0)
    answer = api.chat.completions.with_raw_response.create(model="chat",
                                                            messages=[{"role": "user", "content": "hi"}])
    assert answer.headers["x-gateway-policy-version"] == version
    assert answer.parse().choices[0].message.content


# --- booleans -----------------------------------------------------------------------------------------------------


def test_the_cache_example_of_the_docs_loads_as_written_with_mode_on(tmp_path: Path) -> None:
    """docs/cache.md shows `mode: on`, unquoted: YAML 1.1 read it as `true`, which no mode is."""
    example = re.search(r"```yaml\n(.*?)```", (REPO / "docs" / "cache.md").read_text(), re.S)
    assert example is not None and "      mode: on " in example.group(1)
    policy = ("version: 1\nauth: none\nproviders:\n  openai: {kind: openai, base_url: https://api.openai.com/v1, "
              "api_key_env: OPENAI_API_KEY}\n" + example.group(1))

    spec = compile_text(policy, "cache.yaml", {}, require_env=False).spec

    assert spec is not None
    cache = spec.models["gpt-4o-mini"].cache
    assert cache is not None and cache.mode == "on"


def test_on_and_off_are_strings_and_true_and_false_booleans(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        BASE.replace("model: demo-1}", "model: demo-1, cache: {mode: on}}")
        + "server:\n  watch_policy: False\n  access_log: TRUE\n"
        + "tenants:\n  acme: {}\n"
        + "guards:\n  global:\n    pii: {kind: pii}\n  tenants:\n    acme:\n      pii: {kind: pii, mode: off}\n")

    run = gateway_cli("check", "p.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    spec = load_policy(tmp_path / "p.yaml").spec
    assert spec is not None
    assert spec.guards.tenants["acme"]["pii"].mode == "off"
    assert (spec.server.watch_policy, spec.server.access_log) == (False, True)


def test_a_boolean_field_given_yes_or_on_says_to_write_true_or_false() -> None:
    assert issues(BASE + "server:\n  watch_policy: yes\n  access_log: On\n") == [
        "p.yaml:8: server.watch_policy: expected true or false, got `yes` (a string: write true or false)",
        "p.yaml:9: server.access_log: expected true or false, got `On` (a string: write true or false)",
    ]


# --- recursion and depth --------------------------------------------------------------------------------------------


def test_a_recursive_alias_is_an_error_at_its_line_in_check_explain_and_diff(tmp_path: Path) -> None:
    (tmp_path / "rec.yaml").write_text(BASE.replace("chat: {", "chat: &m {").replace("demo-1}", "demo-1,\n"
                                                                                      "    description: *m}"))
    (tmp_path / "ok.yaml").write_text(BASE)
    (tmp_path / "request.json").write_text(json.dumps({"model": "chat", "messages": [{"role": "user",
                                                                                          "content": "hi"}]}))
    expected = "rec.yaml:7: a recursive YAML alias: `*m` is inside the `&m` it names; refused"

    for args in (["check", "rec.yaml"], ["explain", "--policy", "rec.yaml", "request.json"],
                 ["diff", "ok.yaml", "rec.yaml"]):
        run = gateway_cli(*args, cwd=tmp_path)
        assert run.returncode in (1, 2), (args, run.stderr)
        assert run.stderr.strip() == expected, (args, run.stderr)


def test_a_recursive_alias_in_a_block_list_is_reported_at_the_alias() -> None:
    assert issues(BASE + "keys: &k\n  - name: a\n  - *k\n") == [
        "p.yaml:9: a recursive YAML alias: `*k` is inside the `&k` it names; refused"]


@pytest.mark.parametrize(("levels", "expected"), [
    (MAX_DEPTH + 50, f"p.yaml:6: nested more than {MAX_DEPTH} levels deep; refused"),
    (5_000, "p.yaml:6: YAML syntax error: exceeded maximum nesting depth"),  # (libyaml's own limit, 1000)
])
def test_a_deep_nesting_is_an_error_with_its_line(tmp_path: Path, levels: int, expected: str) -> None:
    (tmp_path / "p.yaml").write_text(BASE.replace("demo-1}", "demo-1, description: " + "[" * levels + "]" * levels
                                                   + "}"))

    run = gateway_cli("check", "p.yaml", cwd=tmp_path)

    assert run.returncode == 1
    assert run.stderr.strip() == expected


def test_a_nesting_deep_only_through_aliases_is_refused_too() -> None:
    """Each anchor nested 60 levels, the second inside the first's alias: 120 levels once expanded."""
    deep = "[" * 60 + "x" + "]" * 60
    found = issues(BASE + f"x-a: &a {deep}\nx-b: {deep.replace('x', '*a')}\n")
    assert found == [f"p.yaml:7: nested more than {MAX_DEPTH} levels deep through its YAML aliases (this anchor's); "
                     "refused"]


def test_a_case_file_with_a_recursive_alias_or_a_deep_nesting_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(BASE)
    (tmp_path / "rec.yaml").write_text("cases:\n  - &c\n    name: loops\n    request: {model: chat, messages: []}\n"
                                       "    expect: {blocked: false}\n    caller: *c\n")
    (tmp_path / "deep.yaml").write_text("cases:\n  - " + "[" * 500 + "]" * 500 + "\n")

    run = gateway_cli("test", "p.yaml", "rec.yaml", "deep.yaml", cwd=tmp_path)

    assert run.returncode == 2
    assert run.stderr.splitlines() == ["rec.yaml:6: a recursive YAML alias: `*c` is inside the `&c` it names; refused",
                                       f"deep.yaml:2: nested more than {MAX_DEPTH} levels deep; refused"]
