"""SIGTERM with a drain delay, then Ctrl-C (SIGINT, which README "Shutdown" says skips the delay) while a stream is
open: the stream still ends with the `shutting_down` error event at the drain deadline.

The SIGINT started uvicorn's own deadline (drain_timeout_s + 2 s) at once, but the gateway's cut was scheduled only
by the first signal, after its delay: uvicorn closed the connection first, and the client got a truncated chunked
body with no error event. The server runs in its own process group (`tests.support.processes.running`), stopped
whole when the test ends.
"""

from __future__ import annotations

import json
import signal
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_serve_lifecycle import serving

MESSAGES = [{"role": "user", "content": "Hello there, demo"}]


def policy(port: int) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: {port}, drain_delay_s: 5, drain_timeout_s: 2}}
        auth: none
        providers:
          slow: {{kind: demo, chunk_delay_ms: 600}}
        models:
          slow: {{provider: slow, model: demo-1}}
        """)


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm-only", "sigterm-then-ctrl-c"])
def test_a_stream_open_at_the_drain_deadline_ends_with_the_shutting_down_event(tmp_path: Path, ctrl_c: bool) -> None:
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(policy(port))
    with serving(path, port) as server:
        received, cut, signalled = b"", None, None
        body = {"model": "slow", "messages": MESSAGES, "stream": True}  # ~17 s of chunks
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                              timeout=30) as response:
                for piece in response.iter_raw():
                    received += piece
                    if signalled is None and received.count(b"\n\n") == 2:
                        server.send_signal(signal.SIGTERM)
                        signalled = time.monotonic()
                        if ctrl_c:
                            time.sleep(0.3)
                            server.send_signal(signal.SIGINT)
        except httpx.RemoteProtocolError as exc:
            cut = f"{exc} {time.monotonic() - signalled:.1f} s after SIGTERM"
        code = server.wait(timeout=30)
        log = server.text()
    events = [event for event in received.decode().split("\n\n") if event]
    assert cut is None, f"the stream was cut without its error event: {cut}"
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert "timeout graceful shutdown exceeded" not in log
    assert code == 0
