"""A guarded request of many short or empty texts, through `gateway serve`: the event loop is not held for all of them.

The guard stage yielded to the loop only per 16,384 characters checked (`YIELD_CHARS`), but a guard check costs tens
of microseconds however short its text: one 3.7 MB body of 128,001 empty messages held the loop (and every other
request, `/healthz` here) 2.9 s. Each text now counts `PER_TEXT` characters more, and listing the texts yields too.
Such a body is now refused before it is decoded (more than `MAX_JSON_CONTAINERS` objects: `test_nested_body_bound`);
the bodies here hold just fewer, 49,001 texts (the old code held the loop about 1.1 s for them).

The gateway runs in a process of its own: a probe in the gateway's process would wait for the GIL behind the
guards' work, yields or none, and measure that instead of the loop.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.pipeline.stages import MAX_JSON_CONTAINERS
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
      guarded: {provider: demo, model: demo-1}
    guards:
      models:
        guarded:
          pii: {kind: pii}
          secrets: {kind: secrets}
          words: {kind: denylist, terms: [forbiddenword]}
    """)
TEXTS = MAX_JSON_CONTAINERS - 1_000  # empty texts, one object each: just under the limit on a body's objects
BOUND_S = 0.5  # the old code held the probe 2-3 s; a loaded CI machine may take a few times today's ~0.1 s
ATTEMPTS = 2  # a busy machine may stall the probe once; a held loop stalls it every time


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    policy = tmp_path_factory.mktemp("many-texts") / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    with serving([sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port)], port):
        yield f"http://127.0.0.1:{port}"


def _chat(texts: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": ""} for _ in range(texts)]
    return {"model": "guarded", "messages": [*messages, {"role": "user", "content": "forbiddenword"}]}


def _responses(texts: int) -> dict[str, Any]:
    items = [{"role": "user", "content": ""} for _ in range(texts)]
    return {"model": "guarded", "input": [*items, {"role": "user", "content": "forbiddenword"}]}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", _chat),  # 49,001 empty messages, the last with a deny-list term
    ("/v1/responses", _responses),  # 49,001 input items, likewise
])
def test_many_empty_texts_do_not_hold_the_loop(url: str, path: str, body: Any) -> None:
    raw = json.dumps(body(TEXTS), separators=(",", ":")).encode()
    assert len(raw) < 4_194_304
    waits: list[float] = []
    for _ in range(ATTEMPTS):
        with healthz_probe(url) as slowest:
            response = httpx.post(url + path, content=raw, timeout=120, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"]["code"] == "content_policy_violation"
        waits.append(slowest[0])
        if slowest[0] < BOUND_S:
            break
    assert min(waits) < BOUND_S, f"/healthz waited {min(waits):.2f}s at best behind one request's guard checks"
