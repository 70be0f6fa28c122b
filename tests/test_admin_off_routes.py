"""With the admin API off (no `server.admin_token_env`) every method of every `/admin/*`
path answers as a path that does not exist: 404 with an OpenAI error body, no `Allow` (docs/admin-api.md). Before,
litestar's method matching answered first: 405 with `Allow` for another method, 204 with `Allow` for OPTIONS, which
told anyone which admin routes exist. On, the admin API answers as before; a reload turns it off and on again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

TOKEN = "b11-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
KEY_ID = "vk_0123456789abcdef"
PATHS = ["/admin/reload", "/admin/keys", f"/admin/keys/{KEY_ID}", f"/admin/keys/{KEY_ID}/rotate", "/admin/usage"]
# The standard methods, and WebDAV's and others' that the HTTP parser accepts and litestar cannot route.
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "PURGE", "MKCOL"]


def _answer(response: httpx.Response) -> tuple[int, str | None, object]:
    """What a client can tell a route by: status, `Allow`, and the body with the path taken out."""
    body = response.json() if response.content else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body["error"]["message"] = body["error"]["message"].rsplit(" ", 1)[0]  # "no route for GET" (sans path)
    return response.status_code, response.headers.get("allow"), body


def _all_hidden(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        for method in METHODS:
            nope = _answer(client.request(method, "/admin/nope", headers=ADMIN))
            assert nope[0] == 404 and nope[1] is None
            if method != "HEAD":
                assert nope[2] == {"error": {"message": f"no route for {method}", "type": "invalid_request_error",
                                             "param": None, "code": "not_found"}}
            for path in PATHS:
                for headers in ({}, ADMIN):  # with the token or without: nothing to tell
                    got = _answer(client.request(method, path, headers=headers))
                    assert got == nope, (method, path, got)


def _policy(upstream: MockUpstream, admin: bool) -> str:
    return policy_text(upstream.base_url, watch_policy="false", **({"admin_token_env": "B11_ADMIN"} if admin else {}))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "B11_ADMIN": TOKEN}
    for name, value in values.items():  # a reload reads the environment
        monkeypatch.setenv(name, value)
    return values


def _reload(running: RunningGateway, text: str) -> None:
    assert running.gateway.source is not None and running.gateway.loop is not None
    running.gateway.source.write_text(text)
    result = asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), running.gateway.loop).result(30)
    assert result["result"] == "ok", result


def test_every_method_of_every_admin_path_is_404_while_the_admin_api_is_off(
        upstream: MockUpstream, env: dict[str, str], tmp_path: Path) -> None:
    running = RunningGateway(_policy(upstream, admin=False), env, source=tmp_path / "gateway.yaml").start()
    try:
        _all_hidden(running.url)
    finally:
        running.stop()


def _on(url: str) -> None:
    """The admin API on: its routes, its 405 with `Allow`, its OPTIONS, its 401, as before."""
    with httpx.Client(base_url=url, timeout=10) as client:
        wrong = client.put("/admin/reload", headers=ADMIN)
        assert (wrong.status_code, wrong.headers.get("allow")) == (405, "POST, OPTIONS")
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        options = client.options("/admin/reload")
        assert (options.status_code, options.headers.get("allow")) == (204, "OPTIONS, POST")
        assert client.request("PROPFIND", f"/admin/keys/{KEY_ID}/rotate").status_code == 405
        assert client.get("/admin/usage").status_code == 401  # no token
        usage = client.get("/admin/usage", headers=ADMIN, params={"scope": "tenant"})
        assert usage.status_code == 200 and usage.json()["scope"] == "tenant"
        listed = client.get("/admin/keys", headers=ADMIN)  # run-time keys off in this policy: its own 404
        assert listed.status_code == 404 and "dynamic_keys" in listed.json()["error"]["message"]


def test_on_the_admin_api_answers_as_before_and_a_reload_turns_it_off_and_on(
        upstream: MockUpstream, env: dict[str, str], tmp_path: Path) -> None:
    running = RunningGateway(_policy(upstream, admin=True), env, source=tmp_path / "gateway.yaml").start()
    try:
        _on(running.url)
        reload = httpx.post(running.url + "/admin/reload", headers=ADMIN, timeout=30)
        assert reload.status_code == 200 and reload.json()["result"] in ("ok", "unchanged")
        _reload(running, _policy(upstream, admin=False))
        _all_hidden(running.url)
        _reload(running, _policy(upstream, admin=True))
        _on(running.url)
    finally:
        running.stop()
