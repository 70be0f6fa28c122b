"""Numbers the admin API cannot take, refused where they are given. `gateway keys create --ttl nan` (or `inf`,
`--expires-at`, `rotate --grace`) sent `NaN` in its JSON, which is not JSON: the gateway answered "the request body
is not valid JSON", which named nothing the operator typed. The commands now refuse a number that is not finite
as argparse refuses a bad argument (exit 2), and the client sends no body holding one. And a `ttl_s` so small that
now plus it is now is refused naming `ttl_s`, not `expires_at`, which the request did not hold."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.admin_client import AdminClient, AdminError
from gateway.cli import main
from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

ADMIN_TOKEN = "admin-token-for-cli-number-tests-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def keyed(upstream: MockUpstream) -> Iterator[RunningGateway]:
    text = policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN") + "dynamic_keys: {enabled: true}\n"
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN}).start()
    yield running
    running.stop()


def _keys(running: RunningGateway) -> list[dict[str, Any]]:
    listing = httpx.get(running.url + "/admin/keys", headers=ADMIN, timeout=10)
    assert listing.status_code == 200, listing.text
    data: list[dict[str, Any]] = listing.json()["data"]
    return data


@pytest.mark.parametrize("args", [
    ["create", "--tenant", "acme", "--ttl", "nan"],
    ["create", "--tenant", "acme", "--ttl", "inf"],
    ["create", "--tenant", "acme", "--ttl", "1e400"],
    ["create", "--tenant", "acme", "--expires-at", "NaN"],
    ["create", "--tenant", "acme", "--expires-at", "Infinity"],
    ["rotate", "vk_0123456789abcdef", "--grace", "inf"],
])
def test_the_commands_refuse_it_as_a_bad_argument(
    keyed: RunningGateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str],
) -> None:
    monkeypatch.setenv("GW_ADMIN_TOKEN", ADMIN_TOKEN)
    with pytest.raises(SystemExit) as exited:
        main(["keys", *args, "--url", keyed.url, "--admin-token-env", "GW_ADMIN_TOKEN"])
    assert exited.value.code == 2
    assert "not a finite number" in capsys.readouterr().err
    assert _keys(keyed) == []  # nothing was sent
    assert main(["keys", "create", "--tenant", "acme", "--ttl", "3600", "--url", keyed.url,
                 "--admin-token-env", "GW_ADMIN_TOKEN"]) == 0  # a finite one is taken
    assert len(_keys(keyed)) == 1


def test_the_client_sends_no_body_that_holds_one(keyed: RunningGateway, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A number inside `--limits` JSON (Python's JSON reads `NaN`), or any caller of the client."""
    monkeypatch.setenv("GW_ADMIN_TOKEN", ADMIN_TOKEN)
    client = AdminClient(keyed.url, "GW_ADMIN_TOKEN")
    with pytest.raises(AdminError, match="not finite"):
        client.call("POST", "/admin/keys", {"tenant": "acme", "ttl_s": float("nan")})
    code = main(["keys", "create", "--tenant", "acme", "--limits", '{"rpm": NaN}', "--url", keyed.url,
                 "--admin-token-env", "GW_ADMIN_TOKEN"])
    assert code == 1 and "not finite" in capsys.readouterr().err
    assert _keys(keyed) == []
    made = client.call("POST", "/admin/keys", {"tenant": "acme", "ttl_s": 60.0})  # a finite one goes through
    assert made["tenant"] == "acme"


def test_a_ttl_too_small_to_give_an_expiry_names_ttl_s(keyed: RunningGateway) -> None:
    answer = httpx.post(keyed.url + "/admin/keys", headers=ADMIN, json={"tenant": "acme", "ttl_s": 1e-7}, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "ttl_s", answer.text
    past = httpx.post(keyed.url + "/admin/keys", headers=ADMIN, json={"tenant": "acme", "expires_at": 1000}, timeout=10)
    assert past.status_code == 400 and past.json()["error"]["param"] == "expires_at", past.text
