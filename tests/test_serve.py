"""`gateway serve` as a real process: default policy, Docker's entry command, workers, SIGTERM drain.

Each server runs through `tests.support.processes.running`: its own process group
(uvicorn's workers and multiprocessing's helpers included), output drained from
threads, and the whole group stopped and waited for when the test ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from gateway.policy.default import PACKAGED_POLICY, resolve_policy_path
from gateway.telemetry.batches import APPLY_AFTER_S
from tests.conftest import free_port
from tests.support.processes import ManagedProcess, group_members, running

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def serving(args: list[str], port: int, cwd: Path = REPO, env: dict[str, str] | None = None,
            ) -> Iterator[ManagedProcess]:
    with running(args, cwd=cwd, env={"PYTHONUNBUFFERED": "1", **(env or {})}) as server:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not become ready:\n{server.text()}")
            time.sleep(0.1)
        yield server


def test_default_policy_answers_with_no_key_and_no_network() -> None:
    port = free_port()
    with serving([sys.executable, "-m", "gateway", "serve", "--port", str(port)], port):
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="anything", max_retries=0)
        answer = api.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello"}])
        assert "demo model" in (answer.choices[0].message.content or "")
        streamed = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], stream=True) if c.choices)
        assert streamed == answer.choices[0].message.content
        assert [m.id for m in api.models.list()] == ["demo", "gpt-4o-mini"]


def _docker_command() -> tuple[list[str], list[str]]:
    text = (REPO / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    health = re.search(r"HEALTHCHECK .*?CMD (\[[^\n]*\])$", text, re.M | re.S).group(1)  # type: ignore[union-attr]
    return entrypoint + cmd, json.loads(health)


def test_the_dockerfile_entry_command_and_healthcheck_work_outside_docker() -> None:
    command, health = _docker_command()
    assert command[0] == "gateway" and "policies/gateway.yaml" in command
    port = free_port()
    gateway_bin = str(Path(sys.executable).with_name("gateway"))
    args = [gateway_bin, *command[1:]]
    args[args.index("8080")] = str(port)
    with serving(args, port):  # run from the repo root, as WORKDIR /app with policies/ mounted
        probe = [sys.executable if health[0] == "python" else health[0], *health[1:]]
        probe[-1] = probe[-1].replace("8080", str(port))
        assert subprocess.run(probe, timeout=10).returncode == 0


def test_sigterm_drains_an_in_flight_stream(tmp_path: Path) -> None:
    policy = tmp_path / "slow.yaml"
    policy.write_text(textwrap.dedent("""\
        version: 1
        server: {drain_timeout_s: 20}
        auth: none
        providers:
          slow: {kind: demo, chunk_delay_ms: 60}
        models:
          slow: {provider: slow, model: demo-slow}
        """))
    port = free_port()
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port)]
    with serving(args, port) as proc:
        body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "Tell me a story"}]}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30) as response:
            chunks = response.iter_text()
            received = next(chunks)
            proc.send_signal(signal.SIGTERM)  # the server only, as an orchestrator would
            time.sleep(0.3)
            assert proc.poll() is None  # still draining
            received += "".join(chunks)
        events = [e for e in received.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text.startswith("Hello! This is the gateway's built-in demo model") and text.endswith("real answers.")
        assert proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean drain
        try:  # after the drain nothing listens any more
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            raise AssertionError("still serving after SIGTERM")
        except httpx.TransportError:
            pass
        assert not group_members(proc.pgid), "the server exited but left processes behind"


def test_several_workers_share_one_port_and_one_metrics_view(tmp_path: Path) -> None:
    port = free_port()
    # TMPDIR: the multiprocess metrics folder is made here, so that the test can see it go.
    args = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--workers", "2"]
    with serving(args, port, env={"TMPDIR": str(tmp_path)}) as server:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(20):
            with httpx.Client() as fresh:  # new connections spread over the workers
                assert fresh.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).status_code == 200
        time.sleep(APPLY_AFTER_S * 3)  # the other worker's last requests: written by its batches' timer
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        total = re.search(r'gateway_requests_total\{endpoint="chat",model="demo",status="200"\} (\S+)', metrics)
        assert total is not None and float(total.group(1)) == 20.0
        assert len(server.members()) >= 3  # the supervisor and two workers (plus multiprocessing's helpers)
        assert [p.name for p in tmp_path.glob("gateway-metrics-*")], "no multiprocess metrics folder"
        server.signal_group(signal.SIGTERM)  # a clean stop: the supervisor removes the metrics folder
        assert server.wait(20) in (0, -signal.SIGTERM), server.text()
    assert not group_members(server.pgid)
    assert not list(tmp_path.glob("gateway-metrics-*")), "the metrics folder outlived the server"


def test_serve_refuses_a_bad_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nproviders: {}\nmodels: {x: {provider: y, model: z}}\n")
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--policy", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"{bad}:3: models.x.provider: unknown provider `y`" in result.stderr


# The default policy, wherever the command runs (gateway/policy/default.py).
# An end-to-end `gateway serve` from a folder with no policies/ needs cli.py to call
# resolve_policy_path (the lead's part); until then the resolution itself is tested here.


def test_the_packaged_default_policy_is_the_repository_one() -> None:
    assert PACKAGED_POLICY.read_text() == (REPO / "policies" / "gateway.yaml").read_text()


def test_resolve_policy_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = tmp_path / "mine.yaml"
    monkeypatch.chdir(tmp_path)  # no policies/ here
    assert resolve_policy_path(given) == given  # an explicit path wins, even one that does not exist (yet)
    packaged = resolve_policy_path(None)
    assert packaged.is_file() and packaged.read_text() == PACKAGED_POLICY.read_text()
    assert packaged.is_absolute()
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "gateway.yaml").write_text("version: 1\n")
    assert resolve_policy_path(None) == Path("policies/gateway.yaml")  # the working directory's, when present
    assert os.path.samefile(resolve_policy_path(None), tmp_path / "policies" / "gateway.yaml")
