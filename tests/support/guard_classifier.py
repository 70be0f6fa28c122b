"""A stand-in injection classifier for tests: the pluggable interface, without a model."""

from __future__ import annotations

import time


class KeywordClassifier:
    def score(self, text: str) -> float:
        return 0.99 if "secret recipe" in text else 0.01


def make() -> KeywordClassifier:
    return KeywordClassifier()


class SlowClassifier:
    """Takes a second a text (a model on a busy machine): the guard's `timeout_s` decides."""

    def score(self, text: str) -> float:
        time.sleep(1.0)
        return 0.01


def make_slow() -> SlowClassifier:
    return SlowClassifier()


def make_broken() -> KeywordClassifier:
    raise RuntimeError("the classifier's model is missing")


FAIL_NEXT = False  # set by a test: the next classifiers made by `make_toggled` fail to be made


def make_toggled() -> KeywordClassifier:
    if FAIL_NEXT:
        raise RuntimeError("the classifier's model is missing")
    return KeywordClassifier()
