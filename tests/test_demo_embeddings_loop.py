"""The demo model's embeddings, made in a thread, do not hold the event loop: a health check sent meanwhile waits only
for its turns at the GIL, not for all of a big request's hashing.

The gateway runs in a process of its own (`gateway serve`): in the test's process, the client's thread reading the
20 MB answer held the GIL the gateway shares, and the health checks measured that instead of the loop.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.support.probe import healthz_probe
from tests.test_serve import serving

REPO = Path(__file__).resolve().parents[1]
POLICY = textwrap.dedent("""\
    version: 1
    server: {watch_policy: false, max_body_bytes: 4194304}
    auth: none
    providers:
      demo: {kind: demo}
    models:
      demo: {provider: demo, model: demo-1}
    """)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    policy = tmp_path_factory.mktemp("demo-embeddings") / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    with serving([sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port)], port):
        yield f"http://127.0.0.1:{port}"


def test_demo_embeddings_do_not_stall_the_event_loop(url: str) -> None:
    """2,048 inputs at 1,024 dimensions (~1 s of hashing): made on the event loop, a health check sent meanwhile
    waits for all of it; made in a thread, only for its turns at the GIL (bounded relative to the request's own
    time, so that a loaded machine, which slows both, does not fail it)."""
    result: dict[str, float] = {}
    began = time.perf_counter()
    with healthz_probe(url, pause_s=0.05) as slowest:
        time.sleep(0.2)  # the probe's first answers: before the request
        thread = threading.Thread(target=lambda: result.update(
            status=(r := httpx.post(url + "/v1/embeddings", timeout=120, json={
                "model": "demo", "input": [f"text {i}" for i in range(2048)], "dimensions": 1024})).status_code,
            count=r.content.count(b'"object":"embedding"')))
        thread.start()
        thread.join()
    elapsed = time.perf_counter() - began - 0.2
    assert result["status"] == 200 and result["count"] == 2048
    assert slowest[0] < max(0.5, elapsed / 3), (
        f"/healthz waited {slowest[0]:.2f}s behind one demo embeddings request of {elapsed:.2f}s")
