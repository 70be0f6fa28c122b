"""Instructions per request: the gateway under callgrind, a feature off and on, against the canned upstream.

Wall-clock ratios on a shared 2-core VM move by 10 to 30% between runs; the number of
user-space instructions the gateway's process executes per request moves far less (about
1% on a quiet machine, up to 4% beside other work: compare specs of one invocation), so
small differences between two variants can be judged. Each
spec starts a gateway (`bench/policy.features.yaml`, as `bench/features.py` does) under
`valgrind --tool=callgrind --instr-atstart=no`, warms it with 300 requests, switches
instrumentation on for `--requests` requests at 16 connections, and divides the
instructions counted by the requests. Kernel work (sockets) is not counted: it is the
same on both sides of a comparison, so these ratios overstate a feature's share of the
whole CPU somewhat. Under callgrind the gateway runs about 50 times slower; a spec takes
about a minute.

    .venv/bin/python bench/instructions.py main:bench-json:json main:bench-json:json:accounted
    .venv/bin/python bench/instructions.py main:bench-sse:sse telemetry:bench-sse:sse
    .venv/bin/python bench/instructions.py --prompt-300 main:bench-json:json main:bench-json-pii:json

A spec is `GATEWAY:ALIAS:MODE[:KEY]`: GATEWAY `main` (the features policy), `telemetry`
(the same policy with the access log and quality signals, as the telemetry rows of
`bench/features.py`) or `bare` (the same policy with the metrics off, `server.metrics: false`:
issue 12's benchmark is `bare` against `telemetry`, every telemetry feature off against on), an
alias of that policy, MODE `json` or `sse`, KEY `plain` (default), `accounted` (the key with an RPM
limit and a budget) or `redis` (that key, with the policy's state in Redis: `GATEWAY_TEST_REDIS_URL`,
else redis://127.0.0.1:6379/15, under a prefix of its own, dropped after).

    .venv/bin/python bench/instructions.py bare:bench-json:json telemetry:bench-json:json

GATEWAY may also be `logged` (the metrics and the access log) or `quality` (the metrics and the quality
signals): with `bare` and `main` they take issue 12's telemetry apart, one part against the next.

    .venv/bin/python bench/instructions.py bare:bench-json:json main:bench-json:json logged:bench-json:json

`--keep DIR` copies each spec's callgrind output to DIR (`callgrind_annotate --inclusive=yes FILE` tells
where the instructions went; the Python code shows as the interpreter's C functions).

A spec `scale:STREAMS:INTERVAL_MS:CHUNKS` counts instructions per forwarded event instead, on
slow streams as in the scale row (`bench/scale.py` `count_instructions`: the scale policy, the
slow upstream, a 30 s window), e.g. `scale:20:100:50` (~200 events/s, about 1.5 minutes; repeats
within a few percent: streams starting in the window move it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import features, scale  # noqa: E402
from bench.harness import HOST, BenchError, Service, callgrind_total, free_port, nginx_upstream, require_tools, workdir  # noqa: E402

WARM_UP = 300


REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def policy_text(gateway: str, upstream_port: int, port: int, state: str = "") -> str:
    digest = "sha256:" + hashlib.sha256(features.KEY.encode()).hexdigest()
    accounted = "sha256:" + hashlib.sha256(features.ACCOUNTED_KEY.encode()).hexdigest()
    text = features.TEMPLATE.read_text()
    for name, value in (("{port}", str(upstream_port)), ("{gateway_port}", str(port)), ("{key_hash}", digest),
                        ("{ner_model}", str(features.NER_MODEL)), ("{accounted_key_hash}", accounted),
                        ("{state}", state)):
        text = text.replace(name, value)
    if gateway == "telemetry":
        text = text.replace("server:\n", "server:\n  access_log: true\n", 1) + features.TELEMETRY_POLICY
    elif gateway == "logged":  # the access log alone (the metrics on, as in `main`)
        text = text.replace("server:\n", "server:\n  access_log: true\n", 1)
    elif gateway == "quality":  # the quality signals alone (the metrics on, as in `main`)
        text += features.TELEMETRY_POLICY
    elif gateway == "bare":
        text = text.replace("server:\n", "server:\n" + features.BARE_SERVER, 1)
    elif gateway != "main":
        raise BenchError(f"unknown gateway {gateway!r} (main, telemetry, logged, quality or bare)")
    return text


async def send(url: str, body: bytes, key: str, requests: int, connections: int = 16) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    left = requests

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise BenchError(f"{url}: status {response.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(connections)))


def wait_ready(url: str, body: bytes, key: str, timeout: float = 600.0, service: Service | None = None) -> None:
    """Until the gateway answers (under callgrind it starts slowly); at once when its process has ended (a policy
    it refused: its log says why)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(send(url, body, key, 1, 1))
            return
        except (aiohttp.ClientError, OSError, BenchError):
            if service is not None and service.proc is not None and service.proc.poll() is not None:
                raise BenchError(f"the gateway exited before it answered (see {service.name}'s log)") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def count(spec: str, upstream_port: int, wd: Path, requests: int, prompt: str, keep: Path | None = None) -> float:
    """Millions of instructions per request for one spec."""
    gateway, alias, mode, *rest = spec.split(":")
    key = features.ACCOUNTED_KEY if rest in (["accounted"], ["redis"]) else features.KEY
    port = free_port()
    prefix = f"gwinstr:{os.getpid()}:{port}:"
    state = f'state: {{backend: redis, url_env: BENCH_REDIS_URL, key_prefix: "{prefix}"}}' if rest == ["redis"] else ""
    policy = wd / f"policy-{port}.yaml"
    policy.write_text(policy_text(gateway, upstream_port, port, state))
    try:
        return _count(spec, port, policy, wd, key, alias, mode, requests, prompt, keep)
    finally:
        if state:
            features.drop_prefix(prefix, REDIS_URL)


def _count(spec: str, port: int, policy: Path, wd: Path, key: str, alias: str, mode: str, requests: int,
           prompt: str, keep: Path | None = None) -> float:
    """`count` for a policy file already written: the gateway under callgrind, warmed, then counted."""
    out = wd / f"callgrind-{port}.out"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            str(REPO / ".venv" / "bin" / "python"), "-m", "gateway", "serve", "--policy", str(policy),
            "--host", HOST, "--port", str(port)]
    env = {"BENCH_UPSTREAM_KEY": "sk-bench", "BENCH_REDIS_URL": REDIS_URL}
    with Service(f"gateway-{port}", argv, log_dir=wd, cpu="1", env=env) as service:
        url = f"http://{HOST}:{port}/v1/chat/completions"
        body = features.body(alias, mode == "sse", prompt)
        wait_ready(url, body, key, service=service)
        asyncio.run(send(url, body, key, WARM_UP))
        pid = str(service.pid)
        for step in (["-z"], ["-i", "on"]):
            subprocess.run(["callgrind_control", *step, pid], check=True, capture_output=True)
        asyncio.run(send(url, body, key, requests))
        for step in (["-i", "off"], ["-d"]):
            subprocess.run(["callgrind_control", *step, pid], check=True, capture_output=True)
        time.sleep(1)
    total = callgrind_total(out)
    if keep is not None:  # the raw dumps, for `callgrind_annotate --inclusive=yes` (one file per spec)
        keep.mkdir(parents=True, exist_ok=True)
        for dump in out.parent.glob(out.name + "*"):
            shutil.copy(dump, keep / (spec.replace(":", "_") + dump.name.removeprefix(out.name) + ".callgrind"))
    if not total:
        raise BenchError(f"{spec}: callgrind wrote no totals")
    return total / requests / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="GATEWAY:ALIAS:MODE[:KEY]")
    parser.add_argument("--requests", type=int, default=600, help="requests counted per spec [%(default)s]")
    parser.add_argument("--prompt-300", action="store_true", help="send the 300-word PII prompt of the guard rows")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="copy each spec's callgrind output to DIR")
    args = parser.parse_args(argv)
    tools = require_tools(("nginx", "taskset"))
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"bench/instructions.py needs {tool} (Debian: apt-get install valgrind)", file=sys.stderr)
            return 2
    prompt = features.PROMPT_300 if args.prompt_300 else "Say hello"
    with workdir("bench-instructions-") as wd, nginx_upstream(tools["nginx"], wd, "0") as upstream_port:
        for spec in args.specs:
            if spec.startswith("scale:"):
                streams, interval_ms, chunks = spec.split(":")[1:]
                per_event, events = scale.count_instructions(wd, streams=int(streams), interval_ms=float(interval_ms),
                                                             chunks=int(chunks))
                print(f"{spec}: {per_event / 1e3:.1f} k instructions/event ({events} events)", flush=True)
                continue
            per_request = count(spec, upstream_port, wd, args.requests, prompt, args.keep)
            print(f"{spec}: {per_request:.3f} M instructions/request", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
