"""The scale row of ``bench/run.py``: many concurrent slow streams through one gateway worker.

For each stream count N (default 1,000 / 2,500 / 5,000 / 10,000) and each run, two kinds of
window, each with a fresh gateway pinned to its core and a fresh slow upstream:

* **paced**: ``bench/slow_upstream.py`` sends one event per stream every ``interval`` ms
  (100), ``chunks`` (50) events an answer; ``bench/streamload.py`` keeps N streams open (a
  new request on the same connection as soon as an answer ends). The nominal load is
  N x 1000 / interval events/s: 100,000/s at 10,000 streams, far beyond one core, so these
  windows show how many events/s one worker forwards, at what CPU per event, and where its
  core saturates. Past saturation requests queue (partly unread in kernel buffers), so the
  gateway does not really hold N streams and its RSS per stream there is not meaningful.
* **held**: the same N streams, but one event every ``hold_interval`` ms (2,000) and answers
  long enough that none ends before the window does; the gateway keeps up, so all N streams
  are open in it at once: this is the honest RSS per open stream at N.

Each window: start the upstream (its first answer is written at once, for the readiness
check) and the gateway (provider ``pool_size`` = N + 5%, ``bench/policy.scale.template.yaml``);
check one stream; read the idle RSS; start the load generator on the load core; it ramps the
connections, waits ``settle`` s, then marks a ``duration`` s window. At both ends of the
window the load generator itself reads the gateway's and the upstream's ``/proc/<pid>/stat``
(utime+stime) and both cores' busy time (``/proc/stat``), at the same instant as its event
counter; during the window this script samples the gateway's ``VmRSS``
(``/proc/<pid>/status``) every 0.25 s. Reported: events/s received by the clients against the
nominal rate, gateway core utilisation, gateway CPU per event, RSS per open stream
((median RSS in the window - idle RSS) / streams open), first-event and whole-stream latency
and the load core's utilisation (above ~90% the load side may be the limit).

``direct`` rows (``--scale-direct``) run the paced load against the slow upstream with no
gateway: the ceiling of the load side itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.harness import (
    GATEWAY_PATH,
    HOST,
    REPO_DIR,
    BenchError,
    Service,
    callgrind_total,
    fmt_rps,
    free_port,
    markdown_table,
    process_tree_rss_bytes,
    raise_nofile,
    tree_pids,
    wait_for_port,
    wait_until_serving,
)

#: The policy schema's upper bound for a provider's pool_size.
POOL_SIZE_MAX = 10_000
#: File descriptors a process needs beyond its sockets (listeners, logs, imports, epoll).
FD_MARGIN = 256
#: Above this share of the window the load core is busy enough to be a suspect.
LOAD_BUSY_WARN = 0.90
#: Gateway core utilisation from which we call the core saturated.
SATURATED = 0.95


@dataclasses.dataclass
class ScaleOptions:
    streams: list[int]
    chunks: int
    interval_ms: float
    hold_interval_ms: float  # 0: no held windows
    tick_ms: float
    duration: float
    settle: float
    ramp_rate: float
    runs: int
    direct: str  # none | max | all
    key: str
    gateway_cpu: str
    load_cpu: str
    startup_timeout: float


@dataclasses.dataclass
class ScaleRun:
    """One measured window (one stream count, one run, one kind)."""

    target: str  # "gateway" or "direct"
    kind: str  # "paced" or "held"
    interval_ms: float
    chunks: int
    streams_requested: int
    streams: int
    window_s: float
    events: int
    streams_ok: int
    streams_bad_status: int
    streams_short: int
    streams_aborted: int
    streams_aborted_waiting: int
    connect_errors: int
    inflight_start: int
    inflight_end: int
    flowing_start: int
    flowing_end: int
    gateway_cpu_s: float | None
    gateway_core_busy_s: float | None
    load_core_busy_s: float
    loadgen_cpu_s: float
    upstream_cpu_s: float
    upstream_events: int
    upstream_lag_max_ms: float | None
    rss_idle_bytes: int | None
    rss_open_bytes: int | None  # median of the samples in the window
    rss_max_bytes: int | None
    rss_samples: int
    ttfe_p50_ms: float | None
    ttfe_p99_ms: float | None
    stream_p50_ms: float | None
    stream_p99_ms: float | None
    nominal_events_per_s: float
    capped: str = ""

    @property
    def events_per_s(self) -> float:
        return self.events / self.window_s if self.window_s else 0.0

    @property
    def achieved_share(self) -> float:
        return self.events_per_s / self.nominal_events_per_s if self.nominal_events_per_s else 0.0

    @property
    def gateway_util(self) -> float | None:
        return None if self.gateway_cpu_s is None else self.gateway_cpu_s / self.window_s

    @property
    def load_util(self) -> float:
        """Busy share of the load core (anything running on it)."""
        return self.load_core_busy_s / self.window_s

    @property
    def load_procs_util(self) -> float:
        """CPU of the load generator + slow upstream over the window."""
        return (self.loadgen_cpu_s + self.upstream_cpu_s) / self.window_s

    @property
    def cpu_us_per_event(self) -> float | None:
        if self.gateway_cpu_s is None or not self.events:
            return None
        return self.gateway_cpu_s / self.events * 1e6

    @property
    def streams_open(self) -> float:
        """Requests the clients had outstanding (mean of both ends of the window)."""
        return (self.inflight_start + self.inflight_end) / 2

    @property
    def streams_flowing(self) -> float:
        """Outstanding requests that had delivered at least one event (mean of both ends)."""
        return (self.flowing_start + self.flowing_end) / 2

    @property
    def rss_kib_per_stream(self) -> float | None:
        if self.rss_open_bytes is None or self.rss_idle_bytes is None or not self.streams_open:
            return None
        return (self.rss_open_bytes - self.rss_idle_bytes) / self.streams_open / 1024

    @property
    def saturated(self) -> bool:
        """The gateway's core is (nearly) full or the clients got clearly less than nominal."""
        return self.target == "gateway" and ((self.gateway_util or 0) >= SATURATED or self.achieved_share < 0.95)

    @property
    def errors(self) -> int:
        return self.streams_bad_status + self.streams_short + self.streams_aborted + self.connect_errors

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in (
            "events_per_s",
            "achieved_share",
            "gateway_util",
            "load_util",
            "load_procs_util",
            "cpu_us_per_event",
            "streams_open",
            "streams_flowing",
            "rss_kib_per_stream",
            "saturated",
            "errors",
        ):
            data[name] = getattr(self, name)
        return data


#: start_gateway(workdir, upstream_port, pool_size) -> (service, port); the caller renders
#: the policy and builds the command line (bench/run.py).
GatewayStarter = Callable[[Path, int, int], tuple[Service, int]]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def nofile_needed(streams: int, direct: bool) -> int:
    """Descriptors the busiest process needs: the gateway holds 2 sockets a stream."""
    return (streams if direct else 2 * streams) + FD_MARGIN


def capped_streams(streams: int, nofile: int) -> tuple[int, str]:
    """The stream count the gateway can hold with ``nofile`` descriptors, and why if lower."""
    limit = (nofile - FD_MARGIN) // 2
    reasons = []
    if streams > limit:
        reasons.append(f"RLIMIT_NOFILE {nofile}")
    if streams > POOL_SIZE_MAX:
        reasons.append(f"pool_size max {POOL_SIZE_MAX:,}")
        limit = min(limit, POOL_SIZE_MAX)
    if reasons:
        return min(streams, limit), f"capped from {streams:,} ({', '.join(reasons)})"
    return streams, ""


def pool_size_for(streams: int) -> int:
    return min(POOL_SIZE_MAX, streams + max(16, streams // 20))


def upstream_stats(port: int) -> dict[str, Any]:
    # With 10,000 streams open the slow upstream's one loop answers its stats late: wait, do not fail.
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("GET", "/stats")
        data: dict[str, Any] = json.loads(conn.getresponse().read())
        return data
    finally:
        conn.close()


def rss_idle(pid: int) -> int:
    samples = []
    for _ in range(5):
        samples.append(process_tree_rss_bytes(pid))
        time.sleep(0.1)
    return int(statistics.median(samples))


class LoadGen:
    """``bench/streamload.py`` pinned to the load core, read line by line with a deadline."""

    def __init__(self, argv: Sequence[str], cpu: str, log: Path) -> None:
        self.argv = ["taskset", "-c", cpu, sys.executable, "-m", "bench.streamload", *argv]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH", "")) if p)
        self._stderr = log.open("wb")
        self.log = log
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=REPO_DIR,
            env=env,
            start_new_session=True,
        )
        self._buf = b""

    def next_line(self, deadline: float, tick: Callable[[], None] | None = None) -> dict[str, Any]:
        """The next JSON line; ``tick`` runs about every 0.25 s while waiting."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"load generator gave no answer in time:\n{self.tail()}")
            ready, _, _ = select.select([fd], [], [], min(0.25, left))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(f"load generator exited ({self.proc.wait()}):\n{self.tail()}")
                self._buf += chunk
            elif tick is not None:
                tick()
        line, self._buf = self._buf.split(b"\n", 1)
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


# --------------------------------------------------------------------------------------
# one window
# --------------------------------------------------------------------------------------


def window_shape(opts: ScaleOptions, kind: str, streams: int) -> tuple[float, int, float]:
    """(interval ms, events per answer, minimum ramp s) for a window of ``kind``."""
    if kind == "paced":
        # Spread the starts over at least one answer, so that restarts stay spread too.
        return opts.interval_ms, opts.chunks, opts.chunks * opts.interval_ms / 1000
    # Starts spread over at least one interval, so that every tick carries the same share.
    min_ramp = opts.hold_interval_ms / 1000
    ramp_s = max(streams / opts.ramp_rate if opts.ramp_rate > 0 else 0.0, min_ramp)
    # Long enough that no answer ends before the window does, even after the load generator's
    # longest wait for every stream to flow (--wait-timeout, 60 s) and a margin.
    live_s = ramp_s + 60 + opts.settle + opts.duration + 30
    return opts.hold_interval_ms, math.ceil(live_s * 1000 / opts.hold_interval_ms) + 3, min_ramp


def measure_window(
    opts: ScaleOptions,
    wd: Path,
    *,
    kind: str,
    streams: int,
    streams_requested: int,
    capped: str,
    start_gateway: GatewayStarter | None,
    label: str,
) -> ScaleRun:
    """Upstream, optional gateway, load generator; one steady window; everything stopped."""
    interval_ms, chunks, min_ramp = window_shape(opts, kind, streams)
    up_port = free_port()
    upstream = Service(
        "slow-upstream",
        [
            sys.executable,
            "-m",
            "bench.slow_upstream",
            "--port",
            str(up_port),
            "--chunks",
            str(chunks),
            "--interval-ms",
            str(interval_ms),
            "--tick-ms",
            str(opts.tick_ms),
            "--fast-streams",
            "1" if start_gateway is not None else "0",
        ],
        log_dir=wd,
        cpu=opts.load_cpu,
    )
    gateway: Service | None = None
    loadgen: LoadGen | None = None
    try:
        upstream.start()
        wait_for_port(upstream, up_port)
        if start_gateway is not None:
            gateway, target_port = start_gateway(wd, up_port, pool_size_for(streams))
            wait_until_serving(gateway, target_port, GATEWAY_PATH, ["sse"], opts.key, timeout=opts.startup_timeout)
            time.sleep(0.5)
            idle: int | None = rss_idle(gateway.pid)
            gateway_pids = tree_pids(gateway.pid)
            path = GATEWAY_PATH
        else:
            target_port, idle, gateway_pids, path = up_port, None, [], "/v1/chat/completions"

        loadgen = LoadGen(
            [
                "--port",
                str(target_port),
                "--path",
                path,
                "--key",
                opts.key,
                "--streams",
                str(streams),
                "--ramp-rate",
                str(opts.ramp_rate),
                "--min-ramp",
                str(min_ramp),
                "--settle",
                str(opts.settle),
                "--duration",
                str(opts.duration),
                # all events + [DONE], or one fewer: the gateway drops the usage chunk when
                # the client did not ask for it (stream_options.include_usage)
                "--expect-events",
                f"{chunks},{chunks + 1}",
                "--watch-pids",
                ",".join(str(p) for p in [*gateway_pids, upstream.pid]),
                "--watch-cores",
                f"{opts.gateway_cpu},{opts.load_cpu}",
                *(["--wait-flowing"] if kind == "held" else []),
            ],
            opts.load_cpu,
            wd / f"streamload-{label}.log",
        )
        ramp_s = max(streams / opts.ramp_rate if opts.ramp_rate > 0 else 0, min_ramp)
        deadline = time.monotonic() + ramp_s + opts.settle + opts.duration + 180

        def alive() -> None:
            if gateway is not None and not gateway.running():
                raise BenchError(f"the gateway died during the scale run:\n{gateway.log_tail()}")
            if not upstream.running():
                raise BenchError(f"the slow upstream died:\n{upstream.log_tail()}")

        line = loadgen.next_line(deadline, alive)
        if line.get("phase") != "ramp_done":
            raise BenchError(f"unexpected load generator output: {line}")
        print(
            f"  [{label}] {line['connections']:,} connections, {line['flowing']:,} streams delivering "
            f"events after {line['ramp_s']:.1f} s",
            flush=True,
        )
        start = loadgen.next_line(deadline, alive)
        u0 = upstream_stats(up_port)  # also resets the upstream's lag maximum
        rss: list[int] = []

        def tick() -> None:
            alive()
            if gateway is not None:
                rss.append(process_tree_rss_bytes(gateway.pid))

        end = loadgen.next_line(deadline, tick)
        u1 = upstream_stats(up_port)
        alive()
        if start.get("phase") != "steady_start" or end.get("phase") != "steady_end":
            raise BenchError(f"unexpected load generator output: {start} / {end}")
        with contextlib.suppress(BenchError):
            loadgen.next_line(time.monotonic() + 10)  # "done"

        def diff(key: str) -> int:
            return int(end[key]) - int(start[key])

        def cpu(pids: Sequence[int]) -> float:
            return sum(float(end["cpu"][str(p)]) - float(start["cpu"][str(p)]) for p in pids)

        def core(cpu_id: str) -> float:
            return float(end["cores"][cpu_id]) - float(start["cores"][cpu_id])

        return ScaleRun(
            target="gateway" if gateway is not None else "direct",
            kind=kind,
            interval_ms=interval_ms,
            chunks=chunks,
            streams_requested=streams_requested,
            streams=streams,
            window_s=float(end["t"]) - float(start["t"]),
            events=diff("events"),
            streams_ok=diff("ok"),
            streams_bad_status=diff("bad_status"),
            streams_short=diff("short"),
            streams_aborted=diff("aborted"),
            streams_aborted_waiting=diff("aborted_waiting"),
            connect_errors=diff("connect_errors"),
            inflight_start=int(start["inflight"]),
            inflight_end=int(end["inflight"]),
            flowing_start=int(start["flowing"]),
            flowing_end=int(end["flowing"]),
            gateway_cpu_s=cpu(gateway_pids) if gateway is not None else None,
            gateway_core_busy_s=core(opts.gateway_cpu) if gateway is not None else None,
            load_core_busy_s=core(opts.load_cpu),
            loadgen_cpu_s=float(end["self_cpu"]) - float(start["self_cpu"]),
            upstream_cpu_s=cpu([upstream.pid]),
            upstream_events=int(u1["events_written"]) - int(u0["events_written"]),
            upstream_lag_max_ms=u1.get("lag_max_ms"),
            rss_idle_bytes=idle,
            rss_open_bytes=int(statistics.median(rss)) if rss else None,
            rss_max_bytes=max(rss) if rss else None,
            rss_samples=len(rss),
            ttfe_p50_ms=end.get("ttfe_p50_ms"),
            ttfe_p99_ms=end.get("ttfe_p99_ms"),
            stream_p50_ms=end.get("stream_p50_ms"),
            stream_p99_ms=end.get("stream_p99_ms"),
            nominal_events_per_s=streams * 1000 / interval_ms,
            capped=capped,
        )
    finally:
        if loadgen is not None:
            loadgen.stop()
        if gateway is not None:
            gateway.stop()
        upstream.stop()


# --------------------------------------------------------------------------------------
# the row
# --------------------------------------------------------------------------------------


def run_scale(opts: ScaleOptions, wd: Path, start_gateway: GatewayStarter) -> list[ScaleRun]:
    nofile = raise_nofile(nofile_needed(max(opts.streams), direct=False))
    kinds = ["paced"] + (["held"] if opts.hold_interval_ms > 0 else [])
    results: list[ScaleRun] = []
    largest = max(opts.streams)

    def one(label: str, **kwargs: Any) -> None:
        print(f"[scale] {label}" + (f" ({kwargs['capped']})" if kwargs["capped"] else ""), flush=True)
        r = measure_window(opts, wd, label=label.replace(" ", "-").replace("/", "of"), **kwargs)
        results.append(r)
        print(f"  [{label}] {describe(r)}", flush=True)

    for run in range(opts.runs):
        for requested in opts.streams:
            if run == 0 and (opts.direct == "all" or (opts.direct == "max" and requested == largest)):
                n = min(requested, nofile - FD_MARGIN)
                one(
                    f"direct paced n={n}",
                    kind="paced",
                    streams=n,
                    streams_requested=requested,
                    capped="" if n == requested else f"capped from {requested:,} (RLIMIT_NOFILE {nofile})",
                    start_gateway=None,
                )
            n, capped = capped_streams(requested, nofile)
            for kind in kinds:
                one(
                    f"gateway {kind} n={n} run {run + 1}/{opts.runs}",
                    kind=kind,
                    streams=n,
                    streams_requested=requested,
                    capped=capped,
                    start_gateway=start_gateway,
                )
    return results


def describe(r: ScaleRun) -> str:
    parts = [
        f"{r.events_per_s:,.0f} events/s ({r.achieved_share:.0%} of {r.nominal_events_per_s:,.0f})",
        f"load core {r.load_util:.0%} (load procs {r.load_procs_util:.0%})",
    ]
    if r.target == "gateway":
        parts += [
            f"gateway core {r.gateway_util or 0:.0%}",
            f"{r.cpu_us_per_event or 0:.1f} us/event",
            (
                f"RSS {(r.rss_idle_bytes or 0) / 2**20:.0f} -> {(r.rss_open_bytes or 0) / 2**20:.0f} MiB "
                f"= {r.rss_kib_per_stream or 0:.1f} KiB/stream"
            ),
        ]
    parts.append(f"first event p50 {r.ttfe_p50_ms} ms, stream p99 {r.stream_p99_ms} ms")
    if r.errors:
        parts.append(
            f"ERRORS status {r.streams_bad_status} short {r.streams_short} aborted {r.streams_aborted} "
            f"(waiting {r.streams_aborted_waiting}) connect {r.connect_errors}"
        )
    return ", ".join(parts)


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def group(results: Sequence[ScaleRun]) -> list[tuple[str, str, int, list[ScaleRun]]]:
    """(target, kind, streams, runs), paced rows first, then held, each by stream count."""
    groups: dict[tuple[str, str, int], list[ScaleRun]] = {}
    for r in results:
        groups.setdefault((r.target, r.kind, r.streams), []).append(r)
    order = {("direct", "paced"): 0, ("gateway", "paced"): 1, ("gateway", "held"): 2}
    keys = sorted(groups, key=lambda k: (order.get((k[0], k[1]), 3), k[2]))
    return [(t, k, n, groups[(t, k, n)]) for t, k, n in keys]


def scale_table(results: Sequence[ScaleRun]) -> str:
    rows = []
    for target, kind, n, runs in group(results):
        gw = target == "gateway"
        nominal = runs[0].nominal_events_per_s
        eps = _median([r.events_per_s for r in runs])
        rss_idle = _median([r.rss_idle_bytes for r in runs])
        rss_open = _median([r.rss_open_bytes for r in runs])
        per_stream = _fmt(_median([r.rss_kib_per_stream for r in runs]), ".1f")
        if gw and sum(r.saturated for r in runs) * 2 > len(runs):
            per_stream = f"({per_stream})"  # requests queue unread: not N streams open in the gateway
        rows.append(
            [
                f"{target} {kind}",
                f"{n:,}" + (" *" if runs[0].capped else ""),
                _fmt(_median([r.streams_flowing for r in runs]), ",.0f"),
                f"{runs[0].interval_ms:g} ms × {runs[0].chunks}",
                str(len(runs)),
                fmt_rps(nominal),
                fmt_rps(eps or 0),
                _fmt((eps or 0) / nominal * 100 if nominal else None, ".0f", "%"),
                _fmt(_median([r.gateway_util for r in runs]) if gw else None, ".0%"),
                _fmt(_median([r.cpu_us_per_event for r in runs]), ".1f"),
                _fmt(rss_idle / 2**20 if rss_idle is not None else None, ".0f"),
                _fmt(rss_open / 2**20 if rss_open is not None else None, ".0f"),
                per_stream,
                _fmt(_median([r.ttfe_p50_ms for r in runs]), ".0f"),
                _fmt(_median([r.ttfe_p99_ms for r in runs]), ".0f"),
                _fmt(_median([r.stream_p99_ms for r in runs]), ".0f"),
                _fmt(_median([r.load_procs_util for r in runs]), ".0%"),
                _fmt(_median([r.load_util for r in runs]), ".0%"),
                str(sum(r.errors for r in runs)),
            ]
        )
    return markdown_table(
        [
            "row",
            "streams",
            "flowing",
            "event every × events",
            "runs",
            "nominal events/s",
            "events/s",
            "achieved",
            "gateway core",
            "gateway CPU µs/event",
            "idle RSS MiB",
            "RSS MiB open",
            "RSS KiB/stream",
            "first event p50 ms",
            "first event p99 ms",
            "stream p99 ms",
            "load procs CPU",
            "load core busy",
            "errors",
        ],
        rows,
        align_right_from=1,
    )


def saturation_note(results: Sequence[ScaleRun]) -> str:
    """One sentence on where the gateway's core saturates (paced rows)."""
    rows = [(n, runs) for target, kind, n, runs in group(results) if target == "gateway" and kind == "paced"]
    if not rows:
        return ""
    below = None
    for n, runs in rows:
        util = _median([r.gateway_util for r in runs]) or 0.0
        share = statistics.median(r.achieved_share for r in runs)
        eps = statistics.median(r.events_per_s for r in runs)
        if sum(r.saturated for r in runs) * 2 > len(runs):
            where = f"between {below:,} and {n:,} streams" if below is not None else f"at or below {n:,} streams"
            return (
                f"Paced rows: the gateway's core saturates {where}; at {n:,} streams it forwards "
                f"{eps:,.0f} events/s ({share:.0%} of the nominal {runs[0].nominal_events_per_s:,.0f}) with "
                f"the core {util:.0%} busy. Past that point requests and events queue (first-event and "
                "stream latency grow, many requests wait unread, so RSS per stream in parentheses is not "
                "per open stream) and the gateway reads several events per socket read, so its CPU per "
                "event there is lower than below saturation. RSS per open stream: see the held rows."
            )
        below = n
    return f"Paced rows: the gateway's core did not saturate up to {rows[-1][0]:,} streams."


def scale_warnings(results: Sequence[ScaleRun]) -> list[str]:
    out = []
    for target, kind, n, runs in group(results):
        for i, r in enumerate(runs, 1):
            where = f"scale {target} {kind} n={n:,} run {i}"
            if r.errors:
                out.append(
                    f"{where}: {r.errors} errors (bad status {r.streams_bad_status}, short {r.streams_short}, "
                    f"aborted {r.streams_aborted} of which {r.streams_aborted_waiting} before the response "
                    f"head, connect {r.connect_errors})"
                )
            if r.load_util > LOAD_BUSY_WARN:
                out.append(
                    f"{where}: load core {r.load_util:.0%} busy (load generator + slow upstream "
                    f"{r.load_procs_util:.0%}) — the load side may limit this row (upstream timer lag up to "
                    f"{r.upstream_lag_max_ms} ms)"
                )
            if r.capped and i == 1:
                out.append(f"{where}: {r.capped}")
            if r.target == "gateway" and r.gateway_core_busy_s is not None and r.gateway_cpu_s is not None:
                other = r.gateway_core_busy_s - r.gateway_cpu_s
                if other > 0.10 * r.window_s:
                    out.append(f"{where}: {other:.1f} s of other work on the gateway's core during the window")
            if kind == "held" and r.saturated:
                out.append(f"{where}: the gateway did not keep up with the held streams; RSS per stream is low")
    return out


# --------------------------------------------------------------------------------------
# instructions per event (bench/instructions.py's `scale:` specs)
# --------------------------------------------------------------------------------------

#: The key of the callgrind window's policy (any key does; this one is hashed into the policy).
CALLGRIND_KEY = "sk-bench-scale-instructions"


def count_instructions(
    wd: Path, *, streams: int, interval_ms: float, chunks: int, settle: float = 5.0, duration: float = 30.0,
) -> tuple[float, int]:
    """(instructions per forwarded event, events) for one paced window with the gateway under callgrind.

    Wall-clock CPU per event needs a quiet machine; the gateway's user-space instructions per
    event do not. The slow upstream and the load generator are started as for a paced window
    (``bench/policy.scale.template.yaml``, events every ``interval_ms``, ``chunks`` events an
    answer, starts spread over one answer), the gateway under ``valgrind --tool=callgrind
    --instr-atstart=no``; instrumentation is on for the load generator's steady window only,
    and the instructions counted are divided by the events the clients received in it. Kernel
    work (socket reads and writes, epoll) is not counted. Under callgrind the gateway runs
    about 50 times slower: keep ``streams * 1000 / interval_ms`` near 200 events/s, so that it
    keeps up (a gateway that falls behind reads several events per read, and counts fewer
    instructions per event than it would at the nominal rate).
    """
    digest = "sha256:" + hashlib.sha256(CALLGRIND_KEY.encode()).hexdigest()
    up_port, port = free_port(), free_port()
    policy = wd / f"policy-scale-{port}.yaml"
    text = (REPO_DIR / "bench" / "policy.scale.template.yaml").read_text()
    for name, value in (("{port}", str(up_port)), ("{gateway_port}", str(port)), ("{key_hash}", digest),
                        ("{pool_size}", str(pool_size_for(streams))), ("{pool_timeout_s}", "30")):
        text = text.replace(name, value)
    policy.write_text("".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#")))
    out = wd / f"callgrind-scale-{port}.out"
    upstream = Service("slow-upstream", [sys.executable, "-m", "bench.slow_upstream", "--port", str(up_port),
                                         "--chunks", str(chunks), "--interval-ms", str(interval_ms),
                                         "--fast-streams", "1"], log_dir=wd, cpu="0")
    gateway = Service(f"gateway-{port}", ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                          f"--callgrind-out-file={out}", str(REPO_DIR / ".venv" / "bin" / "python"),
                                          "-m", "gateway", "serve", "--policy", str(policy), "--host", HOST,
                                          "--port", str(port)],
                      log_dir=wd, cpu="1", env={"BENCH_UPSTREAM_KEY": "sk-bench"})
    loadgen: LoadGen | None = None
    try:
        upstream.start()
        wait_for_port(upstream, up_port)
        gateway.start()
        wait_until_serving(gateway, port, GATEWAY_PATH, ["sse"], CALLGRIND_KEY, timeout=180, answer_timeout=60)
        min_ramp = chunks * interval_ms / 1000
        loadgen = LoadGen(["--port", str(port), "--path", GATEWAY_PATH, "--key", CALLGRIND_KEY, "--streams",
                           str(streams), "--min-ramp", str(min_ramp), "--settle", str(settle), "--duration",
                           str(duration), "--expect-events", f"{chunks},{chunks + 1}"], "0", wd / "streamload.log")
        deadline = time.monotonic() + min_ramp + settle + duration + 300
        loadgen.next_line(deadline)  # ramp_done
        start = loadgen.next_line(deadline)
        for step in (["-z"], ["-i", "on"]):
            subprocess.run(["callgrind_control", *step, str(gateway.pid)], check=True, capture_output=True)
        end = loadgen.next_line(deadline)
        for step in (["-i", "off"], ["-d"]):
            subprocess.run(["callgrind_control", *step, str(gateway.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        if loadgen is not None:
            loadgen.stop()
        gateway.stop(timeout=30)
        upstream.stop()
    events = int(end["events"]) - int(start["events"])
    errors = sum(int(end[k]) - int(start[k]) for k in ("bad_status", "short", "aborted", "connect_errors"))
    if errors or not events:
        raise BenchError(f"scale window: {events} events, {errors} failed streams")
    total = callgrind_total(out)
    if not total:
        raise BenchError("scale window: callgrind wrote no totals")
    return total / events, events
