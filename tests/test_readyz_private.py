"""/readyz answers anyone, so of a refused reload it shows the result, trigger, version and how many errors: the
errors themselves (every alias of a mistyped one, provider names, file paths) only to the admin token, as
`POST /admin/reload` does. A credential pasted into an `*_env` field in place of a variable's name is reported
without being echoed, in /admin/reload's answer, the log and `gateway check`'s warnings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.policy import compile_text
from tests.conftest import OTHER_TENANT_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

ADMIN = "admin-token-for-readyz-private-0123456789"
HIDDEN = "globex-secret-project"
PASTED_KEY = "AIzaSyD4x9Q2m7Lk0pTn3vR8sWb6cYe1uHgJfZa"  # Gemini's key shape, where a variable's name goes


@pytest.fixture
def served(tmp_path: Path, upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("GW_ADMIN", ADMIN)  # a reload reads the process's environment
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    text = policy_text(upstream.base_url, admin_token_env="GW_ADMIN") + \
        f"  {HIDDEN}: {{provider: mock, model: mock-model}}\n"
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN": ADMIN},
                             source=tmp_path / "gateway.yaml").start()
    yield running
    running.stop()


def _break(running: RunningGateway, old: str, new: str) -> dict:
    source = running.gateway.source
    assert source is not None
    source.write_text(source.read_text().replace(old, new, 1))
    answer = httpx.post(running.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert answer.status_code == 422, answer.text
    return answer.json()


def _readyz(running: RunningGateway, credential: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    answer = httpx.get(running.url + "/readyz", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer


def test_readyz_counts_a_refused_reloads_errors_and_shows_them_to_the_admin_token_only(
    served: RunningGateway,
) -> None:
    assert httpx.get(served.url + f"/v1/models/{HIDDEN}",
                     headers={"Authorization": f"Bearer {OTHER_TENANT_KEY}"}).status_code == 404
    refused = _break(served, "  demo: {provider: demo, model: demo-1}",
                     "  demo: {provider: demo, model: demo-1, context_fallback: dmeo}")
    assert any(HIDDEN in error for error in refused["errors"])  # the operator's answer is whole
    for credential in (None, OTHER_TENANT_KEY, "not-the-admin-token"):  # no key, a tenant's key, a wrong token
        ready = _readyz(served, credential)
        assert HIDDEN not in ready.text and "dmeo" not in ready.text and "gateway.yaml" not in ready.text, ready.text
        assert ready.json()["last_reload"] == {"result": "invalid", "trigger": "admin", "version": refused["version"],
                                               "error_count": len(refused["errors"])}
    # The admin token's bearer reads the errors and the count a probe reads (one field for every caller)
    assert _readyz(served, ADMIN).json()["last_reload"] == {**refused, "error_count": len(refused["errors"])}
    head = httpx.head(served.url + "/readyz")
    assert head.status_code == 200 and not head.content


def test_metrics_answers_head_as_the_max_requests_gate_lets_it_through(served: RunningGateway) -> None:
    head = httpx.head(served.url + "/metrics")
    assert head.status_code == 200 and not head.content, head.status_code
    assert head.headers["content-type"].startswith("text/plain") and head.headers["x-request-id"]


def test_a_credential_pasted_as_a_variable_name_is_never_echoed(served: RunningGateway) -> None:
    refused = _break(served, "api_key_env: MOCK_UPSTREAM_KEY", f"api_key_env: {PASTED_KEY}")
    assert PASTED_KEY not in str(refused), refused
    assert any("api_key_env: its value looks like a credential, not the name of an environment variable" in error
               for error in refused["errors"]), refused
    assert PASTED_KEY not in _readyz(served).text and PASTED_KEY not in _readyz(served, ADMIN).text


@pytest.mark.parametrize("pasted", [PASTED_KEY, "AKIAIOSFODNN7EXAMPLE", "ghp_x7Kq2Lm9Pz4Rt6Vw8Yb1Nc3Df5Gh7Jk9Lm2",
                                    "k8Jd7Hq2Lx9Pm4Rt6Vw8Yb1Nc3Df5Gh7"])
def test_gateway_check_warns_of_a_pasted_credential_without_echoing_it(pasted: str) -> None:
    text = policy_text("http://127.0.0.1:9/v1").replace("api_key_env: MOCK_UPSTREAM_KEY", f"api_key_env: {pasted}", 1)
    warnings = compile_text(text, "gateway.yaml", {}, require_env=False).warnings
    assert any("looks like a credential" in warning for warning in warnings), warnings
    assert not any(pasted in warning for warning in warnings), warnings
    named = compile_text(text.replace(pasted, "OPENAI_API_KEY_PRODUCTION_2024"), "gateway.yaml", {},
                         require_env=False).warnings  # a variable's name, unset: named, as before
    assert any("environment variable `OPENAI_API_KEY_PRODUCTION_2024` is not set" in w for w in named), named


@pytest.mark.parametrize("field", ["admin_token_env", "metrics_token_env"])
def test_a_token_pasted_as_a_variable_name_is_never_echoed(field: str) -> None:
    """As for a provider's credential: the admin or metrics token itself written where its variable's name goes."""
    text = policy_text("http://127.0.0.1:9/v1").replace("server:\n", f"server:\n  {field}: {PASTED_KEY}\n", 1)
    warnings = compile_text(text, "gateway.yaml", {}, require_env=False).warnings
    assert any(f"{field}: its value looks like a credential" in warning for warning in warnings), warnings
    assert not any(PASTED_KEY in warning for warning in warnings), warnings
