"""Shared fixtures: offline data from ../shared, a mock upstream, gateways on real ports."""

from __future__ import annotations

import collections
import os
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GATEWAY_SHARED_DIR", REPO.parent / "shared")).resolve()
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))

from gateway.app import Gateway, create_app, served_app  # noqa: E402
from gateway.auth.keys import hash_key  # noqa: E402
from gateway.policy import compile_text  # noqa: E402
from gateway.server import uvicorn_config  # noqa: E402
from tests.support import leakcheck  # noqa: E402
from tests.support.leakcheck import pytest_sessionstart  # noqa: E402,F401 -- suite-end leak check
from tests.support.mock_upstream import MockUpstream  # noqa: E402
from tests.support.redis_server import sweep_test_keys  # noqa: E402

UPSTREAM_KEY = "sk-upstream-test"
FULL_KEY = "gw-test-full-access-key-000000000000000000"
LIMITED_KEY = "gw-test-limited-key-1111111111111111111111"
OTHER_TENANT_KEY = "gw-test-other-tenant-22222222222222222222"
FAULTS = (
    "fault-status-400", "fault-status-401", "fault-status-404", "fault-status-429", "fault-status-500",
    "fault-status-503", "fault-slow-first-byte-3000", "fault-stall-after-3", "fault-reset-before",
    "fault-reset-after-3", "fault-malformed-json", "fault-slow-stream-100", "fault-slow-stream-250", "fault-no-usage",
    "fault-echo-secrets", "fault-echo-secrets-midstream", "fault-huge-body-512", "fault-echo", "fault-echo-tool",
)


_SWEPT: list[str] = []  # what the sweep of the suite's Redis did, for the summary


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite-end leak check (which also stops whatever the session left running), then the sweep of the keys
    tests left in the suite's Redis: only then can nothing of the session write there any more (a gateway's ledger
    flushes its counters as it stops, after the test that started it may have deleted its keys)."""
    leakcheck.pytest_sessionfinish(session, exitstatus)
    url = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if url and not hasattr(session.config, "workerinput"):  # (a worker of a parallel run: its peers still run)
        _sweep_suite_redis(url)


def _sweep_suite_redis(url: str) -> None:
    """Delete what tests left under their prefixes (`sweep_test_keys`); say how much, by prefix, so that a test
    that leaves keys is seen (the run does not fail for it: nothing is left once this has run)."""
    try:
        deleted = sweep_test_keys(url)
    except redis.RedisError as exc:
        lines = [f"could not sweep the tests' keys from the suite's Redis: {exc}"]
    else:
        if not deleted:
            return
        by_prefix = collections.Counter(key.split(":", 1)[0] for key in deleted)
        counts = ", ".join(f"{prefix}: {count}" for prefix, count in sorted(by_prefix.items()))
        lines = [f"deleted {len(deleted)} keys tests left in the suite's Redis ({counts})"]
    _SWEPT.extend(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the sweep did (it ran in `pytest_sessionfinish`, which the terminal's summary follows)."""
    if _SWEPT:
        terminalreporter.write_sep("-", "suite Redis")
        for line in _SWEPT:
            terminalreporter.write_line(line)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def policy_text(upstream_url: str, **server: object) -> str:
    """The test policy: a mock-backed provider, a fast-timeout one, the demo, and three keys."""
    fault_models = "\n".join(f"  {f}: {{provider: mock-fast, model: {f}}}" for f in FAULTS)
    server_lines = "\n        ".join(f"  {k}: {v}" for k, v in server.items())  # indented like the template
    return textwrap.dedent(f"""\
        version: 1
        server:
          host: 127.0.0.1
          max_body_bytes: 1048576
        {server_lines}
        auth: keys
        keys:
          - name: full
            tenant: acme
            hash: "{hash_key(FULL_KEY)}"
          - name: limited
            tenant: acme
            hash: "{hash_key(LIMITED_KEY)}"
            models: [chat]
          - name: other
            tenant: globex
            hash: "{hash_key(OTHER_TENANT_KEY)}"
            models: [chat, embed]
        providers:
          mock:
            kind: openai
            base_url: {upstream_url}
            api_key_env: MOCK_UPSTREAM_KEY
            headers: {{X-Gateway-Test: "yes"}}
          mock-fast:
            kind: openai
            base_url: {upstream_url}
            api_key_env: MOCK_UPSTREAM_KEY
            timeouts: {{connect_s: 1, first_byte_s: 1.5, idle_s: 1.5, total_s: 20}}
          demo:
            kind: demo
        models:
          chat: {{provider: mock, model: mock-model}}
          embed: {{provider: mock, model: text-embedding-3-small}}
          demo: {{provider: demo, model: demo-1}}
        """) + fault_models + "\n"


class RunningGateway:
    """A gateway served by uvicorn in a thread, on a real port."""

    def __init__(self, text: str, env: dict[str, str], source: Path | None = None) -> None:
        if source is not None:  # a policy file that reloads can re-read (env vars must be in os.environ)
            source.write_text(text)
        self.policy = compile_text(text, str(source or "test-policy.yaml"), env)
        self.gateway = Gateway(self.policy, source=source)
        self.app = create_app(self.gateway)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        # the server settings `gateway serve` uses (head limits and timeouts included)
        config = uvicorn_config(served_app(self.app), self.policy, host="127.0.0.1", port=self.port, loop="asyncio",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> RunningGateway:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text


@pytest.fixture(scope="session")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(scope="session")
def gateway(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(policy_text(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def make_gateway(upstream: MockUpstream) -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []

    def make(text: str | None = None, env: dict[str, str] | None = None, **server: object) -> RunningGateway:
        running = RunningGateway(text or policy_text(upstream.base_url, **server),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})}).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture(autouse=True)
def _clear_upstream_records(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").clear()
