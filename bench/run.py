"""Gateway benchmark: the same load against nginx directly, against two floors and through the gateway.

The canned nginx upstream answers in microseconds, so whatever the gateway adds on top of
the direct figures is the gateway's own cost. The process under test is pinned to one core
(``taskset -c 1``) and nginx + wrk to the other (``taskset -c 0``), so at saturation its
req/s is its requests per CPU-second; its CPU time per request is also read from /proc.

Three parts (``--only``, default all):

* ``core``: for every mode (json, sse) and concurrency (1, 16, 64) a warm-up, then N rounds
  of "direct, bare aiohttp pass-through, gateway" (interleaved so drift hits all alike);
  medians, plus the per-run ratios gateway / pass-through (req/s and CPU per request).
* ``floor``: nginx ``proxy_pass`` (one worker on the gateway's core, keep-alive upstream,
  ``proxy_buffering off``) measured in the same rounds: the compiled floor, and the
  gateway's CPU per request as a multiple of it.
* ``scale``: many concurrent slow streams (one event every 100 ms) through one gateway
  worker, at several stream counts: events/s achieved, core utilisation, CPU per event,
  RSS per open stream (``bench/scale.py``).

    .venv/bin/python bench/run.py                     # everything, ~30 minutes
    .venv/bin/python bench/run.py --only core,floor   # ~15 minutes
    .venv/bin/python bench/run.py --only scale        # ~14 minutes
    .venv/bin/python bench/run.py --runs 1 --duration 2 --concurrency 16 --only core,floor --out /tmp/b.md
    .venv/bin/python bench/run.py --gateway-cmd "..."  # any server; {policy} {port} {upstream}

See bench/README.md for how to read the tables.
"""

from __future__ import annotations

if __package__ in (None, ""):  # allow ``python bench/run.py`` from anywhere
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import canned, scale
from bench.harness import (
    BENCH_DIR,
    DISTURBED_SHARE,
    GATEWAY_PATH,
    HOST,
    REPO_DIR,
    UPSTREAM_PATHS,
    VENV_BIN,
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
    nginx_proxy,
    nginx_upstream,
    raise_nofile,
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
MODES = ("json", "sse", "anthropic")  # anthropic: a chat stream through the Anthropic translator
PARTS = ("core", "floor", "scale")
PASSTHROUGH_ARGV = [str(VENV_BIN / "python"), "-m", "bench.apps.aiohttp_passthrough", "--host", HOST, "--port"]
#: Order of the targets inside one run (the interleaving).
TARGET_ORDER = ("direct", "passthrough", "nginx", "gateway")
TARGET_LABELS = {
    "direct": "direct (wrk -> canned nginx)",
    "passthrough": "bare aiohttp pass-through",
    "nginx": "nginx proxy_pass",
    "gateway": "gateway",
}


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
    parts: list[str]
    scale: scale.ScaleOptions
    scale_policy_template: Path
    scale_pool_timeout: str


@dataclasses.dataclass
class Cell:
    """All runs of one (mode, concurrency) pair: one list of results per target."""

    mode: str
    connections: int
    results: dict[str, list[WrkResult]] = dataclasses.field(default_factory=dict)
    #: Runs thrown away and repeated because of foreign load on the measured core, per target.
    retries: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def direct(self) -> list[WrkResult]:
        return self.results.get("direct", [])

    @property
    def gateway(self) -> list[WrkResult]:
        return self.results.get("gateway", [])

    def has(self, target: str) -> bool:
        return bool(self.results.get(target))

    def ratios(self, num: str, den: str, metric: Callable[[WrkResult], float | None]) -> list[float]:
        """Per-run ratios num/den of ``metric`` (runs are paired by index: same round)."""
        out = []
        for a, b in zip(self.results.get(num, []), self.results.get(den, []), strict=False):
            x, y = metric(a), metric(b)
            if x is not None and y:
                out.append(x / y)
        return out

    def median_ratio(self, num: str, den: str, metric: Callable[[WrkResult], float | None]) -> float | None:
        values = self.ratios(num, den, metric)
        return statistics.median(values) if values else None


def rps_of(r: WrkResult) -> float:
    return r.rps


def cpu_of(r: WrkResult) -> float | None:
    return r.cpu_us_per_request


@dataclasses.dataclass
class Target:
    """One thing wrk is pointed at; ``service`` is what /proc CPU accounting follows."""

    name: str
    urls: dict[str, str]
    service: Service | None


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


def render_policy(
    template: Path,
    *,
    upstream_port: int,
    gateway_port: int,
    hash_: str,
    extra: Mapping[str, str | None] | None = None,
) -> str:
    """Fill a policy template; a line whose placeholder maps to None is dropped.

    str.replace, not str.format: the YAML itself uses braces ({provider: ..., model: ...}).
    Comment lines are dropped so the placeholder docs in the template are not "filled".
    """
    values: dict[str, str | None] = {
        "{port}": str(upstream_port),
        "{gateway_port}": str(gateway_port),
        "{key_hash}": hash_,
        **(extra or {}),
    }
    lines = []
    for line in template.read_text().splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            continue
        if any(name in line and value is None for name, value in values.items()):
            continue
        for name, value in values.items():
            if value is not None:
                line = line.replace(name, value)
        lines.append(line)
    return "".join(lines)


def schema_has(opts: Options, field: str) -> bool:
    """True if ``gateway schema`` (the real gateway only) mentions ``field``."""
    if opts.gateway_cmd != DEFAULT_GATEWAY_CMD or not GATEWAY_BIN.exists():
        return False
    try:
        proc = subprocess.run([str(GATEWAY_BIN), "schema"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and f'"{field}"' in proc.stdout


def scale_pool_timeout(opts: Options) -> str | None:
    """The ``pool_timeout_s`` value for the scale policy, or None to leave the field out."""
    choice = opts.scale_pool_timeout
    if choice == "none":
        return None
    if choice == "auto":
        return "30" if schema_has(opts, "pool_timeout_s") else None
    return choice


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


def measure(opts: Options, tools: dict[str, str], targets: Sequence[Target]) -> list[Cell]:
    """Every (mode, concurrency) cell: warm-up, then ``runs`` rounds over ``targets`` in order."""
    cells: list[Cell] = []
    for mode in opts.modes:
        body = canned.request_body_for(mode)
        # The bare pass-through app only forwards OpenAI bytes: it has no Anthropic row.
        mode_targets = [t for t in targets if not (mode == "anthropic" and t.name == "passthrough")]
        for conns in opts.concurrency:
            cell = Cell(mode, conns, {t.name: [] for t in mode_targets}, {t.name: 0 for t in mode_targets})
            cells.append(cell)

            wrk = functools.partial(
                run_wrk, tools["wrk"], body=body, key=opts.key, connections=conns, cpu=opts.load_cpu
            )

            if opts.warmup > 0:
                for t in mode_targets:
                    wrk(t.urls[mode], duration=opts.warmup if t.service is not None else min(opts.warmup, 1))
            for run in range(opts.runs):
                for t in mode_targets:
                    for attempt in range(opts.retries + 1):
                        r = wrk(t.urls[mode], duration=opts.duration, target=t.service)
                        if t.service is not None and not t.service.running():
                            raise BenchError(f"{t.name} died during the run:\n{t.service.log_tail()}")
                        if not disturbed(r) or attempt == opts.retries:
                            break
                        cell.retries[t.name] += 1
                        print(
                            f"[{mode} c={conns} run {run + 1}/{opts.runs}] {t.name}: {r.other_cpu_s:.1f} s of "
                            f"foreign load on core {opts.gateway_cpu}: discarding and repeating",
                            flush=True,
                        )
                    cell.results[t.name].append(r)
                print(f"[{mode} c={conns} run {run + 1}/{opts.runs}] " + run_line(cell), flush=True)
    return cells


def run_line(cell: Cell) -> str:
    """Progress line for the last round of ``cell``."""
    parts = []
    for name in TARGET_ORDER:
        if not cell.has(name):
            continue
        r = cell.results[name][-1]
        text = f"{name} {r.rps:7.0f} req/s p50 {r.p50_ms:6.2f} ms"
        if r.cpu_us_per_request is not None:
            text += f" cpu {r.cpu_us_per_request:4.0f} us"
        if r.errors:
            text += f" ERRORS {r.errors}"
        parts.append(text)
    g = cell.gateway[-1] if cell.gateway else None
    if g is not None:
        for name, short in (("passthrough", "pt"), ("nginx", "nginx")):
            if cell.has(name):
                o = cell.results[name][-1]
                if o.rps and o.cpu_us_per_request and g.cpu_us_per_request:
                    parts.append(
                        f"gw/{short} req/s {g.rps / o.rps:.2f} cpu {g.cpu_us_per_request / o.cpu_us_per_request:.2f}"
                    )
    return " | ".join(parts)


# --------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------


def _ratio(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def _cpu(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "n/a"


def results_table(cells: Sequence[Cell]) -> str:
    """The core table: the original columns, then the pass-through of the same rounds."""
    with_pt = any(c.has("passthrough") for c in cells)
    rows = []
    for cell in cells:
        d, g = Summary.of(cell.direct), Summary.of(cell.gateway)
        errors = f"{d.errors}/{g.errors}"
        row = [
            cell.mode,
            str(cell.connections),
            fmt_rps(d.rps),
            fmt_ms(d.p50_ms),
            fmt_ms(d.p99_ms),
            fmt_rps(g.rps),
            fmt_ms(g.p50_ms),
            fmt_ms(g.p99_ms),
            f"+{fmt_ms(g.p50_ms - d.p50_ms)}",
            _cpu(g.cpu_us_per_request),
            errors,
        ]
        if with_pt:
            if cell.has("passthrough"):
                p = Summary.of(cell.results["passthrough"])
                row += [
                    fmt_rps(p.rps),
                    fmt_ms(p.p50_ms),
                    fmt_ms(p.p99_ms),
                    _cpu(p.cpu_us_per_request),
                    _ratio(cell.median_ratio("gateway", "passthrough", rps_of)),
                    _ratio(cell.median_ratio("gateway", "passthrough", cpu_of)),
                    str(p.errors),
                ]
            else:
                row += ["n/a"] * 7
        rows.append(row)
    header = [
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
    ]
    if with_pt:
        header += [
            "pass-through req/s",
            "pass-through p50 ms",
            "pass-through p99 ms",
            "pass-through CPU µs/req",
            "req/s gw÷pt",
            "CPU gw÷pt",
            "errors pt",
        ]
    return markdown_table(header, rows, align_right_from=1)


def floor_table(cells: Sequence[Cell]) -> str:
    """nginx proxy_pass beside the gateway, same rounds."""
    rows = []
    for cell in cells:
        if not cell.has("nginx"):
            continue
        n, g = Summary.of(cell.results["nginx"]), Summary.of(cell.gateway)
        busy = [
            r.target_cpu_s / r.duration_s for r in cell.results["nginx"] if r.target_cpu_s is not None and r.duration_s
        ]
        rows.append(
            [
                cell.mode,
                str(cell.connections),
                fmt_rps(n.rps),
                fmt_ms(n.p50_ms),
                fmt_ms(n.p99_ms),
                _cpu(n.cpu_us_per_request),
                f"{statistics.median(busy):.0%}" if busy else "n/a",
                fmt_rps(g.rps),
                fmt_ms(g.p50_ms),
                fmt_ms(g.p99_ms),
                _cpu(g.cpu_us_per_request),
                _ratio(cell.median_ratio("gateway", "nginx", rps_of)),
                _ratio(cell.median_ratio("gateway", "nginx", cpu_of), ".1f") + "×",
                str(n.errors),
            ]
        )
    return markdown_table(
        [
            "mode",
            "conc",
            "nginx req/s",
            "nginx p50 ms",
            "nginx p99 ms",
            "nginx CPU µs/req",
            "nginx core",
            "gateway req/s",
            "gateway p50 ms",
            "gateway p99 ms",
            "gateway CPU µs/req",
            "req/s gw÷nginx",
            "CPU gw÷nginx",
            "errors nginx",
        ],
        rows,
        align_right_from=1,
    )


def translation_headline(cells: Sequence[Cell]) -> str:
    """The Anthropic translator's cost: the gateway's anthropic row against its OpenAI sse row, same run."""
    parts = []
    for cell in cells:
        if cell.mode != "anthropic" or not cell.has("gateway"):
            continue
        sse = next((c for c in cells if c.mode == "sse" and c.connections == cell.connections and c.has("gateway")),
                   None)
        if sse is None:
            continue
        a, o = Summary.of(cell.gateway), Summary.of(sse.gateway)
        rps = a.rps / o.rps if o.rps else None
        cpu = (a.cpu_us_per_request / o.cpu_us_per_request
               if a.cpu_us_per_request is not None and o.cpu_us_per_request else None)
        verdict = "within 20%" if rps is not None and rps >= 0.8 and (cpu is None or cpu <= 1.2) else "NOT within 20%"
        parts.append(f"conc {cell.connections}: req/s {_ratio(rps)}, CPU µs/req {_ratio(cpu)} ({verdict})")
    if not parts:
        return ""
    return ("Anthropic translator (stream of canned Messages events, translated to chunks) ÷ OpenAI pass-through "
            "stream, gateway rows of the same run: " + "; ".join(parts) + ".")


def floor_headline(cells: Sequence[Cell]) -> str:
    """One sentence: the gateway's CPU per request as a multiple of nginx's, at conc 16."""
    parts = []
    for mode in MODES:
        mine = [c for c in cells if c.mode == mode and c.has("nginx")]
        if not mine:
            continue
        pick = next((c for c in mine if c.connections == 16), max(mine, key=lambda c: c.connections))
        ratio = pick.median_ratio("gateway", "nginx", cpu_of)
        if ratio is not None:
            parts.append(f"{mode} {ratio:.1f}× (conc {pick.connections})")
    return "Gateway CPU per request as a multiple of nginx proxy_pass's: " + ", ".join(parts) + "." if parts else ""


def git_revision() -> str:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD") or "no commit"
    return rev + (" + uncommitted changes" if git("status", "--porcelain") else "")


def render(
    opts: Options,
    tools: dict[str, str],
    gateway_cmdline: str,
    cells: Sequence[Cell],
    scale_runs: Sequence[scale.ScaleRun],
    pool_timeout: str | None,
) -> str:
    vers = versions(tools)
    warnings = []
    for cell in cells:
        for who, results in cell.results.items():
            errors = sum(r.errors for r in results)
            if errors:
                warnings.append(
                    f"{cell.mode} c={cell.connections} {who}: {errors} errors "
                    "(non-2xx, socket errors or timeouts) — figures not valid"
                )
            if who == "direct":
                continue
            kept = sum(disturbed(r) for r in results)
            if kept:
                warnings.append(
                    f"{cell.mode} c={cell.connections} {who}: {kept} of {len(results)} runs had more than "
                    f"{DISTURBED_SHARE:.0%} foreign load on core {opts.gateway_cpu} even after "
                    f"{opts.retries} repeats — figures may be low"
                )
            if cell.retries.get(who):
                warnings.append(
                    f"{cell.mode} c={cell.connections} {who}: {cell.retries[who]} disturbed run(s) "
                    "discarded and repeated"
                )
    warnings += scale.scale_warnings(scale_runs)
    wrk = shlex.join(wrk_command("wrk", "<url>", 16, opts.duration, opts.load_cpu))
    lines = [
        "# Gateway benchmark",
        "",
        (
            f"Generated by `bench/run.py` on {dt.datetime.now().isoformat(timespec='seconds')} "
            f"(checkout {git_revision()}; parts: {', '.join(opts.parts)})."
        ),
        "",
        f"* Gateway: `{gateway_cmdline}` (policy: `bench/policy.template.yaml`"
        + (", scale row: `bench/policy.scale.template.yaml`" if scale_runs else "")
        + ").",
    ]
    if cells:
        targets = [t for t in TARGET_ORDER if any(c.has(t) for c in cells)]
        lines += [
            (
                f"* Gateway, pass-through and nginx proxy pinned to core {opts.gateway_cpu} (one at a time "
                f"under load); nginx (canned upstream) and wrk pinned to core {opts.load_cpu}."
            ),
            (
                f"* Load: `{wrk}` (`-c` = conc), `POST` with `Authorization: Bearer <key>`; "
                f"json body `{canned.request_body(False).decode()}`, sse body "
                f"`{canned.request_body(True).decode()}`, anthropic body "
                f"`{canned.request_body_for('anthropic').decode()}`."
            ),
            (
                f"* Upstream answers: json {len(canned.chat_completion())} B `chat.completion`; sse "
                f"{canned.SSE_CHUNKS} chunks incl. a final usage chunk + `[DONE]` "
                f"({len(canned.sse_stream())} B, written at once)."
            ),
            (
                f"* {opts.runs} runs of {opts.duration:g} s per cell after {opts.warmup:g} s warm-up; "
                f"every figure is the median over runs. Each run measures {', '.join(targets)} in turn "
                "(interleaved); ratios are medians of the per-run ratios."
            ),
        ]
        if "passthrough" in targets:
            lines.append(
                f"* Pass-through: `{shlex.join(PASSTHROUGH_ARGV + ['<port>'])}` "
                "(`bench/apps/aiohttp_passthrough.py`: aiohttp server + one aiohttp client session, no "
                "auth, routing, metrics or SSE parsing) — the floor for a Python proxy."
            )
        if "nginx" in targets:
            lines.append(
                "* nginx proxy_pass: `bench/nginx/proxy.conf.template` — 1 worker, `proxy_http_version 1.1`, "
                "upstream `keepalive 256`, `proxy_buffering off`; same canned upstream, path-routed "
                "(`/json/...`, `/sse/...`) — the compiled floor."
            )
    if scale_runs:
        so = opts.scale
        lines.append(
            f"* Scale row (`bench/scale.py`): paced windows — `bench/slow_upstream.py` sends {so.chunks} events "
            f"a stream, one every {so.interval_ms:g} ms, then `[DONE]`; `bench/streamload.py` keeps N streams "
            "open (a new request on the same connection when an answer ends; starts spread over at least "
            "one answer's length)"
            + (
                f"; held windows — one event every {so.hold_interval_ms:g} ms and answers that outlast the "
                "window, so all N streams stay open in the gateway"
                if so.hold_interval_ms > 0
                else ""
            )
            + f". Ramp at most {so.ramp_rate:g} new streams/s, {so.settle:g} s settle, {so.duration:g} s "
            f"window; {so.runs} run(s) per row, a fresh gateway and upstream each window; load generator "
            f"and slow upstream on core {so.load_cpu}. Provider `pool_size` = N + 5% (max 10,000)"
            + (f", `pool_timeout_s: {pool_timeout}`" if pool_timeout else "")
            + ". Client request: the sse body above (no `stream_options`)."
        )
    lines += ["* Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "."]
    if cells:
        lines += [
            "",
            "## Gateway beside direct and the bare pass-through",
            "",
            results_table(cells),
            "",
            translation_headline(cells),
            "",
            (
                "`p50 overhead` = gateway p50 − direct p50. `CPU µs/req` = CPU time of the process tree "
                "during the run / requests. `gw÷pt` = gateway ÷ pass-through, per run, median over runs: "
                "req/s below 1 and CPU above 1 is what the gateway costs beyond the bare pass-through. At "
                "conc 1 wrk waits for each answer, so req/s there is latency-bound, not CPU-bound. See "
                "bench/README.md."
            ),
        ]
    if any(c.has("nginx") for c in cells):
        lines += [
            "",
            "## Compiled floor: nginx proxy_pass",
            "",
            floor_table(cells),
            "",
            floor_headline(cells),
            "",
            (
                "`nginx core` = nginx's CPU time / run time: below 100% nginx is not the limit and its "
                "req/s is bound by wrk and the canned upstream on the other core; its CPU µs/req is "
                "the meaningful figure. `CPU gw÷nginx` is per run, median over runs."
            ),
        ]
    if scale_runs:
        lines += [
            "",
            "## Scale: many slow streams through one worker",
            "",
            scale.scale_table(scale_runs),
            "",
            scale.saturation_note(scale_runs),
            "",
            (
                "`flowing` = streams that had delivered their first event and not yet ended (mean of "
                "both ends of the window). "
                "`events/s` = SSE events received by the clients in the window ÷ window (`[DONE]` "
                "included; the gateway drops the upstream's usage chunk, which this client did not ask "
                "for, so it forwards one event per interval per stream); `nominal` = N × 1000 / interval. "
                "`gateway core` = gateway CPU time (`/proc/<pid>/stat` utime+stime) ÷ window; `CPU "
                "µs/event` = that CPU time ÷ events (paced rows include each stream's set-up, spread over "
                "its events). `RSS KiB/stream` = (median `VmRSS` in the window − idle `VmRSS` after one "
                "stream) ÷ streams open; in parentheses where the core is saturated (not N streams really "
                "open in the gateway: use the held row). `first event` = request sent to first event "
                "(nominal one interval), `stream p99` = request to end of answer (nominal interval × "
                "events). `load procs CPU` = CPU of the load generator + slow upstream ÷ window; `load core "
                "busy` = busy share of their core, anything included (above ~90% the load side may be the "
                "limit; the `direct` row is that load against the slow upstream with no gateway: the load "
                "side's ceiling). `*` = fewer "
                "streams than asked (see warnings)."
            ),
        ]
    if warnings:
        lines += ["", "**Warnings:**", ""] + [f"* {w}" for w in warnings]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(c.replace("_", "")) for c in text.split(",") if c.strip()]


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help="comma list of parts to run: core (direct, pass-through, gateway), floor (nginx proxy_pass), "
        "scale (slow streams) [default: %(default)s]",
    )
    parser.add_argument(
        "--gateway-cmd",
        default=DEFAULT_GATEWAY_CMD,
        help="command to start the target; placeholders {policy} {port} "
        "{upstream} (upstream base URL, also in $BENCH_UPSTREAM) "
        "[default: %(default)s]",
    )
    parser.add_argument(
        "--key-hash-cmd", default=DEFAULT_KEY_HASH_CMD, help="prints the policy hash of {key} [default: %(default)s]"
    )
    parser.add_argument("--key", default=DEFAULT_KEY, help="client API key to send")
    parser.add_argument("--policy-template", type=Path, default=BENCH_DIR / "policy.template.yaml")
    parser.add_argument("--runs", type=int, default=4, help="runs per cell (median) [%(default)s]")
    parser.add_argument("--duration", type=int, default=8, help="seconds per run [%(default)s]")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per cell and target (0 to skip)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma list of connections")
    parser.add_argument("--modes", default="json,sse,anthropic", help="comma list from json,sse,anthropic")
    parser.add_argument("--gateway-cpu", default="1", help="core for the gateway (and the floors)")
    parser.add_argument("--load-cpu", default="0", help="core for nginx, wrk and the scale load")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a run up to N times when another job loaded the measured core (default: 2)",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "latest.md")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (policy, nginx config, logs)")
    sc = parser.add_argument_group("scale row (--only scale)")
    sc.add_argument("--scale-streams", default="1000,2500,5000,10000", help="comma list of stream counts")
    sc.add_argument("--scale-runs", type=int, default=3, help="runs per stream count (median) [%(default)s]")
    sc.add_argument("--scale-duration", type=float, default=10.0, help="steady window, seconds [%(default)s]")
    sc.add_argument("--scale-settle", type=float, default=5.0, help="seconds between ramp and window [%(default)s]")
    sc.add_argument("--scale-chunks", type=int, default=50, help="events per stream [%(default)s]")
    sc.add_argument("--scale-interval-ms", type=float, default=100.0, help="time between events [%(default)s]")
    sc.add_argument(
        "--scale-hold-interval-ms",
        type=float,
        default=2000.0,
        help="time between events in the held windows (RSS per open stream); 0 skips them [%(default)s]",
    )
    sc.add_argument("--scale-tick-ms", type=float, default=10.0, help="slow upstream timer period [%(default)s]")
    sc.add_argument("--scale-ramp-rate", type=float, default=1000.0, help="new streams per second [%(default)s]")
    sc.add_argument(
        "--scale-direct",
        choices=("none", "max", "all"),
        default="max",
        help="also run the load against the slow upstream without a gateway (load-side ceiling): "
        "for no, the largest or every stream count, once [%(default)s]",
    )
    sc.add_argument(
        "--scale-pool-timeout",
        default="auto",
        help="pool_timeout_s in the scale policy: auto (30 if `gateway schema` has the field), none, or seconds",
    )
    sc.add_argument("--scale-policy-template", type=Path, default=BENCH_DIR / "policy.scale.template.yaml")
    args = parser.parse_args(argv)
    try:
        concurrency = _int_list(args.concurrency)
        streams = _int_list(args.scale_streams)
    except ValueError:
        parser.error("--concurrency and --scale-streams must be comma lists of integers")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must be a comma list from {','.join(MODES)}")
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        parser.error(f"--only must be a comma list from {','.join(PARTS)}")
    if not concurrency or min(concurrency) < 1 or args.runs < 1 or args.duration <= 0:
        parser.error("--concurrency, --runs and --duration must be positive")
    if not streams or min(streams) < 1 or args.scale_runs < 1 or args.scale_duration <= 0 or args.scale_chunks < 3:
        parser.error("--scale-streams, --scale-runs, --scale-duration must be positive; --scale-chunks >= 3")
    if args.scale_pool_timeout not in ("auto", "none"):
        try:
            float(args.scale_pool_timeout)
        except ValueError:
            parser.error("--scale-pool-timeout must be auto, none or a number of seconds")
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
        parts=[p for p in PARTS if p in parts],
        scale=scale.ScaleOptions(
            streams=streams,
            chunks=args.scale_chunks,
            interval_ms=args.scale_interval_ms,
            hold_interval_ms=args.scale_hold_interval_ms,
            tick_ms=args.scale_tick_ms,
            duration=args.scale_duration,
            settle=args.scale_settle,
            ramp_rate=args.scale_ramp_rate,
            runs=args.scale_runs,
            direct=args.scale_direct,
            key=args.key,
            gateway_cpu=args.gateway_cpu,
            load_cpu=args.load_cpu,
            startup_timeout=args.startup_timeout,
        ),
        scale_policy_template=args.scale_policy_template,
        scale_pool_timeout=args.scale_pool_timeout,
    )


def gateway_env(upstream: str) -> dict[str, str]:
    return {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "BENCH_UPSTREAM": upstream}


def run_core_and_floor(opts: Options, tools: dict[str, str], wd: Path, hash_: str) -> tuple[list[Cell], str]:
    """Canned nginx, then the gateway and the floors asked for; returns cells and the gateway's command."""
    with nginx_upstream(tools["nginx"], wd, opts.load_cpu) as upstream_port, contextlib.ExitStack() as stack:
        upstream = f"http://{HOST}:{upstream_port}"
        gateway_port = free_port()
        policy = wd / "policy.yaml"
        argv = gateway_argv(opts, policy, gateway_port, upstream)
        policy.write_text(
            render_policy(opts.policy_template, upstream_port=upstream_port, gateway_port=gateway_port, hash_=hash_)
        )
        gateway = Service("gateway", argv, log_dir=wd, cpu=opts.gateway_cpu, env=gateway_env(upstream))
        print(f"nginx upstream on {upstream}; starting: {gateway.command_line}", flush=True)
        stack.enter_context(gateway)
        wait_until_serving(gateway, gateway_port, GATEWAY_PATH, opts.modes, opts.key, timeout=opts.startup_timeout)
        for mode in opts.modes:  # the direct path must answer the same way
            check_answer(upstream_port, UPSTREAM_PATHS[mode], mode, opts.key)

        direct_urls = {m: f"http://{HOST}:{upstream_port}{UPSTREAM_PATHS[m]}" for m in MODES}
        gateway_urls = {m: f"http://{HOST}:{gateway_port}{GATEWAY_PATH}" for m in MODES}
        found: dict[str, Target] = {
            "direct": Target("direct", direct_urls, None),
            "gateway": Target("gateway", gateway_urls, gateway),
        }
        if "core" in opts.parts:
            pt_port = free_port()
            pt = Service(
                "passthrough",
                [*PASSTHROUGH_ARGV, str(pt_port)],
                log_dir=wd,
                cpu=opts.gateway_cpu,
                env=gateway_env(upstream),
            )
            print(f"starting the bare pass-through: {pt.command_line}", flush=True)
            stack.enter_context(pt)
            wait_until_serving(pt, pt_port, GATEWAY_PATH, opts.modes, opts.key, timeout=opts.startup_timeout)
            found["passthrough"] = Target(
                "passthrough", {m: f"http://{HOST}:{pt_port}{GATEWAY_PATH}" for m in MODES}, pt
            )
        if "floor" in opts.parts:
            proxy, proxy_port = stack.enter_context(nginx_proxy(tools["nginx"], wd, opts.gateway_cpu, upstream_port))
            print(f"nginx proxy_pass on {HOST}:{proxy_port}: {proxy.command_line}", flush=True)
            found["nginx"] = Target(
                "nginx", {m: f"http://{HOST}:{proxy_port}{UPSTREAM_PATHS[m]}" for m in MODES}, proxy
            )
        targets = [found[name] for name in TARGET_ORDER if name in found]
        cells = measure(opts, tools, targets)
        for t in targets:
            if t.service is not None and not t.service.running():
                raise BenchError(f"{t.name} exited:\n{t.service.log_tail()}")
        return cells, gateway.command_line


def run_scale_part(opts: Options, wd: Path, hash_: str, pool_timeout: str | None) -> tuple[list[scale.ScaleRun], str]:
    cmdlines: list[str] = []

    def start_gateway(step_dir: Path, upstream_port: int, pool_size: int) -> tuple[Service, int]:
        port = free_port()
        upstream = f"http://{HOST}:{upstream_port}"
        policy = step_dir / f"policy-scale-{port}.yaml"
        policy.write_text(
            render_policy(
                opts.scale_policy_template,
                upstream_port=upstream_port,
                gateway_port=port,
                hash_=hash_,
                extra={"{pool_size}": str(pool_size), "{pool_timeout_s}": pool_timeout},
            )
        )
        service = Service(
            f"gateway-scale-{port}",
            gateway_argv(opts, policy, port, upstream),
            log_dir=step_dir,
            cpu=opts.gateway_cpu,
            env=gateway_env(upstream),
        )
        cmdlines.append(service.command_line)
        return service.start(), port

    results = scale.run_scale(opts.scale, wd, start_gateway)
    return results, cmdlines[0] if cmdlines else ""


def write_outputs(
    opts: Options,
    report: str,
    cells: Sequence[Cell],
    scale_runs: Sequence[scale.ScaleRun],
    tools: dict[str, str],
) -> None:
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(report + "\n")
    raw: dict[str, Any] = {
        "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "checkout": git_revision(),
        "parts": opts.parts,
        "versions": versions(tools),
        "options": {
            "runs": opts.runs,
            "duration": opts.duration,
            "warmup": opts.warmup,
            "concurrency": opts.concurrency,
            "modes": opts.modes,
            "gateway_cmd": opts.gateway_cmd,
            "gateway_cpu": opts.gateway_cpu,
            "load_cpu": opts.load_cpu,
            "scale": dataclasses.asdict(opts.scale) | {"key": "<bench key>"},
        },
        "cells": [
            {
                "mode": c.mode,
                "connections": c.connections,
                "direct": [r.as_dict() for r in c.direct],
                "gateway": [r.as_dict() for r in c.gateway],
                "passthrough": [r.as_dict() for r in c.results.get("passthrough", [])],
                "nginx_proxy": [r.as_dict() for r in c.results.get("nginx", [])],
                "retries": c.retries,
                "ratios_per_run": {
                    "rps_gateway_over_passthrough": c.ratios("gateway", "passthrough", rps_of),
                    "cpu_gateway_over_passthrough": c.ratios("gateway", "passthrough", cpu_of),
                    "rps_gateway_over_nginx": c.ratios("gateway", "nginx", rps_of),
                    "cpu_gateway_over_nginx": c.ratios("gateway", "nginx", cpu_of),
                },
            }
            for c in cells
        ],
        "scale": [r.as_dict() for r in scale_runs],
    }
    opts.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    wrk_parts = {"core", "floor"} & set(opts.parts)
    tools = require_tools(("nginx", "wrk", "taskset") if wrk_parts else ("taskset",))
    install_signal_handlers()
    cells: list[Cell] = []
    scale_runs: list[scale.ScaleRun] = []
    pool_timeout = None
    scale_error = ""
    try:
        check_cpus(opts.gateway_cpu, opts.load_cpu)
        # This script only waits and reads /proc: keep it off the measured core.
        os.sched_setaffinity(0, {int(opts.load_cpu)})
        raise_nofile(65536)
        hash_ = key_hash(opts)
        gateway_cmdline = ""
        with workdir("bench-run-", keep=opts.keep_workdir) as wd:
            if wrk_parts:
                cells, gateway_cmdline = run_core_and_floor(opts, tools, wd, hash_)
            if "scale" in opts.parts:
                pool_timeout = scale_pool_timeout(opts)
                try:
                    scale_runs, scale_cmdline = run_scale_part(opts, wd, hash_, pool_timeout)
                    gateway_cmdline = gateway_cmdline or scale_cmdline
                except BenchError as exc:
                    if not cells:
                        raise
                    # keep the core/floor figures of this run; report the failure
                    scale_error = str(exc)
                    print(f"error in the scale part: {exc}", file=sys.stderr)
            report = render(opts, tools, gateway_cmdline, cells, scale_runs, pool_timeout)
            if scale_error:
                report += f"\n\n**The scale part failed:** `{scale_error.splitlines()[0]}` (see the console).\n"
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopped everything this script started", file=sys.stderr)
        return 130
    write_outputs(opts, report, cells, scale_runs, tools)
    print()
    print(report)
    print(f"\nwrote {opts.out} and {opts.out.with_suffix('.json')}")
    return 1 if scale_error else 0


if __name__ == "__main__":
    sys.exit(main())
