"""Process, nginx and wrk plumbing shared by ``bench/transport.py`` and ``bench/run.py``.

Design notes (the "why"):

* Every long-running child (nginx, the app under test) is started in its own session, so
  stopping it kills exactly the process group *we* created and nothing else on the machine.
  wrk runs in the foreground and ends with ``subprocess.run`` (also on Ctrl-C).
* CPU pinning is done with ``taskset`` on the command line: the app under test gets one core
  to itself and nginx + wrk share the other, so "requests per second" of a saturated app is
  "requests per CPU-second" and variants are comparable.
* CPU time of the app's whole process tree is read from ``/proc`` around each measured run,
  which gives CPU per request directly (granian, for one, forks a worker process).
* wrk reports through a Lua ``done()`` that prints one JSON line; scraping the human table
  would mean dealing with its changing units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

from bench import canned

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
# tiktoken's encoding files, offline (../shared/tiktoken): the gateway counts tokens exactly, as in production,
# instead of falling back to estimates; a TIKTOKEN_CACHE_DIR already set wins.
TIKTOKEN_DIR = Path(os.environ.get("GATEWAY_SHARED_DIR", REPO_DIR.parent / "shared")) / "tiktoken"
VENV_BIN = Path(sys.executable).parent
NGINX_TEMPLATE = BENCH_DIR / "nginx" / "nginx.conf.template"
NGINX_PROXY_TEMPLATE = BENCH_DIR / "nginx" / "proxy.conf.template"
WRK_SCRIPT = BENCH_DIR / "wrk" / "chat.lua"

INSTALL_HINT = "apt-get update && apt-get install -y nginx-light wrk"
HOST = "127.0.0.1"

#: Upstream paths served by the canned nginx (see nginx/nginx.conf.template).
UPSTREAM_PATHS = {"json": "/json/v1/chat/completions", "sse": "/sse/v1/chat/completions",
                  "anthropic": "/anthropic/v1/messages"}
#: Path the gateway (and the pass-through apps) serve.
GATEWAY_PATH = "/v1/chat/completions"


class BenchError(RuntimeError):
    """A benchmark precondition failed; the message is meant for the user."""


# --------------------------------------------------------------------------------------
# tools and environment
# --------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """``shutil.which`` plus the sbin dirs, which are not on a non-root user's PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tools(names: Sequence[str] = ("nginx", "wrk", "taskset")) -> dict[str, str]:
    """Return ``{name: path}``; if any tool is missing print how to install it and exit 2."""
    found = {name: find_tool(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        print(f"install them with:  {INSTALL_HINT}", file=sys.stderr)
        if "taskset" in missing:
            print("(taskset is in the util-linux package)", file=sys.stderr)
        sys.exit(2)
    return {name: path for name, path in found.items() if path is not None}


def check_cpus(*cpus: str) -> None:
    """Fail early with a clear message if a pinning target is not an online CPU."""
    allowed = os.sched_getaffinity(0)
    for cpu in cpus:
        if int(cpu) not in allowed:
            raise BenchError(
                f"CPU {cpu} is not available to this process (have {sorted(allowed)}); adjust --gateway-cpu/--load-cpu"
            )


def callgrind_total(out: Path) -> int:
    """The instructions callgrind counted, over every dump it wrote to `out` (`out`, `out.1`, ...); 0 if none."""
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def free_port() -> int:
    """Ask the kernel for a free TCP port (tiny race until the child binds it; fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so ``finally`` blocks stop our children."""

    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


def _command_output(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (proc.stdout + proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def versions(tools: Mapping[str, str]) -> dict[str, str]:
    """Exact versions of everything that can move the numbers, for the results file."""
    from importlib import metadata

    out: dict[str, str] = {"python": platform.python_version()}
    for dist in (
        "litestar",
        "uvicorn",
        "uvloop",
        "httptools",
        "granian",
        "httpx",
        "httpcore",
        "httpx-aiohttp",
        "aiohttp",
        "msgspec",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if "nginx" in tools:
        out["nginx"] = _command_output([tools["nginx"], "-v"]).replace("nginx version: nginx/", "")
    if "wrk" in tools:
        out["wrk"] = _command_output([tools["wrk"], "-v"]).split(" [")[0].removeprefix("wrk ")
    out["kernel"] = platform.release()
    out["cpu"] = _cpu_model()
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------------------


class Service:
    """A long-running child (nginx, an app, the gateway) pinned to ``cpu``.

    Started with ``start_new_session=True`` so that :meth:`stop` can signal the whole
    process group it created (workers included) and nothing else.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        cpu: str | None,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO_DIR,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cpu = cpu
        self.log_path = log_dir / f"{name}.log"
        self._env = dict(os.environ)
        # Apps under bench/apps are imported as ``bench.apps.*`` from the repo root.
        self._env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH", "")) if p)
        if TIKTOKEN_DIR.is_dir():
            self._env.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_DIR))
        if env:
            self._env.update(env)
        self._cwd = cwd
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command_line(self) -> str:
        prefix = ["taskset", "-c", self.cpu] if self.cpu is not None else []
        return shlex.join(prefix + self.argv)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} was not started")
        return self.proc.pid

    def start(self) -> Self:
        argv = self.argv
        if self.cpu is not None:
            # taskset execs the command, so proc.pid is the service itself.
            argv = ["taskset", "-c", self.cpu, *argv]
        self._log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise BenchError(f"cannot start {self.name}: {exc} ({self.command_line})") from exc
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM our process group, then SIGKILL it if it does not go away in time."""
        proc = self.proc
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # Reap stragglers of the group (e.g. workers that ignored SIGTERM).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def wait_for_port(service: Service, port: int, timeout: float = 30.0) -> None:
    """Poll until ``port`` accepts TCP connections; fail fast if the service died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.running():
            raise BenchError(
                f"{service.name} exited before listening on {port}:\n$ {service.command_line}\n{service.log_tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{service.name} did not listen on {port} within {timeout:.0f}s:\n{service.log_tail()}")


def post(port: int, path: str, body: bytes, key: str, timeout: float = 10.0) -> tuple[int, str, bytes]:
    """One blocking HTTP POST; returns (status, content-type, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(
            "POST",
            path,
            body=body,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {key}",
            },
        )
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type", ""), resp.read()
    finally:
        conn.close()


def check_answer(port: int, path: str, mode: str, key: str, timeout: float = 10.0) -> None:
    """Send one request of ``mode`` and verify the answer looks right.

    Load numbers for a misrouted or failing endpoint are worthless, so every target is
    smoke-tested before wrk touches it.
    """
    status, ctype, body = post(port, path, canned.request_body_for(mode), key, timeout=timeout)
    where = f"POST http://{HOST}:{port}{path} ({mode})"
    if status != 200:
        raise BenchError(f"{where} -> {status}: {body[:300]!r}")
    if mode == "anthropic" and path == UPSTREAM_PATHS["anthropic"]:  # the canned Anthropic stream itself
        if not body.rstrip().endswith(b'data: {"type":"message_stop"}'):
            raise BenchError(f"{where}: not an Anthropic event stream: {body[-200:]!r}")
    elif mode in ("sse", "anthropic"):
        if not ctype.startswith("text/event-stream"):
            raise BenchError(f"{where}: content-type {ctype!r}, expected text/event-stream")
        if not body.rstrip().endswith(b"data: [DONE]") or body.count(b"data: ") < 2:
            raise BenchError(f"{where}: not an SSE chat stream: {body[-200:]!r}")
    else:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise BenchError(f"{where}: invalid JSON ({exc}): {body[:200]!r}") from exc
        if not isinstance(obj, dict) or "choices" not in obj:
            raise BenchError(f"{where}: not a chat.completion: {body[:200]!r}")


def wait_until_serving(
    service: Service,
    port: int,
    path: str,
    modes: Sequence[str],
    key: str,
    timeout: float = 30.0,
    answer_timeout: float = 10.0,
) -> None:
    """Wait for the port, then retry a valid answer for each mode until ``timeout``.

    Some servers bind before the app's startup hook has finished, so a listening socket
    alone does not mean the app is ready.
    """
    deadline = time.monotonic() + timeout
    wait_for_port(service, port, timeout)
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not service.running():
            break
        try:
            for mode in modes:
                check_answer(port, path, mode, key, timeout=answer_timeout)
            return
        except (OSError, http.client.HTTPException, BenchError) as exc:
            last = exc
            time.sleep(0.2)
    raise BenchError(
        f"{service.name} is not answering correctly: {last}\n$ {service.command_line}\n{service.log_tail()}"
    )


# --------------------------------------------------------------------------------------
# nginx upstream
# --------------------------------------------------------------------------------------


def render_nginx_conf(tmp: Path, port: int) -> str:
    """Fill in the template and write the canned bodies where its ``root`` expects them."""
    for mode, path in UPSTREAM_PATHS.items():
        target = tmp / "www" / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(canned.upstream_body(mode))
        for parent in [target, *target.parents]:  # readable by a worker running as nobody
            if parent == tmp.parent:
                break
            parent.chmod(0o755 if parent.is_dir() else 0o644)
    conf = NGINX_TEMPLATE.read_text()
    return conf.replace("@TMP@", str(tmp)).replace("@PORT@", str(port))


def _start_nginx(nginx: str, name: str, tmp: Path, conf_text: str, *, log_dir: Path, cpu: str | None) -> Service:
    """Check ``conf_text`` with ``nginx -t`` and return the (not yet started) service."""
    conf = tmp / "nginx.conf"
    conf.write_text(conf_text)
    check = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise BenchError(f"nginx rejected {conf}:\n{check.stderr}")
    return Service(
        name, [nginx, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)], log_dir=log_dir, cpu=cpu
    )


@contextlib.contextmanager
def nginx_upstream(nginx: str, workdir: Path, cpu: str | None) -> Iterator[int]:
    """Run the canned upstream in the foreground (``daemon off``); yield its port.

    ``-p``/``-e`` point every path nginx opens at ``workdir``, so it runs without root
    and never conflicts with a system nginx.
    """
    tmp = workdir / "nginx"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    service = _start_nginx(nginx, "nginx", tmp, render_nginx_conf(tmp, port), log_dir=workdir, cpu=cpu)
    with service:
        wait_for_port(service, port)
        for mode, path in UPSTREAM_PATHS.items():
            check_answer(port, path, mode, "sk-bench")
        yield port


@contextlib.contextmanager
def nginx_proxy(nginx: str, workdir: Path, cpu: str | None, upstream_port: int) -> Iterator[tuple[Service, int]]:
    """nginx as a reverse proxy (``proxy_pass``, one worker) in front of the canned upstream.

    The compiled floor for the gateway: same paths as the canned upstream (``/json/...``,
    ``/sse/...``), HTTP/1.1 with a keep-alive pool upstream, ``proxy_buffering off``.
    Yields the service (for CPU accounting: master + its worker) and its port.
    """
    tmp = workdir / "nginx-proxy"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = (
        NGINX_PROXY_TEMPLATE.read_text()
        .replace("@TMP@", str(tmp))
        .replace("@UPSTREAM_PORT@", str(upstream_port))
        .replace("@PORT@", str(port))
    )
    service = _start_nginx(nginx, "nginx-proxy", tmp, conf, log_dir=workdir, cpu=cpu)
    with service:
        wait_for_port(service, port)
        for mode, path in UPSTREAM_PATHS.items():
            check_answer(port, path, mode, "sk-bench")
        yield service, port


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A private temp dir for configs and logs; removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # nginx workers drop to "nobody" when the harness runs as root
    try:
        yield path
    finally:
        if keep:
            print(f"kept work dir {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces; everything after the last ')' is well-formed.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree_cpu_seconds(root: int) -> float:
    """User+system CPU seconds of ``root`` and all its live descendants."""
    return sum(process_cpu_seconds(pid) for pid in tree_pids(root))


def core_busy_seconds(cpu: str) -> float:
    """Non-idle time of one core from /proc/stat, to spot foreign load on the app's core."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            return (sum(values[:8]) - idle) / _CLK_TCK
    return 0.0


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (``/proc/<pid>/stat``), 0.0 if it is gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK if fields is not None else 0.0


def process_tree_rss_bytes(root: int) -> int:
    """Sum of ``VmRSS`` (``/proc/<pid>/status``) over ``root`` and its descendants."""
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE (inherited by the children) towards ``want``.

    The soft limit goes up to the hard one; the hard one only with CAP_SYS_RESOURCE.
    Returns the soft limit now in force.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            soft, hard = want, want
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WrkResult:
    """One measured wrk run (latencies in milliseconds)."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    #: CPU seconds used by the target's process tree during the run (None if not tracked).
    target_cpu_s: float | None = None
    #: Busy seconds of the target's core not accounted to the target (other load, softirq).
    other_cpu_s: float | None = None

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.target_cpu_s is None or self.requests == 0:
            return None
        return self.target_cpu_s / self.requests * 1e6

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cpu_us_per_request"] = self.cpu_us_per_request
        return data


def wrk_command(wrk: str, url: str, connections: int, duration: int, cpu: str | None, timeout_s: int = 10) -> list[str]:
    # One wrk thread is plenty for a few thousand req/s and keeps wrk on its single core.
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", f"--timeout={timeout_s}s", "-s", str(WRK_SCRIPT), url]
    return ["taskset", "-c", cpu, *argv] if cpu is not None else argv


def run_wrk(
    wrk: str,
    url: str,
    *,
    body: bytes,
    key: str,
    connections: int,
    duration: int,
    cpu: str | None,
    target: Service | None = None,
) -> WrkResult:
    """Run wrk once; if ``target`` is given also measure its CPU use during the run."""
    env = dict(os.environ, BENCH_BODY=body.decode(), BENCH_KEY=key)
    argv = wrk_command(wrk, url, connections, duration, cpu)
    cpu_before = process_tree_cpu_seconds(target.pid) if target else None
    core_before = core_busy_seconds(target.cpu) if target and target.cpu is not None else None
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=duration + 60)
    cpu_after = process_tree_cpu_seconds(target.pid) if target else None
    core_after = core_busy_seconds(target.cpu) if target and target.cpu is not None else None
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {shlex.join(argv)}\n{proc.stdout}\n{proc.stderr}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    duration_s = data["duration_us"] / 1e6
    errors = sum(v for k, v in data.items() if k.startswith("errors_"))
    target_cpu = (cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None else None
    other = None
    if core_before is not None and core_after is not None and target_cpu is not None:
        other = max(0.0, (core_after - core_before) - target_cpu)
    return WrkResult(
        requests=data["requests"],
        duration_s=duration_s,
        rps=data["requests"] / duration_s if duration_s else 0.0,
        p50_ms=data["lat_p50_us"] / 1000,
        p90_ms=data["lat_p90_us"] / 1000,
        p99_ms=data["lat_p99_us"] / 1000,
        max_ms=data["lat_max_us"] / 1000,
        errors=errors,
        target_cpu_s=target_cpu,
        other_cpu_s=other,
    )


#: A run is "disturbed" when the target's core spent more than this share of the run on
#: work not accounted to the target (someone else's job on this shared machine).
DISTURBED_SHARE = 0.10


def disturbed(result: WrkResult) -> bool:
    """True if foreign load on the target's core makes this run unrepresentative."""
    return result.other_cpu_s is not None and result.other_cpu_s > DISTURBED_SHARE * result.duration_s


# --------------------------------------------------------------------------------------
# summarising
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Summary:
    """Medians over repeated runs (each field is the median of that field)."""

    runs: int
    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float | None
    other_cpu_s: float | None

    @classmethod
    def of(cls, results: Sequence[WrkResult]) -> Summary:
        if not results:
            raise ValueError("no results")
        cpu = [r.cpu_us_per_request for r in results if r.cpu_us_per_request is not None]
        other = [r.other_cpu_s for r in results if r.other_cpu_s is not None]
        return cls(
            runs=len(results),
            rps=statistics.median(r.rps for r in results),
            rps_min=min(r.rps for r in results),
            rps_max=max(r.rps for r in results),
            p50_ms=statistics.median(r.p50_ms for r in results),
            p99_ms=statistics.median(r.p99_ms for r in results),
            errors=sum(r.errors for r in results),
            cpu_us_per_request=statistics.median(cpu) if cpu else None,
            other_cpu_s=max(other) if other else None,
        )


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> str:
    """Render a GitHub markdown table; columns from ``align_right_from`` are right-aligned."""
    sep = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
