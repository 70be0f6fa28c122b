"""A key revoked (or rotated) while a policy reload is starting stops working on the replica that reloads.

The new runtime adopts the old one's found keys when it is built (`DynamicKeys.adopt`, in `Gateway._build`), and
listens on `keys:changes` only once it starts, after its guards' analyzers are built (a second or more for
presidio's). A revocation in between reached only the old runtime's cache: the new one was swapped in holding the
revoked key and accepted it for `cache_ttl_s` (H51). The old runtime now passes what it forgets on to the one that
adopted its keys, and a runtime listens before it serves.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from gateway.guards.runtime import GuardRuntime
from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

ADMIN_TOKEN = "admin-token-revoke-during-reload-0123456"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ENV = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN}
GUARD = "guards:\n  global:\n    pii: {kind: pii, engine: patterns}\n"


def _policy(upstream: MockUpstream, extra: str = "") -> str:
    return (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN")
            + "dynamic_keys: {enabled: true, cache_ttl_s: 60}\n" + extra)


def _status(url: str, key: str) -> int:
    api = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)
    try:
        api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}])
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


@pytest.mark.parametrize("change", ["revoke", "rotate"])
def test_a_key_revoked_while_a_reload_starts_stops_working(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    original = GuardRuntime.start

    async def slow_start(self: GuardRuntime) -> None:  # as a first build of presidio's analyzers takes (~1 s here)
        await asyncio.sleep(1.0)
        await original(self)

    monkeypatch.setattr(GuardRuntime, "start", slow_start)
    source = tmp_path / "gateway.yaml"
    running = RunningGateway(_policy(upstream), ENV, source=source).start()
    try:
        made = httpx.post(running.url + "/admin/keys", headers=ADMIN, json={"tenant": "acme"}, timeout=10).json()
        assert _status(running.url, made["key"]) == 200  # found: this process caches it (60 s)
        source.write_text(_policy(upstream, GUARD))  # the operator adds a pii guard...
        reloaded: dict[str, object] = {}
        reload = threading.Thread(target=lambda: reloaded.update(
            httpx.post(running.url + "/admin/reload", headers=ADMIN, timeout=30).json()))
        reload.start()
        time.sleep(0.3)  # ...and, meanwhile, revokes (or rotates) a leaked key
        if change == "revoke":
            answer = httpx.delete(f"{running.url}/admin/keys/{made['id']}", headers=ADMIN, timeout=10)
        else:
            answer = httpx.post(f"{running.url}/admin/keys/{made['id']}/rotate", headers=ADMIN, timeout=10)
        assert answer.status_code == 200
        reload.join()
        assert reloaded["result"] == "ok"
        time.sleep(0.5)
        # docs/admin-api.md: "The key stops working before the answer is sent on the gateway that took the call"
        assert _status(running.url, made["key"]) == 401, "the revoked secret still works after the reload"
    finally:
        running.stop()
