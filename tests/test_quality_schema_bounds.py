"""The quality signals' schema checks through a real gateway: whatever schema and answer a client brings, checking
them does not hold up the event loop (a /healthz probe stays fast), and ordinary schemas are still judged right."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, free_port, policy_text

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
STALL_S = 0.3  # a probe's longest wait allowed while one answer is checked (before the bounds: 1.6 to 3.8 s)


@pytest.fixture(scope="module")
def gw(upstream: Any) -> Iterator[RunningGateway]:
    text = policy_text(upstream.base_url) + "telemetry:\n  quality: {enabled: true}\n"
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _schema_answer(answer: str, schema: Any) -> dict[str, Any]:
    """A request whose answer (`fault-echo` echoes the user's text) is `answer`, asked to fit `schema`."""
    return {"model": "fault-echo", "messages": [{"role": "user", "content": answer}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def _tool_answer(text: str, parameters: Any) -> dict[str, Any]:
    """A request answered by one call of the tool `echo` with arguments `{"text": text}` (`fault-echo-tool`)."""
    return {"model": "fault-echo-tool", "messages": [{"role": "user", "content": text}],
            "tools": [{"type": "function", "function": {"name": "echo", "parameters": parameters}}]}


def _counts(gw: RunningGateway) -> dict[str, float]:
    """`fault-echo`'s and `fault-echo-tool`'s answers checked and their signals, by signal."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(gw.metrics()):
        for sample in family.samples:
            if sample.labels.get("model", "").startswith("fault-echo"):
                if sample.name == "gateway_quality_checked_total":
                    counts["checked"] = counts.get("checked", 0) + sample.value
                elif sample.name == "gateway_quality_signals_total":
                    signal = sample.labels["signal"]
                    counts[signal] = counts.get(signal, 0) + sample.value
    return counts


def _signals_of(gw: RunningGateway, body: dict[str, Any]) -> set[str]:
    """The signals counted for the one answer to `body` (and that it was checked at all)."""
    before = _counts(gw)
    response = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    after = _counts(gw)
    assert after.get("checked", 0) == before.get("checked", 0) + 1
    return {name for name, value in after.items() if name != "checked" and value > before.get(name, 0)}


def _longest_probe_while(gw: RunningGateway, body: dict[str, Any]) -> float:
    """Sends `body` while a second client probes /healthz; the probe's longest wait is how long the loop was held."""
    waits: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=120) as client:
            while not done.is_set():
                started = time.monotonic()
                assert client.get(gw.url + "/healthz").status_code == 200
                waits.append(time.monotonic() - started)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.2)
        response = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=300)
        time.sleep(0.2)
    finally:
        done.set()
        prober.join()
    assert response.status_code == 200, response.text
    return max(waits)


def test_a_backtracking_pattern_does_not_hold_the_loop(gw: RunningGateway) -> None:
    """`^(a+)+$` against 25 `a`s and a `!`: 1.6 s of backtracking with `re`."""
    body = _schema_answer('"' + "a" * 25 + '!"', {"type": "string", "pattern": "^(a+)+$"})
    assert _longest_probe_while(gw, body) < STALL_S


def test_a_pattern_that_runs_out_of_time_counts_nothing(gw: RunningGateway) -> None:
    """`^(a|aa)+$` backtracks with `regex` too: its search times out, and the answer is not held against the
    target (in a tool's schema, here: `malformed_tool_call`); with `re`, 34 `a`s held the loop about 2 s."""
    body = _tool_answer("a" * 34 + "!", {"type": "object", "properties": {"text": {"pattern": "^(a|aa)+$"}}})
    assert _longest_probe_while(gw, body) < STALL_S
    assert _signals_of(gw, body) == set()


def test_unique_items_over_many_objects_do_not_hold_the_loop(gw: RunningGateway) -> None:
    """`uniqueItems` over 1,500 small objects: 3.8 s in jsonschema (it compares them pairwise)."""
    answer = json.dumps([{"a": i} for i in range(1500)], separators=(",", ":"))
    assert _longest_probe_while(gw, _schema_answer(answer, {"type": "array", "uniqueItems": True})) < STALL_S


def test_a_large_schema_does_not_hold_the_loop(gw: RunningGateway) -> None:
    """A 350 KB schema of 10,000 properties: 3.5 s to check against the meta-schema, fresh for every request."""
    schema = {"type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(10_000)}}
    assert _longest_probe_while(gw, _schema_answer("{}", schema)) < STALL_S


def test_a_small_schema_of_exponential_work_does_not_hold_the_loop(gw: RunningGateway) -> None:
    """A 2 KB schema whose each level refers to the next twice: 2^18 subschemas to enter for one number."""
    levels = {f"l{i}": {"allOf": [{"$ref": f"#/$defs/l{i + 1}"}, {"$ref": f"#/$defs/l{i + 1}"}]} for i in range(18)}
    schema = {"$defs": {**levels, "l18": {"type": "integer"}}, "$ref": "#/$defs/l0"}
    assert _longest_probe_while(gw, _schema_answer("1", schema)) < STALL_S


def test_a_remote_reference_is_not_fetched(gw: RunningGateway) -> None:
    """A `$ref` to a URL: jsonschema would fetch it (on the event loop, from wherever the client points)."""
    fetched: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    try:
        schema = {"$ref": f"http://127.0.0.1:{server.server_port}/schema.json"}
        assert _signals_of(gw, _schema_answer("5", schema)) == set()  # cannot tell: not counted
    finally:
        server.shutdown()
        serving.join()
        server.server_close()
    assert fetched == []


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
CODE = {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}$"}
UNIQUE = {"type": "array", "uniqueItems": True}


@pytest.mark.parametrize(("answer", "schema", "violates"), [
    ('{"name":"Ada","age":36}', PERSON, False),
    ('{"name":"Ada","age":-1}', PERSON, True),
    ('{"name":"Ada"}', PERSON, True),
    ('{"name":"Ada","age":36,"email":"a@b.c"}', PERSON, True),
    ('"ABC-1234"', CODE, False),
    ('"abc-1234"', CODE, True),
    ('[{"a":1,"b":2},{"a":2}]', UNIQUE, False),
    ('[{"a":1,"b":2},{"b":2,"a":1}]', UNIQUE, True),
    ("[1,1.0]", UNIQUE, True),
    ("[1,true]", UNIQUE, False),
    ('{"x-a":1,"y":2}', {"patternProperties": {"^x-": {"type": "integer"}}, "additionalProperties": False}, True),
    ('{"x-a":"1"}', {"patternProperties": {"^x-": {"type": "integer"}}}, True),
    ('{"x-a":1}', {"patternProperties": {"^x-": {"type": "integer"}}, "additionalProperties": False}, False),
    ('{"b":5}', {"type": "object", "required": "a"}, False),  # a broken schema: the client's fault, not counted
])
def test_ordinary_schemas_are_judged_right(gw: RunningGateway, answer: str, schema: Any, violates: bool) -> None:
    assert _signals_of(gw, _schema_answer(answer, schema)) == ({"schema_violation"} if violates else set())


@pytest.mark.parametrize(("text", "malformed"), [("ABC-1234", False), ("abc-1234", True)])
def test_a_tool_calls_pattern_is_judged_right(gw: RunningGateway, text: str, malformed: bool) -> None:
    body = _tool_answer(text, {"type": "object", "properties": {"text": CODE}, "required": ["text"]})
    assert _signals_of(gw, body) == ({"malformed_tool_call"} if malformed else set())
