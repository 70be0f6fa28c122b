"""A slow, token-by-token SSE upstream for the scale row of ``bench/run.py``.

nginx cannot pace an SSE answer (it writes the canned file at once), so this is a small
server of its own, built to stay cheap at 10,000 open streams:

* one process, uvloop, raw ``asyncio.Protocol`` connections (no HTTP framework);
* ONE timer for all streams. Streams are spread over ``interval / tick`` buckets by the
  tick they arrived in; every ``tick`` ms the timer writes the next pre-encoded chunk to
  each stream of one bucket, so every stream gets one event per ``interval`` ms and the
  writes are spread evenly over the interval instead of arriving in one burst;
* every frame (HTTP chunked encoding included) is encoded once at start-up.

Any ``POST`` answers ``200 text/event-stream`` (chunked, keep-alive) with ``--chunks``
``chat.completion.chunk`` events from ``bench/canned.py``, the first one ``interval`` ms after
the request; the last event is followed at once by ``data: [DONE]`` and the end of the
body (the first ``--fast-streams`` answers are written at once, for readiness checks).
``GET /stats`` answers counters as JSON (``lag_max_ms`` is the worst lateness of the timer
since the previous ``/stats``: when it grows beyond a tick or two, this process, not the
system under test, is the bottleneck).

    python -m bench.slow_upstream --port 9000 --chunks 50 --interval-ms 100
"""

from __future__ import annotations

if __package__ in (None, ""):  # allow ``python bench/slow_upstream.py``
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import gc
import json
import resource
import signal

import uvloop

from bench import canned

HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
MAX_HEAD = 64 * 1024


def chunk_frame(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Upstream:
    """The shared timer, the buckets of open streams and the counters."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, chunks: int, interval_ms: float, tick_ms: float, fast_streams: int = 0
    ) -> None:
        events = canned.sse_events(chunks)
        self.fast_streams = fast_streams
        self.frames = [chunk_frame(e) for e in events[:-1]]
        self.frames.append(chunk_frame(events[-1]) + chunk_frame(canned.SSE_DONE) + b"0\r\n\r\n")
        self.chunks = chunks
        self.loop = loop
        self.tick_s = tick_ms / 1000
        self.slots = max(1, round(interval_ms / tick_ms))
        self.buckets: list[list[Conn]] = [[] for _ in range(self.slots)]
        self.tick_no = 0
        self.t0 = 0.0
        # counters
        self.connections = 0
        self.streams_started = 0
        self.streams_finished = 0
        self.streams_aborted = 0
        self.events_written = 0
        self.lag_max_s = 0.0
        self.ticks = 0

    def start(self) -> None:
        self.t0 = self.loop.time()
        self.loop.call_at(self.t0 + self.tick_s, self._tick)

    def add(self, conn: Conn) -> None:
        """Answer ``conn`` from the bucket of the current tick: first event one interval later.

        The first ``fast_streams`` answers are written at once (a quick readiness check).
        """
        self.streams_started += 1
        if self.streams_started <= self.fast_streams:
            conn.transport.write(HEADERS + b"".join(self.frames))
            self.streams_finished += 1
            return
        conn.transport.write(HEADERS)
        conn.step = 0
        self.buckets[self.tick_no % self.slots].append(conn)

    def _tick(self) -> None:
        loop = self.loop
        self.tick_no += 1
        due = self.t0 + self.tick_no * self.tick_s
        now = loop.time()
        lag = now - due
        self.lag_max_s = max(self.lag_max_s, lag)
        self.ticks += 1
        bucket = self.buckets[self.tick_no % self.slots]
        if bucket:
            frames = self.frames
            last = self.chunks - 1
            keep: list[Conn] = []
            pipelined: list[Conn] = []
            written = 0
            for conn in bucket:
                if conn.closed:
                    continue
                step = conn.step
                conn.transport.write(frames[step])
                if step < last:
                    conn.step = step + 1
                    written += 1
                    keep.append(conn)
                else:
                    written += 2  # the last event and [DONE]
                    conn.step = -1
                    self.streams_finished += 1
                    if conn.buf:  # a request that arrived early (pipelining)
                        pipelined.append(conn)
            self.events_written += written
            self.buckets[self.tick_no % self.slots] = keep
            for conn in pipelined:
                conn.parse()
        # Fixed schedule (no drift); when late, run again at once and let lag_max show it.
        loop.call_at(max(due + self.tick_s, now), self._tick)

    def open_streams(self) -> int:
        return sum(len(b) for b in self.buckets)

    def stats(self) -> bytes:
        body = json.dumps(
            {
                "connections": self.connections,
                "streams_open": self.open_streams(),
                "streams_started": self.streams_started,
                "streams_finished": self.streams_finished,
                "streams_aborted": self.streams_aborted,
                "events_written": self.events_written,
                "ticks": self.ticks,
                "lag_max_ms": round(self.lag_max_s * 1000, 3),
                "chunks": self.chunks,
                "interval_ms": self.slots * self.tick_s * 1000,
            }
        ).encode()
        self.lag_max_s = 0.0
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Conn(asyncio.Protocol):
    __slots__ = ("buf", "closed", "step", "transport", "up")

    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.buf = bytearray()
        self.step = -1  # -1: waiting for a request; else index of the next frame
        self.closed = False
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.up.connections -= 1
        if self.step >= 0:
            self.up.streams_aborted += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.step < 0:
            self.parse()

    def parse(self) -> None:
        """Serve every complete request in ``buf`` (a stream ends the loop until it is done)."""
        buf = self.buf
        while self.step < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self.transport.close()
                return
            head = bytes(buf[:end]).lower()
            length = 0
            pos = head.find(b"\r\ncontent-length:")
            if pos >= 0:
                eol = head.find(b"\r\n", pos + 2)
                length = int(head[pos + 17 : eol if eol >= 0 else len(head)].strip())
            if len(buf) < end + 4 + length:
                return
            del buf[: end + 4 + length]
            if head.startswith(b"get /stats"):
                self.transport.write(self.up.stats())
                continue
            self.up.add(self)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    up = Upstream(loop, args.chunks, args.interval_ms, args.tick_ms, args.fast_streams)
    server = await loop.create_server(lambda: Conn(up), args.host, args.port, backlog=8192, reuse_address=True)
    up.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"slow upstream on {args.host}:{args.port}: {args.chunks} chunks every {args.interval_ms:g} ms", flush=True)
    gc.collect()
    gc.freeze()
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=50, help="events per answer (>= 3) [%(default)s]")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="time between events [%(default)s]")
    parser.add_argument("--tick-ms", type=float, default=10.0, help="timer period; interval/tick buckets [%(default)s]")
    parser.add_argument(
        "--fast-streams", type=int, default=0, help="write the first N answers at once (readiness checks) [%(default)s]"
    )
    args = parser.parse_args()
    raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
