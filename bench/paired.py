"""Paired runs: both sides of a row loaded at the same time, on the same core, each by its own wrk.

Taken in turn (`features.measure`), two runs of the same gateway on this shared 2-core VM differ by 5 to 10%
from one run to the next, as much as the effects the telemetry rows look for. Loaded at once, the two gateway
processes share the core (the scheduler gives each about half) and whatever slows the core in a round slows
both: each side's CPU per request (its own process's CPU time from `/proc`, divided by the requests wrk
counted) is then compared within the round. Two processes of the same policy read 0.99 to 1.01 a round this
way (`bare` against `bare`, 8 rounds, `main` below), where runs taken in turn read 0.95 to 1.07.

The ratio of a round is plain CPU µs per request ÷ feature CPU µs per request: the feature side's throughput
per CPU-second against the plain side's, which is what a saturated core's req/s ratio measures. Each side's
req/s in the table is about half the core's, so only the ratio and the CPU columns compare with taken-in-turn
rows. Only rows whose sides are different gateway kinds are paired (`features.py --paired`): a row of two aliases
of one gateway is one process, whose CPU cannot be split by side, and the control rows (the same kind on both
sides) are taken in turn too. `main` pairs any two kinds of `bench/instructions.py`, one process each, as issue
12's parts were measured (the 0.99 to 1.01 above is `bare` against `bare` so):

    .venv/bin/python -m bench.paired bare bare --rounds 8
    .venv/bin/python -m bench.paired main logged --mode sse --rounds 8
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from bench.harness import BenchError, Service, WrkResult, run_wrk

__all__ = ["measure_paired"]


def measure_paired(name: str, bodies: Mapping[str, bytes], keys: Mapping[str, str],
                   sides: Mapping[str, Sequence[tuple[str, Service]]], connections: int, wrk: str, runs: int,
                   duration: int, cpu: str) -> dict[str, list[WrkResult]]:
    """`runs` rounds of both sides ("plain", "feature") loaded at once for `duration` seconds, after a 2 s
    warm-up round of every instance; round r takes instance r mod N of each side."""
    results: dict[str, list[WrkResult]] = {"plain": [], "feature": []}

    def one_round(run: int, seconds: int) -> dict[str, WrkResult]:
        done: dict[str, WrkResult] = {}
        failed: list[BaseException] = []

        def load(which: str) -> None:
            instances = sides[which]
            url, gateway = instances[run % len(instances)]
            try:
                done[which] = run_wrk(wrk, url, body=bodies[which], key=keys[which], connections=connections,
                                      duration=seconds, cpu=cpu, target=gateway)
            except BaseException as exc:  # noqa: BLE001 -- raised in the caller's thread below
                failed.append(exc)

        threads = [threading.Thread(target=load, args=(which,)) for which in ("plain", "feature")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failed:
            raise failed[0]
        return done

    for run in range(max(len(sides["plain"]), len(sides["feature"]))):
        one_round(run, 2)
    for run in range(runs):
        done = one_round(run, duration)
        for which in ("plain", "feature"):
            if done[which].errors:
                raise BenchError(f"{name} {which}: {done[which].errors} errors")
            results[which].append(done[which])
        plain, feature = done["plain"], done["feature"]
        print(f"[{name} round {run + 1}/{runs}] plain {plain.cpu_us_per_request:6.1f} µs/req "
              f"({plain.rps:5.0f} req/s) | feature {feature.cpu_us_per_request:6.1f} µs/req "
              f"({feature.rps:5.0f} req/s) | "
              f"ratio {plain.cpu_us_per_request / feature.cpu_us_per_request:.3f}",  # type: ignore[operator]
              flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Two gateway kinds of `bench/instructions.py` (`bare`, `main`, `logged`, `quality`, `telemetry`: issue 12's
    parts), one process each, paired round by round on one alias; prints each round and the median ratio."""
    import argparse
    import contextlib
    import statistics
    from pathlib import Path

    from bench import features
    from bench.harness import HOST, Service, free_port, nginx_upstream, require_tools, wait_until_serving, workdir
    from bench.instructions import policy_text

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("plain", help="the plain side's kind, e.g. bare")
    parser.add_argument("feature", help="the feature side's kind, e.g. telemetry")
    parser.add_argument("--mode", choices=("json", "sse"), default="json")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--gateway-cpu", default="1")
    parser.add_argument("--load-cpu", default="0")
    args = parser.parse_args(argv)
    tools = require_tools()
    with workdir("bench-paired-") as wd, nginx_upstream(tools["nginx"], wd, args.load_cpu) as upstream_port, \
            contextlib.ExitStack() as stack:
        sides: dict[str, list[tuple[str, Service]]] = {}
        for which, kind in (("plain", args.plain), ("feature", args.feature)):
            port = free_port()
            policy = wd / f"policy-{which}.yaml"
            policy.write_text(policy_text(kind, upstream_port, port))
            argv_ = [str(features.GATEWAY_BIN), "serve", "--policy", str(policy), "--host", HOST, "--port", str(port)]
            gateway = stack.enter_context(Service(f"gateway-{which}", argv_, log_dir=Path(wd), cpu=args.gateway_cpu,
                                                  env={"BENCH_UPSTREAM_KEY": "sk-bench"}))
            wait_until_serving(gateway, port, "/v1/chat/completions", ("json", "sse"), features.KEY, timeout=60)
            sides[which] = [(f"http://{HOST}:{port}/v1/chat/completions", gateway)]
        body = features.body("bench-json" if args.mode == "json" else "bench-sse", args.mode == "sse")
        results = measure_paired(f"{args.plain}->{args.feature}", {"plain": body, "feature": body},
                                 {"plain": features.KEY, "feature": features.KEY}, sides, 16, tools["wrk"],
                                 args.rounds, args.duration, args.load_cpu)
    ratios = [p.cpu_us_per_request / f.cpu_us_per_request  # type: ignore[operator]
              for p, f in zip(results["plain"], results["feature"], strict=True)]
    print(f"{args.plain} -> {args.feature} {args.mode}: ratio {statistics.median(ratios):.3f} "
          f"(rounds {min(ratios):.3f} to {max(ratios):.3f}, {args.rounds} rounds of {args.duration} s)")
    return 0


if __name__ == "__main__":  # .venv/bin/python -m bench.paired bare telemetry --mode sse
    raise SystemExit(main())
