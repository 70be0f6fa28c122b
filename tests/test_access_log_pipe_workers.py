"""`gateway serve --workers 2` with stderr a pipe (Docker, Kubernetes) whose reader lags: every access line is still
a whole JSON line, and every request has one.

Each worker's writer thread handed a batch of lines (many KB) to one `os.write`; a pipe write over PIPE_BUF (4,096
bytes) is not atomic, so when the pipe was full the two workers' batches interleaved mid-line: 10 to 14 lines in 400
were not JSON (H54). A batch now goes to a pipe in pieces of whole lines of at most PIPE_BUF bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from gateway.auth.keys import hash_key
from gateway.telemetry.log_writer import line_pieces
from tests.conftest import free_port

KEY = "gw-pipe-test-key-0000000000000000000000000000"


def test_a_batch_is_cut_after_newlines_into_pieces_no_longer_than_asked() -> None:
    lines = [b"a" * 10 + b"\n", b"b" * 30 + b"\n", b"c" * 5 + b"\n", b"d" * 50 + b"\n", b"e\n"]
    batch = b"".join(lines)
    pieces = [bytes(piece) for piece in line_pieces(batch, 40)]
    assert b"".join(pieces) == batch
    assert pieces == [lines[0], lines[1] + lines[2], lines[3], lines[4]]  # the 51-byte line alone, whole
    assert all(piece.endswith(b"\n") for piece in pieces)
    assert [bytes(piece) for piece in line_pieces(batch, 1_000)] == [batch]



def test_two_workers_never_split_an_access_line_on_a_shared_pipe(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: 8080, access_log: true}}
        auth: keys
        keys: [{{name: team-key, tenant: team, hash: "{hash_key(KEY)}"}}]
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: demo-1}}}}
        """))
    port = free_port()
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port), "--workers", "2"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    received = bytearray()
    slow = threading.Event()

    def shipper() -> None:  # a log shipper that falls behind under a burst: 256 bytes every 10 ms
        assert server.stderr is not None
        while data := os.read(server.stderr.fileno(), 256):
            received.extend(data)
            if slow.is_set():
                time.sleep(0.01)

    reader = threading.Thread(target=shipper, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.2)
        slow.set()

        def send(n: int) -> str:
            with httpx.Client(timeout=30) as fresh:  # a new connection each: both workers serve
                answer = fresh.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                    headers={"Authorization": f"Bearer {KEY}"},
                                    json={"model": "demo", "messages": [{"role": "user", "content": f"hi {n}"}]})
                assert answer.status_code == 200
                return answer.headers["x-request-id"]

        with ThreadPoolExecutor(16) as pool:
            sent = set(pool.map(send, range(400)))
        assert len({rid[:16] for rid in sent}) == 2, "the requests did not reach both workers"
        slow.clear()
        time.sleep(2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)
        reader.join(10)
    logged, broken = set(), []
    for line in bytes(received).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            broken.append(line)
            continue
        if record.get("logger") == "gateway.access":
            logged.add(record["request_id"])
    assert not broken, f"{len(broken)} lines are not JSON, e.g. {broken[0][:200]!r}"
    assert logged == sent
