"""Interpreter steps per request, by function: the gateway's Python bytecode instructions, counted exactly.

A gateway process (`bench/policy.features.yaml`, the policies of `bench/instructions.py`) runs under a
tracer that counts every bytecode instruction it executes (`sys.settrace`, `frame.f_trace_opcodes`) while
counting is on: warmed with 300 requests, counted over `--requests` at 16 connections, and each code
object's count divided by the requests. The gateway runs many times slower while counted, and its event
loop batches differently (so a figure that depends on batching, like a metrics batch's, moves); the steps a
request's own code takes do not. Two specs print what the second adds, function by function:

    .venv/bin/python bench/opcodes.py bare:bench-json:json telemetry:bench-json:json
    .venv/bin/python bench/opcodes.py --top 40 main:bench-sse:sse quality:bench-sse:sse

In a served request a step costs about the same whatever its part (the request's total CPU over its
steps), which a loop of one part in one process does not show (its code and data stay in the caches).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import features, instructions  # noqa: E402
from bench.harness import HOST, Service, free_port, nginx_upstream, require_tools, workdir  # noqa: E402

# Run as the gateway's entry point: counts steps between SIGUSR1 (start afresh) and SIGUSR2 (stop and write
# `code<TAB>count` lines to $BENCH_OPCODES_OUT), then runs `python -m gateway` with the rest of its argv.
_COUNTER = """
import collections, os, runpy, signal, sys
counts = collections.Counter()
by_line = os.environ.get("BENCH_OPCODES_LINES") == "1"
def tracer(frame, event, arg):
    if event == "call":
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return tracer
    if event == "opcode":
        counts[(frame.f_code, frame.f_lineno) if by_line else (frame.f_code, None)] += 1
    return tracer
def start(*_):
    counts.clear()
    sys.settrace(tracer)
def stop(*_):
    sys.settrace(None)
    with open(os.environ["BENCH_OPCODES_OUT"], "w") as out:
        for (code, line), n in counts.items():
            at = code.co_firstlineno if line is None else line
            out.write(f"{code.co_qualname} ({code.co_filename}:{at})\\t{n}\\n")
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["gateway", *sys.argv[1:]]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""


def count(spec: str, upstream_port: int, wd: Path, requests: int, by_line: bool = False) -> dict[str, float]:
    """Steps per request by function (`qualname (file:line)`, the function's first line; `by_line`: by each line
    of each function) for one spec, `GATEWAY:ALIAS:MODE`."""
    gateway, alias, mode = spec.split(":")
    port = free_port()
    policy = wd / f"policy-{port}.yaml"
    policy.write_text(instructions.policy_text(gateway, upstream_port, port))
    counter = wd / "counter.py"
    counter.write_text(_COUNTER)
    out = wd / f"opcodes-{port}.tsv"
    argv = [str(REPO / ".venv" / "bin" / "python"), str(counter), "serve", "--policy", str(policy), "--host", HOST,
            "--port", str(port)]
    with Service(f"gateway-{port}", argv, log_dir=wd, cpu="1",
                 env={"BENCH_UPSTREAM_KEY": "sk-bench", "BENCH_OPCODES_OUT": str(out),
                          "BENCH_OPCODES_LINES": "1" if by_line else "0"}) as service:
        url = f"http://{HOST}:{port}/v1/chat/completions"
        body = features.body(alias, mode == "sse")
        instructions.wait_ready(url, body, features.KEY)
        asyncio.run(instructions.send(url, body, features.KEY, instructions.WARM_UP))
        os.kill(service.pid, signal.SIGUSR1)
        time.sleep(0.5)  # (the handler runs between the loop's steps)
        asyncio.run(instructions.send(url, body, features.KEY, requests))
        os.kill(service.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    steps: dict[str, float] = collections.defaultdict(float)
    for line in out.read_text().splitlines():
        name, _, number = line.rpartition("\t")
        steps[name.replace(str(REPO) + "/", "")] += int(number) / requests
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="GATEWAY:ALIAS:MODE, as bench/instructions.py's")
    parser.add_argument("--requests", type=int, default=200, help="requests counted per spec [%(default)s]")
    parser.add_argument("--top", type=int, default=25, help="functions listed per difference [%(default)s]")
    parser.add_argument("--lines", action="store_true", help="steps by line, not by function")
    args = parser.parse_args(argv)
    tools = require_tools(("nginx", "taskset"))
    with workdir("bench-opcodes-") as wd, nginx_upstream(tools["nginx"], wd, "0") as upstream_port:
        counted = [(spec, count(spec, upstream_port, wd, args.requests, args.lines)) for spec in args.specs]
    for spec, steps in counted:
        print(f"{spec}: {sum(steps.values()):,.0f} steps/request")
    for (before_spec, before), (spec, after) in itertools.pairwise(counted):
        diff = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in set(before) | set(after)}
        print(f"\n{spec} - {before_spec}: {sum(diff.values()):+,.0f} steps/request")
        for name, steps in sorted(diff.items(), key=lambda item: -abs(item[1]))[:args.top]:
            print(f"{steps:+9.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
