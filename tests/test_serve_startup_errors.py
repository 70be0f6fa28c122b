"""A service that cannot start for a configuration problem stops `gateway serve` with one line naming it.

An unwritable `telemetry.payload_log.path` (and any path, folder or model a service cannot open: an `OSError` at its
start) is the configuration's problem, not a bug: the server reports the error's own message in one line, no
traceback, and exits non-zero. A bug at start keeps its traceback. A reload onto such a policy keeps the one in
force.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx

from gateway.app import Gateway, create_app, served_app
from gateway.policy import compile_text
from tests.conftest import free_port
from tests.support.processes import running

REPO = Path(__file__).resolve().parents[1]
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hello"}]}


def _policy(port: int, payload_path: Path | None) -> str:
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: {port}, watch_policy: false}}
        auth: none
        providers:
          demo: {{kind: demo}}
        models:
          demo: {{provider: demo, model: demo-1}}
        """)
    if payload_path is not None:
        text += f"telemetry:\n  payload_log: {{enabled: true, sink: file, path: '{payload_path}'}}\n"
    return text


def test_an_unwritable_payload_log_path_is_one_line_and_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder" / "payloads.jsonl"
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(free_port(), missing))
    with running([sys.executable, "-m", "gateway", "serve", "--policy", str(policy)], cwd=REPO,
                 env={"PYTHONUNBUFFERED": "1"}) as server:
        code = server.wait(60)
        output = server.text()
    assert code != 0
    assert "Traceback" not in output, output
    named = [line for line in output.splitlines() if "the gateway cannot start" in line]
    assert len(named) == 1, output
    assert "telemetry.payload_log.path" in named[0] and str(missing) in named[0]


def test_a_bug_at_start_keeps_its_traceback() -> None:
    """Not a configuration problem (not an `OSError` of a service): the server is sent the traceback."""
    gateway = Gateway(compile_text(_policy(free_port(), None), "policy.yaml", {}))

    def bug() -> None:
        raise RuntimeError("a bug in a start hook")

    app = served_app(create_app(gateway, on_startup=[bug]))

    async def start() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await incoming.put({"type": "lifespan.startup"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        with contextlib.suppress(Exception):  # (litestar raises it on, in a group, once it has sent the failure)
            await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, incoming.get, send)
        return sent

    sent = asyncio.run(start())
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "Traceback" in sent[0]["message"] and "a bug in a start hook" in sent[0]["message"]


def test_a_reload_onto_an_unwritable_path_keeps_the_policy_in_force(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(port, None))
    with running([sys.executable, "-m", "gateway", "serve", "--policy", str(policy)], cwd=REPO,
                 env={"PYTHONUNBUFFERED": "1"}) as server:
        assert server.wait_for_output("Application startup complete", 60), server.text()
        before = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=20)
        assert before.status_code == 200
        policy.write_text(_policy(port, tmp_path / "no-such-folder" / "payloads.jsonl"))
        server.send_signal(signal.SIGHUP)
        assert server.wait_for_output("failed to start; keeping", 60), server.text()
        after = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=20)
        assert after.status_code == 200 and server.poll() is None
        version = "x-gateway-policy-version"
        assert after.headers[version] == before.headers[version]
