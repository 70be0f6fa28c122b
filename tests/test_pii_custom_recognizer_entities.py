"""A custom pii recognizer is looked for: beside the default set when the policy lists no `entities`, and
`gateway check` refuses a listed `entities` that leaves its type out (it would never find anything).

Before: the recognizer's type was dropped from every analysis unless listed under `entities`, and listing it
replaced the default set (e-mails, cards... no longer checked); `gateway check` said ok.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FULL_KEY, REPO, SHARED, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

MODEL = str(SHARED / "models" / "en_ner_sm_port-1.0.0")
EMAIL = "jane.doe@mailbox.org"
EMP = "EMP-123456"
RECOGNIZER = 'emp: {entity: EMPLOYEE_ID, patterns: [{regex: "EMP-\\\\d{6}", score: 0.9}]}'
ENGINES = {"patterns": "engine: patterns", "ner": f"engine: ner, model: {MODEL}"}


def _guards() -> str:
    models, guards = [], []
    for engine, settings in ENGINES.items():
        for action in ("block", "redact"):
            alias = f"{engine}-{action}"
            models.append(f"  {alias}: {{provider: mock, model: mock-model}}\n")
            guards.append(f"    {alias}:\n      pii: {{kind: pii, places: [input], {settings}, action: {action}, "
                          f"recognizers: {{{RECOGNIZER}}}}}\n")
    # A custom type that presidio also has a recognizer for, outside the default set: only the custom one runs.
    models.append("  patterns-url: {provider: mock, model: mock-model}\n")
    guards.append("    patterns-url:\n      pii: {kind: pii, places: [input], recognizers: "
                  "{wiki: {entity: URL, patterns: [{regex: 'intranet/\\w+', score: 0.9}]}}}\n")
    return "".join(models) + "guards:\n  models:\n" + "".join(guards)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(policy_text(upstream.base_url) + _guards(), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _chat(gw: RunningGateway, model: str, text: str) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": model, "messages": [{"role": "user", "content": text}]}, timeout=30)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_custom_recognizer_blocks_with_the_default_set(gw: RunningGateway, upstream: MockUpstream,
                                                         engine: str) -> None:
    for text, entity in ((f"my id is {EMP}", "EMPLOYEE_ID"), (f"write to {EMAIL}", "EMAIL_ADDRESS")):
        before = len(upstream.requests)
        response = _chat(gw, f"{engine}-block", text)
        assert response.status_code == 400, (text, response.text)
        assert entity in response.json()["error"]["message"]
        assert EMP not in response.text and EMAIL not in response.text
        assert "pii.block=1" in response.headers["x-gateway-guards"]
        assert len(upstream.requests) == before


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_custom_recognizer_redacts_beside_the_default_set(gw: RunningGateway, upstream: MockUpstream,
                                                            engine: str) -> None:
    response = _chat(gw, f"{engine}-redact", f"employee {EMP} writes from {EMAIL} today")
    assert response.status_code == 200, response.text
    sent = upstream.requests[-1].json["messages"][-1]["content"]
    assert sent == "employee <EMPLOYEE_ID> writes from <EMAIL_ADDRESS> today"
    assert "pii.redact=2" in response.headers["x-gateway-guards"]


def test_a_custom_type_outside_the_default_set_does_not_switch_on_the_engines_own(
    gw: RunningGateway, upstream: MockUpstream,
) -> None:
    response = _chat(gw, "patterns-url", f"see https://example.org/docs and intranet/wiki, or {EMAIL}")
    assert response.status_code == 200, response.text
    sent = upstream.requests[-1].json["messages"][-1]["content"]
    assert sent == "see https://example.org/docs and <URL>, or <EMAIL_ADDRESS>"


def _check(tmp_path: Path, pii: str) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    text = textwrap.dedent("""\
        version: 1
        auth: none
        providers:
          demo: {kind: demo}
        models:
          demo: {provider: demo, model: demo-1}
        guards:
          global:
            pii:
        """) + textwrap.indent(textwrap.dedent(pii), "      ")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "gateway", "check", str(path)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    return result, path, text


@pytest.mark.parametrize("engine", list(ENGINES))
def test_check_refuses_listed_entities_that_leave_a_recognizers_type_out(tmp_path: Path, engine: str) -> None:
    engine_lines = "".join(f"{line}\n" for line in ENGINES[engine].split(", "))
    result, path, text = _check(tmp_path, "kind: pii\n" + engine_lines + textwrap.dedent("""\
        action: block
        entities: {EMAIL_ADDRESS: {}}
        recognizers:
          emp:
            entity: EMPLOYEE_ID
            patterns: [{regex: "EMP-\\\\d{6}", score: 0.9}]
        """))
    line = text.splitlines().index("          entity: EMPLOYEE_ID") + 1
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"{path}:{line}: guards.global.pii.recognizers.emp.entity: `EMPLOYEE_ID` is not under this guard's " \
           "`entities`" in output
    assert "never finds anything" in output and "ok (" not in output


@pytest.mark.parametrize("listed", ["", "entities: {EMAIL_ADDRESS: {}, EMPLOYEE_ID: {threshold: 0.8}}\n"])
def test_check_accepts_the_default_set_or_listed_entities_with_the_type(tmp_path: Path, listed: str) -> None:
    result, path, _ = _check(tmp_path, "kind: pii\naction: block\n" + listed + "recognizers: {" + RECOGNIZER + "}\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{path}: ok (" in result.stdout
