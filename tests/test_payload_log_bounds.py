"""The payload log's queue is bounded by the characters it holds, and an entry by what the log reads.

With a sink that stalls (a Redis that accepts and never answers), the queue held up to `queue` (10,000) entries of
whatever size: big prompts took about 1 MB each, gigabytes in all. Each entry now holds `read_chars` characters
of prompts at most in all, and as many of answer (a complete answer was queued whole), and the queue
`QUEUE_CHARS` in all: beyond, entries are dropped and counted as at `queue` entries (`queue_full`).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.payload_log import _UNSURE_TAIL, QUEUE_CHARS, PayloadWriter
from tests.conftest import FULL_KEY, RunningGateway, policy_text

Make = Callable[..., RunningGateway]
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}


def _commands(buffer: bytes) -> tuple[list[list[bytes]], bytes]:
    """The complete RESP commands (arrays of bulk strings, as redis-py sends them) at the start of `buffer`."""
    found: list[list[bytes]] = []
    while buffer.startswith(b"*"):
        end = buffer.find(b"\r\n")
        if end < 0:
            break
        pos, args = end + 2, []
        for _ in range(int(buffer[1:end])):
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                return found, buffer
            start = end + 2
            stop = start + int(buffer[pos + 1:end])
            if len(buffer) < stop + 2:
                return found, buffer
            args.append(buffer[start:stop])
            pos = stop + 2
        found.append(args)
        buffer = buffer[pos:]
    return found, buffer


@pytest.fixture
def stalled_redis() -> Iterator[str]:
    """A "Redis" that answers every command (the store's start and health checks: PING, SELECT...) but XADD,
    the payload log's write, which it never answers: the URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = conn.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            commands, buffer = _commands(buffer + data)
            try:
                for command in commands:
                    name = command[0].upper()
                    if name == b"HELLO":  # (an old Redis: the client speaks RESP2)
                        conn.sendall(b"-ERR unknown command 'HELLO'\r\n")
                    elif name != b"XADD":  # (stalled: never answered)
                        conn.sendall(b"+PONG\r\n" if name == b"PING" else b"+OK\r\n")
            except OSError:  # (closed by the fixture's end, or by the client)
                return

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def _dropped(running: RunningGateway, reason: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(running.metrics()) for s in f.samples
               if s.name == "gateway_telemetry_dropped_total" and s.labels == {"sink": "payload_log", "reason": reason})


def _writer(running: RunningGateway) -> PayloadWriter:
    return next(s for s in running.gateway.runtime.services if isinstance(s, PayloadWriter))


def test_a_stalled_sink_holds_a_bounded_queue(make_gateway: Make, upstream: Any, stalled_redis: str) -> None:
    """Prompts of 900,000 characters echoed back whole: each entry holds 204,096 characters of prompt and 204,097
    of answer (one more than is read: the writer sees it was cut), so 41 fit in `QUEUE_CHARS`; the rest are
    dropped and counted, though `queue` would take them all. Every request is answered meanwhile."""
    max_text = 100_000
    read = 2 * max_text + _UNSURE_TAIL
    size = read + read + 1
    text = policy_text(upstream.base_url) + (
        "state: {backend: redis, url_env: STALLED_REDIS, key_prefix: 'bounds:', on_unavailable: open, "
        "op_timeout_s: 30}\n"
        "telemetry:\n"
        f"  payload_log: {{enabled: true, sink: redis, stream: pl, max_text_chars: {max_text}, queue: 1000}}\n")
    running = make_gateway(text, {"STALLED_REDIS": stalled_redis})
    fits = QUEUE_CHARS // size
    sent = fits + 12
    with httpx.Client(headers=AUTH, timeout=60) as client:
        for n in range(sent):
            prompt = f"{n:05d} " + "lorem ipsum dolor sit amet " * 33_333
            body = {"model": "fault-echo", "messages": [{"role": "user", "content": prompt}]}
            answer = client.post(f"{running.base_url}/chat/completions", json=body)
            assert answer.status_code == 200, answer.text[:300]
            assert len(answer.json()["choices"][0]["message"]["content"]) == len(prompt)  # the whole answer
            upstream.clear()
    held = _writer(running).held_chars
    dropped, failed = _dropped(running, "queue_full"), _dropped(running, "sink_failed")
    # Each entry is held, dropped, or failed (its write timed out after `op_timeout_s`, 30 s: on a slow machine
    # only), and no more than `fits` are held at once: one that failed made room for one more
    assert held <= QUEUE_CHARS and held % size == 0
    assert held // size + dropped + failed == sent
    assert dropped >= sent - fits - failed and dropped > 0


def test_an_entry_holds_read_chars_of_prompts_in_all(make_gateway: Make, upstream: Any, tmp_path: Path) -> None:
    """25 messages of 10,000 characters, then a question: the entry keeps the last 36,864 characters in all
    (`read_chars` under the default `max_text_chars`), counted from the question back: the question and the three
    texts before it whole, in order, and the one before them cut to its head, its last 4,096 characters not written
    (a finding the cut splits lies there: the e-mail address across the cut is not written, not even in part); the
    older ones are left out. (Kept from the first text on, the entry left out the newest turn, the question.)
    And a system prompt of 40,000 characters before a question: its head is written, and the question."""
    path = tmp_path / "payloads.jsonl"
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}'}}\n"))
    question = "what is the capital of France?"
    texts = [f"{n:02d} " + "word " * 1_999 + "en" for n in range(25)]
    assert {len(t) for t in texts} == {10_000}
    left = 36_864 - 30_000 - len(question)  # what is kept of texts[21], the oldest one kept
    texts[21] = texts[21][: left - 10] + "jane.roe@example.com " + texts[21][left + 11:]  # across the cut
    assert len(texts[21]) == 10_000
    system = "sys " + "word " * 7_999 + "e"
    assert len(system) == 40_000
    bodies = [[{"role": "user", "content": t} for t in [*texts, question]],
              [{"role": "system", "content": system}, {"role": "user", "content": question}]]
    for messages in bodies:
        body = {"model": "chat", "messages": messages, "max_tokens": 5}
        answer = httpx.post(f"{running.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
        assert answer.status_code == 200
    deadline = time.monotonic() + 20
    while not (path.exists() and len(path.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, "the entries were never written"
        time.sleep(0.05)
    long_talk, long_system = (json.loads(line) for line in path.read_text().splitlines()[:2])
    assert long_talk["input"][-1] == question  # the newest turn
    assert long_talk["input"][1:] == [*texts[22:], question]
    assert len(long_talk["input"]) == 5
    assert long_talk["input"][0] == texts[21][: left - _UNSURE_TAIL]
    assert long_system["input"] == [system[:16_384], question]
    logged = path.read_text()
    assert "jane" not in logged and "example.com" not in logged
