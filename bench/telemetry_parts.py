"""Issue 12's telemetry taken apart on the wall clock: the gateway's CPU per request with each part on.

One gateway process per policy (`bench/policy.features.yaml`, as `bench/instructions.py` writes it), pinned to
one core, the canned nginx upstream and wrk to the other; each run loads every gateway in turn (the order
reversed every other run) for `--duration` seconds at 16 connections, and reads the process's utime + stime
(`/proc/<pid>/stat`) around it. The medians per policy:

- `bare`: metrics, access log and quality signals off (`server.metrics: false`);
- `main`: the metrics;
- `logged`: the metrics and the access log;
- `quality`: the metrics and the quality signals;
- `telemetry`: all three (issue 12's benchmark is `bare` against this).

    .venv/bin/python bench/telemetry_parts.py --mode json --runs 6
    .venv/bin/python bench/telemetry_parts.py --mode sse --runs 6 --out bench/results/parts-sse.md

`--baseline DIR` adds, for each policy in `--kinds`, a gateway run from another checkout at DIR (its
`gateway` package first on PYTHONPATH: `git worktree add DIR COMMIT`), named `<policy>@base` and measured in
turn with the rest: an A/B of a change on the wall clock, e.g.

    git worktree add /tmp/base HEAD~1
    .venv/bin/python bench/telemetry_parts.py --kinds logged --baseline /tmp/base --runs 10

Two processes of one policy differ by a few percent by themselves on this VM (`bench/features.py`,
`--instances`): take a difference of a few µs from one pair as a direction, not a size.

Callgrind's instruction counts (`bench/instructions.py`) rank changes well within one part, but not the parts'
wall-clock costs: a part's code runs once per request between everything else, so it pays cache misses a
tight loop of it does not (the access line: about 1.4 µs a line in a loop of lines, about 7 µs in a served
request), while msgspec's decoding counts many instructions for little time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import features, instructions  # noqa: E402
from bench.harness import (  # noqa: E402
    HOST,
    Service,
    free_port,
    markdown_table,
    nginx_upstream,
    process_tree_cpu_seconds,
    require_tools,
    run_wrk,
    wait_until_serving,
    workdir,
)

KINDS = ("bare", "main", "logged", "quality", "telemetry")
BASELINE = "@base"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("json", "sse"), default="json")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--kinds", default=",".join(KINDS), help="policies, in the table's order [%(default)s]")
    parser.add_argument("--baseline", type=Path, help="also run each policy from the checkout at this path")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown policies: {', '.join(sorted(unknown))}")
    if args.baseline is not None:
        if not (args.baseline / "gateway" / "__init__.py").is_file():
            parser.error(f"{args.baseline} holds no `gateway` package")
        kinds = [name for kind in kinds for name in (kind + BASELINE, kind)]
    tools = require_tools()
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    rps: dict[str, list[float]] = {kind: [] for kind in kinds}
    with workdir("bench-parts-") as wd, nginx_upstream(tools["nginx"], wd, "0") as upstream_port, \
            contextlib.ExitStack() as stack:
        gateways: dict[str, tuple[str, Service]] = {}
        for kind in kinds:
            port = free_port()
            path = wd / f"policy-{kind}.yaml"
            path.write_text(instructions.policy_text(kind.removesuffix(BASELINE), upstream_port, port))
            env = {"BENCH_UPSTREAM_KEY": "sk-bench"}
            if kind.endswith(BASELINE):
                env["PYTHONPATH"] = str(args.baseline.resolve())
            gateway = stack.enter_context(Service(
                f"gateway-{kind}", [str(features.GATEWAY_BIN), "serve", "--policy", str(path), "--host", HOST,
                                    "--port", str(port)],
                log_dir=wd, cpu="1", env=env))
            wait_until_serving(gateway, port, "/v1/chat/completions", (args.mode,), features.KEY, timeout=60)
            gateways[kind] = (f"http://{HOST}:{port}/v1/chat/completions", gateway)
        body = features.body("bench-sse" if args.mode == "sse" else "bench-json", args.mode == "sse")
        for run in range(args.runs):
            for kind in kinds if run % 2 == 0 else kinds[::-1]:
                url, gateway = gateways[kind]
                before = process_tree_cpu_seconds(gateway.pid)
                result = run_wrk(tools["wrk"], url, body=body, key=features.KEY, connections=16,
                                 duration=args.duration, cpu="0")
                cpu[kind].append((process_tree_cpu_seconds(gateway.pid) - before) / result.requests * 1e6)
                rps[kind].append(result.rps)
                print(f"[run {run + 1}/{args.runs}] {kind:9s} {result.rps:7.0f} req/s "
                      f"{cpu[kind][-1]:6.1f} µs/req", flush=True)
    first = statistics.median(cpu[kinds[0]])
    rows = [[kind, f"{statistics.median(rps[kind]):,.0f}", f"{statistics.median(cpu[kind]):.1f}",
             f"{statistics.median(cpu[kind]) - first:+.1f}"] for kind in kinds]
    lines = [f"# Telemetry parts, {args.mode}", "",
             f"Generated by `bench/telemetry_parts.py` on {time.strftime('%Y-%m-%dT%H:%M:%S')}; {args.runs} runs of "
             f"{args.duration} s per policy, in turn; medians; CPU = the gateway's utime + stime per request.", "",
             markdown_table(["policy", "req/s", "CPU µs/req", f"vs {kinds[0]}"], rows, align_right_from=1)]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
