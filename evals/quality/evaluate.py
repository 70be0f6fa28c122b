"""Measure the refusal heuristic (`gateway.telemetry.refusals`) on the labelled set beside this file.

    .venv/bin/python -m evals.quality.evaluate [--json out.json]

`refusals.jsonl`: one answer per line with its label, written by hand: 50 refusals in many phrasings
(apologies, "as an AI", policy mentions, polite deflections) and 50 answers that are not refusals but
share their words ("I can't stress enough", "Sorry for the confusion", "I'm unable to reproduce ... here's
the fix", quoted refusals). `refusals-heldout.jsonl` (30) was written before the patterns were tuned;
`refusals-review.jsonl` (15) holds the false positives a review found and refusals in the same words. Prints
precision, recall and the misclassified texts (of the main set, or of the file given with `--set`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gateway.telemetry.refusals import looks_like_refusal

SAMPLES = Path(__file__).with_name("refusals.jsonl")


def evaluate(path: Path = SAMPLES) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tp = fp = fn = tn = 0
    false_positives: list[str] = []
    false_negatives: list[str] = []
    for row in rows:
        said = looks_like_refusal(row["text"])
        if said and row["refusal"]:
            tp += 1
        elif said:
            fp += 1
            false_positives.append(row["text"])
        elif row["refusal"]:
            fn += 1
            false_negatives.append(row["text"])
        else:
            tn += 1
    return {
        "samples": len(rows), "refusals": tp + fn, "precision": round(tp / max(1, tp + fp), 3),
        "recall": round(tp / max(1, tp + fn), 3), "false_positives": false_positives,
        "false_negatives": false_negatives,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--set", type=Path, default=SAMPLES, help="a labelled set (default: refusals.jsonl)")
    args = parser.parse_args()
    result = evaluate(args.set)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
