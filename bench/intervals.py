"""The stream scanner's effect on time to first token and on inter-chunk latency.

`bench/features.py` measures the scanner's throughput against the canned nginx upstream,
which writes a whole answer at once: it cannot show gaps between chunks. Here the upstream
is `bench/slow_upstream.py`, one `chat.completion.chunk` every `--interval-ms`, and one
gateway serves two aliases on it: `bench-sse` (plain) and `bench-sse-scan` (a `patterns`
PII output guard, so the stream scanner holds back a window of text and releases it in
larger pieces). One client (aiohttp, one stream at a time, plain and guarded interleaved)
records when each SSE `data:` event carrying answer text arrives:

* TTFT: request sent -> first event with content text;
* gaps: time between consecutive content events of one stream (pooled over all streams);
* content events per stream (the scanner merges text: fewer, larger events).

Both sides must deliver the same text (the canned answer has no PII), which is checked.

    .venv/bin/python bench/intervals.py                          # 30 streams a side, 20 ms x 50 chunks
    .venv/bin/python bench/intervals.py --streams 10 --interval-ms 50 --out /tmp/intervals.md
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench.harness import (  # noqa: E402
    GATEWAY_PATH,
    HOST,
    BenchError,
    Service,
    free_port,
    markdown_table,
    wait_for_port,
    wait_until_serving,
    workdir,
)

GATEWAY_BIN = REPO / ".venv" / "bin" / "gateway"
KEY = "sk-bench-4f1c2a9e7b3d4e5f8a6b"
SIDES = {"plain": "bench-sse", "guarded": "bench-sse-scan"}
POLICY = """\
version: 1
server: {{host: 127.0.0.1, port: {gateway_port}}}
auth: keys
keys:
  - {{name: bench, hash: "{key_hash}", tenant: bench, models: ["*"]}}
providers:
  slow-sse: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: BENCH_UPSTREAM_KEY}}
models:
  bench-sse: {{provider: slow-sse, model: gpt-4o-mini}}
  bench-sse-scan: {{provider: slow-sse, model: gpt-4o-mini}}
guards:
  models:
    bench-sse-scan:
      pii: {{kind: pii, engine: patterns, places: [output]}}
"""


@dataclass
class Side:
    """What one side's client saw, over all its streams (seconds)."""

    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    texts: set[str] = field(default_factory=set)


async def one_stream(session: aiohttp.ClientSession, url: str, model: str, side: Side) -> None:
    """One streamed request; arrival time of every content event, taken as its line is read."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "Say hello"}]}
    arrivals: list[float] = []
    text: list[str] = []
    sent = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        if resp.status != 200:
            raise BenchError(f"{model}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
        async for raw in resp.content:
            now = time.perf_counter()
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            content = "".join((c.get("delta") or {}).get("content") or "" for c in choices)
            if content:
                arrivals.append(now)
                text.append(content)
    done = time.perf_counter()
    if not arrivals:
        raise BenchError(f"{model}: a stream with no content")
    side.ttft.append(arrivals[0] - sent)
    side.gaps.extend(b - a for a, b in itertools.pairwise(arrivals))
    side.events.append(len(arrivals))
    side.total.append(done - sent)
    side.texts.add("".join(text))


async def measure(port: int, streams: int, warmup: int) -> dict[str, Side]:
    url = f"http://{HOST}:{port}{GATEWAY_PATH}"
    sides = {name: Side() for name in SIDES}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(warmup):  # connections, first-use imports, the guard's analyzer
            for model in SIDES.values():
                await one_stream(session, url, model, Side())
        for _ in range(streams):
            for name, model in SIDES.items():
                await one_stream(session, url, model, sides[name])
    return sides


def ms(values: list[float], q: float | None = None) -> str:
    """The ``q`` quantile (nearest rank) in ms, or the max when ``q`` is None."""
    ordered = sorted(values)
    value = ordered[-1] if q is None else ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
    return f"{value * 1000:.1f}"


def report(sides: dict[str, Side], args: argparse.Namespace, started: str) -> str:
    rows = []
    for name, side in sides.items():
        rows.append([
            f"{name} (`{SIDES[name]}`)", str(len(side.ttft)), ms(side.ttft, 0.5), ms(side.ttft, 0.99),
            ms(side.gaps, 0.5), ms(side.gaps, 0.9), ms(side.gaps, 0.99), ms(side.gaps),
            f"{statistics.mean(side.events):.1f}", ms(side.total, 0.5),
        ])
    plain, guarded = sides["plain"], sides["guarded"]
    same = plain.texts == guarded.texts and len(plain.texts) == 1
    chars = len(next(iter(plain.texts)))
    added = (statistics.median(guarded.ttft) - statistics.median(plain.ttft)) * 1000
    lines = [
        "# Stream scanner: time to first token and inter-chunk latency",
        "",
        f"Generated by `bench/intervals.py` on {started}. Upstream: `bench/slow_upstream.py`, one "
        f"`chat.completion.chunk` every {args.interval_ms:g} ms, {args.chunks} chunks an answer "
        f"({args.chunks - 3} carry one word each, {chars} characters of text in all). One gateway "
        f"(pinned to core {args.gateway_cpu}; upstream and client on core {args.load_cpu}) with a plain alias "
        "and one with a `patterns` PII output guard (the stream scanner at its defaults, `window_chars` 48, "
        f"`step_chars` 24). One aiohttp client, one stream at a time, plain and guarded interleaved, "
        f"{args.streams} streams a side after {args.warmup} warm-up streams a side. Times are client-side "
        "arrival times of SSE `data:` events that carry content text: TTFT = request sent to the first one; "
        "gaps = between consecutive ones of a stream, pooled over all streams. The machine has 2 cores and "
        "was busy with other work: figures are indicative.",
        "",
        markdown_table(["side", "streams", "TTFT p50 ms", "TTFT p99 ms", "gap p50 ms", "gap p90 ms",
                        "gap p99 ms", "gap max ms", "content events / stream", "whole answer p50 ms"],
                       rows, align_right_from=1),
        "",
        f"Added time to first token (p50 guarded − p50 plain): {added:.1f} ms. Same text on both sides: "
        f"{'yes' if same else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=30, help="measured streams per side [%(default)s]")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured streams per side first [%(default)s]")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="upstream time between chunks [%(default)s]")
    parser.add_argument("--chunks", type=int, default=50, help="upstream chunks an answer [%(default)s]")
    parser.add_argument("--gateway-cpu", default="1")
    parser.add_argument("--load-cpu", default="0", help="core of the upstream and of this client")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "intervals.md")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.sched_setaffinity(0, {int(args.load_cpu)})
    with workdir("bench-intervals-") as wd:
        up_port, gw_port = free_port(), free_port()
        upstream = Service("slow-upstream", [
            sys.executable, "-m", "bench.slow_upstream", "--port", str(up_port), "--chunks", str(args.chunks),
            "--interval-ms", str(args.interval_ms), "--tick-ms", str(min(10.0, args.interval_ms)),
        ], log_dir=wd, cpu=args.load_cpu)
        policy = wd / "policy.yaml"
        policy.write_text(POLICY.format(gateway_port=gw_port, port=up_port,
                                        key_hash="sha256:" + hashlib.sha256(KEY.encode()).hexdigest()))
        gateway = Service("gateway", [str(GATEWAY_BIN), "serve", "--policy", str(policy), "--host", HOST,
                                      "--port", str(gw_port)],
                          log_dir=wd, cpu=args.gateway_cpu, env={"BENCH_UPSTREAM_KEY": "sk-bench"})
        with upstream, gateway:
            wait_for_port(upstream, up_port)
            wait_until_serving(gateway, gw_port, GATEWAY_PATH, ("sse",), KEY, timeout=60)
            sides = asyncio.run(measure(gw_port, args.streams, args.warmup))
    text = report(sides, args, started)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
