"""The payload log never writes a text where it should not: a redacting guard's `places` or `fail: open` do not let
a text through in clear, a failed write never goes to stderr, `backups: 0` still bounds the file, and a streamed
Responses answer is logged with its text wherever its message is."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy.telemetry_schema import PayloadLogSpec
from gateway.store.base import StoreConfig
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.payload_log import PayloadLogPathError, PayloadWriter, _Entry
from tests.conftest import FULL_KEY, RunningGateway, policy_text

Make = Callable[..., RunningGateway]
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
SECRET_TEXT = "Write to jane.roe@example.com about the plan codename BLUEHERON"


def _chat(running: RunningGateway, content: str, model: str = "fault-echo") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    response = httpx.post(f"{running.base_url}/chat/completions", json=body, headers=AUTH, timeout=20)
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _dropped(running: RunningGateway, reason: str) -> float:
    labels = {"sink": "payload_log", "reason": reason}
    return running.gateway.metrics.registry.get_sample_value("gateway_telemetry_dropped_total", labels) or 0.0


def test_a_redact_guard_scoped_to_answers_redacts_the_prompts_too(make_gateway: Make, upstream: Any,
                                                                   tmp_path: Path) -> None:
    """The log's guards read every text it writes: `places: [output]` kept the guard off the prompts, and, as only
    the guards with `input` in their places were run at all, off the answers too: both were written in clear."""
    path = tmp_path / "payloads.jsonl"
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}', "
        "redact: {pii: {kind: pii, places: [output]}}}\n"))
    _chat(running, SECRET_TEXT)  # (fault-echo: the answer holds the prompt)
    _eventually(lambda: len(_entries(path)) == 1, "the entry was never written")
    entry = _entries(path)[0]
    assert "jane.roe@example.com" not in path.read_text()
    assert "<EMAIL_ADDRESS>" in entry["input"][0] and "<EMAIL_ADDRESS>" in entry["output"], entry


def test_a_fail_open_redacting_guard_that_times_out_withholds_the_text(make_gateway: Make, upstream: Any,
                                                                        tmp_path: Path) -> None:
    """`fail: open` lets a request through a guard that failed; in the log it wrote the unchecked text in clear.
    The text is long enough (about 1 MB, and the log keeps that much) that its check takes far longer than the
    1 ms allowed (see `test_payload_log.py::test_a_text_a_redacting_guard_failed_to_check_is_withheld`)."""
    path = tmp_path / "payloads.jsonl"
    prompt = "lorem ipsum dolor sit amet " * 36_000 + "write to jane.roe@example.com thanks"
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log:\n    enabled: true\n    path: '{path}'\n    max_text_chars: 1000000\n"
        "    redact:\n      pii: {kind: pii, fail: open, timeout_s: 0.001}\n"))
    _chat(running, prompt, model="chat")
    _eventually(lambda: len(_entries(path)) == 1, "the entry was never written")
    entry = _entries(path)[0]
    assert "jane.roe@example.com" not in path.read_text() and "lorem ipsum" not in path.read_text()
    assert entry["input"] == ["<WITHHELD: a redacting guard failed>"]


def test_a_full_disk_is_counted_logged_once_without_the_text_and_the_log_goes_on(
        make_gateway: Make, upstream: Any, tmp_path: Path, capfd: Any, caplog: Any) -> None:
    """A failed write (`/dev/full`: ENOSPC on every write) went through logging's error handler, which printed the
    whole line, prompt and answer, to stderr and counted nothing. Now each entry that fails is counted, the failure
    logged once (without the text), and once the disk takes writes again the next entries are written."""
    caplog.set_level(logging.INFO, logger="gateway.payload_log")
    path = tmp_path / "payloads.jsonl"
    path.symlink_to("/dev/full")
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}'}}\n"))
    for _ in range(2):
        _chat(running, SECRET_TEXT)
    _eventually(lambda: _dropped(running, "sink_failed") == 2, "the failed writes were not counted")
    err = capfd.readouterr().err
    assert "BLUEHERON" not in err and "jane.roe" not in err
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.payload_log"]
    assert warnings == ["payload log: entries dropped until a write succeeds: the file sink failed "
                        "(OSError: No space left on device)"]
    path.unlink()  # the disk takes writes again: the next entry goes to a file opened anew
    request_id = _chat(running, SECRET_TEXT)
    _eventually(lambda: len(_entries(path)) == 1, "the log did not write again after the failure")
    entry = _entries(path)[0]
    assert entry["request_id"] == request_id and "<EMAIL_ADDRESS>" in entry["input"][0]
    assert _dropped(running, "sink_failed") == 2
    assert "BLUEHERON" not in capfd.readouterr().err and "BLUEHERON" not in caplog.text
    # logged just after the write that succeeded returns: the file may be read before the line is logged
    _eventually(lambda: "payload log: writing again after a failure" in caplog.text,
                "the log did not say it was writing again")


def test_backups_zero_empties_the_file_at_max_bytes(make_gateway: Make, upstream: Any, tmp_path: Path) -> None:
    """`backups: 0` keeps no old file: at `max_bytes` the file is emptied (logging's handler reopened it to append,
    and it grew without bound)."""
    path = tmp_path / "payloads.jsonl"
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}', max_bytes: 1024, backups: 0}}\n"))
    ids = [_chat(running, f"hello {n}", model="chat") for n in range(30)]
    _eventually(lambda: ids[-1] in {e["request_id"] for e in _entries(path)}, "the last entry was never written")
    assert path.stat().st_size <= 1024, f"{len(_entries(path))} entries, {path.stat().st_size} bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payloads.jsonl"]


def test_a_streamed_responses_answer_after_a_reasoning_item_is_logged_with_its_text(
        make_gateway: Make, upstream: Any, tmp_path: Path) -> None:
    """The answer's message is the second output item, after the reasoning: only the first output's text deltas
    were kept, so the streamed answer was logged empty while the same answer complete was logged `Done.`."""
    path = tmp_path / "payloads.jsonl"
    text = policy_text(upstream.base_url).replace(
        "models:\n", "models:\n  fault-echo-reasoning: {provider: mock-fast, model: fault-echo-reasoning}\n", 1)
    running = make_gateway(text + f"telemetry:\n  payload_log: {{enabled: true, path: '{path}'}}\n")
    streamed = {}
    for stream in (False, True):
        body = {"model": "fault-echo-reasoning", "input": "think about it", "stream": stream}
        response = httpx.post(f"{running.base_url}/responses", json=body, headers=AUTH, timeout=20)
        assert response.status_code == 200, response.text
        streamed[response.headers["x-request-id"]] = stream
    _eventually(lambda: len(_entries(path)) == 2, "the entries were never written")
    outputs = {streamed[e["request_id"]]: e["output"] for e in _entries(path)}
    assert outputs == {False: "Done.", True: "Done."}


async def test_an_entry_added_after_the_close_is_counted(tmp_path: Path) -> None:
    """A request that ends after the log closed (a stream of a retired policy): its entry would sit in a queue no
    task reads, uncounted; it is dropped and counted as one still queued at the close is."""
    metrics = Metrics()
    writer = PayloadWriter(PayloadLogSpec(enabled=True, path=str(tmp_path / "p.jsonl")), metrics, StoreConfig(), len)
    await writer.start()
    await writer.aclose()
    writer.add(_Entry(time.time(), "req-1", "acme", "chat", None, 200, ["hi"], "hello"))
    labels = {"sink": "payload_log", "reason": "close_timeout"}
    assert metrics.registry.get_sample_value("gateway_telemetry_dropped_total", labels) == 1.0


async def test_a_path_that_cannot_be_opened_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder" / "payloads.jsonl"
    writer = PayloadWriter(PayloadLogSpec(enabled=True, path=str(missing)), Metrics(), StoreConfig(), len)
    try:
        with pytest.raises(PayloadLogPathError, match=r"telemetry\.payload_log\.path: cannot open .*no-such-folder"):
            await writer.start()
    finally:
        await writer.aclose()
