"""The compose load balancer (deploy/nginx/nginx.conf) hides /metrics under every spelling the gateway serves it at.

Its `location = /metrics` matched the exact path alone, and the gateway also answered `/metrics/`, `/metrics//` and
`/metrics%2F` (litestar matches them): through the balancer, every tenant's series (requests by key, spend, budgets
left) were one slash away (H52). Real nginx with the deploy config (its resolver, pid, listen address and upstream
changed for the test); the gateway now also answers its metrics at `/metrics` alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import free_port
from tests.test_serve import serving

REPO = Path(__file__).resolve().parents[1]


def test_the_balancer_hides_metrics_under_every_spelling_the_gateway_serves(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx not installed")
    port, lb_port = free_port(), free_port()
    policy = tmp_path / "p.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: acme-ci, tenant: acme, hash: "{hash_key('gw-acme-key-000000000000000000000000')}"}}
          - {{name: globex-bot, tenant: globex, hash: "{hash_key('gw-globex-key-00000000000000000000000')}"}}
        providers:
          demo: {{kind: demo}}
        models:
          demo: {{provider: demo, model: demo-1}}
        accounting: {{always: true}}
        """))
    conf = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    conf = conf.replace("resolver 127.0.0.11 valid=10s ipv6=off;", "") \
        .replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;") \
        .replace("listen 8080;", f"listen 127.0.0.1:{lb_port};") \
        .replace("http://gateway:8080", f"http://127.0.0.1:{port}")
    (tmp_path / "nginx.conf").write_text(conf)
    (tmp_path / "logs").mkdir()
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port)]
    with serving(args, port):
        for key in ("gw-acme-key-000000000000000000000000", "gw-globex-key-00000000000000000000000"):
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        lb = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                               "-g", "daemon off; error_log stderr;"], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{lb_port}/healthz", timeout=1)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "nginx did not start"
                    time.sleep(0.1)
            time.sleep(1.5)  # the metric batches applied
            assert httpx.get(f"http://127.0.0.1:{lb_port}/metrics", timeout=5).status_code == 404  # the intent
            leaks = {}
            for spelling in ("/metrics/", "/metrics//", "/metrics%2F"):
                answer = httpx.get(f"http://127.0.0.1:{lb_port}{spelling}", timeout=5)
                leaks[spelling] = (answer.status_code, [line for line in answer.text.splitlines()
                                                        if 'tenant="' in line and not line.startswith("#")][:3])
            print(leaks)
            # Observed: each spelling 200, with series such as gateway_requests_by_tenant_total{tenant="globex",...}
            assert all(status == 404 for status, _ in leaks.values()), leaks
        finally:
            lb.terminate()
            lb.wait(10)


def test_the_gateway_answers_its_metrics_at_their_path_alone(tmp_path: Path) -> None:
    """Whatever stands in front of it: `/metrics` is the one spelling; the others are a 404 in OpenAI's shape."""
    port = free_port()
    policy = tmp_path / "p.yaml"
    policy.write_text(textwrap.dedent("""\
        version: 1
        server: {host: 127.0.0.1}
        auth: none
        providers:
          demo: {kind: demo}
        models:
          demo: {provider: demo, model: demo-1}
        """))
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port)]
    with serving(args, port):
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
        for spelling in ("/metrics/", "/metrics//", "/metrics%2F"):
            answer = httpx.get(f"http://127.0.0.1:{port}{spelling}", timeout=5)
            assert answer.status_code == 404, (spelling, answer.text[:200])
            assert answer.json()["error"]["type"] == "invalid_request_error" or answer.json()["error"]["code"]
            assert "gateway_" not in answer.text
