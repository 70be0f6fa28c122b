"""The admin and metrics tokens read from the environment are cleaned as provider credentials are: a secret mounted
from a file (`echo tok > file`, a Kubernetes secret) ends in a newline, which no presented token carries, so the
token is compared without it (with a warning); a control character inside it is refused, naming the variable and
never its value. The `gateway keys` commands read the variable the same way and never print the token."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.policy import PolicyError, compile_text
from tests.conftest import REPO, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

TOKEN = "admin-token-env-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _policy(upstream: MockUpstream, dynamic: bool = False) -> str:
    text = policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN", metrics_token_env="GW_METRICS_TOKEN")
    return text + ("dynamic_keys: {enabled: true}\n" if dynamic else "")


def _env(admin: str, metrics: str | None = None) -> dict[str, str]:
    return {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": admin, "GW_METRICS_TOKEN": metrics or admin}


@pytest.fixture
def keyed(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream, dynamic=True), _env(TOKEN)).start()
    yield running
    running.stop()


def _keys_list(running_url: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GW_CLI_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "list", "--url", running_url, "--admin-token-env", "GW_CLI_TOKEN"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False,
    )


def test_tokens_ending_in_a_newline_open_the_admin_api_and_metrics(
    upstream: MockUpstream, make_gateway: Callable[..., RunningGateway],
) -> None:
    running = make_gateway(_policy(upstream), _env(TOKEN + "\n", "  " + TOKEN + "\r\n"))
    assert running.policy.admin_token == TOKEN and running.policy.metrics_token == TOKEN
    assert any("GW_ADMIN_TOKEN" in w and "whitespace" in w for w in running.policy.warnings)
    assert all(TOKEN not in w for w in running.policy.warnings)
    reload = httpx.post(running.url + "/admin/reload", headers=AUTH, timeout=10)
    assert reload.status_code != 401, reload.text  # taken (nothing to reload: built from text)
    assert httpx.get(running.url + "/metrics", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(running.url + "/metrics", timeout=10).status_code == 401


@pytest.mark.parametrize("var", ["GW_ADMIN_TOKEN", "GW_METRICS_TOKEN"])
def test_a_control_character_inside_a_token_refuses_the_policy_naming_the_variable(
    upstream: MockUpstream, var: str,
) -> None:
    env = {**_env(TOKEN), var: "admin-token\nsecret-part"}
    with pytest.raises(PolicyError) as refused:
        compile_text(_policy(upstream), "p.yaml", env)
    text = str(refused.value)
    assert var in text and "control character" in text and "secret-part" not in text
    checked = compile_text(_policy(upstream), "p.yaml", env, require_env=False)  # `gateway check`: a warning
    assert any(var in w and "control character" in w for w in checked.warnings)
    assert all("secret-part" not in w for w in checked.warnings)


@pytest.mark.parametrize("var", ["GW_ADMIN_TOKEN", "GW_METRICS_TOKEN"])
@pytest.mark.parametrize("value", ["admin-tok-\u20ac-secret-part", "t\u00f6k-secret-part", "tok\u00a0secret-part",
                                   "tok\u200bsecret-part"])
def test_a_token_no_client_can_present_refuses_the_policy_naming_the_variable(
    upstream: MockUpstream, var: str, value: str,
) -> None:
    """A character outside ASCII: a client sends it as UTF-8 (or not at all), the gateway reads a header's bytes as
    Latin-1 (as HTTP has it), so the token never matched and the API stayed locked while it looked configured."""
    with pytest.raises(PolicyError) as refused:
        compile_text(_policy(upstream), "p.yaml", {**_env(TOKEN), var: value})
    text = str(refused.value)
    assert var in text and "outside ASCII" in text and "secret-part" not in text, text


def test_a_blank_token_is_not_a_token(upstream: MockUpstream) -> None:
    with pytest.raises(PolicyError) as refused:
        compile_text(_policy(upstream), "p.yaml", _env(" \n"))
    assert "GW_ADMIN_TOKEN` holds only whitespace" in str(refused.value)


def test_the_keys_command_strips_a_token_ending_in_a_newline(keyed: RunningGateway) -> None:
    made = httpx.post(keyed.url + "/admin/keys", headers=AUTH, json={"tenant": "acme", "name": "nl-key"}, timeout=10)
    assert made.status_code == 201, made.text
    listed = _keys_list(keyed.url, TOKEN + "\n")
    assert listed.returncode == 0, listed.stderr
    assert "nl-key" in listed.stdout and TOKEN not in listed.stdout + listed.stderr


def test_the_keys_command_names_a_bad_token_variable_and_never_prints_the_token(keyed: RunningGateway) -> None:
    done = _keys_list(keyed.url, "admin-token\nsecret-part-of-it")
    assert done.returncode == 1
    assert "GW_CLI_TOKEN" in done.stderr and "control character" in done.stderr, done.stderr
    assert "secret-part" not in done.stderr and "cannot reach" not in done.stderr, done.stderr
    unsendable = _keys_list(keyed.url, "admin-token-\u2603-secret-part")  # UTF-8, but no latin-1 header value
    assert unsendable.returncode == 1 and "GW_CLI_TOKEN" in unsendable.stderr, unsendable.stderr
    assert "secret-part" not in unsendable.stderr and "cannot reach" not in unsendable.stderr, unsendable.stderr
