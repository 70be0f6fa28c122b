"""A stand-in injection classifier for tests: the pluggable interface, without a model."""

from __future__ import annotations


class KeywordClassifier:
    def score(self, text: str) -> float:
        return 0.99 if "secret recipe" in text else 0.01


def make() -> KeywordClassifier:
    return KeywordClassifier()
