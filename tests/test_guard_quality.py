"""Floors on the guards' measured quality (evals/guards): real presidio and the shared spaCy pipeline.

The full report (every chunk size, every sample) is `python -m evals.guards.evaluate`; here the
whole texts are all measured and the streamed part on every 10th sample at chunk sizes 1, 4 and 7.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from evals.guards.evaluate import TYPES, evaluate
from tests.conftest import SHARED

MODEL = str(SHARED / "models" / "en_ner_sm_port-1.0.0")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return asyncio.run(evaluate(MODEL, stream_sizes=(1, 4, 7), every=10))


def test_the_set_is_large_and_varied(report: dict[str, Any]) -> None:
    assert report["samples"] >= 1000
    assert report["by_kind"]["clean"] >= 300


def test_ner_engine_floors(report: dict[str, Any]) -> None:
    ner = report["ner"]
    assert ner["recall"] >= 0.95 and ner["precision"] >= 0.90
    for entity in TYPES:
        assert ner["per_type"][entity]["recall"] >= 0.85, entity
    assert ner["clean_changed"] <= 0.05


def test_streamed_output_floors(report: dict[str, Any]) -> None:
    stream = report["ner"]["stream"]
    assert stream["recall"] >= 0.95
    assert all(recall >= 0.85 for recall in stream["recall_per_type"].values()), stream["recall_per_type"]
    assert stream["clean_changed"] <= 0.05
    assert report["patterns"]["stream"]["same_as_whole"] >= 0.99  # patterns: chunking changes nothing


def test_patterns_engine_changes_few_clean_texts(report: dict[str, Any]) -> None:
    patterns = report["patterns"]
    assert patterns["precision"] >= 0.95 and patterns["clean_changed"] <= 0.05
    for entity in TYPES:
        if entity != "PERSON":  # names need the ner engine
            assert patterns["per_type"][entity]["recall"] >= 0.85, entity


def test_secrets_and_injection_floors(report: dict[str, Any]) -> None:
    assert report["secrets"]["recall"] >= 0.95 and report["secrets"]["false_alarms"] <= 0.05
    assert report["injection"]["detection"] >= 0.90 and report["injection"]["false_alarms"] <= 0.05
