"""The payload log's redacting guards are not a request's: they count nothing in the request guard series.

They were counted in `gateway_guard_verdicts_total` (place input and output), the guard latency and
`gateway_guard_failures_total`: a policy with no request guard showed redactions no request had, a request guard
named `pii` had the log's counts added to its own, and a log guard's timeout fired GatewayGuardFailures, whose
runbook says requests were refused or let through unchecked (none were: the log withheld a text). A text the log
withholds is counted in the log's own series: `gateway_telemetry_dropped_total{sink="payload_log",
reason="redact_failed"}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FULL_KEY, RunningGateway, policy_text

Make = Callable[..., RunningGateway]
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
SECRET_TEXT = "mail jane.roe@example.com key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"


def _samples(running: RunningGateway, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(running.metrics()) for s in f.samples
            if s.name == name]


def _entries(path: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(entries) >= count:
            return entries
        assert time.monotonic() < deadline, f"{len(entries)} of {count} entries written"
        time.sleep(0.05)


def _send(running: RunningGateway, content: str, model: str = "fault-echo") -> None:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    assert httpx.post(f"{running.base_url}/chat/completions", json=body, headers=AUTH, timeout=20).status_code == 200


def test_a_policy_without_request_guards_shows_no_guard_verdicts(make_gateway: Make, upstream: Any,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "payloads.jsonl"
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}'}}\n"))
    for _ in range(3):
        _send(running, SECRET_TEXT)
    entries = _entries(path, 3)
    assert all("<EMAIL_ADDRESS>" in e["input"][0] and "<EMAIL_ADDRESS>" in e["output"] for e in entries)  # redacted
    assert _samples(running, "gateway_guard_verdicts_total") == []
    assert _samples(running, "gateway_guard_duration_seconds_count") == []
    assert _samples(running, "gateway_guard_failures_total") == []


def test_a_request_guard_named_like_a_log_guard_counts_only_the_requests(make_gateway: Make, upstream: Any,
                                                                        tmp_path: Path) -> None:
    """A request guard `pii` on prompts: one verdict per request (the log's default `pii` added two: the prompt's
    and the answer's, under place input and output)."""
    path = tmp_path / "payloads.jsonl"
    running = make_gateway(policy_text(upstream.base_url) + (
        "guards:\n  global:\n    pii: {kind: pii, action: redact, places: [input]}\n"
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}'}}\n"))
    for _ in range(2):
        _send(running, SECRET_TEXT)
    _entries(path, 2)
    verdicts = {(labels["guard"], labels["verdict"], labels["place"]): value
                for labels, value in _samples(running, "gateway_guard_verdicts_total")}
    assert verdicts == {("pii", "redact", "input"): 2.0}
    durations = {(labels["guard"], labels["place"]): value
                 for labels, value in _samples(running, "gateway_guard_duration_seconds_count")}
    assert durations == {("pii", "input"): 2.0}


def test_a_log_guard_that_fails_is_counted_as_the_logs_not_as_a_request_guard_failure(
        make_gateway: Make, upstream: Any, tmp_path: Path) -> None:
    """A text of about 1 MB takes far longer to check than the 1 ms allowed: the log withholds it, and counts it
    (`redact_failed`); no request guard failed, so `gateway_guard_failures_total` (GatewayGuardFailures) stays
    empty."""
    path = tmp_path / "payloads.jsonl"
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log:\n    enabled: true\n    path: '{path}'\n    max_text_chars: 1000000\n"
        "    redact:\n      pii: {kind: pii, timeout_s: 0.001}\n"))
    _send(running, "lorem ipsum dolor sit amet " * 36_000 + "write to jane.roe@example.com", model="chat")
    entry = _entries(path, 1)[0]
    assert entry["input"] == ["<WITHHELD: a redacting guard failed>"]
    assert entry["output"] and entry["output"] != "<WITHHELD: a redacting guard failed>"  # (short: checked)
    assert _samples(running, "gateway_guard_failures_total") == []
    dropped = {labels["reason"]: value for labels, value in _samples(running, "gateway_telemetry_dropped_total")
               if labels["sink"] == "payload_log"}
    assert dropped == {"redact_failed": 1.0}
