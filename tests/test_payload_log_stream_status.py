"""The payload log's status for a stream is the one the access log has: a stream cut by the upstream (502), timed
out (504) or left by its client (499) is not logged as 200. (The payload log's end hook runs before the telemetry
stage's, the one that sets `ctx.status`.)"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FULL_KEY, RunningGateway, policy_text

Make = Callable[..., RunningGateway]
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "stream": True}


def _stream(running: RunningGateway, request_id: str, model: str) -> None:
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{running.base_url}/chat/completions", json=_chat(model),
            headers={**AUTH, "x-request-id": request_id}) as reply:
        assert reply.status_code == 200  # (the stream started: what went wrong came after)
        b"".join(reply.iter_bytes())


def _leave_a_stream(running: RunningGateway, request_id: str) -> None:
    """Starts a slow stream, reads its first bytes, and closes the connection."""
    raw = json.dumps(_chat("fault-slow-stream-100")).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {FULL_KEY}\r\n"
            f"x-request-id: {request_id}\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", running.port)) as sock:
        sock.sendall(head.encode() + raw)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)


def test_a_streams_payload_log_status_is_the_access_logs(
    make_gateway: Make, upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "payloads.jsonl"
    logged = f"telemetry:\n  payload_log: {{enabled: true, path: '{path}'}}\n"
    running = make_gateway(policy_text(upstream.base_url, access_log="true") + logged)
    expected = {"p-done": 200, "p-reset": 502, "p-stall": 504, "p-gone": 499}
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        _stream(running, "p-done", "chat")
        _stream(running, "p-reset", "fault-reset-after-3")
        _stream(running, "p-stall", "fault-stall-after-3")
        _leave_a_stream(running, "p-gone")
        deadline = time.monotonic() + 20
        while len(entries := path.read_text().splitlines() if path.exists() else []) < len(expected):
            assert time.monotonic() < deadline, f"{len(entries)} of {len(expected)} entries written"
            time.sleep(0.05)
    access = {r.fields["request_id"]: r.fields["status"]  # type: ignore[attr-defined]
              for r in caplog.records if r.name == "gateway.access"}
    assert access == expected
    assert {entry["request_id"]: entry["status"] for entry in map(json.loads, entries)} == expected
