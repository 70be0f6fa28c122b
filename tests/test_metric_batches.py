"""A finished request's series written in batches (`gateway/telemetry/batches.py`): the same samples as writing
each request's values at once, in a single-process registry and in a multiprocess one; and when batches are
written: full (64), after the timer, before an exposition, at shutdown and at exit."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import batches
from gateway.telemetry import metrics as metrics_module
from gateway.telemetry.batches import BATCH, BatchedSeries, _LoopBatchedSeries
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.series import RequestSeries

REPO = Path(__file__).resolve().parents[1]
# Label values of finished requests: answered, refused before the upstream, failed upstream, another endpoint.
_NAMES = (("chat", "a", 200, "p", "t", "ten", "k", None),
          ("chat", "a", 429, None, "t", "ten", "k", "rate_limited"),
          ("chat", "b", 502, "p", "t2", "ten", "k", "upstream_error"),
          ("embeddings", "e", 200, "p", "t", "x", "y", None))


def _requests(count: int, seed: int, dyadic: bool = False, narrow: bool = False) -> list[tuple[int, tuple[Any, ...]]]:
    """(which of `_NAMES`, `record`'s arguments) of `count` requests: complete answers and streams, with and
    without tokens, a stream of one token or none, totals below and above the upstream's time. `dyadic`: every
    time a multiple of 1/1024, and every stream's tokens after the first a power of 2 (sums of times, and of
    times per token, then are exact in any order). `narrow`: as a steady load has them, each kind of value within
    one bucket of its histogram (the time per token and the overhead aside), totals above the upstream's time
    and the first chunk's."""
    pick = random.Random(seed)
    if narrow:
        made = []
        for _ in range(count):
            total = pick.uniform(0.26, 0.5)
            arguments = (total, pick.uniform(0.26, total), pick.choice((None, pick.uniform(0.11, 0.2))),
                         pick.randrange(5, 16), pick.randrange(17, 64))
            made.append((pick.randrange(len(_NAMES)), arguments))
        return made

    def seconds(high: float) -> float:
        return round(pick.uniform(0, high) * 1024) / 1024 if dyadic else pick.choice((0.0, pick.uniform(0, high)))

    made = []
    for _ in range(count):
        total, upstream = seconds(30), seconds(30)
        first = None if pick.random() < 0.5 else seconds(5)
        prompt = pick.choice((0, 1, 7, pick.randrange(1, 200_000)))
        completion = pick.choice((0, 1, 2, 1 + 2 ** pick.randrange(13) if dyadic else pick.randrange(1, 5000)))
        made.append((pick.randrange(len(_NAMES)), (total, upstream, first, prompt, completion)))
    return made


def _samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(exposition.decode()) for s in family.samples
            if not s.name.endswith("_created")}


def _one_by_one(metrics: Metrics, names: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch) -> RequestSeries:
    """`metrics`' series for `names` made of the library's own children (`observe`, `inc`, each request's values
    written at once): what the batches must add up to."""
    with monkeypatch.context() as patched:
        patched.setattr(metrics_module, "loop_child", lambda child: child)
        series = metrics.series(*names)
    assert type(series) is RequestSeries
    return series


async def _written(requests: list[tuple[int, tuple[Any, ...]]], metrics: Metrics, monkeypatch: pytest.MonkeyPatch,
                   batched: bool, names: tuple[tuple[Any, ...], ...] = _NAMES) -> dict[Any, float]:
    """The samples of `metrics` once every request is recorded on this running loop: in batches, or one by one
    (`_one_by_one`)."""
    if batched:
        several = [metrics.series(*labels) for labels in names]
        kind = BatchedSeries if metrics.multiprocess else _LoopBatchedSeries  # (lock-free: one process)
        assert all(type(series) is kind for series in several)
    else:
        several = [_one_by_one(metrics, labels, monkeypatch) for labels in names]
    for which, arguments in requests:
        several[which].record(*arguments)
    assert any(getattr(series, "batch", None) for series in several) == batched  # some wait (timer, `render`)
    return _samples(metrics.render())


def _same(written: dict[Any, float], expected: dict[Any, float], exact_sums: bool) -> None:
    """The same samples; sums (`_sum`) to 1e-12 unless `exact_sums`: a child that several label combinations
    share (`gateway_overhead_seconds` by endpoint only...) is added to batch by batch, not request by request."""
    assert written.keys() == expected.keys() and len(written) > 100
    for key, value in expected.items():
        if exact_sums or not key[0].endswith("_sum"):
            assert written[key] == value, key
        else:
            assert written[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


async def test_batches_write_what_each_request_writes_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lock-free children (one process): the same bucket counts, counters and sums, over a few full batches
    and some waiting ones. The sums to the last bit where one label combination writes a child (added in order,
    value by value); where several share one, the same up to their order of addition."""
    for names, narrow in ((_NAMES, False), (_NAMES[:1], False), (_NAMES[:1], True)):
        batched = Metrics()
        assert not batched.multiprocess
        requests = [(which % len(names), arguments) for which, arguments in _requests(1000, seed=1, narrow=narrow)]
        expected = await _written(requests, Metrics(), monkeypatch, False, names)
        exact = len(names) == 1 and sys.version_info < (3, 12)  # (from 3.12, `sum` compensates its rounding)
        _same(await _written(requests, batched, monkeypatch, True, names), expected, exact_sums=exact)
        assert expected[("gateway_requests_total", (("endpoint", "chat"), ("model", "a"), ("status", "200")))] > BATCH


@contextmanager
def _multiprocess(monkeypatch: pytest.MonkeyPatch, process: str) -> Iterator[Metrics]:
    """A `Metrics` in multiprocess mode in a folder of its own (removed after), its values in mmap'd files as
    one worker `process` of `gateway serve --workers N` writes them."""
    with tempfile.TemporaryDirectory(prefix="gateway-test-metrics-") as folder, monkeypatch.context() as patched:
        patched.setenv("PROMETHEUS_MULTIPROC_DIR", folder)
        patched.setattr(values, "ValueClass", values.MultiProcessValue(lambda: process))
        metrics = Metrics()
        assert metrics.multiprocess
        yield metrics
        assert list(Path(folder).glob("*.db"))  # the values went to the files


async def test_batches_write_what_each_request_writes_multiprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's locked, mmap'd values (multiprocess mode): written through their own `inc`, the same
    counts; sums the same up to their order of addition (exact here, for times that are multiples of 1/1024;
    to 1e-12 otherwise)."""
    for dyadic in (True, False):
        requests = _requests(700, seed=2, dyadic=dyadic)
        with _multiprocess(monkeypatch, "plain") as one_by_one:
            expected = await _written(requests, one_by_one, monkeypatch, False)
        with _multiprocess(monkeypatch, "batched") as batched:
            series = batched.series(*_NAMES[0])
            assert type(series) is BatchedSeries and type(series.duration).__name__ == "_Observe"  # locked: `inc`
            assert type(series.requests).__name__ == "_Increment"
            _same(await _written(requests, batched, monkeypatch, True), expected, exact_sums=dyadic)


def _requests_total(metrics: Metrics) -> float:
    """`gateway_requests_total` of `_NAMES[0]` as the registry holds it now (not `render`: no batch written)."""
    return sum(s.value for m in metrics.registry.collect() for s in m.samples
               if s.name == "gateway_requests_total" and s.labels["status"] == "200" and s.labels["model"] == "a")


async def test_a_full_batch_is_written_by_the_request_that_fills_it() -> None:
    metrics = Metrics()
    series = metrics.series(*_NAMES[0])
    for _ in range(BATCH - 1):
        series.record(0.5, 0.4, None, 10, 20)
    assert _requests_total(metrics) == 0 and len(series.batch) == BATCH - 1
    series.record(0.5, 0.4, None, 10, 20)
    assert _requests_total(metrics) == BATCH and not series.batch
    series.record(0.5, 0.4, None, 10, 20)  # a new batch, written by the timer already due
    await asyncio.sleep(batches.APPLY_AFTER_S * 2)
    assert _requests_total(metrics) == BATCH + 1 and not series.batch


async def test_a_waiting_batch_is_written_after_the_delay_on_the_running_loop() -> None:
    """One timer for every series of a `Metrics`: started by the first waiting request, written when it fires;
    nothing is written earlier."""
    metrics = Metrics()
    first, second = metrics.series(*_NAMES[0]), metrics.series(*_NAMES[1])
    first.record(0.5, 0.4, None, 10, 20)
    await asyncio.sleep(batches.APPLY_AFTER_S / 4)
    first.record(0.5, 0.4, None, 10, 20)
    second.record(0.1, 0.0, None, 0, 0)
    assert _requests_total(metrics) == 0 and len(first.batch) == 2
    await asyncio.sleep(batches.APPLY_AFTER_S)
    assert _requests_total(metrics) == 2 and not first.batch and not second.batch
    assert not metrics._batches.waiting


def test_a_timer_left_on_an_ended_loop_does_not_hold_the_next_batches() -> None:
    """The loop ends before its timer fires: on the next loop, the first request of another series starts a
    timer there, which writes every waiting batch (a series alone gets one once its batch is full, as the
    access log's lines do); no loop at all: at once."""
    metrics = Metrics()
    series, other = metrics.series(*_NAMES[0]), metrics.series(*_NAMES[1])

    async def one() -> None:
        series.record(0.5, 0.4, None, 10, 20)

    asyncio.run(one())
    assert len(series.batch) == 1

    async def another() -> None:
        series.record(0.5, 0.4, None, 10, 20)
        other.record(0.5, 0.4, None, 10, 20)
        await asyncio.sleep(batches.APPLY_AFTER_S * 2)

    asyncio.run(another())
    assert _requests_total(metrics) == 2 and not series.batch and not other.batch

    async def alone() -> None:
        series.record(0.5, 0.4, None, 10, 20)

    asyncio.run(alone())

    async def refilled() -> None:
        for _ in range(BATCH):
            series.record(0.5, 0.4, None, 10, 20)
        await asyncio.sleep(batches.APPLY_AFTER_S * 2)

    asyncio.run(refilled())
    assert _requests_total(metrics) == 3 + BATCH and not series.batch
    series.record(0.5, 0.4, None, 10, 20)  # no loop running: at once
    assert _requests_total(metrics) == 4 + BATCH and not series.batch


async def test_render_writes_every_waiting_batch_first() -> None:
    metrics = Metrics()
    for names in _NAMES:
        metrics.series(*names).record(0.5, 0.4, 0.1, 10, 20)
    assert len(metrics._batches.waiting) == len(_NAMES) and _requests_total(metrics) == 0
    text = metrics.render().decode()
    assert 'gateway_requests_total{endpoint="chat",model="a",status="200"} 1.0' in text
    assert 'gateway_gen_ai_server_time_per_output_token_seconds_count{model="a",target="t"} 2.0' in text
    assert not metrics._batches.waiting and not any(metrics.series(*names).batch for names in _NAMES)


async def test_flush_and_the_exit_hook_write_what_waits() -> None:
    """`Metrics.flush` (at shutdown) and the exit hook (every `Metrics` of the process) leave nothing waiting;
    a call from a thread other than the recording loop's, while that thread lives, leaves the batches to it."""
    flushed, at_exit = Metrics(), Metrics()
    for metrics in (flushed, at_exit):
        metrics.series(*_NAMES[0]).record(0.5, 0.4, None, 10, 20)
    flushed.flush()
    assert _requests_total(flushed) == 1
    elsewhere = threading.Thread(target=batches._apply_all)
    elsewhere.start()
    elsewhere.join()
    assert _requests_total(at_exit) == 0  # this thread (the loop's) lives: not written from another one
    at_exit._batches._owner = -2  # as if the loop's thread had ended
    elsewhere = threading.Thread(target=batches._apply_all)
    elsewhere.start()
    elsewhere.join()
    assert _requests_total(at_exit) == 1 and not at_exit._batches.waiting


def test_a_worker_that_exits_leaves_its_waiting_requests_in_the_multiprocess_files(tmp_path: Path) -> None:
    """A process that records on a loop and exits at once, its timer not yet fired (a worker stopped
    gracefully): the exit hook writes the batch, and another process's collector reads it."""
    script = textwrap.dedent("""\
        import asyncio
        from gateway.telemetry.metrics import Metrics

        async def main():
            series = Metrics().series("chat", "a", 200, "p", "t", "ten", "k", None)
            for _ in range(3):
                series.record(0.5, 0.4, None, 10, 20)
            assert len(series.batch) == 3

        asyncio.run(main())
        """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True, timeout=60)
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    totals = [s.value for m in registry.collect() for s in m.samples if s.name == "gateway_requests_total"]
    usage = [s.value for m in registry.collect() for s in m.samples
             if s.name == "gateway_gen_ai_client_token_usage_sum"]
    assert totals == [3.0] and sorted(usage) == [30.0, 60.0]


@pytest.mark.parametrize("loop", [False, True])
def test_a_histograms_batch_counts_what_observe_counts_at_the_bounds(loop: bool) -> None:
    """`add` (sorted amounts, a bisection per bucket reached) against the library's `observe`, amounts on the
    bounds, between them, below the first and past the last included, in one bucket or many, ints too."""
    from prometheus_client import CollectorRegistry, Histogram

    from gateway.telemetry.series import _LoopObserve, _Observe, fast_child, loop_child

    batches_of = ([0.001], [0.001, 0.001, 0.0005, 0.0], [0.01, 0.1, 1.0, 10.0, float("inf")], [-1.0, 0.05, 11.0, 1e9],
                  [5, 1, 10, 10, 3], [0.011, 0.099, 0.012], [0.5, 2.0, 0.002, 0.5, 7.5, 0.0101, 1e-9])

    def samples(batched: bool) -> list[Any]:
        registry = CollectorRegistry()
        histogram = Histogram("h_seconds", "h", ("a",), buckets=(0.001, 0.01, 0.1, 1.0, 10.0), registry=registry)
        child = (loop_child if loop else fast_child)(histogram.labels("x"))
        assert type(child) is (_LoopObserve if loop else _Observe)
        for amounts in batches_of:
            if batched:
                child.add(amounts)
            else:
                for amount in amounts:
                    histogram.labels("x").observe(amount)
        return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples
                if not s.name.endswith("_created")]

    assert samples(True) == samples(False)


@pytest.mark.parametrize("multiprocess", [False, True])
async def test_a_few_requests_are_written_one_by_one_the_same(multiprocess: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches smaller than `FEW` (a quiet series) are written request by request (lock-free: in line), and
    from `FEW` on as batches: the same samples either way, at every size around it."""
    for count in range(1, 9):
        requests = _requests(count * len(_NAMES), seed=count)
        requests = [(n % len(_NAMES), arguments) for n, (_, arguments) in enumerate(requests)]  # `count` each
        if multiprocess:
            with _multiprocess(monkeypatch, "plain") as one_by_one:
                expected = await _written(requests, one_by_one, monkeypatch, False)
            with _multiprocess(monkeypatch, "batched") as batched:
                written = await _written(requests, batched, monkeypatch, True)
        else:
            expected = await _written(requests, Metrics(), monkeypatch, False)
            written = await _written(requests, Metrics(), monkeypatch, True)
        _same(written, expected, exact_sums=False)  # (children shared by label combinations: see `_same`)
