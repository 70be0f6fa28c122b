"""A provider credential variable that is set but empty (or only whitespace) is as unusable as an unset one:
`gateway serve` (and `gateway check --strict-env`) refuse it, naming the variable, as they refuse an empty
`admin_token_env`/`metrics_token_env` ("holds only whitespace") or `state.url_env` ("is not set").

Observed: the policy loads, and every request goes upstream with `Authorization: Bearer ` / `x-api-key: ` (empty),
so the gateway starts ready and each call fails upstream with 401 (`credentials`). An empty variable is what
`environment: {OPENAI_API_KEY: ${OPENAI_API_KEY}}` in docker compose gives when the host has none, or a Kubernetes
secret with an empty value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.policy import PolicyError, compile_text
from tests.conftest import REPO

POLICY = """\
version: 1
auth: keys
providers:
  openai: {kind: openai, base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}
  claude: {kind: anthropic, api_key_env: ANTHROPIC_API_KEY}
  extra: {kind: openai, base_url: https://llm.example.com/v1, headers_env: {X-Org-Token: ORG_TOKEN}}
  az: {kind: azure, base_url: https://x.openai.azure.com, azure: {entra_token_env: ENTRA_TOKEN}}
models:
  gpt-4o-mini: {provider: openai, model: gpt-4o-mini}
  claude: {provider: claude, model: claude-3-5-haiku-latest}
  extra: {provider: extra, model: m}
  az: {provider: az, model: gpt-4o-mini}
keys:
  - {name: a, hash: "sha256:0000000000000000000000000000000000000000000000000000000000000000", tenant: t}
"""
GOOD = {"OPENAI_API_KEY": "sk-a", "ANTHROPIC_API_KEY": "sk-b", "ORG_TOKEN": "tok", "ENTRA_TOKEN": "ey"}


def test_the_policy_loads_with_every_credential_set() -> None:
    compile_text(POLICY, "p.yaml", env=GOOD)


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
@pytest.mark.parametrize("var", sorted(GOOD))
def test_a_blank_credential_variable_is_refused_when_serving(var: str, blank: str) -> None:
    env = {**GOOD, var: blank}
    with pytest.raises(PolicyError) as refused:
        policy = compile_text(POLICY, "p.yaml", env=env)
        sent = {name: dict(provider.headers) for name, provider in policy.providers.items()}
        pytest.fail(f"loaded; the providers send {sent}")
    assert any(var in issue.message for issue in refused.value.issues), refused.value.issues


@pytest.mark.parametrize(("blank", "problem"), [("", "is empty"), ("  \n", "holds only whitespace")])
def test_a_blank_credential_is_a_warning_without_strict_env_as_an_unset_one_is(blank: str, problem: str) -> None:
    """`gateway check` (no --strict-env) needs no credentials: a blank variable is a warning, as an unset one is, and
    the provider sends no header at all rather than an empty one."""
    policy = compile_text(POLICY, "p.yaml", env={**GOOD, "OPENAI_API_KEY": blank}, require_env=False)
    assert f"p.yaml:4: providers.openai.api_key_env: environment variable `OPENAI_API_KEY` {problem}" in \
        policy.warnings
    assert "Authorization" not in policy.providers["openai"].headers
    unset = compile_text(POLICY, "p.yaml", env={k: v for k, v in GOOD.items() if k != "OPENAI_API_KEY"},
                         require_env=False)
    assert "p.yaml:4: providers.openai.api_key_env: environment variable `OPENAI_API_KEY` is not set" in \
        unset.warnings


def test_a_blank_collector_header_variable_is_refused_too(tmp_path: Path) -> None:
    """`telemetry.tracing.otlp_headers_env` shares the check: `gateway check --strict-env` fails naming the
    variable (an empty one only warned, and the exporter then posted without its credential)."""
    policy = POLICY + ("telemetry:\n  tracing: {enabled: true, otlp_endpoint: 'http://127.0.0.1:4318/v1/traces', "
                       "otlp_headers_env: {Authorization: COLLECTOR_TOKEN}}\n")
    (tmp_path / "policy.yaml").write_text(policy)
    clean = {k: v for k, v in os.environ.items() if k not in GOOD and k != "COLLECTOR_TOKEN"}
    strict = subprocess.run([sys.executable, "-m", "gateway", "check", "--strict-env", "policy.yaml"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**clean, "PYTHONPATH": str(REPO), **GOOD, "COLLECTOR_TOKEN": " "})
    assert strict.returncode == 1, strict.stdout
    assert ("policy.yaml:16: telemetry.tracing.otlp_headers_env.Authorization: environment variable "
            "`COLLECTOR_TOKEN` holds only whitespace") in strict.stderr, strict.stderr
