"""Gateway benchmark: the same load against nginx directly and through the gateway.

The canned nginx upstream answers in microseconds, so whatever the gateway adds on top of
the direct figures is the gateway's own cost. The gateway is pinned to one core
(``taskset -c 1``) and nginx + wrk to the other (``taskset -c 0``), so at saturation the
gateway's req/s is its requests per CPU-second; its CPU time per request is also read
from /proc.

For every mode (json, sse) and concurrency (1, 16, 64) it runs a warm-up, then N rounds of
"direct, then gateway" (interleaved so drift hits both alike) and reports medians.

    .venv/bin/python bench/run.py                     # the real gateway, ~6 minutes
    .venv/bin/python bench/run.py --runs 1 --duration 3 --concurrency 16   # quick look
    .venv/bin/python bench/run.py --gateway-cmd "..."  # any server; {policy} {port} {upstream}

See bench/README.md for how to read the table.
"""

from __future__ import annotations

if __package__ in (None, ""):  # allow ``python bench/run.py`` from anywhere
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import canned
from bench.harness import (
    BENCH_DIR,
    DISTURBED_SHARE,
    GATEWAY_PATH,
    HOST,
    REPO_DIR,
    UPSTREAM_PATHS,
    BenchError,
    Service,
    Summary,
    WrkResult,
    check_answer,
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

GATEWAY_BIN = REPO_DIR / ".venv" / "bin" / "gateway"
DEFAULT_GATEWAY_CMD = f"{GATEWAY_BIN} serve --policy {{policy}} --host {HOST} --port {{port}} --workers 1"
DEFAULT_KEY_HASH_CMD = f"{GATEWAY_BIN} keys hash {{key}}"
DEFAULT_KEY = "sk-bench-4f1c2a9e7b3d4e5f8a6b"
UPSTREAM_KEY = "sk-bench"
HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
MODES = ("json", "sse")


@dataclasses.dataclass
class Options:
    gateway_cmd: str
    key_hash_cmd: str
    key: str
    policy_template: Path
    runs: int
    duration: int  # wrk only takes whole seconds
    warmup: int
    concurrency: list[int]
    modes: list[str]
    gateway_cpu: str
    load_cpu: str
    startup_timeout: float
    retries: int
    out: Path
    keep_workdir: bool


@dataclasses.dataclass
class Cell:
    """All runs of one (mode, concurrency) pair."""

    mode: str
    connections: int
    direct: list[WrkResult] = dataclasses.field(default_factory=list)
    gateway: list[WrkResult] = dataclasses.field(default_factory=list)
    #: Runs thrown away and repeated because of foreign load on the gateway's core.
    retries: int = 0


# --------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------


def key_hash(opts: Options) -> str:
    """Ask the gateway to hash the bench key, so the policy matches its own scheme.

    Falls back to a plain ``sha256:<hex>`` (with a warning) when the command is missing,
    which is what a stand-in server needs; a wrong hash shows up as 401 in the smoke test.
    """
    argv = shlex.split(opts.key_hash_cmd.replace("{key}", shlex.quote(opts.key)))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        match = HASH_RE.search(proc.stdout) if proc.returncode == 0 else None
        if match:
            return match.group(0)
        problem = f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    fallback = "sha256:" + hashlib.sha256(opts.key.encode()).hexdigest()
    print(
        f"warning: `{opts.key_hash_cmd}` gave no sha256 hash ({problem}); using plain sha256 of the key",
        file=sys.stderr,
    )
    return fallback


def render_policy(template: Path, *, upstream_port: int, gateway_port: int, hash_: str) -> str:
    # str.replace, not str.format: the YAML itself uses braces ({provider: ..., model: ...}).
    # Comment lines are dropped so the placeholder docs in the template are not "filled".
    text = "".join(line for line in template.read_text().splitlines(keepends=True) if not line.lstrip().startswith("#"))
    for name, value in (("{port}", str(upstream_port)), ("{gateway_port}", str(gateway_port)), ("{key_hash}", hash_)):
        text = text.replace(name, value)
    return text


def gateway_argv(opts: Options, policy: Path, port: int, upstream: str) -> list[str]:
    if opts.gateway_cmd == DEFAULT_GATEWAY_CMD and not GATEWAY_BIN.exists():
        raise BenchError(f"{GATEWAY_BIN} does not exist; install the gateway (pip install -e .) or pass --gateway-cmd")
    cmd = opts.gateway_cmd
    for name, value in (("{policy}", str(policy)), ("{port}", str(port)), ("{upstream}", upstream)):
        cmd = cmd.replace(name, shlex.quote(value))
    return shlex.split(cmd)


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


def measure(
    opts: Options, tools: dict[str, str], gateway: Service, gateway_port: int, upstream_port: int
) -> list[Cell]:
    cells: list[Cell] = []
    for mode in opts.modes:
        body = canned.request_body(stream=mode == "sse")
        direct_url = f"http://{HOST}:{upstream_port}{UPSTREAM_PATHS[mode]}"
        gateway_url = f"http://{HOST}:{gateway_port}{GATEWAY_PATH}"
        for conns in opts.concurrency:
            cell = Cell(mode, conns)
            cells.append(cell)

            wrk = functools.partial(
                run_wrk, tools["wrk"], body=body, key=opts.key, connections=conns, cpu=opts.load_cpu
            )

            if opts.warmup > 0:
                wrk(direct_url, duration=min(opts.warmup, 1))
                wrk(gateway_url, duration=opts.warmup)
            for run in range(opts.runs):
                for attempt in range(opts.retries + 1):
                    d = wrk(direct_url, duration=opts.duration)
                    g = wrk(gateway_url, duration=opts.duration, target=gateway)
                    if not gateway.running():
                        raise BenchError(f"the gateway died during the run:\n{gateway.log_tail()}")
                    if not disturbed(g) or attempt == opts.retries:
                        break
                    cell.retries += 1
                    print(
                        f"[{mode} c={conns} run {run + 1}/{opts.runs}] {g.other_cpu_s:.1f} s of foreign "
                        f"load on core {opts.gateway_cpu}: discarding and repeating",
                        flush=True,
                    )
                cell.direct.append(d)
                cell.gateway.append(g)
                print(
                    f"[{mode} c={conns} run {run + 1}/{opts.runs}] "
                    f"direct {d.rps:8.0f} req/s p50 {d.p50_ms:6.2f} ms | "
                    f"gateway {g.rps:7.0f} req/s p50 {g.p50_ms:6.2f} ms "
                    f"p99 {g.p99_ms:6.2f} ms cpu {g.cpu_us_per_request or 0:5.0f} us/req"
                    + (f" ERRORS {d.errors}/{g.errors}" if d.errors or g.errors else ""),
                    flush=True,
                )
    return cells


# --------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------


def results_table(cells: Sequence[Cell]) -> str:
    rows = []
    for cell in cells:
        d, g = Summary.of(cell.direct), Summary.of(cell.gateway)
        cpu = f"{g.cpu_us_per_request:.0f}" if g.cpu_us_per_request is not None else "n/a"
        errors = f"{d.errors}/{g.errors}"
        rows.append(
            [
                cell.mode,
                str(cell.connections),
                fmt_rps(d.rps),
                fmt_ms(d.p50_ms),
                fmt_ms(d.p99_ms),
                fmt_rps(g.rps),
                fmt_ms(g.p50_ms),
                fmt_ms(g.p99_ms),
                f"+{fmt_ms(g.p50_ms - d.p50_ms)}",
                cpu,
                errors,
            ]
        )
    return markdown_table(
        [
            "mode",
            "conc",
            "direct req/s",
            "direct p50 ms",
            "direct p99 ms",
            "gateway req/s",
            "gateway p50 ms",
            "gateway p99 ms",
            "p50 overhead ms",
            "gateway CPU µs/req",
            "errors d/g",
        ],
        rows,
        align_right_from=1,
    )


def git_revision() -> str:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD") or "no commit"
    return rev + (" + uncommitted changes" if git("status", "--porcelain") else "")


def render(opts: Options, tools: dict[str, str], gateway: Service, cells: Sequence[Cell]) -> str:
    vers = versions(tools)
    warnings = []
    for cell in cells:
        for who, results in (("direct", cell.direct), ("gateway", cell.gateway)):
            errors = sum(r.errors for r in results)
            if errors:
                warnings.append(
                    f"{cell.mode} c={cell.connections} {who}: {errors} errors "
                    "(non-2xx, socket errors or timeouts) — figures not valid"
                )
        kept = sum(disturbed(r) for r in cell.gateway)
        if kept:
            warnings.append(
                f"{cell.mode} c={cell.connections}: {kept} of {len(cell.gateway)} runs had more than "
                f"{DISTURBED_SHARE:.0%} foreign load on core {opts.gateway_cpu} even after "
                f"{opts.retries} repeats — figures may be low"
            )
        if cell.retries:
            warnings.append(f"{cell.mode} c={cell.connections}: {cell.retries} disturbed run(s) discarded and repeated")
    wrk = shlex.join(wrk_command("wrk", "<url>", 16, opts.duration, opts.load_cpu))
    lines = [
        "# Gateway benchmark",
        "",
        (
            f"Generated by `bench/run.py` on {dt.datetime.now().isoformat(timespec='seconds')} "
            f"(checkout {git_revision()})."
        ),
        "",
        f"* Gateway: `{gateway.command_line}` (policy: `bench/policy.template.yaml`).",
        (
            f"* Gateway pinned to core {opts.gateway_cpu}; nginx (canned upstream) and wrk "
            f"pinned to core {opts.load_cpu}."
        ),
        (
            f"* Load: `{wrk}` (`-c` = conc), `POST` with `Authorization: Bearer <key>`; "
            f"json body `{canned.request_body(False).decode()}`, sse body "
            f"`{canned.request_body(True).decode()}`."
        ),
        (
            f"* Upstream answers: json {len(canned.chat_completion())} B `chat.completion`; sse "
            f"{canned.SSE_CHUNKS} chunks incl. a final usage chunk + `[DONE]` "
            f"({len(canned.sse_stream())} B, written at once)."
        ),
        (
            f"* {opts.runs} runs of {opts.duration:g} s per cell after {opts.warmup:g} s warm-up; "
            "every figure is the median over runs. Direct and gateway runs are interleaved."
        ),
        "* Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        "",
        results_table(cells),
        "",
        (
            "`p50 overhead` = gateway p50 − direct p50. `gateway CPU µs/req` = CPU time of the "
            "gateway's process tree during the run / requests. At conc 1 wrk waits for each "
            "answer, so req/s there is latency-bound, not CPU-bound. See bench/README.md."
        ),
    ]
    if warnings:
        lines += ["", "**Warnings:**", ""] + [f"* {w}" for w in warnings]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--gateway-cmd",
        default=DEFAULT_GATEWAY_CMD,
        help="command to start the target; placeholders {policy} {port} "
        "{upstream} (nginx base URL, also in $BENCH_UPSTREAM) "
        "[default: %(default)s]",
    )
    parser.add_argument(
        "--key-hash-cmd", default=DEFAULT_KEY_HASH_CMD, help="prints the policy hash of {key} [default: %(default)s]"
    )
    parser.add_argument("--key", default=DEFAULT_KEY, help="client API key to send")
    parser.add_argument("--policy-template", type=Path, default=BENCH_DIR / "policy.template.yaml")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per cell (0 to skip)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma list of connections")
    parser.add_argument("--modes", default="json,sse", help="comma list from json,sse")
    parser.add_argument("--gateway-cpu", default="1", help="core for the gateway")
    parser.add_argument("--load-cpu", default="0", help="core for nginx and wrk")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a run up to N times when another job loaded the gateway's core (default: 2)",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "latest.md")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (policy, nginx config, logs)")
    args = parser.parse_args(argv)
    try:
        concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency must be a comma list of integers")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must be a comma list from {','.join(MODES)}")
    if not concurrency or min(concurrency) < 1 or args.runs < 1 or args.duration <= 0:
        parser.error("--concurrency, --runs and --duration must be positive")
    return Options(
        gateway_cmd=args.gateway_cmd,
        key_hash_cmd=args.key_hash_cmd,
        key=args.key,
        policy_template=args.policy_template,
        runs=args.runs,
        duration=args.duration,
        warmup=args.warmup,
        concurrency=concurrency,
        modes=modes,
        gateway_cpu=args.gateway_cpu,
        load_cpu=args.load_cpu,
        startup_timeout=args.startup_timeout,
        retries=max(0, args.retries),
        out=args.out,
        keep_workdir=args.keep_workdir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    tools = require_tools()
    install_signal_handlers()
    try:
        check_cpus(opts.gateway_cpu, opts.load_cpu)
        with (
            workdir("bench-run-", keep=opts.keep_workdir) as wd,
            nginx_upstream(tools["nginx"], wd, opts.load_cpu) as upstream_port,
        ):
            upstream = f"http://{HOST}:{upstream_port}"
            gateway_port = free_port()
            policy = wd / "policy.yaml"
            argv = gateway_argv(opts, policy, gateway_port, upstream)
            policy.write_text(
                render_policy(
                    opts.policy_template, upstream_port=upstream_port, gateway_port=gateway_port, hash_=key_hash(opts)
                )
            )
            gateway = Service(
                "gateway",
                argv,
                log_dir=wd,
                cpu=opts.gateway_cpu,
                env={"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "BENCH_UPSTREAM": upstream},
            )
            print(f"nginx upstream on {upstream}; starting: {gateway.command_line}", flush=True)
            with gateway:
                wait_until_serving(
                    gateway, gateway_port, GATEWAY_PATH, opts.modes, opts.key, timeout=opts.startup_timeout
                )
                for mode in opts.modes:  # the direct path must answer the same way
                    check_answer(upstream_port, UPSTREAM_PATHS[mode], mode, opts.key)
                cells = measure(opts, tools, gateway, gateway_port, upstream_port)
                report = render(opts, tools, gateway, cells)
                if not gateway.running():
                    raise BenchError(f"the gateway exited:\n{gateway.log_tail()}")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopped nginx and the gateway", file=sys.stderr)
        return 130
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(report + "\n")
    raw = [
        {
            "mode": c.mode,
            "connections": c.connections,
            "direct": [r.as_dict() for r in c.direct],
            "gateway": [r.as_dict() for r in c.gateway],
        }
        for c in cells
    ]
    opts.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print()
    print(report)
    print(f"\nwrote {opts.out} and {opts.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
