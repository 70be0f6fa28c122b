"""Measure the guards on the labelled set: PII precision/recall per type for both engines (whole
texts and streamed output chunked 1..7 characters), over-redaction of clean texts, secrets recall
and false alarms, injection detection and false alarms.

    .venv/bin/python -m evals.guards.evaluate --model ../shared/models/en_ner_sm_port-1.0.0 [--json out.json]

The PII guard is the one in policies/examples/guards.yaml (`guards.global.pii`), run as `ner` with
the given spaCy pipeline and as `patterns` (the same policy without the NER-only types).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec

from gateway.guards.base import Where
from gateway.guards.pii import PiiGuard
from gateway.guards.runtime import GuardRuntime
from gateway.guards.session import GuardSession
from gateway.guards.stream import StreamGuard
from gateway.guards.verdict import resolve
from gateway.policy import load_policy
from gateway.policy.guard_check import NER_ENTITIES
from gateway.policy.guard_schema import GuardsSpec, PiiGuardSpec, StreamScanSpec
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import DONE, Chunk
from gateway.telemetry.metrics import Metrics

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SAMPLES = HERE / "samples.jsonl"
POLICY = REPO / "policies" / "examples" / "guards.yaml"
TYPES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "STREET_ADDRESS", "DATE_OF_BIRTH",
         "IP_ADDRESS", "GOV_ID", "PERSONAL_URL")
_ALIASES = {"US_SSN": "GOV_ID", "UK_NINO": "GOV_ID"}
_IN = Where("input", "message")


def load_samples(path: Path = SAMPLES) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def runtime_for(engine: str, model: str | None) -> tuple[GuardRuntime, dict[str, Any]]:
    spec = load_policy(POLICY, require_env=False).guards.global_["pii"]  # (its model: `model`, not the example's)
    assert isinstance(spec, PiiGuardSpec)
    entities = {k: v for k, v in spec.entities.items() if engine == "ner" or k not in NER_ENTITIES}
    raw = msgspec.to_builtins(spec)
    raw.update(engine=engine, model=model if engine == "ner" else None, entities=msgspec.to_builtins(entities))
    guards = GuardsSpec(global_={"pii": raw, "secrets": {"kind": "secrets"}, "injection": {"kind": "injection"}})
    guards = msgspec.convert(msgspec.to_builtins(guards), GuardsSpec)
    return GuardRuntime(guards, Metrics(), len), raw


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def score_pii(samples: list[dict[str, Any]], found: dict[str, list[tuple[str, int, int]]]) -> dict[str, Any]:
    tp: dict[str, int] = defaultdict(int)
    fn: dict[str, int] = defaultdict(int)
    fp: dict[str, int] = defaultdict(int)
    for s in samples:
        gold = [(g["type"], g["start"], g["end"]) for g in s["spans"]]
        hits = found.get(s["id"], [])
        for t, a, b in gold:
            ok = any(ht == t and _overlap((a, b), (ha, hb)) >= 0.5 * (b - a) for ht, ha, hb in hits)
            (tp if ok else fn)[t] += 1
        for ht, ha, hb in hits:
            if not any(t == ht and _overlap((a, b), (ha, hb)) > 0 for t, a, b in gold):
                fp[ht] += 1
    per_type = {}
    for t in TYPES:
        found_t = tp[t] + fp[t]
        per_type[t] = {"support": tp[t] + fn[t], "recall": _ratio(tp[t], tp[t] + fn[t]),
                       "precision": _ratio(tp[t], found_t), "false_positives": fp[t]}
    total_tp, total_fn, total_fp = sum(tp.values()), sum(fn.values()), sum(fp.values())
    return {"recall": _ratio(total_tp, total_tp + total_fn), "precision": _ratio(total_tp, total_tp + total_fp),
            "per_type": per_type}


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 1.0


async def detect_pii(runtime: GuardRuntime, samples: list[dict[str, Any]]) -> dict[str, list[tuple[str, int, int]]]:
    guard = next(g for g in runtime.resolve("t", "a").input if isinstance(g, PiiGuard))
    out = {}
    for s in samples:
        found = resolve(await guard.detect(s["text"], _IN))  # what would be rewritten: overlaps resolved
        out[s["id"]] = [(_ALIASES.get(f.type, f.type), f.start, f.end) for f in found]
    return out


async def stream_once(runtime: GuardRuntime, text: str, size: int, spec: StreamScanSpec) -> str:
    """The text as a client would read it, sent upstream in pieces of `size` characters."""
    guards = tuple(g for g in runtime.resolve("t", "a").output if isinstance(g, PiiGuard))
    stage = StreamGuard(runtime, guards, GuardSession(runtime.metrics), spec, Endpoint.CHAT, "eval")
    out = []
    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    events: list[Any] = [Chunk.of({**base, "choices": [{"index": 0, "delta": {"content": text[i:i + size]},
                                                         "finish_reason": None}]}) for i in range(0, len(text), size)]
    events.append(Chunk.of({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append(DONE)
    for event in events:
        for item in await stage.on_events(None, [event]):  # type: ignore[arg-type]
            if isinstance(item, Chunk):
                for choice in item.data()["choices"]:
                    out.append(choice["delta"].get("content") or "")
    return "".join(out)


async def whole(runtime: GuardRuntime, text: str) -> str:
    guards = tuple(g for g in runtime.resolve("t", "a").output if isinstance(g, PiiGuard))
    verdict = await runtime.check(guards, text, Where("output", "answer"), GuardSession(runtime.metrics))
    return verdict.text


async def evaluate(
    model: str | None, *, samples_path: Path = SAMPLES, stream_sizes: tuple[int, ...] = tuple(range(1, 8)),
    every: int = 1, engines: tuple[str, ...] = ("patterns", "ner"),
) -> dict[str, Any]:
    samples = load_samples(samples_path)
    pii = [s for s in samples if s["kind"] == "pii"]
    clean = [s for s in samples if s["kind"] == "clean"]
    report: dict[str, Any] = {"samples": len(samples), "by_kind": {k: sum(1 for s in samples if s["kind"] == k)
                                                                   for k in ("pii", "clean", "secret", "injection",
                                                                             "benign")}}
    spec = StreamScanSpec()
    for engine in engines:
        if engine == "ner" and not model:
            continue
        runtime, _ = runtime_for(engine, model)
        await runtime.start()
        started = time.perf_counter()
        found = await detect_pii(runtime, pii + clean)
        result = score_pii(pii, found)
        result["seconds_per_text"] = round((time.perf_counter() - started) / (len(pii) + len(clean)), 4)
        result["clean_changed"] = _ratio(sum(1 for s in clean if found[s["id"]]), len(clean))
        # Streamed output: the client's text must not contain a labelled value (recall); clean texts unchanged.
        leaked: dict[str, int] = defaultdict(int)
        support: dict[str, int] = defaultdict(int)
        same = changed = streams = 0
        for s in (pii + clean)[::every]:
            reference = await whole(runtime, s["text"])
            for size in stream_sizes:
                got = await stream_once(runtime, s["text"], size, spec)
                streams += 1
                same += got == reference
                if s["kind"] == "clean":
                    changed += got != s["text"]
                for g in s["spans"]:
                    support[g["type"]] += 1
                    leaked[g["type"]] += s["text"][g["start"]:g["end"]] in got
        result["stream"] = {
            "streams": streams, "chunk_sizes": list(stream_sizes), "same_as_whole": _ratio(same, streams),
            "clean_changed": _ratio(changed, sum(1 for s in clean[::every]) * len(stream_sizes)) if clean else 0.0,
            "recall": _ratio(sum(support.values()) - sum(leaked.values()), sum(support.values())),
            "recall_per_type": {t: _ratio(support[t] - leaked[t], support[t]) for t in TYPES if support[t]},
        }
        report[engine] = result
        await runtime.aclose()
    report["secrets"] = await _secrets(samples)
    report["injection"] = await _injection(samples)
    return report


_PRESIDIO_TYPES = {"LOCATION": "STREET_ADDRESS", "DATE_TIME": "DATE_OF_BIRTH", "URL": "PERSONAL_URL",
                   "US_SSN": "GOV_ID", "UK_NINO": "GOV_ID", "US_PASSPORT": "GOV_ID", "US_DRIVER_LICENSE": "GOV_ID",
                   "IT_FISCAL_CODE": "GOV_ID", "ES_NIF": "GOV_ID", "IN_AADHAAR": "GOV_ID", "UK_PASSPORT": "GOV_ID"}


def presidio_default(model: str, samples_path: Path = SAMPLES) -> dict[str, Any]:
    """Presidio out of the box, for comparison: its predefined recognizers and the same spaCy pipeline,
    no score threshold, no context rules; its types mapped to ours (LOCATION counts as an address,
    DATE_TIME as a date of birth, URL as a profile URL, national ids as GOV_ID)."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    from gateway.guards.pii import quiet_network

    quiet_network()
    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy", "models": [
        {"lang_code": "en", "model_name": model}]}).create_engine()
    engine = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    samples = load_samples(samples_path)
    pii = [s for s in samples if s["kind"] == "pii"]
    clean = [s for s in samples if s["kind"] == "clean"]
    found = {}
    for s in pii + clean:
        results = engine.analyze(s["text"], language="en")
        found[s["id"]] = [(_PRESIDIO_TYPES.get(r.entity_type, r.entity_type), r.start, r.end) for r in results]
    result = score_pii(pii, found)
    result["clean_changed"] = _ratio(sum(1 for s in clean if found[s["id"]]), len(clean))
    return result


async def _secrets(samples: list[dict[str, Any]]) -> dict[str, Any]:
    runtime, _ = runtime_for("patterns", None)
    guard = next(g for g in runtime.resolve("t", "a").input if g.kind == "secrets")
    secrets = [s for s in samples if s["kind"] == "secret"]
    others = [s for s in samples if s["kind"] in ("clean", "benign", "pii")]
    caught = 0
    for s in secrets:
        hits = await guard.detect(s["text"], _IN)
        g = s["spans"][0]
        caught += any(_overlap((g["start"], g["end"]), (f.start, f.end)) > 0 for f in hits)
    alarms = 0
    for s in others:
        alarms += bool(await guard.detect(s["text"], _IN))
    return {"recall": _ratio(caught, len(secrets)), "false_alarms": _ratio(alarms, len(others)),
            "secrets": len(secrets), "other_texts": len(others)}


async def _injection(samples: list[dict[str, Any]]) -> dict[str, Any]:
    runtime, _ = runtime_for("patterns", None)
    guard = next(g for g in runtime.resolve("t", "a").input if g.kind == "injection")
    attacks = [s for s in samples if s["kind"] == "injection"]
    benign = [s for s in samples if s["kind"] in ("benign", "clean")]
    detected = sum([bool(await guard.detect(s["text"], _IN)) for s in attacks])
    alarms = sum([bool(await guard.detect(s["text"], _IN)) for s in benign])
    return {"detection": _ratio(detected, len(attacks)), "false_alarms": _ratio(alarms, len(benign)),
            "attacks": len(attacks), "benign": len(benign)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="spaCy pipeline (package name or directory) for the ner engine")
    parser.add_argument("--every", type=int, default=1, help="stream every Nth sample (the stream part is slow)")
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--baseline", action="store_true", help="also measure presidio out of the box")
    parser.add_argument("--samples", default=str(SAMPLES), help="a set written by generate.py (default: the committed)")
    args = parser.parse_args()
    model = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model
    report = asyncio.run(evaluate(model, samples_path=Path(args.samples), every=args.every))
    if args.baseline and model:
        report["presidio_default"] = presidio_default(model, Path(args.samples))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
