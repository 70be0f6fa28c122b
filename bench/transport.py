"""Part 1: pick the upstream HTTP client and the ASGI server by measurement.

Each variant is a minimal pass-through (``bench/apps``) pinned to ONE core (``taskset -c 1``
by default) while nginx (canned upstream) and wrk share the other core. wrk keeps 16
connections busy, so the app's core is saturated and its req/s is its requests per
CPU-second; the app's own CPU time per request is measured from /proc as a cross-check.

Variants run round-robin (a, b, c, ... then again), each run with a fresh process, a
warm-up and a measured wrk run; repeating and taking medians protects against other
people's jobs on this shared machine.

    .venv/bin/python bench/transport.py                 # everything, ~8 minutes
    .venv/bin/python bench/transport.py --variants a,c --runs 1 --duration 3   # quick look
"""

from __future__ import annotations

if __package__ in (None, ""):  # allow ``python bench/transport.py`` from anywhere
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import dataclasses
import datetime as dt
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import canned
from bench.harness import (
    BENCH_DIR,
    GATEWAY_PATH,
    HOST,
    VENV_BIN,
    BenchError,
    Service,
    Summary,
    WrkResult,
    check_cpus,
    disturbed,
    fmt_ms,
    fmt_rps,
    free_port,
    install_signal_handlers,
    markdown_table,
    nginx_upstream,
    require_tools,
    run_wrk,
    versions,
    wait_until_serving,
    workdir,
    wrk_command,
)

LITESTAR_APP = "bench.apps.litestar_passthrough:app"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One server + client combination under test."""

    key: str
    server: str  # uvicorn | granian | aiohttp.web
    client: str  # BENCH_CLIENT value: httpx | httpx-aiohttp | aiohttp | none
    label: str
    #: Server/client ceilings are reported but never "chosen".
    reference: bool = False
    #: Extra environment for the app (e.g. BENCH_GC_FREEZE).
    env: tuple[tuple[str, str], ...] = ()
    #: Extra server options.
    extra_args: tuple[str, ...] = ()

    def argv(self, port: int) -> list[str]:
        if self.server == "uvicorn":
            return [
                str(VENV_BIN / "uvicorn"),
                LITESTAR_APP,
                "--host",
                HOST,
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
                "--lifespan",
                "on",
                *self.extra_args,
            ]
        if self.server == "granian":
            return [
                str(VENV_BIN / "granian"),
                "--interface",
                "asgi",
                "--host",
                HOST,
                "--port",
                str(port),
                "--workers",
                "1",
                "--runtime-threads",
                "1",
                "--loop",
                "uvloop",
                "--no-access-log",
                "--log-level",
                "warning",
                *self.extra_args,
                LITESTAR_APP,
            ]
        if self.server == "aiohttp.web":
            return [
                str(VENV_BIN / "python"),
                "-m",
                "bench.apps.aiohttp_passthrough",
                "--host",
                HOST,
                "--port",
                str(port),
            ]
        raise ValueError(self.server)


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("a", "uvicorn", "httpx", "litestar/uvicorn + httpx (default transport)"),
        Variant("b", "uvicorn", "httpx-aiohttp", "litestar/uvicorn + httpx over AiohttpTransport"),
        Variant("c", "uvicorn", "aiohttp", "litestar/uvicorn + aiohttp ClientSession"),
        Variant("d", "granian", "aiohttp", "litestar/granian + aiohttp ClientSession"),
        Variant("e", "aiohttp.web", "aiohttp", "bare aiohttp.web + aiohttp (reference)", True),
        Variant("f", "uvicorn", "none", "litestar/uvicorn, canned answer (server ceiling)", True),
        Variant("g", "granian", "none", "litestar/granian, canned answer (server ceiling)", True),
        Variant("h", "uvicorn", "aiohttp", "as c, plus gc.freeze() after startup", env=(("BENCH_GC_FREEZE", "1"),)),
        Variant("i", "granian", "aiohttp", "as d, plus granian --task-impl rust", extra_args=("--task-impl", "rust")),
    )
}


@dataclasses.dataclass
class Options:
    variants: list[Variant]
    stream_variants: list[Variant] | None  # None = pick the best 3 non-reference by json rps
    runs: int
    duration: int  # wrk only takes whole seconds
    warmup: int
    connections: int
    app_cpu: str
    load_cpu: str
    out: Path
    keep_workdir: bool
    retries: int


def measure(variant: Variant, mode: str, opts: Options, tools: dict[str, str], wd: Path, upstream: int) -> WrkResult:
    """Start a fresh app, check it answers ``mode`` correctly, warm it up, measure once."""
    port = free_port()
    service = Service(
        f"{variant.key}-{variant.server}-{variant.client}",
        variant.argv(port),
        log_dir=wd,
        cpu=opts.app_cpu,
        env={"BENCH_CLIENT": variant.client, "BENCH_UPSTREAM": f"http://{HOST}:{upstream}", **dict(variant.env)},
    )
    with service:
        wait_until_serving(service, port, GATEWAY_PATH, [mode], "sk-bench")
        url = f"http://{HOST}:{port}{GATEWAY_PATH}"
        body = canned.request_body(stream=mode == "sse")

        def wrk(duration: int, target: Service | None = None) -> WrkResult:
            return run_wrk(
                tools["wrk"],
                url,
                body=body,
                key="sk-bench",
                connections=opts.connections,
                duration=duration,
                cpu=opts.load_cpu,
                target=target,
            )

        if opts.warmup > 0:
            wrk(opts.warmup)
        result = wrk(opts.duration, target=service)
        if not service.running():
            raise BenchError(f"{service.name} died during the run:\n{service.log_tail()}")
        return result


def run_mode(
    mode: str, variants: Sequence[Variant], opts: Options, tools: dict[str, str], wd: Path, upstream: int
) -> dict[str, list[WrkResult]]:
    results: dict[str, list[WrkResult]] = {v.key: [] for v in variants}
    for run in range(opts.runs):
        # Rotate the order each round so slow drift (or a neighbour's job) is spread out.
        order = list(variants[run % len(variants) :]) + list(variants[: run % len(variants)])
        for variant in order:
            r = measure(variant, mode, opts, tools, wd, upstream)
            for _ in range(opts.retries):
                if not disturbed(r):
                    break
                print(
                    f"[{mode} run {run + 1}/{opts.runs}] {variant.key}: "
                    f"{r.other_cpu_s:.1f} s of foreign load, repeating"
                )
                r = measure(variant, mode, opts, tools, wd, upstream)
            results[variant.key].append(r)
            cpu = r.cpu_us_per_request
            print(
                f"[{mode} run {run + 1}/{opts.runs}] {variant.key} {variant.label:52s} "
                f"{r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
                f"cpu {cpu or 0:6.0f} us/req  errors {r.errors}",
                flush=True,
            )
    return results


def table(mode: str, variants: Sequence[Variant], results: dict[str, list[WrkResult]]) -> str:
    rows = []
    for v in variants:
        s = Summary.of(results[v.key])
        cpu = f"{s.cpu_us_per_request:.0f}" if s.cpu_us_per_request is not None else "n/a"
        rows.append(
            [
                f"{v.key}",
                v.label,
                f"**{fmt_rps(s.rps)}**",
                f"{fmt_rps(s.rps_min)}–{fmt_rps(s.rps_max)}",
                fmt_ms(s.p50_ms),
                fmt_ms(s.p99_ms),
                cpu,
                str(s.errors),
            ]
        )
    return markdown_table(
        ["", f"variant ({mode})", "req/s (median)", "min–max", "p50 ms", "p99 ms", "app CPU µs/req", "errors"],
        rows,
        align_right_from=2,
    )


def render(
    opts: Options,
    tools: dict[str, str],
    upstream_cmd: str,
    json_results: dict[str, list[WrkResult]],
    sse_variants: Sequence[Variant],
    sse_results: dict[str, list[WrkResult]],
) -> str:
    vers = versions(tools)
    example_port = 8000
    lines = [
        "# Part 1 — upstream transport and ASGI server, measured",
        "",
        f"Generated by `bench/transport.py` on {dt.datetime.now().isoformat(timespec='seconds')}.",
        (
            f"{opts.runs} runs per variant (fresh process each run, variants interleaved), "
            f"{opts.warmup:g} s warm-up + {opts.duration:g} s measured, wrk with "
            f"{opts.connections} connections, medians reported."
        ),
        "",
        "## Setup",
        "",
        (f"* Machine: {vers['cpu']}, {os.cpu_count()} cores, Linux {vers['kernel']}."),
        (
            f"* App under test pinned to core {opts.app_cpu}; nginx (canned upstream) and wrk "
            f"pinned to core {opts.load_cpu}. The app's core is saturated, so req/s = requests "
            'per CPU-second of the app; "app CPU µs/req" is the app\'s process-tree CPU time '
            "(from /proc) divided by requests during the measured run."
        ),
        "* Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if k not in ("cpu", "kernel")) + ".",
        (
            f"* Request: `POST /v1/chat/completions` with `{canned.request_body(False).decode()}` "
            f"({len(canned.request_body(False))} B); upstream answers a {len(canned.chat_completion())} B "
            '`chat.completion`. Streamed: `"stream":true` in the body, upstream answers '
            f"{canned.SSE_CHUNKS} `chat.completion.chunk` events + `data: [DONE]` "
            f"({len(canned.sse_stream())} B, `text/event-stream`), which the app relays "
            "chunk by chunk (litestar `Stream` over the client's chunk iterator)."
        ),
        (
            "* nginx writes the whole SSE body at once, so the app typically sees it in one or "
            "two reads: the streamed figures measure per-stream overhead, not per-event overhead."
        ),
        "",
        "Command lines (`{port}` is a free port picked per run):",
        "",
        "```sh",
        f"# upstream (config: bench/nginx/nginx.conf.template)\n{upstream_cmd}",
    ]
    for v in opts.variants:
        argv = ["taskset", "-c", opts.app_cpu, *v.argv(example_port)]
        cmd = shlex.join(argv).replace(str(example_port), "{port}")
        extra = "".join(f"{k}={val} " for k, val in v.env)
        lines.append(
            f"# {v.key}: {v.label}\n{extra}BENCH_CLIENT={v.client} BENCH_UPSTREAM=http://127.0.0.1:{{nginx_port}} {cmd}"
        )
    wrk = shlex.join(
        wrk_command(
            "wrk", "http://127.0.0.1:{port}/v1/chat/completions", opts.connections, opts.duration, opts.load_cpu
        )
    )
    lines += [
        f"# load (BENCH_BODY=<request body>, BENCH_KEY=sk-bench)\n{wrk}",
        "```",
        "",
        "## Non-streamed",
        "",
        table("json", opts.variants, json_results),
        "",
    ]
    if sse_variants:
        lines += ["## Streamed (SSE)", "", table("sse", sse_variants, sse_results), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variant keys (default: all)")
    parser.add_argument(
        "--stream-variants", default="auto", help="comma list, 'auto' (best 3 non-reference by json req/s) or 'none'"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--app-cpu", default="1")
    parser.add_argument("--load-cpu", default="0")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "transport.md")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    parser.add_argument(
        "--retries", type=int, default=2, help="repeat a run up to N times when another job loaded the app's core"
    )
    args = parser.parse_args(argv)

    def pick(spec: str) -> list[Variant]:
        try:
            return [VARIANTS[k.strip()] for k in spec.split(",") if k.strip()]
        except KeyError as exc:
            parser.error(f"unknown variant {exc}; choose from {', '.join(VARIANTS)}")

    stream: list[Variant] | None
    stream = (
        None
        if args.stream_variants == "auto"
        else ([] if args.stream_variants == "none" else pick(args.stream_variants))
    )
    return Options(
        variants=pick(args.variants),
        stream_variants=stream,
        runs=args.runs,
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        app_cpu=args.app_cpu,
        load_cpu=args.load_cpu,
        out=args.out,
        keep_workdir=args.keep_workdir,
        retries=max(0, args.retries),
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    tools = require_tools()
    install_signal_handlers()
    try:
        check_cpus(opts.app_cpu, opts.load_cpu)
        with (
            workdir("bench-transport-", keep=opts.keep_workdir) as wd,
            nginx_upstream(tools["nginx"], wd, opts.load_cpu) as upstream,
        ):
            upstream_cmd = (
                f"taskset -c {opts.load_cpu} nginx -p <tmp>/nginx -e <tmp>/nginx/error.log -c <tmp>/nginx/nginx.conf"
            )
            json_results = run_mode("json", opts.variants, opts, tools, wd, upstream)
            sse_variants = opts.stream_variants
            if sse_variants is None:
                ranked = sorted(
                    (v for v in opts.variants if not v.reference),
                    key=lambda v: Summary.of(json_results[v.key]).rps,
                    reverse=True,
                )
                sse_variants = ranked[:3]
            sse_results = run_mode("sse", sse_variants, opts, tools, wd, upstream) if sse_variants else {}
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    report = render(opts, tools, upstream_cmd, json_results, sse_variants, sse_results)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(report + "\n")
    raw = {
        mode: {k: [r.as_dict() for r in rs] for k, rs in res.items()}
        for mode, res in (("json", json_results), ("sse", sse_results))
    }
    opts.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(report)
    print(f"\nwrote {opts.out} and {opts.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
