"""A credential written into `telemetry.tracing.otlp_endpoint` (user:password@, or an `api_key=` query parameter) is
refused, as it is in a provider's `base_url` ("credentials in base_url are not allowed"): the collector's credential
belongs in `otlp_headers_env`. Observed: accepted without a word, sent (aiohttp turns the userinfo into a Basic
Authorization header), and printed whole by `gateway diff`, whose output lands in CI logs and pull requests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.policy import PolicyError, compile_text
from tests.conftest import REPO

POLICY = """\
version: 1
auth: none
providers:
  demo: {{kind: demo}}
models:
  demo: {{provider: demo, model: demo-1}}
telemetry:
  tracing: {{enabled: true, otlp_endpoint: "{endpoint}"}}
"""


@pytest.mark.parametrize("endpoint", [
    "https://user:s3cretpass@collector.example.com/v1/traces",
    "https://collector.example.com/v1/traces?api_key=abcdef123456",
])
def test_a_credential_in_the_otlp_endpoint_is_refused(endpoint: str) -> None:
    with pytest.raises(PolicyError) as refused:
        compile_text(POLICY.format(endpoint=endpoint), "p.yaml", env={})
    assert any("otlp_endpoint" in issue.path for issue in refused.value.issues)
    assert not any("s3cretpass" in str(issue) or "abcdef123456" in str(issue) for issue in refused.value.issues)


def test_gateway_diff_never_prints_a_collector_credential(tmp_path: Path) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(POLICY.format(endpoint="https://user:s3cretpass@collector.example.com/v1/traces"))
    new.write_text(POLICY.format(endpoint="https://user:n3wpass@collector.example.com/v1/traces"))
    done = subprocess.run([sys.executable, "-m", "gateway", "diff", str(old), str(new)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert "s3cretpass" not in done.stdout + done.stderr and "n3wpass" not in done.stdout + done.stderr, done.stdout


@pytest.mark.parametrize(("endpoint", "said"), [
    ("https://user:s3cretpass@collector.example.com/v1/traces", "credentials in otlp_endpoint are not allowed"),
    ("https://s3cretpass@collector.example.com/v1/traces", "credentials in otlp_endpoint are not allowed"),
    ("https://collector.example.com/v1/traces?api_key=s3cretpass", "the query parameter `api_key` looks like"),
    ("https://collector.example.com/v1/traces?x-sig=s3cretpass", "the query parameter `x-sig` looks like"),
    ("https://collector.example.com/v1/traces?tenant=Bearer%20s3cretpass", "the query parameter `tenant` looks"),
])
def test_the_refusal_points_to_otlp_headers_env_without_the_value(endpoint: str, said: str) -> None:
    with pytest.raises(PolicyError) as refused:
        compile_text(POLICY.format(endpoint=endpoint), "p.yaml", env={})
    [issue] = refused.value.issues
    assert (issue.file, issue.line, issue.path) == ("p.yaml", 8, "telemetry.tracing.otlp_endpoint"), issue
    assert said in issue.message and "otlp_headers_env" in issue.message, issue.message
    assert "s3cretpass" not in str(issue), issue


def test_a_url_that_is_not_http_is_refused_without_quoting_a_credential_in_it() -> None:
    """Its shape is refused as before, but quoted only when it can hold no credential: the refusal lands in `gateway
    check`'s output, a reload's answer and the log. So is a provider's `base_url`."""
    with pytest.raises(PolicyError) as refused:
        compile_text(POLICY.format(endpoint="ftp://user:s3cretpass@collector/v1/traces"), "p.yaml", env={})
    assert any("is not an http(s) URL" in issue.message for issue in refused.value.issues), refused.value.issues
    assert not any("s3cretpass" in str(issue) for issue in refused.value.issues), refused.value.issues
    with pytest.raises(PolicyError) as shown:
        compile_text(POLICY.format(endpoint="collector:4318/v1/traces"), "p.yaml", env={})
    assert "`collector:4318/v1/traces` is not an http(s) URL" in str(shown.value)
    provider = POLICY.replace("demo: {{kind: demo}}", "demo: {{kind: openai, base_url: 'htps://u:s3cretpass@h/v1'}}")
    with pytest.raises(PolicyError) as base_url:
        compile_text(provider.format(endpoint="http://collector:4318/v1/traces"), "p.yaml", env={})
    assert any(issue.path == "providers.demo.base_url" for issue in base_url.value.issues), base_url.value.issues
    assert "s3cretpass" not in str(base_url.value), base_url.value


@pytest.mark.parametrize("endpoint", [
    "http://collector:4318/v1/traces",
    "https://collector.example.com/v1/traces?tenant=prod&region=eu",
    "https://@collector.example.com/v1/traces",
])
def test_an_endpoint_without_a_credential_still_loads(endpoint: str) -> None:
    policy = compile_text(POLICY.format(endpoint=endpoint), "p.yaml", env={})
    assert policy.spec.telemetry.tracing.otlp_endpoint == endpoint
