"""Token counting: bounded start-up without network, exact counts from local encodings, per-model encodings."""

from __future__ import annotations

import logging
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.telemetry import tokens
from gateway.telemetry.tokens import TokenCounter, encoding_for_model
from tests.conftest import SHARED

LOCAL_ENCODINGS = SHARED / "tiktoken"


@pytest.fixture
def fresh_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the encodings this process has loaded, so that a test really loads them."""
    monkeypatch.setattr(tokens, "_attempts", {})
    monkeypatch.setattr(tokens, "_hint_given", False)


@pytest.fixture
def blackhole(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An HTTPS proxy that completes TCP handshakes and then never answers: a network that drops packets."""
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(16)  # never accepted: connections wait in the backlog, requests waits forever
        proxy = f"http://127.0.0.1:{sink.getsockname()[1]}"
        for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, proxy)
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        yield proxy
    # closing the socket resets the connections waiting in its backlog, which ends any stuck download


def _load_within(counter: TokenCounter, seconds: float) -> tuple[bool, float]:
    result: list[bool] = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: result.append(counter.load()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"load() still blocked after {seconds} s"
    return result[0], time.monotonic() - started


@pytest.mark.usefixtures("fresh_loads")
def test_without_local_encodings_and_network_load_is_bounded_and_counts_are_estimates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blackhole: str, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty
    caplog.set_level(logging.WARNING, "gateway.tokens")
    counter = TokenCounter(download_timeout_s=1.0)
    exact, took = _load_within(counter, 10)
    assert exact is False and not counter.exact
    assert 0.9 <= took < 3, took
    assert counter.count("hello world") == 3  # about four characters a token
    assert counter.count("") == 0
    assert counter.count_messages([{"role": "user", "content": "hello world"}]) == 3 + 1 + 3 + 3
    hints = [r.getMessage() for r in caplog.records if "TIKTOKEN_CACHE_DIR" in r.getMessage()]
    assert len(hints) == 1, hints
    caplog.clear()
    assert _load_within(counter, 1)[0] is False  # tried once: no second wait, no second warning
    assert not caplog.records
    assert not list(tmp_path.iterdir())


@pytest.mark.usefixtures("fresh_loads")
def test_local_encodings_give_exact_counts_without_the_network(monkeypatch: pytest.MonkeyPatch,
                                                                blackhole: str) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(LOCAL_ENCODINGS))
    counter = TokenCounter(download_timeout_s=0.5)
    exact, _ = _load_within(counter, 60)
    assert exact and counter.exact
    assert counter.count("hello world") == 2
    assert counter.count_messages([{"role": "user", "content": "hello world"}]) == 9  # 3 + user + 2 + 3
    assert counter.count_messages([{"role": "user", "name": "ann", "content": [{"type": "text", "text": "hello world"},
                                                                              {"type": "image_url"}]}]) == 9 + 1 + 1


@pytest.mark.usefixtures("fresh_loads")
def test_each_model_family_counts_with_its_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(LOCAL_ENCODINGS))
    text = "Schöne Grüße aus München"
    counter = TokenCounter()
    assert counter.load()
    assert not counter.exact_for("gpt-4")
    assert counter.count(text, "gpt-4") == counter.count(text) == 5  # not loaded: the default's count
    assert counter.load(["gpt-4", "gpt-4o"])
    assert counter.exact_for("gpt-4") and counter.exact_for("gpt-4o")
    assert counter.count(text, "gpt-4") == 7 and counter.count(text, "gpt-4o") == 5
    other = TokenCounter()
    started = time.monotonic()
    assert other.load(["gpt-3.5-turbo"]) and time.monotonic() - started < 0.5  # loaded once per process
    assert other.count(text, "gpt-3.5-turbo") == 7


@pytest.mark.usefixtures("fresh_loads")
def test_counting_never_loads() -> None:
    counter = TokenCounter()
    assert counter.count("hello world", "gpt-4") == 3
    assert counter.count_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]) > 6
    assert tokens._attempts == {}


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"), ("GPT-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"), ("o1", "o200k_base"), ("o3-mini", "o200k_base"), ("o4-mini-2025-04-16", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc", "o200k_base"), ("openai/gpt-4o", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("llama-3.1-8b", "o200k_base"), ("demo-1", "o200k_base"), ("omni", "o200k_base"),
    ],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert encoding_for_model(model) == encoding


# -- texts tiktoken cannot take whole ------------------------------------------------------------------


@pytest.fixture
def exact_counter(monkeypatch: pytest.MonkeyPatch) -> TokenCounter:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(LOCAL_ENCODINGS))
    counter = TokenCounter()
    assert counter.load(["gpt-4"])
    return counter


def test_a_million_spaces_are_counted_not_a_rust_panic(exact_counter: TokenCounter) -> None:
    # tiktoken's regex panics past 999,999 spaces in a row (pyo3_runtime.PanicException, a BaseException)
    encoding = exact_counter._encoding(None)
    assert exact_counter.count(" " * 1_000_000) == len(encoding._encode_single_piece(" " * 1_000_000)) == 7813
    assert exact_counter.count("x" + "\t" * 1_200_000 + "y", "gpt-4") > 0
    messages = [{"role": "user", "content": "a" + " \u3000" * 600_000 + "b"}]
    assert exact_counter.count_messages(messages) > 0
    # where tiktoken itself still copes, the counts are its own
    for text in ("x" + " " * 999_000 + "y", "say " + " " * 70_000 + "hi\n" + "\t" * 9_000, " " * 65_536 + "!"):
        assert exact_counter.count(text) == len(encoding.encode_ordinary(text))
        assert exact_counter.count(text, "gpt-4") == len(exact_counter._encoding("gpt-4").encode_ordinary(text))


_SPACES = [" ", "\t", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2003", "\u2028", "\u2029", "\u202f", "\u205f",
           "\u3000", "\n", "\r", "\r\n", "\x1c", "\x1f"]
_OTHERS = ["a", "B", "word", "Ünïcode", "é", "1", "123456", "!", "?!", "/", "'s", "'ll", "中文", "😀", ".", "-", "_",
           "x'S", "\u0301"]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_cutting_out_runs_of_white_space_gives_tiktokens_own_counts(
    exact_counter: TokenCounter, monkeypatch: pytest.MonkeyPatch, model: str,
) -> None:
    # every run of two or more is cut out (the gateway cuts runs of 4,096 in texts of 64 Ki characters)
    monkeypatch.setattr(tokens, "_LONG_TEXT", 0)
    monkeypatch.setattr(tokens, "_STRIDE", 1)
    monkeypatch.setattr(tokens, "_SAMPLED_RUN", re.compile(rf"[{tokens._HSPACE}]"))
    monkeypatch.setattr(tokens, "_LONG_RUN", re.compile(rf"(?<![{tokens._HSPACE}])[{tokens._HSPACE}]{{2,}}+(?![\r\n])"))
    encoding = exact_counter._encoding(model)
    rng = random.Random(7)
    for _ in range(5000):
        text = "".join("".join(rng.choice(_SPACES) for _ in range(rng.choice([1, 2, 3, 5, 9, 30])))
                       if rng.random() < 0.5 else rng.choice(_OTHERS) for _ in range(rng.randint(1, 12)))
        assert exact_counter.count(text, model) == len(encoding.encode_ordinary(text)), repr(text)


class PanicException(BaseException):
    """What a Rust panic in tiktoken raises in Python (`pyo3_runtime.PanicException`)."""


class _Panicking:
    name = "o200k_base"

    def encode_ordinary(self, text: str) -> list[int]:
        if "boom" in text:
            raise PanicException("called `Result::unwrap()` on an `Err` value")
        if "stop" in text:
            raise KeyboardInterrupt
        return [0] * len(text.split())


@pytest.mark.usefixtures("fresh_loads")
def test_a_panic_in_tiktoken_gives_that_text_an_estimate_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tokens, "_panic_logged", False, raising=False)
    caplog.set_level(logging.WARNING, "gateway.tokens")
    counter = TokenCounter()
    counter._loaded["o200k_base"] = _Panicking()
    assert counter.count("boom " * 100) == 125  # four characters a token
    assert counter.count("boom " * 20_000) == 25_000  # the long-text path too
    assert counter.count("two words") == 2
    assert counter.count_messages([{"role": "user", "content": "boom " * 100}]) == 3 + 1 + 125 + 3
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "500 characters" in logged[0] and "boom" not in logged[0], logged
    with pytest.raises(KeyboardInterrupt):  # only a panic is caught
        counter.count("stop")
    with pytest.raises(KeyboardInterrupt):
        counter.count_messages([{"role": "user", "content": "stop"}])
