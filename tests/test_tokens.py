"""Token counting: bounded start-up without network, exact counts from local encodings, per-model encodings."""

from __future__ import annotations

import logging
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
