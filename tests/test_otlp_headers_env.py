"""`telemetry.tracing.otlp_headers_env` is checked as a provider's `headers_env` is: a header name that is none is
refused, a variable unset is an error for `gateway check --strict-env` (a warning without), and the exporter sends
no header it cannot send (unset: it sent `Authorization: ''`) and never dies on one aiohttp refuses (a ValueError
ended its task, and every later span was queued for nothing)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from gateway.policy.telemetry_schema import TracingSpec
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import SpanExporter
from tests.conftest import REPO

VAR = "B10_OTLP_COLLECTOR_KEY"
POLICY = f"""\
    version: 1
    auth: none
    providers: {{demo: {{kind: demo}}}}
    models: {{chat: {{provider: demo, model: demo-1}}}}
    telemetry:
      tracing:
        enabled: true
        otlp_endpoint: http://127.0.0.1:4318/v1/traces
        otlp_headers_env:
          Authorization: {VAR}
    """


def gateway_check(folder: Path, text: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (folder / "policy.yaml").write_text(textwrap.dedent(text))
    clean = {k: v for k, v in os.environ.items() if k != VAR}
    return subprocess.run([sys.executable, "-m", "gateway", "check", *args, "policy.yaml"], capture_output=True,
                          text=True, cwd=folder, timeout=120, env={**clean, "PYTHONPATH": str(REPO), **env})


def test_an_unset_variable_is_an_error_with_strict_env_and_a_warning_without(tmp_path: Path) -> None:
    strict = gateway_check(tmp_path, POLICY, "--strict-env", env={})
    assert (strict.returncode, strict.stderr) == (
        1, f"policy.yaml:10: telemetry.tracing.otlp_headers_env.Authorization: environment variable `{VAR}` is not "
           "set\n")
    lenient = gateway_check(tmp_path, POLICY, env={})
    assert lenient.returncode == 0
    assert (f"warning: policy.yaml:10: telemetry.tracing.otlp_headers_env.Authorization: environment variable `{VAR}` "
            "is not set") in lenient.stderr
    broken = gateway_check(tmp_path, POLICY, "--strict-env", env={VAR: "Bearer a\nb"})
    assert broken.returncode == 1
    assert "holds a control character" in broken.stderr and "Bearer a" not in broken.stderr  # never the value
    assert gateway_check(tmp_path, POLICY, "--strict-env", env={VAR: "Bearer abc"}).returncode == 0


def test_a_header_name_that_is_none_is_refused(tmp_path: Path) -> None:
    run = gateway_check(tmp_path, POLICY.replace("Authorization:", "Bad Header:"), env={VAR: "x"})
    assert run.returncode == 1
    assert run.stderr.startswith("policy.yaml:10: telemetry.tracing.otlp_headers_env.Bad Header: invalid header name "
                                 "`Bad Header`")


@asynccontextmanager
async def collector(seen: list[dict[str, str]]) -> AsyncIterator[int]:
    async def traces(request: web.Request) -> web.Response:
        await request.read()
        seen.append(dict(request.headers))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def _span(n: int) -> dict[str, str]:
    return {"traceId": "0" * 31 + "1", "spanId": f"{n:016x}", "name": "chat x"}


def test_the_exporter_sends_a_cleaned_value_and_leaves_out_one_it_cannot_send() -> None:
    async def main() -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []
        async with collector(seen) as port:
            spec = TracingSpec(enabled=True, otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces",
                               otlp_headers_env={"Authorization": "UNSET_B10", "x-team": "TEAM_B10",
                                                 "x-broken": "BROKEN_B10"})
            exporter = SpanExporter(spec, Metrics(), env={"TEAM_B10": "search\n", "BROKEN_B10": "a\x00b"})
            await exporter.start()
            exporter.add(_span(1))
            await exporter.aclose()
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 1
    assert seen[0].get("x-team") == "search"  # (a secret mounted from a file ends in a newline)
    assert "Authorization" not in seen[0] and "x-broken" not in seen[0]


def test_a_header_aiohttp_refuses_fails_the_export_not_the_exporter() -> None:
    async def main() -> tuple[bool, float, float, int]:
        seen: list[dict[str, str]] = []
        async with collector(seen) as port:
            # (built without the policy's checks, as a struct is: a name the checks would refuse)
            spec = TracingSpec(enabled=True, otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces",
                               otlp_headers_env={"x-bad\nname": "TEAM_B10"}, flush_interval_s=0.05)
            metrics = Metrics()
            exporter = SpanExporter(spec, metrics, env={"TEAM_B10": "search"})
            await exporter.start()
            exporter.add(_span(1))
            for _ in range(200):  # the first flush, within 10 s
                await asyncio.sleep(0.05)
                if metrics.registry.get_sample_value("gateway_spans_exported_total", {"result": "failed"}):
                    break
            assert exporter._task is not None
            alive = not exporter._task.done()
            exporter.add(_span(2))
            await exporter.aclose()
        sample = metrics.registry.get_sample_value
        return (alive, sample("gateway_spans_exported_total", {"result": "failed"}) or 0.0,
                sample("gateway_telemetry_dropped_total", {"sink": "otlp", "reason": "close_timeout"}) or 0.0,
                len(seen))

    alive, failed, dropped, posts = asyncio.run(main())
    assert alive  # the task lives on after a post aiohttp refused
    assert (failed, dropped, posts) == (2.0, 0.0, 0)  # the second span was tried too, never left queued at close
