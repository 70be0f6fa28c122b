"""Paired runs: both sides of a row loaded at the same time, on the same core, each by its own wrk.

Taken in turn (`features.measure`), two runs of the same gateway on this shared 2-core VM differ by 5 to 10%
from one run to the next, as much as the effects the telemetry rows look for. Loaded at once, the two gateway
processes share the core (the scheduler gives each about half) and whatever slows the core in a round slows
both: each side's CPU per request (its own process's CPU time from `/proc`, divided by the requests wrk
counted) is then compared within the round. Two processes of the same policy read 0.99 to 1.01 a round this
way (`bare` against `bare`, 8 rounds), where runs taken in turn read 0.95 to 1.07.

The ratio of a round is plain CPU µs per request ÷ feature CPU µs per request: the feature side's throughput
per CPU-second against the plain side's, which is what a saturated core's req/s ratio measures. Each side's
req/s in the table is about half the core's, so only the ratio and the CPU columns compare with taken-in-turn
rows. Only rows whose sides are different gateway processes can be paired (a row of two aliases of one
gateway is one process: its CPU cannot be split by side).
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
