"""A policy's file that is not a regular file (a named pipe, a device) is refused at once with its file and line,
never waited on: a FIFO opened the usual way waits for a writer, for good if none comes. A reload that did so held
the reload lock (every later reload and `POST /admin/reload` hung behind it) and a thread the interpreter's exit
waits for (SIGTERM no longer ended the process); `gateway check` hung too.

A real gateway in this process (`RunningGateway`) and the `gateway` CLI as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

BASE = "version: 1\nauth: none\nproviders:\n  d: {kind: demo}\nmodels:\n  chat: {provider: d, model: demo-1}\n"
REFUSAL = "it is not a regular file (a named pipe, a device or a socket)"


def _release(fifo: Path) -> None:
    """A reader stuck on `fifo` (the defect) gets a writer and an end of file, so that no thread is left waiting."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.fixture
def served(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)  # (a reload in this process reads it)
    text = policy_text(upstream.base_url, watch_policy="false", access_log="false")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    yield running
    running.stop()


def test_gateway_check_refuses_a_named_pipe_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    try:
        run = subprocess.run([sys.executable, "-m", "gateway", "check", fifo.name], capture_output=True, text=True,
                             cwd=tmp_path, timeout=60)
    finally:
        _release(fifo)
    assert run.returncode == 1, run.stderr
    assert f"p.yaml:1: cannot read the policy file p.yaml: {REFUSAL}" in run.stderr + run.stdout


def test_a_prices_file_that_is_a_pipe_is_refused_at_its_entry(tmp_path: Path) -> None:
    (tmp_path / "root.yaml").write_text(BASE + "prices_file: prices.yaml\n")
    fifo = tmp_path / "prices.yaml"
    os.mkfifo(fifo)
    try:
        run = subprocess.run([sys.executable, "-m", "gateway", "check", "root.yaml"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=60)
    finally:
        _release(fifo)
    assert run.returncode == 1, run.stderr
    assert "root.yaml:7: prices_file: cannot read the prices file" in run.stderr and "NotRegularFile" in run.stderr, \
        run.stderr


def test_a_reload_of_a_policy_replaced_by_a_pipe_is_refused_and_the_next_one_loads(served: RunningGateway) -> None:
    gateway = served.gateway
    source, version, loop = gateway.source, gateway.runtime.policy.version, gateway.loop
    assert source is not None and loop is not None
    text = source.read_text()
    source.unlink()
    os.mkfifo(source)
    try:
        refused = asyncio.run_coroutine_threadsafe(gateway.reload("test"), loop).result(60)
    finally:
        _release(source)
    assert refused["result"] == "invalid" and refused["version"] == version, refused
    assert refused["errors"] == [f"{source}:1: cannot read the policy file {source}: {REFUSAL}"]

    source.unlink()  # the file put back, changed: the next reload takes it (the lock was let go)
    source.write_text(text.replace("models:\n", "models:\n  later: {provider: mock, model: mock-model}\n", 1))
    loaded = asyncio.run_coroutine_threadsafe(gateway.reload("test"), loop).result(60)
    assert loaded["result"] == "ok" and loaded["version"] != version, loaded
    api = openai.OpenAI(base_url=served.base_url, api_key=FULL_KEY, max_retries=0)
    answer = api.chat.completions.with_raw_response.create(model="later", messages=[{"role": "user", "content": "hi"}])
    assert answer.headers["x-gateway-policy-version"] == loaded["version"]
