"""The budget gauges of a key made at run time go with the key.

After `DELETE /admin/keys/{id}`, `gateway_budget_remaining_ratio{scope="key",name=...}` kept the revoked key's last
figure for the life of the process (a reload did not drop it), so an alert on a nearly spent budget fired for good
for a key that no longer existed, and a new key taking the revoked one's name (its counters start from nothing: they
are kept under its id) was shown with the old key's figure (H51).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

ADMIN_TOKEN = "admin-token-revoked-gauges-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ENV = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN}
PRICES = "prices:\n  mock-model: {input_per_mtok: 1000, output_per_mtok: 10000}\n"  # ~0.2 USD a request


def _gauge(running: RunningGateway) -> list[str]:
    return [line for line in running.metrics().splitlines()
            if line.startswith("gateway_budget_remaining_ratio{") and 'name="spender"' in line]


def test_a_revoked_keys_budget_gauges_are_dropped(upstream: MockUpstream, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    text = (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN") + PRICES
            + "dynamic_keys: {enabled: true}\n")
    source = tmp_path / "gateway.yaml"
    running = RunningGateway(text, ENV, source=source).start()
    try:
        made = httpx.post(running.url + "/admin/keys", headers=ADMIN, timeout=10,
                          json={"tenant": "acme", "name": "spender", "budget": {"usd": 1, "period": "day"}}).json()
        api = openai.OpenAI(base_url=running.base_url, api_key=made["key"], max_retries=0, timeout=10)
        for _ in range(3):
            api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=25)
        assert _gauge(running) and float(_gauge(running)[0].split()[-1]) < 0.5  # most of it spent
        assert httpx.delete(f"{running.url}/admin/keys/{made['id']}", headers=ADMIN).status_code == 200
        assert _gauge(running) == []  # gone with the key
        source.write_text(text + "# touched\n")
        assert running.gateway.loop is not None
        result = asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), running.gateway.loop).result(30)
        assert result["result"] == "ok"
        # a new key of that name, nothing spent yet (its counters are its own id's)
        again = httpx.post(running.url + "/admin/keys", headers=ADMIN, timeout=10,
                           json={"tenant": "acme", "name": "spender", "budget": {"usd": 100, "period": "day"}}).json()
        series = _gauge(running)
        assert series == [] or float(series[0].split()[-1]) == 1.0, f"the revoked key's figure is still shown: {series}"
        renewed = openai.OpenAI(base_url=running.base_url, api_key=again["key"], max_retries=0, timeout=10)
        renewed.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=25)
        shown = _gauge(running)  # the new key's own figure, once it spends
        assert len(shown) == 1 and 0.99 < float(shown[0].split()[-1]) < 1.0, shown
    finally:
        running.stop()
