"""Policy values the checks once let through to a crash, each now an error with file, line and field: a value YAML
cannot make (`!!int eighty`, an impossible date), a `null:` key, a URL `urlsplit` refuses, a regex `re` refuses
with OverflowError, a NUL in a file name. And a pii guard's spaCy package that is not installed: `gateway check`
said ok and `gateway serve` died at start (presidio pip-installs a missing pipeline, `spacy.cli.download`); now
serve and a reload refuse it with its field, `check` warns (an error with `--strict-env`), and nothing downloads.

Dates are strings, as the schema has them: `date: 2024-06-01` needs no quotes (YAML 1.1 made it a `date`)."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.policy import PolicyError, compile_text
from tests.conftest import SHARED, RunningGateway, free_port

BASE = "version: 1\nauth: none\nproviders:\n  d: {kind: demo}\nmodels:\n  chat: {provider: d, model: demo-1}\n"
# (line 7 is the first line after BASE)
PRICE = "    input_per_mtok: 1\n    output_per_mtok: 2\n"

CASES = {
    # --- a value PyYAML cannot construct: an impossible day, an explicit tag its constructor refuses
    "impossible_date": (BASE + "prices:\n  demo-1:\n" + PRICE + "    date: 2025-02-29\n", 11, "prices.demo-1.date"),
    "impossible_date_of_a_target": (
        "version: 1\nauth: none\nproviders:\n  d: {kind: demo}\nmodels:\n  chat:\n    targets:\n"
        "      - provider: d\n        model: demo-1\n        price: {input_per_mtok: 1, output_per_mtok: 2,\n"
        "                date: 2024-13-01}\n", 11, "models.chat.targets[0].price.date"),
    "explicit_int_tag": (BASE + "server:\n  port: !!int eighty\n", 8, "server.port"),
    "explicit_bool_tag": (BASE + "server:\n  metrics: !!bool maybe\n", 8, "server.metrics"),
    "explicit_timestamp_tag": (BASE + "server:\n  host: !!timestamp soon\n", 8, "server.host"),
    "explicit_float_tag_in_an_anchor": (BASE + "server: &s\n  drain_delay_s: !!float soon\n", 8,
                                        "server.drain_delay_s"),
    "a_list_as_a_key": (BASE + "server:\n  port: 8080\n  [a, b]: 1\n", 9, "server"),
    # --- a null key (`null:`/`~:`) in a section, or as a name
    "null_key_in_server": (BASE + "server:\n  port: 8080\n  null: 1\n", 9, "server.null"),
    "null_key_in_alias": ("version: 1\nauth: none\nproviders:\n  d: {kind: demo}\nmodels:\n  chat:\n"
                          "    provider: d\n    model: demo-1\n    ~: x\n", 9, "models.chat.null"),
    "null_alias_name": ("version: 1\nauth: none\nproviders:\n  d: {kind: demo}\nmodels:\n"
                        "  chat: {provider: d, model: demo-1}\n  ~: {provider: d, model: demo-1}\n", 7, "models.null"),
    # --- URLs urlsplit refuses (an IPv6 bracket left open), regexes `re`/`regex` refuse with other exceptions
    "ipv6_base_url": ("version: 1\nauth: none\nproviders:\n  local:\n    kind: openai\n"
                      "    base_url: http://[fd00::1/v1\nmodels:\n  chat: {provider: local, model: m}\n",
                      6, "providers.local.base_url"),
    "ipv6_otlp_endpoint": (BASE + "telemetry:\n  tracing:\n    otlp_endpoint: http://[::1:4318/v1/traces\n", 9,
                           "telemetry.tracing.otlp_endpoint"),
    "regex_repeat_overflow": (BASE + "guards:\n  global:\n    words:\n      kind: denylist\n"
                                     "      patterns: ['a{99999999999}']\n", 11, "guards.global.words.patterns[0]"),
    "allow_pattern_repeat_overflow": (BASE + "guards:\n  global:\n    pii:\n      kind: pii\n"
                                             "      allow_patterns: ['x{99999999999}']\n", 11,
                                      "guards.global.pii.allow_patterns[0]"),
    "recognizer_regex_too_deep": (BASE + "guards:\n  global:\n    pii:\n      kind: pii\n      recognizers:\n"
                                         "        deep:\n          entity: DEEP\n          patterns: [{regex: '"
                                  + "(?:" * 200 + "a" + ")" * 200 + "', score: 0.5}]\n", 14,
                                  "guards.global.pii.recognizers.deep.patterns[0].regex"),
    # --- a NUL in a file name (`open` raises ValueError)
    "nul_in_prices_file": (BASE + 'prices_file: "a\\0b.yaml"\n', 7, "prices_file"),
    "nul_in_an_include": (BASE + 'include: ["a\\0b/*.yaml"]\n', 7, "include"),
    "nul_in_shadow_policy": (BASE + 'server: {shadow_policy: "a\\0b.yaml"}\n', 7, "server.shadow_policy"),
    "nul_in_payload_log_path": (BASE + 'telemetry: {payload_log: {enabled: true, sink: file, path: "a\\0b"}}\n', 7,
                                "telemetry.payload_log.path"),
    "nul_in_entra_token_file": ("version: 1\nauth: none\nmodels:\n  chat: {provider: az, model: m}\nproviders:\n"
                                "  az:\n    kind: azure\n    base_url: https://x.openai.azure.com/openai\n"
                                '    azure: {entra_token_file: "a\\0b"}\n', 9, "providers.az.azure.entra_token_file"),
}


def issues_of(text: str, file: str) -> list[tuple[str, int, str, str]]:
    with pytest.raises(PolicyError) as caught:
        compile_text(text, file, require_env=False)
    return [(i.file, i.line, i.path, i.message) for i in caught.value.issues]


def gateway_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_with_file_line_and_field(name: str) -> None:
    text, line, path = CASES[name]
    found = issues_of(text, "p.yaml")
    assert not any("gateway bug" in message for *_, message in found), found
    assert any(f == "p.yaml" and ln == line and p == path for f, ln, p, _ in found), found


def test_the_messages_say_what_is_wrong() -> None:
    def message(name: str) -> str:
        text, line, path = CASES[name]
        return next(m for _, ln, p, m in issues_of(text, "p.yaml") if ln == line and p == path)

    assert message("explicit_int_tag") == "`eighty` is not a valid `!!int` value"
    assert message("impossible_date") == "`2025-02-29` is not a day of the calendar (YYYY-MM-DD)"
    assert message("null_key_in_server").startswith("unknown field `null` (allowed: access_log, ")
    assert message("ipv6_base_url") == "`http://[fd00::1/v1` is not a URL (Invalid IPv6 URL)"
    assert message("regex_repeat_overflow") == "invalid regular expression: the repetition number is too large"
    assert message("nul_in_prices_file") == "a file name cannot hold a NUL character (`\\0`)"


def test_gateway_check_prints_every_one_located_and_no_traceback(tmp_path: Path) -> None:
    for name, (text, _, _) in CASES.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    run = gateway_cli("check", *(f"{name}.yaml" for name in sorted(CASES)), cwd=tmp_path)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "gateway bug" not in run.stderr, run.stderr[-3000:]
    for name, (_, line, path) in CASES.items():
        assert f"{name}.yaml:{line}: {path}: " in run.stderr, (name, run.stderr[-3000:])


def test_null_keys_of_an_included_file_are_refused_in_that_file(tmp_path: Path) -> None:
    """The merge of an included file once made `~:` the alias `None` (a valid name), and dropped a guard scope's
    entry that was not a mapping: both passed `gateway check`."""
    (tmp_path / "inc.yaml").write_text("null: 1\nserver: {~: 2}\nmodels:\n  ~: {provider: d, model: demo-1}\n"
                                       "guards:\n  models:\n    chat: 3\n")
    found = issues_of(BASE + "include: [inc.yaml]\n", str(tmp_path / "p.yaml"))
    located = {(Path(f).name, ln, p) for f, ln, p, _ in found}
    assert {("inc.yaml", 1, "null"), ("inc.yaml", 2, "server.null"), ("inc.yaml", 4, "models.null"),
            ("inc.yaml", 7, "guards.models.chat")} <= located, found
    assert ("inc.yaml", 4, "models.null", "invalid name `null`: Expected `str`, got `null`") in [
        (Path(f).name, ln, p, m) for f, ln, p, m in found]


def test_dates_are_strings_and_a_written_date_is_taken_unquoted() -> None:
    policy = compile_text(BASE + "prices:\n  demo-1:\n" + PRICE + "    date: 2024-06-01\n", "p.yaml")
    assert policy.spec is not None and policy.spec.prices["demo-1"].date == "2024-06-01"
    # (a date tagged as one is still a `date`, which the field, a string, refuses)
    found = issues_of(BASE + "prices:\n  demo-1:\n" + PRICE + "    date: !!timestamp 2024-06-01\n", "p.yaml")
    assert ("p.yaml", 11, "prices.demo-1.date", "expected `str`, got `date`") in found


def test_the_prices_file_names_itself_and_its_line(tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("version: 1\nprices:\n  demo-1: {input_per_mtok: 1, output_per_mtok: 2,\n"
                      "           date: 2025-02-29}\n  demo-2: {input_per_mtok: 1, output_per_mtok: !!float x}\n")
    (tmp_path / "p.yaml").write_text(BASE + "prices_file: prices.yaml\n")
    run = gateway_cli("check", "p.yaml", cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-1500:]
    assert "prices.yaml:5: prices.demo-2.output_per_mtok: `x` is not a valid `!!float` value" in run.stderr
    prices.write_text("version: 1\nprices:\n  demo-1: {input_per_mtok: 1, output_per_mtok: 2,\n"
                      "           date: 2025-02-29}\n")
    run = gateway_cli("check", "p.yaml", cwd=tmp_path)
    assert run.returncode == 1, run.stdout
    assert "prices.yaml:4: prices.demo-1.date: `2025-02-29` is not a day of the calendar" in run.stderr
    prices.write_text("version: 1\nprices:\n  demo-1: {input_per_mtok: 1, output_per_mtok: 2, date: 2024-02-29}\n")
    assert gateway_cli("check", "p.yaml", cwd=tmp_path).returncode == 0  # (a leap day, unquoted)
    prices.write_text("# nothing yet\n")
    assert "prices.yaml:1: the prices file is empty" in gateway_cli("check", "p.yaml", cwd=tmp_path).stderr


# --- a pii guard's `engine: ner` naming a spaCy package that is not installed

MISSING = "en_core_web_sm"
NER = ("version: 1\nauth: none\nserver: {{host: 127.0.0.1, port: {port}, watch_policy: false}}\nproviders:\n"
       "  d: {{kind: demo}}\nmodels:\n  chat: {{provider: d, model: demo-1}}\nguards:\n  global:\n"
       "    pii: {{kind: pii, engine: ner, model: {model}}}\n")
WHERE = "p.yaml:10: guards.global.pii.model: the spaCy package `en_core_web_sm` is not installed"


@pytest.fixture
def not_installed() -> str:
    if importlib.util.find_spec(MISSING) is not None:
        pytest.skip(f"{MISSING} is installed here")
    return MISSING


def test_serve_refuses_a_missing_spacy_package_with_its_field_and_check_warns(
    not_installed: str, tmp_path: Path,
) -> None:
    (tmp_path / "p.yaml").write_text(NER.format(port=free_port(), model=not_installed))
    serve = gateway_cli("serve", "--policy", "p.yaml", cwd=tmp_path)  # (refused before it listens)
    assert serve.returncode != 0
    assert WHERE in serve.stderr and "Traceback" not in serve.stderr, serve.stderr[-1500:]
    strict = gateway_cli("check", "--strict-env", "p.yaml", cwd=tmp_path)
    assert strict.returncode == 1 and WHERE in strict.stderr, strict.stdout + strict.stderr
    # Without --strict-env, as for an unset variable: a policy repository's CI need not install a 500 MB model.
    check = gateway_cli("check", "p.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert f"warning: {WHERE}" in check.stderr and "`gateway serve` refuses this policy until it is" in check.stderr
    # The same guard redacting the payload log: its own field.
    text = BASE + f"telemetry:\n  payload_log:\n    redact:\n      pii: {{kind: pii, engine: ner, model: {MISSING}}}\n"
    assert any(ln == 10 and p == "telemetry.payload_log.redact.pii.model"
               for _, ln, p, _ in _strict_issues(text))


def _strict_issues(text: str) -> list[tuple[str, int, str, str]]:
    with pytest.raises(PolicyError) as caught:
        compile_text(text, "p.yaml")
    return [(i.file, i.line, i.path, i.message) for i in caught.value.issues]


def test_a_reload_to_a_missing_spacy_package_is_refused_and_the_policy_stays(not_installed: str,
                                                                             tmp_path: Path) -> None:
    source = tmp_path / "p.yaml"
    running = RunningGateway(BASE, {}, source=source).start()
    try:
        assert running.gateway.loop is not None
        source.write_text(NER.format(port=running.port, model=not_installed))
        result = asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), running.gateway.loop).result(60)
        assert result["result"] != "ok", result
        assert "guards.global.pii.model" in str(result) and "is not installed" in str(result), result
        assert running.gateway.runtime.policy.version == running.policy.version  # the policy in force stays
    finally:
        running.stop()


def test_a_pipeline_directory_or_an_installed_package_passes(tmp_path: Path) -> None:
    from gateway.policy.guard_check import spacy_pipeline_found

    model = SHARED / "models" / "en_ner_sm_port-1.0.0"
    if not model.is_dir():
        pytest.skip(f"no shared pipeline at {model}")
    compile_text(NER.format(port=8080, model=model), str(tmp_path / "p.yaml"))  # --strict-env's check: no issue
    assert spacy_pipeline_found(str(model))
    assert not spacy_pipeline_found("en_core_web_xx_not_a_package") and not spacy_pipeline_found("a.b")
