r"""An open SSE event of many lines (legal: `data:` lines, no blank line yet), each read one line of it: the decoder
keeps the reads that end no event as they are and joins them once, when one does. It used to join everything kept
and split it again on every read with a line break: quadratic in the event's size (a 6 MB event in 1 KB lines cost
17 s of the event loop's CPU; the same bytes without line breaks, 0.03 s).

The cost is measured as a ratio, not a time: four times the event should cost about four times the CPU, where the
quadratic decoder took sixteen. Beside it, what the decoder gives for such events, whatever the line endings and
wherever the reads cut them, checked against the spec's reading of the same bytes."""

from __future__ import annotations

import random
import time

import pytest

from gateway.upstream.sse import SSEDecoder

LINE = b"data: " + b"x" * 1000  # a 1 KB line
FORMS = {  # the reads of one event: its first, then one a line, then the one that ends it
    "lf": (LINE + b"\n", LINE + b"\n", b"\n"),
    "crlf": (LINE + b"\r\n", LINE + b"\r\n", b"\r\n"),
    "cr": (LINE + b"\r", LINE + b"\r", b"\r"),
    "crlf split across reads": (LINE + b"\r", b"\n" + LINE + b"\r", b"\n\r"),
}


def _decode(reads: list[bytes]) -> tuple[list[bytes], list[int]]:
    """The payloads of `reads`, and the indexes of the reads that gave any."""
    decoder = SSEDecoder()
    payloads: list[bytes] = []
    gave: list[int] = []
    for index, read in enumerate(reads):
        got = decoder.feed(read)
        if got:
            gave.append(index)
        payloads += got
    return payloads + decoder.flush(), gave


def _cpu(reads: list[bytes]) -> float:
    """The least process CPU of feeding `reads` to a decoder, over a few runs (stopped early when a run is slow: the
    quadratic decoder took seconds)."""
    best = float("inf")
    for _ in range(5):
        decoder = SSEDecoder()
        start = time.process_time()
        for read in reads:
            decoder.feed(read)
        best = min(best, time.process_time() - start)
        if best > 0.2:
            break
    return best


@pytest.mark.parametrize("form", list(FORMS))
def test_an_event_of_many_lines_costs_cpu_in_proportion_to_its_size(form: str) -> None:
    """Timed: the reads that keep the open event, where the quadratic decoder spent its time. The read that ends it
    parses it once, in time linear in its size but not in proportion to it (a 1 MB event's lines outgrow the CPU's
    caches where a 256 KB one's do not: about 7x the time for 4x the lines, measured)."""
    first, line, last = FORMS[form]
    small, large = ([first, *[line] * (lines - 1)] for lines in (256, 1024))
    assert _decode([*small, last]) == ([b" ".join([b"x" * 1000] * 256)], [256])  # from the read that ends it
    assert _decode([*large, last]) == ([b" ".join([b"x" * 1000] * 1024)], [1024])
    ratio = _cpu(large) / max(_cpu(small), 1e-6)
    assert ratio < 8, f"4x the event cost {ratio:.1f}x the CPU (linear: ~4x; the quadratic decoder: ~16x)"


def test_an_event_of_many_lines_still_meets_the_size_cap() -> None:
    decoder = SSEDecoder()
    with pytest.raises(ValueError, match="too large"):
        for _ in range(9 * 1024):
            decoder.feed(LINE + b"\n")


def _payloads(events: list[bytes]) -> list[bytes]:
    payloads = []
    for event in events:
        data = [line[6:] if line[5:6] == b" " else line[5:] for line in event.split(b"\n") if line[:5] == b"data:"]
        if data:
            payloads.append(b" ".join(data))
    return payloads


def _dispatched(stream: bytes) -> list[bytes]:
    """The payloads of the events that bytes so far complete, as the spec reads them (a "\r" that ends them ends its
    line), with the decoder's conventions: only `data:` lines count, several joined by a space."""
    if stream[:3] == b"\xef\xbb\xbf":  # a stream's byte order mark, dropped
        stream = stream[3:]
    return _payloads(stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")[:-1])


def _long_event(ending: bytes, lines: int) -> bytes:
    return b"event: e" + ending + b"".join(b"data: %d" % n + b"y" * 200 + ending for n in range(lines))


# Events longer than the decoder joins again whole on every read with a line break, and short ones: their blank
# lines (after lines that end in "\n", "\r\n" or "\r", each form) fall anywhere in a read or across two.
STREAM = (b"\xef\xbb\xbf" + _long_event(b"\n", 40) + b"\n" + _long_event(b"\r\n", 40) + b"\r\n"
          + _long_event(b"\r", 40) + b"\r" + _long_event(b"\n", 30) + b"\r" + _long_event(b"\r\n", 30) + b"\r"
          + _long_event(b"\r", 30) + b"\r\n" + _long_event(b"\r\n", 30) + b"\n"
          + b": comment\n\ndata: a\r\rdata: b\n\r\n" + _long_event(b"\n", 30) + b"data: last")


@pytest.mark.parametrize("seed", range(20))
def test_events_of_many_lines_give_what_the_spec_reads_however_the_reads_cut_them(seed: int) -> None:
    rng = random.Random(seed)
    decoder = SSEDecoder()
    got: list[bytes] = []
    start = 0
    while start < len(STREAM):
        end = start + rng.choice((1, 2, 3, rng.randint(1, 300), rng.randint(1, 3000)))
        got += decoder.feed(STREAM[start:end])
        assert got == _dispatched(STREAM[:end])
        start = end
    assert got + decoder.flush() == _dispatched(STREAM + b"\n\n")


@pytest.mark.parametrize(("ending", "blank"), [
    (b"\n", b"\n"), (b"\n", b"\r\n"), (b"\n", b"\r"), (b"\r\n", b"\r\n"), (b"\r\n", b"\n"), (b"\r\n", b"\r"),
    (b"\r", b"\r"), (b"\r", b"\r\n"),
])
def test_the_read_that_ends_a_long_event_gives_it(ending: bytes, blank: bytes) -> None:
    """A long event in 500-byte reads, its last bytes cut every way across two reads: the read that completes its
    blank line gives it (not a later one, nor an earlier one)."""
    stream = _long_event(ending, 40) + blank
    for cut in range(len(stream) - 5, len(stream)):
        decoder = SSEDecoder()
        got: list[bytes] = []
        for start in range(0, cut, 500):
            got += decoder.feed(stream[start:min(start + 500, cut)])
        assert got == _dispatched(stream[:cut]), cut
        got += decoder.feed(stream[cut:])
        assert got == _dispatched(stream) and len(got) == 1, cut
