"""After a refused reload, the files that only the refused version names are watched too, until a version loads.

Operator flow: `git pull` (or a deploy script) writes the root file with a new `include: [extra.yaml]` a moment
before the new file lands. The reload reads the root first: "included file not found", refused. Then the file
appears (or a typo in it is fixed): that must reload, as docs/policies.md says of every file of the policy; the
watcher used to watch the files of the policy in force only, and the old policy served on for good.
"""
from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

EXTRA = "models:\n  extra: {provider: mock, model: extra-model}\n"


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def _policy(upstream: MockUpstream, interval_s: float = 0.1) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_interval_s: {interval_s}}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: first-model}}
        """)


def _including(text: str) -> str:
    return text.replace("version: 1\n", "version: 1\ninclude: [extra.yaml]\n")


def _last(running: RunningGateway) -> dict[str, Any]:
    return running.gateway.last_reload or {}


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], RunningGateway]]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)  # (a reload reads the environment)
    started: list[RunningGateway] = []

    def serve(text: str) -> RunningGateway:
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
        started.append(running)
        return running

    yield serve
    for running in started:
        running.stop()


def test_a_file_named_by_a_refused_version_is_watched_too(
    served: Callable[[str], RunningGateway], upstream: MockUpstream, tmp_path: Path,
) -> None:
    text = _policy(upstream)
    running = served(text)
    first = running.gateway.runtime.policy.version
    time.sleep(0.05)
    (tmp_path / "gateway.yaml").write_text(_including(text))  # the root lands first
    assert _wait(lambda: _last(running).get("result") == "invalid", 10)
    assert "included file not found" in _last(running)["errors"][0]
    (tmp_path / "extra.yaml").write_text(EXTRA)  # then the file it includes
    assert _wait(lambda: running.gateway.runtime.policy.version != first, 5), \
        f"the new file was never noticed: still serving {first}, last reload {running.gateway.last_reload}"
    body = {"model": "extra", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(running.base_url + "/chat/completions", json=body, timeout=10).status_code == 200


def test_fixing_an_included_file_a_refused_version_added_is_noticed(
    served: Callable[[str], RunningGateway], upstream: MockUpstream, tmp_path: Path,
) -> None:
    text = _policy(upstream)
    running = served(text)
    first = running.gateway.runtime.policy.version
    extra = tmp_path / "extra.yaml"
    extra.write_text(EXTRA.replace("provider: mock", "provider: mokc"))  # a typo
    time.sleep(0.05)
    (tmp_path / "gateway.yaml").write_text(_including(text))
    assert _wait(lambda: _last(running).get("result") == "invalid", 10)
    assert "unknown provider `mokc`" in "\n".join(_last(running)["errors"])
    time.sleep(0.2)
    extra.write_text(EXTRA)  # the typo fixed
    assert _wait(lambda: running.gateway.runtime.policy.version != first, 5), \
        f"the fix was never noticed: still serving {first}, last reload {running.gateway.last_reload}"


def test_a_reload_by_hand_refused_is_reported_once_and_its_missing_file_still_reloads(
    served: Callable[[str], RunningGateway], upstream: MockUpstream, tmp_path: Path,
) -> None:
    """SIGHUP or the admin API, not the watcher, met the refusal: the watcher takes the files as that reload read
    them (it does not read the refused version again, reporting it twice), yet the missing file's arrival reloads."""
    text = _policy(upstream, interval_s=0.5)
    running = served(text)
    first = running.gateway.runtime.policy.version
    (tmp_path / "gateway.yaml").write_text(_including(text))
    refused = asyncio.run_coroutine_threadsafe(running.gateway.reload("signal"), running.gateway.loop).result(30)
    assert refused["result"] == "invalid" and "included file not found" in refused["errors"][0]
    time.sleep(1.5)  # three ticks of the watcher, which sees the root changed and a file more to watch
    assert _last(running) is refused, f"the refused version was read again: {running.gateway.last_reload}"
    (tmp_path / "extra.yaml").write_text(EXTRA)
    assert _wait(lambda: running.gateway.runtime.policy.version != first, 5), \
        f"the new file was never noticed: still serving {first}, last reload {running.gateway.last_reload}"
    assert _last(running)["trigger"] == "file"
