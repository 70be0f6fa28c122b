"""At the drain deadline the gateway ends every request still running itself (README "Shutdown": "a request still
waiting a 503") before uvicorn would cancel it. `/v1/messages/count_tokens` was not among them (it never joined
`Gateway.active`): uvicorn cancelled it 2 s later, the client got its plain-text `500 Internal Server Error`, and the
log an "Exception in ASGI application" traceback (H52).
"""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

from tests.conftest import free_port
from tests.test_serve import serving


def test_a_count_tokens_request_at_the_drain_deadline_gets_the_gateways_503(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(textwrap.dedent("""\
        version: 1
        server: {drain_timeout_s: 2, body_timeout_s: 10}
        auth: none
        providers:
          demo: {kind: demo}
        models:
          demo: {provider: demo, model: demo-1}
        """))
    port = free_port()
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port)]
    with serving(args, port) as server:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(0.5)
        sock.sendall(b"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        answer = b""
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:  # a slow upload: a byte a second (never idle for body_timeout_s)
            try:
                sock.send(b" ")
            except OSError:
                pass
            try:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            except TimeoutError:
                pass
            except OSError:
                break
            time.sleep(0.5)
        sock.close()
        server.wait(15)
        log = server.text()
    status = answer.split(b"\r\n", 1)[0]
    # Observed: b"HTTP/1.1 500 Internal Server Error", text/plain "Internal Server Error", and in the log
    # "Cancel 1 running task(s), timeout graceful shutdown exceeded" and "Exception in ASGI application".
    assert status == b"HTTP/1.1 503 Service Unavailable", answer[:300]
    assert b"application/json" in answer and b"overloaded_error" in answer
    assert "Exception in ASGI application" not in log
