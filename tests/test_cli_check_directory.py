"""A directory where a policy file is expected (`gateway check policies`, `gateway serve --policy policies/`, an
`include:` entry naming a folder, a policy file replaced by a folder before a reload) is refused with a message
that says so. It read `cannot read the policy file policies: [Errno 21] Is a directory: 3`: `open` on the
descriptor named the descriptor's number, and left the descriptor open (one more on every reload that met it).

A policy is one file that names any others in its `include` (docs/policies.md), so a folder is not checked file
by file: `policies/` holds `prices.yaml` too, which is not a policy.

The `gateway` CLI as a subprocess, and a real gateway in this process (`RunningGateway`) for the reload."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.policy import PolicyError, load_policy
from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

BASE = "version: 1\nauth: none\nproviders:\n  d: {kind: demo}\nmodels:\n  chat: {provider: d, model: demo-1}\n"
IS_A_DIRECTORY = "it is a directory; give a policy file"


def _gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def served(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)  # (a reload in this process reads it)
    text = policy_text(upstream.base_url, watch_policy="false", access_log="false")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    yield running
    running.stop()


def test_gateway_check_of_a_directory_says_it_is_one(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "gateway.yaml").write_text(BASE)
    run = _gateway("check", "policies", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.splitlines() == [f"policies:1: cannot read the policy file policies: {IS_A_DIRECTORY} (a policy "
                                       "split across files names the others in its `include`)"], run.stderr
    assert "Errno" not in run.stderr

    both = _gateway("check", "policies", "policies/gateway.yaml", cwd=tmp_path)  # the others are still checked
    assert both.returncode == 1 and IS_A_DIRECTORY in both.stderr
    assert "policies/gateway.yaml: ok" in both.stdout, both.stdout


def test_gateway_serve_of_a_directory_says_it_is_one(tmp_path: Path) -> None:
    run = _gateway("serve", "--policy", str(tmp_path), "--port", "1", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{tmp_path}:1: cannot read the policy file {tmp_path}: {IS_A_DIRECTORY}" in run.stderr, run.stderr
    assert "Errno" not in run.stderr and "Traceback" not in run.stderr


def test_an_include_of_a_directory_says_to_include_its_files(tmp_path: Path) -> None:
    (tmp_path / "tenants").mkdir()
    (tmp_path / "root.yaml").write_text(BASE.replace("auth: none\n", "auth: none\ninclude: [tenants]\n"))
    run = _gateway("check", "root.yaml", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.splitlines() == ["root.yaml:3: include: included file is a directory: tenants; include its "
                                       "files with a glob, as `tenants/*.yaml`"], run.stderr


def test_reading_a_directory_leaves_no_descriptor_open(tmp_path: Path) -> None:
    before = _open_descriptors()
    for _ in range(20):
        with pytest.raises(PolicyError):
            load_policy(tmp_path)
    assert _open_descriptors() <= before  # (was one more for each reading)


def test_a_reload_of_a_policy_replaced_by_a_directory_is_refused(served: RunningGateway) -> None:
    gateway = served.gateway
    source, version, loop = gateway.source, gateway.runtime.policy.version, gateway.loop
    assert source is not None and loop is not None
    text = source.read_text()
    source.unlink()
    source.mkdir()
    refused = asyncio.run_coroutine_threadsafe(gateway.reload("test"), loop).result(60)
    assert refused["result"] == "invalid" and refused["version"] == version, refused
    assert refused["errors"] == [f"{source}:1: cannot read the policy file {source}: {IS_A_DIRECTORY} (a policy "
                                 "split across files names the others in its `include`)"], refused

    source.rmdir()  # the file put back: the next reload takes it
    source.write_text(text.replace("models:\n", "models:\n  later: {provider: mock, model: mock-model}\n", 1))
    loaded = asyncio.run_coroutine_threadsafe(gateway.reload("test"), loop).result(60)
    assert loaded["result"] == "ok" and loaded["version"] != version, loaded
