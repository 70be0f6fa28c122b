"""Injection: the patterns engine against the model engine (and both), on texts the model was not trained on.

    .venv/bin/python -m evals.guards.compare_injection --json evals/guards/results-injection-engines.json

The model's head is trained on the committed set (seed 7, `train_injection.py`). Measured here:

- `heldout_seed11`: a draw with seed 11 (built in memory as `generate --seed 11` writes it): its 170
  attacks against its 490 benign and clean prompts, as `evaluate.py` counts injection. The draw uses the
  same templates as the training set, and many of its texts are verbatim training texts, so also:
- `heldout_seed11_unseen`: the same draw without the texts that occur verbatim in the training set;
- `template_disjoint_cv`: on the training set, each sample scored by a head trained without its
  generator template (5 folds of templates): how the model does on phrasings it never saw;
- `paraphrases`: `paraphrases.jsonl`, 30 attacks worded to avoid the patterns' trigger words and 30 benign
  near misses, hand-written for this comparison before the model was measured on them.

Each engine runs through the real guard (`InjectionGuard.detect`, the model on a 2-thread guard pool);
latency is the wall time of one check, one at a time, on the held-out texts and on one 330-word prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from gateway.guards.base import Where
from gateway.guards.injection import InjectionGuard
from gateway.guards.runtime import GuardRuntime
from gateway.policy.guard_schema import GuardsSpec
from gateway.telemetry.metrics import Metrics

from .evaluate import SAMPLES, load_samples
from .generate import Gen, clean_samples, injection_samples, pii_samples, secret_samples
from .train_injection import embed_all, labels, prf, template_cv

HERE = Path(__file__).parent
PARAPHRASES = HERE / "paraphrases.jsonl"
ENGINES = ("patterns", "model", "both")
_IN = Where("input", "message")
LONG_PROMPT = " ".join([
    "We are planning the quarterly offsite for the data team and need help with the agenda.",
    "There will be about forty people, two days, and a budget that covers meals and one evening event.",
    "Please propose sessions on the roadmap, on-call load, the migration to the new warehouse,",
    "and a retrospective of the last incident, with times and owners left blank for us to fill in.",
] * 5)  # 330 words, 1,844 characters, 15 sentences


def draw(seed: int) -> list[dict[str, Any]]:
    """The set `generate --seed N` writes, built in memory."""
    g = Gen(seed)
    return pii_samples(g) + clean_samples(g) + secret_samples(g) + injection_samples(g)


async def guard_for(engine: str) -> tuple[GuardRuntime, InjectionGuard]:
    guards = msgspec.convert({"global": {"injection": {"kind": "injection", "engine": engine}}}, GuardsSpec)
    runtime = GuardRuntime(guards, Metrics(), len)
    await runtime.start()
    guard = runtime.resolve("t", "a").input[0]
    assert isinstance(guard, InjectionGuard)
    return runtime, guard


async def flags(guard: InjectionGuard, samples: list[dict[str, Any]]) -> tuple[np.ndarray, list[float]]:
    flagged, seconds = [], []
    for s in samples:
        started = time.perf_counter()
        found = await guard.detect(s["text"], _IN)
        seconds.append(time.perf_counter() - started)
        flagged.append(bool(found))
    return np.asarray(flagged), seconds


def latency(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {"mean_ms": round(statistics.fmean(ms), 3), "p50_ms": round(ms[len(ms) // 2], 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3), "checks": len(ms)}


def attacks_and_benign(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in samples if s["kind"] in ("injection", "benign", "clean")]


async def compare(heldout: list[dict[str, Any]], training: list[dict[str, Any]]) -> dict[str, Any]:
    seen = {s["text"] for s in training}
    sets = {
        "heldout_seed11": attacks_and_benign(heldout),
        "heldout_seed11_unseen": [s for s in attacks_and_benign(heldout) if s["text"] not in seen],
        "paraphrases": load_samples(PARAPHRASES),
    }
    others = [s for s in heldout if s["kind"] in ("pii", "secret")]
    report: dict[str, Any] = {name: {"attacks": int(labels(s).sum()), "benign": int(len(s) - labels(s).sum())}
                              for name, s in sets.items()}
    report["latency"] = {}
    for engine in ENGINES:
        runtime, guard = await guard_for(engine)
        try:
            for name, samples in sets.items():
                flagged, seconds = await flags(guard, samples)
                report[name][engine] = prf(labels(samples), flagged)
                if name == "heldout_seed11":
                    report["latency"][engine] = latency(seconds)
                    alarms, _ = await flags(guard, others)
                    report[name][engine]["false_alarms_pii_and_secret_texts"] = round(float(alarms.mean()), 4)
            _, long_seconds = await flags(guard, [{"text": LONG_PROMPT}] * 20)
            report["latency"][engine + "_330_words"] = latency(long_seconds)
        finally:
            await runtime.aclose()
    report["heldout_seed11"]["pii_and_secret_texts"] = len(others)
    report["template_disjoint_cv"] = await template_disjoint(training)
    report["load_average_1m"] = round(os.getloadavg()[0], 2)
    return report


async def template_disjoint(training: list[dict[str, Any]]) -> dict[str, Any]:
    """Model: a head per fold of templates, trained on the others (the shipped head's L2). Patterns: as they are."""
    head = json.loads((Path(__file__).parents[2] / "gateway" / "guards" / "injection_head.json").read_text())
    x = embed_all([s["text"] for s in training])
    y = labels(training)
    model = template_cv(training, x, float(head["l2"])) >= 0.5
    runtime, guard = await guard_for("patterns")
    patterns, _ = await flags(guard, training)
    await runtime.aclose()
    both = model | patterns
    return {"samples": len(training), "attacks": int(y.sum()), "folds": 5,
            "patterns": prf(y, patterns), "model": prf(y, model), "both": prf(y, both)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=11, help="the held-out draw")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()
    report = asyncio.run(compare(draw(args.seed), load_samples(SAMPLES)))
    report = {"heldout_seed": args.seed, **report}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
