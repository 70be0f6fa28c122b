"""At `server.max_requests` (requests in flight, streams included) liveness and scrapes still answer: `GET`/`HEAD`
`/healthz` and `GET /metrics` pass the gate; everything else, `/readyz` included, gets 503 `server_overloaded`.

Before, the gate refused every path alike: a pod holding `max_requests` long streams failed its liveness probe
(the Helm chart, deploy/kubernetes.yaml and the Dockerfile's HEALTHCHECK point it at /healthz) and was restarted,
cutting every stream; Prometheus lost its scrape exactly while the gateway was saturated."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from gateway.http_server import HAVE_HTTPTOOLS, server_limits
from tests.conftest import FULL_KEY, RunningGateway

try:
    import uvloop  # noqa: F401
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False
else:
    HAVE_UVLOOP = True


def _refused(text: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "gateway_http_refused_total" and sample.labels.get("reason") == "too_many_requests")


def _overloaded(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text[:200])
    assert response.json()["error"]["code"] == "server_overloaded"
    assert response.headers["retry-after"] == "1"


def test_probes_answer_while_long_streams_hold_every_request_slot(
        make_gateway: Callable[..., RunningGateway]) -> None:
    running = make_gateway(max_requests=2)
    client = openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0, timeout=30)
    opened = threading.Barrier(3, timeout=20)
    done = threading.Event()
    chunks: list[int] = []

    def stream() -> None:  # ~5 s upstream, a chunk every 250 ms; left as soon as the test is done
        with client.chat.completions.create(model="fault-slow-stream-250", stream=True,
                                            messages=[{"role": "user", "content": "hi"}]) as events:
            count = 0
            for _ in events:
                count += 1
                if count == 1:
                    opened.wait()
                if done.is_set():
                    break
            chunks.append(count)

    streams = [threading.Thread(target=stream) for _ in range(2)]
    for thread in streams:
        thread.start()
    try:
        opened.wait()  # both streams are flowing: the process is at max_requests
        with httpx.Client(base_url=running.url, timeout=5) as http:
            _overloaded(http.get("/v1/models", headers={"Authorization": f"Bearer {FULL_KEY}"}))
            health = http.get("/healthz")
            assert (health.status_code, health.json()) == (200, {"status": "ok"}), health.text[:200]
            assert http.head("/healthz").status_code == 200
            scrape = http.get("/metrics")
            assert scrape.status_code == 200 and "gateway_requests_in_flight" in scrape.text, scrape.text[:200]
            before = _refused(scrape.text)
            assert _refused(http.get("/metrics").text) == before  # a probe that passed is not a refusal
            _overloaded(http.get("/readyz"))  # readiness refused: a load balancer sends the traffic elsewhere
            _overloaded(http.post("/healthz"))  # only GET and HEAD are probes
            _overloaded(http.get("/v1/models/fault-slow-stream-250"))
            assert _refused(http.get("/metrics").text) == before + 3
    finally:
        done.set()
        for thread in streams:
            thread.join(30)
    assert len(chunks) == 2  # the streams were never cut


# -- the gate itself, on both HTTP protocols, with a tiny app -----------------------------------------------

VARIANTS = [
    pytest.param(("httptools", "uvloop"), id="httptools-uvloop",
                 marks=pytest.mark.skipif(not (HAVE_HTTPTOOLS and HAVE_UVLOOP), reason="httptools or uvloop missing")),
    pytest.param(("httptools", "asyncio"), id="httptools-asyncio",
                 marks=pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="httptools missing")),
    pytest.param(("h11", "asyncio"), id="h11-asyncio"),
]


class _Held:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = 0

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            self.holding += 1
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        body = f"{scope['method']} {scope['path']}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=VARIANTS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[_Held, str]]:
    http, loop = request.param
    held = _Held()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(held.app, log_config=None, access_log=False, lifespan="off", loop=loop, interface="asgi3",
                            timeout_graceful_shutdown=2, **server_limits(http=http, max_requests=1))
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not running.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        yield held, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        held.release.set()
        running.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive()


def test_only_get_and_head_of_healthz_and_metrics_pass_the_gate(server: tuple[_Held, str]) -> None:
    held, url = server
    holder = threading.Thread(target=lambda: httpx.get(url + "/hold", timeout=20))
    holder.start()
    try:
        deadline = time.monotonic() + 5
        while held.holding < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=5) as http:
            for method, path in [("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/metrics"),
                                 ("HEAD", "/metrics"), ("GET", "/metrics?name[]=up")]:
                answer = http.request(method, path)
                assert answer.status_code == 200, (method, path, answer.status_code)
                if method == "GET":
                    assert answer.text == f"GET {path.partition('?')[0]}"
            for method, path in [("GET", "/readyz"), ("POST", "/healthz"), ("DELETE", "/metrics"),
                                 ("GET", "/healthz/"), ("GET", "/v1/models"), ("GET", "/metricsx")]:
                _overloaded(http.request(method, path))
    finally:
        held.release.set()
        holder.join(20)
