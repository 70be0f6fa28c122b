"""Hot reload: a new policy swaps in under load, requests keep the one they started with,
an invalid policy changes nothing, and what a reload changes really changes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = [{"role": "user", "content": "hello"}]
ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
def reloadable(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("GW_ADMIN_TOKEN", ADMIN_TOKEN)
    text = policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN", watch_interval_s=0.2, access_log="false")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN},
                             source=tmp_path / "gateway.yaml").start()
    yield running
    running.stop()


def reload_now(running: RunningGateway) -> dict[str, Any]:
    assert running.gateway.loop is not None
    return asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), running.gateway.loop).result(30)


def admin_reload(running: RunningGateway, token: str = ADMIN_TOKEN) -> httpx.Response:
    return httpx.post(running.url + "/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_twenty_reloads_under_load_fail_no_request_and_close_old_pools_after_their_last_stream(
    reloadable: RunningGateway,
) -> None:
    source = reloadable.gateway.source
    assert source is not None
    versions = {reloadable.gateway.runtime.policy.version}
    runtimes = [reloadable.gateway.runtime]
    failures: list[str] = []
    seen: list[str] = []
    stop = threading.Event()

    def load(stream: bool) -> None:
        with httpx.Client(base_url=reloadable.base_url, headers=AUTH, timeout=30) as client:
            while not stop.is_set():
                body = {"model": "chat", "messages": MESSAGES, "stream": stream}
                with client.stream("POST", "/chat/completions", json=body) as response:
                    text = response.read().decode()
                    seen.append(response.headers.get("x-gateway-policy-version", "none"))
                    ok = response.status_code == 200 and (not stream or text.endswith("data: [DONE]\n\n"))
                    if not ok:
                        failures.append(f"{response.status_code} {text[-200:]}")

    streaming = threading.Event()

    def long_stream() -> None:  # spans several reloads: its runtime must stay open until it ends
        # n=2: about 45 events 100 ms apart, 4.5 s: longer than twenty reloads take on a loaded machine
        body = {"model": "fault-slow-stream-100", "messages": MESSAGES, "stream": True, "n": 2}
        with httpx.stream("POST", reloadable.base_url + "/chat/completions", headers=AUTH, json=body,
                          timeout=30) as response:
            streaming.set()  # it holds the first runtime from here
            text = response.read().decode()
            if not text.endswith("data: [DONE]\n\n"):
                failures.append("long stream: " + text[-200:])

    workers = [threading.Thread(target=load, args=(s,)) for s in (False, False, True, True)]
    workers.append(threading.Thread(target=long_stream))
    for worker in workers:
        worker.start()
    assert streaming.wait(10)  # on a busy machine the thread may start late: reload only once it streams
    try:
        for n in range(20):
            time.sleep(0.1)
            source.write_text(source.read_text() + f"# reload {n}\n")
            result = admin_reload(reloadable).json() if n % 2 else reload_now(reloadable)
            assert result["result"] in ("ok", "unchanged"), result  # "unchanged": the file watcher was first
            versions.add(result["version"])
            runtimes.append(reloadable.gateway.runtime)
        first = runtimes[0]
        assert first.active >= 1  # the long stream still holds the first policy's runtime ...
        assert first.providers["mock-fast"]._session is not None  # ... and its pool is open
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert not failures, failures[:5]
    assert len(versions) == 21 and set(seen) <= versions and len(set(seen)) > 1
    assert wait(lambda: all(r.providers["mock"]._session is None for r in runtimes[:-1]))
    assert runtimes[-1].providers["mock"]._session is not None
    assert 'gateway_policy_reload_total{result="ok"} 20.0' in reloadable.metrics()


def wait(condition: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    return bool(condition())


def test_an_invalid_policy_keeps_the_last_good_one_and_reports_every_error(reloadable: RunningGateway) -> None:
    source = reloadable.gateway.source
    assert source is not None
    before = reloadable.gateway.runtime.policy.version
    broken = source.read_text().replace("max_body_bytes: 1048576", "max_body_bytes: 1048576\n  colour: blue")
    broken = broken.replace("chat: {provider: mock,", "chat: {provider: nowhere,")
    source.write_text(broken)
    result = reload_now(reloadable)
    assert result["result"] == "invalid" and result["version"] == before
    assert len(result["errors"]) == 2
    assert any("server.colour" in e and "unknown field" in e for e in result["errors"])
    assert any("models.chat.provider" in e and "nowhere" in e for e in result["errors"])
    assert all(e.startswith(f"{source}:") for e in result["errors"])  # file and line
    ready = httpx.get(reloadable.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["policy_version"] == before
    assert ready["last_reload"]["result"] == "invalid"
    assert 'gateway_policy_reload_total{result="invalid"} 1.0' in reloadable.metrics()
    response = httpx.post(reloadable.base_url + "/chat/completions", headers=AUTH,
                          json={"model": "chat", "messages": MESSAGES})
    assert response.status_code == 200 and response.headers["x-gateway-policy-version"] == before


def test_a_changed_file_is_picked_up_by_the_watcher(reloadable: RunningGateway) -> None:
    source = reloadable.gateway.source
    assert source is not None
    before = reloadable.gateway.runtime.policy.version
    source.write_text(source.read_text().replace("access_log: false", "access_log: true"))
    assert wait(lambda: reloadable.gateway.runtime.policy.version != before)
    assert reloadable.gateway.runtime.policy.server.access_log is True
    assert reloadable.gateway.last_reload is not None and reloadable.gateway.last_reload["trigger"] == "file"


def test_settings_read_per_request_change_with_a_reload(reloadable: RunningGateway) -> None:
    source = reloadable.gateway.source
    assert source is not None
    assert httpx.get(reloadable.url + "/metrics").status_code == 200
    body = {"model": "chat", "messages": [{"role": "user", "content": "x" * 600_000}]}
    assert httpx.post(reloadable.base_url + "/chat/completions", headers=AUTH, json=body).status_code == 200
    text = source.read_text().replace("max_body_bytes: 1048576", "max_body_bytes: 500000\n  metrics: false")
    source.write_text(text)
    assert reload_now(reloadable)["result"] == "ok"
    assert httpx.get(reloadable.url + "/metrics").status_code == 404
    assert httpx.post(reloadable.base_url + "/chat/completions", headers=AUTH, json=body).status_code == 413


def test_the_admin_api_needs_its_token_and_is_off_without_one(
    reloadable: RunningGateway, make_gateway: Any,
) -> None:
    assert admin_reload(reloadable, "wrong-token").status_code == 401
    assert httpx.post(reloadable.url + "/admin/reload").status_code == 401
    unchanged = admin_reload(reloadable)
    assert unchanged.status_code == 200 and unchanged.json()["result"] == "unchanged"
    plain = make_gateway()  # no admin_token_env in its policy
    assert admin_reload(plain).status_code == 404
