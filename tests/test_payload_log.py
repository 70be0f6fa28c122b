"""The payload log through a real gateway: texts redacted by guards, to a rotating file or a Redis stream."""

from __future__ import annotations

import json
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.policy import PolicyError, compile_text
from tests.conftest import FULL_KEY, RunningGateway, policy_text
from tests.support.redis_server import suite_redis_url

Make = Callable[..., RunningGateway]
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
SECRET_TEXT = "Write to jane.roe@example.com or call +1 415 555 0134 about the plan"


def _send(running: RunningGateway, stream: bool) -> str:
    body = {"model": "fault-echo", "messages": [{"role": "user", "content": SECRET_TEXT}], "stream": stream}
    response = httpx.post(f"{running.base_url}/chat/completions", json=body, headers=AUTH, timeout=20)
    assert response.status_code == 200
    return response.headers["x-request-id"]


def _wait_for(read: Callable[[], list[dict[str, Any]]], count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while len(entries := read()) < count:
        assert time.monotonic() < deadline, f"{len(entries)} of {count} entries written"
        time.sleep(0.05)
    return entries


def test_file_sink_redacts_and_rotates(make_gateway: Make, upstream: Any, tmp_path: Path) -> None:
    path = tmp_path / "payloads.jsonl"
    text = policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}', max_bytes: 2048, backups: 2}}\n")
    running = make_gateway(text)
    ids = [_send(running, stream=n % 2 == 1) for n in range(2)]

    def read() -> list[dict[str, Any]]:
        files = [path, *sorted(tmp_path.glob("payloads.jsonl.*"))]
        return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]

    entries = _wait_for(read, 2)
    by_id = {e["request_id"]: e for e in entries}
    for request_id in ids:
        entry = by_id[request_id]
        assert entry["tenant"] == "acme" and entry["model"] == "fault-echo" and entry["status"] == 200
        logged = json.dumps(entry)
        assert "jane.roe@example.com" not in logged and "555 0134" not in logged
        assert "<EMAIL_ADDRESS>" in entry["input"][0] and "about the plan" in entry["input"][0]
        assert "<EMAIL_ADDRESS>" in entry["output"]  # the echoed answer, redacted too (streamed or not)
    for _ in range(20):  # past max_bytes several times: rotated, at most `backups` old files kept
        _send(running, stream=False)
    _wait_for(read, 2)
    deadline = time.monotonic() + 20
    while not (tmp_path / "payloads.jsonl.2").exists():
        assert time.monotonic() < deadline, "the file never rotated"
        time.sleep(0.05)
    assert not (tmp_path / "payloads.jsonl.3").exists()
    assert all(f.stat().st_size <= 2048 + 1024 for f in tmp_path.glob("payloads.jsonl*"))
    # Prompts and answers: readable by the gateway's user alone, whatever the umask, the rotated files too
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in tmp_path.glob("payloads.jsonl*")} == {
        f.name: "0o600" for f in tmp_path.glob("payloads.jsonl*")}


def test_a_responses_answer_is_logged_with_its_text(make_gateway: Make, upstream: Any, tmp_path: Path) -> None:
    """`/v1/responses`, complete and streamed: the answer's text is its messages' `output_text` (it was empty)."""
    path = tmp_path / "payloads.jsonl"
    logged = f"telemetry:\n  payload_log: {{enabled: true, path: '{path}'}}\n"
    running = make_gateway(policy_text(upstream.base_url) + logged)
    ids = []
    for stream in (False, True):
        body = {"model": "fault-echo", "input": SECRET_TEXT, "stream": stream}
        response = httpx.post(f"{running.base_url}/responses", json=body, headers=AUTH, timeout=20)
        assert response.status_code == 200, response.text
        ids.append(response.headers["x-request-id"])

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    by_id = {e["request_id"]: e for e in _wait_for(read, 2)}
    for request_id in ids:
        output = by_id[request_id]["output"]
        assert "about the plan" in output and "<EMAIL_ADDRESS>" in output and "jane.roe" not in output, output


@pytest.fixture
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


def test_redis_sink_keeps_a_capped_stream(make_gateway: Make, upstream: Any, redis_url: str) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    text = policy_text(upstream.base_url) + (
        f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}"}}\n'
        "telemetry:\n  payload_log: {enabled: true, sink: redis, stream: payloads, max_entries: 100}\n")
    running = make_gateway(text, env={"GW_TEST_REDIS": redis_url})
    client = redis.Redis.from_url(redis_url)
    try:
        ids = [_send(running, stream=n % 2 == 1) for n in range(2)]

        def read() -> list[dict[str, Any]]:
            return [json.loads(fields[b"entry"]) for _, fields in client.xrange(prefix + "payloads")]

        entries = _wait_for(read, 2)
        assert {e["request_id"] for e in entries} == set(ids)
        assert "jane.roe@example.com" not in json.dumps(entries)
        info = client.xinfo_stream(prefix + "payloads")
        assert info["length"] == 2
    finally:
        client.delete(prefix + "payloads")
        client.close()


def test_payload_log_policy_errors_name_the_field(upstream: Any) -> None:
    base = policy_text(upstream.base_url)
    with pytest.raises(PolicyError) as caught:
        compile_text(base + "telemetry:\n  payload_log: {enabled: true, sink: redis}\n", "p.yaml",
                     {"MOCK_UPSTREAM_KEY": "k"})
    assert "telemetry.payload_log.sink" in str(caught.value) and "state.backend: redis" in str(caught.value)
    with pytest.raises(PolicyError) as caught:
        compile_text(base + "telemetry:\n  payload_log: {enabled: true, retention: 5}\n", "p.yaml",
                     {"MOCK_UPSTREAM_KEY": "k"})
    assert "retention" in str(caught.value)
    with pytest.raises(PolicyError) as caught:
        compile_text(base + "telemetry:\n  tracing: {enabled: true, otlp_endpoint: 'ftp://x'}\n", "p.yaml",
                     {"MOCK_UPSTREAM_KEY": "k"})
    assert "telemetry.tracing.otlp_endpoint" in str(caught.value)
    with pytest.raises(PolicyError) as caught:
        compile_text(base + "telemetry:\n  feedback: {labels: ['Not A Label']}\n", "p.yaml", {"MOCK_UPSTREAM_KEY": "k"})
    assert "telemetry.feedback.labels" in str(caught.value)


def test_a_text_a_redacting_guard_failed_to_check_is_withheld(make_gateway: Make, upstream: Any,
                                                               tmp_path: Path) -> None:
    """A long text goes to the guard pool, under the guard's `timeout_s`: one that timed out was never checked,
    so none of it reaches the log (not the text with a `<GUARD_FAILURE>` tag in front). The text is long enough
    (about 1 MB, and the log keeps that much) that its check takes far longer than the 1 ms allowed: a text of
    32 KB was checked in about 0.6 ms, and then went to the log redacted, not withheld."""
    path = tmp_path / "payloads.jsonl"
    secret = "sk-proj-" + "Q7wX9zR2" * 5
    prompt = "lorem ipsum dolor sit amet " * 36_000 + f"my key is {secret} thanks"  # about 1 MB
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log:\n    enabled: true\n    path: '{path}'\n    max_text_chars: 1000000\n"
        "    redact:\n      keys: {kind: secrets, timeout_s: 0.001}\n"))
    body = {"model": "chat", "messages": [{"role": "user", "content": prompt}]}
    response = httpx.post(f"{running.base_url}/chat/completions", json=body, headers=AUTH, timeout=20)
    assert response.status_code == 200
    entries = _wait_for(lambda: [json.loads(line) for line in path.read_text().splitlines()]
                        if path.exists() else [], 1)
    logged = json.dumps(entries[0])
    assert secret not in logged and "lorem ipsum" not in logged
    assert entries[0]["input"] == ["<WITHHELD: a redacting guard failed>"]
