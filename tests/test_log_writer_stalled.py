"""A log reader that stalls (stderr a pipe nobody reads: a stalled log shipper, Docker's blocking log mode) holds
the log's writer thread, never the event loop: requests and /healthz keep answering, the lines that do not fit
the writer's queue are dropped and counted, and the first line written after them says how many; the lines
written keep their order. The process still exits on SIGTERM within its bounded wait for the log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.telemetry import log_writer, logs
from tests.conftest import free_port
from tests.support.processes import STARTED_GROUPS, group_members

REPO = Path(__file__).resolve().parent.parent
QUEUE_BYTES = 192 << 10  # the writer's queue in the served process: ~270 lines (drops before the pipe is full,
# the writer thread kept from the CPU that long on a busy machine, would break the test's count)
# `gateway serve` as `python -m gateway` runs it, its writer's queue made small (the default takes ~6,000 lines).
SERVE = ("import sys; from gateway.telemetry import logs; logs._QUEUE_BYTES = int(sys.argv.pop(1)); "
         "from gateway.cli import main; raise SystemExit(main())")
BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


@contextmanager
def _served_unread(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, int]]:
    """`gateway serve` with the access log on, its stderr a pipe this test reads only when it chooses (the read
    end's fd is yielded); stopped with its whole process group."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent("""\
        version: 1
        server: {access_log: true, watch_policy: false}
        auth: none
        providers: {demo: {kind: demo}}
        models: {demo: {provider: demo, model: demo-1}}
        """))
    port = free_port()
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(QUEUE_BYTES), "serve", "--policy", str(policy), "--port", str(port)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_end, start_new_session=True)
    STARTED_GROUPS.add(process.pid)
    os.close(write_end)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # (its start-up lines fit the pipe's buffer)
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.1)
        yield process, url, read_end
    finally:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            with _suppress_lookup():
                os.killpg(process.pid, sig)
            deadline = time.monotonic() + wait
            while (process.poll() is None or group_members(process.pid)) and time.monotonic() < deadline:
                _read_all(read_end, 0.0)  # (a pipe read again lets a stopping process write what it has)
                time.sleep(0.02)
            if process.poll() is not None and not group_members(process.pid):
                break
        os.close(read_end)


@contextmanager
def _suppress_lookup() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


def _read_all(fd: int, quiet_s: float) -> bytes:
    """What the pipe holds, read until nothing came for `quiet_s`."""
    got = bytearray()
    while select.select([fd], [], [], quiet_s)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def _ask(client: httpx.Client, url: str) -> str:
    """One chat completion, answered within 5 s: its request id."""
    started = time.monotonic()
    answer = client.post(url + "/v1/chat/completions", json=BODY)
    assert answer.status_code == 200 and time.monotonic() - started < 5
    return answer.headers["x-request-id"]


def test_a_stalled_stderr_reader_holds_no_request_and_the_lines_it_missed_are_counted(tmp_path: Path) -> None:
    with _served_unread(tmp_path) as (process, url, stderr), httpx.Client(timeout=5) as client:
        started = _read_all(stderr, 0.5)  # the start-up lines; from here on, nothing is read for a while
        stalled = [_ask(client, url) for _ in range(800)]  # ~550 KB of lines: the pipe (64 KiB) and queue full
        before = time.monotonic()
        assert client.get(url + "/healthz").status_code == 200 and time.monotonic() - before < 2
        written = _read_all(stderr, 0.5)  # the reader is back: what the pipe and the queue held
        after = [_ask(client, url) for _ in range(5)]
        written += _read_all(stderr, 1.0)  # (`_FLUSH_AFTER_S` later: the warning, then these lines)
        metrics = client.get(url + "/metrics").text
        assert process.poll() is None

    assert b'"msg":"Uvicorn running on' in started or b"Application startup complete" in started
    lines = [json.loads(line) for line in written.splitlines()]
    warnings = [n for n, line in enumerate(lines) if line["msg"].startswith("log lines dropped")]
    assert len(warnings) == 1, lines[-10:]
    gap = warnings[0]
    warning = lines[gap]
    assert warning["level"] == "warning" and warning["logger"] == "gateway.telemetry.log_writer"
    ids = [[line["request_id"] for line in part if line["logger"] == "gateway.access"]
           for part in (lines[:gap], lines[gap + 1:])]
    assert len(ids[0]) < len(stalled) and ids[0] == stalled[:len(ids[0])]  # in order, up to the first one dropped
    dropped = warning["dropped_lines"]
    assert dropped > 0 and len(ids[0]) + dropped <= len(stalled)
    # After the warning, the lines queued once the reader was back (the last ones of the stall, which waited
    # `_FLUSH_AFTER_S` in the handler, then those sent after): every line missing was counted.
    assert ids[1] == stalled[len(ids[0]) + dropped:] + after
    assert f'gateway_telemetry_dropped_total{{reason="queue_full",sink="log"}} {dropped}.0' in metrics


def test_a_stalled_stderr_reader_holds_the_exit_for_2_s_at_most(tmp_path: Path) -> None:
    """SIGTERM while stderr is still not read: the process drains its requests and exits, its wait for the log
    bounded (`logging.shutdown`), not blocked in a write for good (nor aborted at exit by a daemon thread)."""
    with _served_unread(tmp_path) as (process, url, stderr), httpx.Client(timeout=5) as client:
        _read_all(stderr, 0.5)
        for _ in range(300):
            _ask(client, url)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("the gateway did not exit within 10 s of SIGTERM with its stderr unread")
        assert code == 0


# -- the writer on a pipe, in this process ---------------------------------------------------------------------


@contextmanager
def _pipe_handler(full: bool = False) -> Iterator[tuple[logs.JsonLinesHandler, int]]:
    """A handler on a pipe; `full`: its buffer filled with empty lines first (its reader stalled)."""
    read_end, write_end = os.pipe()
    if full:
        os.set_blocking(write_end, False)
        with _suppress_blocking():
            while True:
                os.write(write_end, b"\n" * 4096)
        os.set_blocking(write_end, True)
    stream = io.TextIOWrapper(io.FileIO(write_end, "w"), encoding="utf-8", line_buffering=True)
    try:
        yield logs.JsonLinesHandler(stream), read_end
    finally:
        stream.close()
        os.close(read_end)


@contextmanager
def _suppress_blocking() -> Iterator[None]:
    try:
        yield
    except BlockingIOError:
        pass


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("x", logging.INFO, __file__, 1, msg, None, None)


def _writers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "gateway-log-writer"]


def test_on_a_pipe_lines_and_records_keep_their_order_and_the_writer_thread_ends_when_idle() -> None:
    with _pipe_handler() as (handler, read_end):
        async def run() -> None:
            handler.write_line(b'{"n":1}\n')
            worker = threading.Thread(target=handler.emit, args=(_record("other"),))  # not waiting for the loop's
            worker.start()
            worker.join()
            handler.write_line(b'{"n":2}\n')
            handler.emit(_record("loop"))  # the loop's thread: after the lines that wait
            await asyncio.sleep(logs._FLUSH_AFTER_S * 2)

        asyncio.run(run())
        handler.flush()
        text = _read_all(read_end, 0.2).decode()
        assert [json.loads(line).get("n", json.loads(line).get("msg")) for line in text.splitlines()] == \
            ["other", 1, 2, "loop"]
        assert len(_writers()) == 1
        deadline = time.monotonic() + log_writer._WRITER_IDLE_S + 5
        while _writers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _writers()  # idle: no thread left behind
        handler.emit(_record("again"))  # a new one for the next line
        handler.flush()
        assert '"msg":"again"' in _read_all(read_end, 0.2).decode()


def test_on_a_pipe_nobody_reads_lines_are_dropped_counted_and_flush_waits_2_s_at_most(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_QUEUE_BYTES", 32 << 10)  # two batches of 64 lines
    registry = CollectorRegistry()
    counter = Counter("dropped", "test", ("sink", "reason"), registry=registry)
    previous = log_writer._dropped_counter[0]
    log_writer.count_dropped_lines(counter)
    line = b'{"n":%d,"pad":"' + b"x" * 200 + b'"}\n'
    try:
        with _pipe_handler(full=True) as (handler, read_end):
            async def run() -> None:
                for n in range(2000):  # ~430 KB: past the queue
                    handler.write_line(line % n)
                await asyncio.sleep(logs._FLUSH_AFTER_S * 2)

            asyncio.run(run())
            counted = registry.get_sample_value("dropped_total", {"sink": "log", "reason": "queue_full"})
            assert counted
            started = time.monotonic()
            handler.flush()  # the reader stalled: gives up after `_FLUSH_WAIT_S`
            assert logs._FLUSH_WAIT_S - 0.1 < time.monotonic() - started < logs._FLUSH_WAIT_S + 1.5
            text = _read_all(read_end, 0.3)
            handler.write_line(line % 2000)
            handler.flush()
            text += _read_all(read_end, 0.3)
        parsed = [json.loads(each) for each in text.splitlines() if each]
        numbers = [each["n"] for each in parsed if "n" in each]
        warning = [each for each in parsed if "dropped_lines" in each]
        assert numbers[:-1] == list(range(len(numbers) - 1)) and numbers[-1] == 2000  # in order, up to the drops
        assert len(warning) == 1 and warning[0]["dropped_lines"] == counted == 2000 - (len(numbers) - 1)
        assert parsed[-2] == warning[0]  # written before the next line
    finally:
        log_writer._dropped_counter[0] = previous
