"""Load generator for the scale row of ``bench/run.py``: hold N streaming requests open.

Opens ``--streams`` keep-alive connections (at most ``--ramp-rate`` new ones a second), sends
one streaming chat request on each and, whenever an answer ends, the next request on the
same connection, so N streams stay open all the time. Every connection is a raw
``asyncio.Protocol`` on uvloop with a hand-written HTTP/1.1 response parser (chunked,
Content-Length or until close) that counts SSE events (``data:`` fields, ``[DONE]``
included) without decoding them; one process carries 10,000 streams.

Phases: ramp (optionally until every stream has had its first event), then ``--settle``
seconds, then a ``--duration`` s steady window. Each snapshot also carries the CPU time of
the ``--watch-pids`` processes and the busy time of the ``--watch-cores`` cores, read at the
same instant as the event counter, so the caller's CPU and event figures cover exactly the
same window. It prints
one JSON object per line on stdout: ``{"phase": "ramp_done", ...}``,
``{"phase": "steady_start", ...}`` and ``{"phase": "steady_end", ...}`` with cumulative
counters (the caller takes differences and reads the gateway's /proc files at the same
moments), then ``{"phase": "done"}``. Latency figures in ``steady_end`` cover the streams
that ended inside the window: ``ttfe`` = request sent to first event, ``stream`` = request
sent to end of answer.

    python -m bench.streamload --port 8000 --streams 1000 --duration 10
"""

from __future__ import annotations

if __package__ in (None, ""):  # allow ``python bench/streamload.py``
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import gc
import json
import math
import os
import resource
import sys
import time

import uvloop

from bench import canned
from bench.harness import core_busy_seconds, process_cpu_seconds

IDLE, HEAD, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, CHUNK_END, LENGTH, UNTIL_CLOSE = range(8)
MARK = b"data:"
MAX_HEAD = 64 * 1024


class Gen:
    """Counters, the request bytes and the connection bookkeeping shared by all clients."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        body = args.body.encode()
        self.request = (
            f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {args.key}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.expect = {int(n) for n in args.expect_events.split(",") if n.strip()}
        self.stopping = False
        self.recording = False
        self.clients: set[Client] = set()
        # counters (cumulative)
        self.events = 0
        self.started = 0
        self.ok = 0
        self.bad_status = 0
        self.short = 0
        self.aborted = 0
        self.aborted_waiting = 0  # of which before the response head arrived
        self.connect_errors = 0
        self.inflight = 0
        self.flowing = 0  # in-flight answers that have delivered at least one event
        self.connecting = 0
        self.ttfe: list[float] = []
        self.durations: list[float] = []

    def connect(self, delay: float = 0.0) -> None:
        self.connecting += 1
        self.loop.create_task(self._connect(delay))

    async def _connect(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        try:
            if not self.stopping:
                await self.loop.create_connection(lambda: Client(self), self.args.host, self.args.port)
        except OSError:
            self.connect_errors += 1
            if not self.stopping:
                self.connect(0.2)
        finally:
            self.connecting -= 1

    def snapshot(self, phase: str, **extra: object) -> dict[str, object]:
        """Counters, plus the CPU time of the watched processes and cores read at this moment."""
        args = self.args
        return {
            "phase": phase,
            "t": time.monotonic(),
            "cpu": {str(pid): process_cpu_seconds(pid) for pid in args.watch_pids},
            "cores": {cpu: core_busy_seconds(cpu) for cpu in args.watch_cores},
            "self_cpu": sum(os.times()[:2]),
            "events": self.events,
            "started": self.started,
            "ok": self.ok,
            "bad_status": self.bad_status,
            "short": self.short,
            "aborted": self.aborted,
            "aborted_waiting": self.aborted_waiting,
            "connect_errors": self.connect_errors,
            "inflight": self.inflight,
            "flowing": self.flowing,
            "connections": len(self.clients),
            **extra,
        }


class Client(asyncio.Protocol):
    __slots__ = (
        "buf",
        "events",
        "first",
        "gen",
        "left",
        "state",
        "status",
        "t0",
        "tail",
        "transport",
    )

    def __init__(self, gen: Gen) -> None:
        self.gen = gen
        self.state = IDLE
        self.buf = b""
        self.tail = b""
        self.left = 0
        self.events = 0
        self.status = 0
        self.t0 = 0.0
        self.first = 0.0
        self.transport: asyncio.Transport

    # -- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gen.clients.add(self)
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        gen = self.gen
        gen.clients.discard(self)
        if self.state == UNTIL_CLOSE:
            self.finish(closing=True)
        elif self.state != IDLE:
            gen.inflight -= 1
            if self.events:
                gen.flowing -= 1
            if not gen.stopping:
                gen.aborted += 1
                if self.state == HEAD:
                    gen.aborted_waiting += 1
        self.state = IDLE
        if not gen.stopping:
            gen.connect(0.1)

    def send(self) -> None:
        gen = self.gen
        self.state = HEAD
        self.buf = b""
        self.tail = b""
        self.events = 0
        self.t0 = time.perf_counter()
        self.first = 0.0
        gen.inflight += 1
        gen.started += 1
        self.transport.write(gen.request)

    # -- parsing -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == HEAD:
            if self.buf:
                data = self.buf + data
                self.buf = b""
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    self.transport.close()
                self.buf = data
                return
            head = data[:end].lower()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.status = 0
            data = data[end + 4 :]
            if b"\r\ntransfer-encoding: chunked" in head:
                self.state = CHUNK_SIZE
            else:
                pos = head.find(b"\r\ncontent-length:")
                if pos >= 0:
                    eol = head.find(b"\r\n", pos + 2)
                    self.left = int(head[pos + 17 : eol if eol >= 0 else len(head)].strip())
                    self.state = LENGTH
                    if self.left == 0:
                        self.finish()
                        return
                else:
                    self.state = UNTIL_CLOSE
            if not data:
                return
        state = self.state
        if state in (CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, CHUNK_END):
            self.chunked(data)
        elif state == LENGTH:
            take = data[: self.left]
            self.payload(take)
            self.left -= len(take)
            if self.left == 0:
                self.finish()
        elif state == UNTIL_CLOSE:
            self.payload(data)
        # IDLE: unexpected bytes between answers are ignored

    def chunked(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos = 0
        n = len(buf)
        while pos < n:
            state = self.state
            if state == CHUNK_DATA:
                end = pos + self.left
                if end > n:
                    self.payload(buf[pos:])
                    self.left = end - n
                    return
                self.payload(buf[pos:end])
                pos = end
                self.left = 2
                self.state = CHUNK_CRLF
            elif state == CHUNK_CRLF or state == CHUNK_END:
                take = min(self.left, n - pos)
                pos += take
                self.left -= take
                if self.left:
                    return
                if state == CHUNK_END:
                    self.finish()  # bytes after the answer (none expected) are dropped
                    return
                self.state = CHUNK_SIZE
            else:  # CHUNK_SIZE
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    self.buf = buf[pos:]
                    return
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size:
                    self.left = size
                    self.state = CHUNK_DATA
                else:  # last chunk; no trailers expected, just the final CRLF
                    self.left = 2
                    self.state = CHUNK_END

    def payload(self, data: bytes) -> None:
        text = self.tail + data if self.tail else data
        found = text.count(MARK)
        if found:
            if not self.events:
                self.first = time.perf_counter()
                self.gen.flowing += 1
            self.events += found
            self.gen.events += found
        self.tail = text[-4:]  # a "data:" split across reads is counted once, in the next read

    def finish(self, closing: bool = False) -> None:
        gen = self.gen
        gen.inflight -= 1
        if self.events:
            gen.flowing -= 1
        now = time.perf_counter()
        if self.status != 200:
            gen.bad_status += 1
        elif gen.expect and self.events not in gen.expect:
            gen.short += 1
        else:
            gen.ok += 1
        if gen.recording:
            gen.durations.append(now - self.t0)
            if self.first:
                gen.ttfe.append(self.first - self.t0)
        self.state = IDLE
        if closing:
            return
        if gen.stopping:
            self.transport.close()
        else:
            self.send()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> None:
    gen = Gen(args)
    n = args.streams
    ramp_s = max(0.0, n / args.ramp_rate if args.ramp_rate > 0 else 0.0, args.min_ramp)
    gc.collect()
    gc.freeze()
    start = time.monotonic()
    launched = 0
    while launched < n:
        due = n if ramp_s == 0 else min(n, math.ceil(n * (time.monotonic() - start) / ramp_s))
        while launched < due:
            gen.connect()
            launched += 1
        await asyncio.sleep(0.01)
    # wait until every connection is up (and, with --wait-flowing, every answer delivers events)
    deadline = time.monotonic() + args.wait_timeout
    while (len(gen.clients) < n or (args.wait_flowing and gen.flowing < n)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    emit(gen.snapshot("ramp_done", ramp_s=round(time.monotonic() - start, 3)))
    await asyncio.sleep(args.settle)
    gen.recording = True
    emit(gen.snapshot("steady_start"))
    await asyncio.sleep(args.duration)
    gen.recording = False
    end = gen.snapshot("steady_end")
    end["window_streams"] = len(gen.durations)
    for name, values in (("ttfe", gen.ttfe), ("stream", gen.durations)):
        for q in (50, 99):
            v = percentile(values, q)
            end[f"{name}_p{q}_ms"] = None if v is None else round(v * 1000, 2)
        v = max(values) if values else None
        end[f"{name}_max_ms"] = None if v is None else round(v * 1000, 2)
    emit(end)
    gen.stopping = True
    for client in list(gen.clients):
        client.transport.close()
    await asyncio.sleep(0.2)
    emit({"phase": "done"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--key", default="sk-bench")
    parser.add_argument("--body", default=canned.request_body(stream=True).decode())
    parser.add_argument("--streams", type=int, required=True, help="streams to keep open")
    parser.add_argument("--ramp-rate", type=float, default=1000.0, help="new connections per second [%(default)s]")
    parser.add_argument("--min-ramp", type=float, default=0.0, help="spread the ramp over at least this long (s)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between ramp and window [%(default)s]")
    parser.add_argument("--duration", type=float, default=10.0, help="steady window, seconds [%(default)s]")
    parser.add_argument(
        "--expect-events",
        default="",
        help="comma list of acceptable event counts per answer ([DONE] included); others count as short",
    )
    parser.add_argument(
        "--wait-flowing",
        action="store_true",
        help="after the ramp, wait until every stream has had its first event (long answers only)",
    )
    parser.add_argument("--wait-timeout", type=float, default=60.0, help="limit for those waits, s [%(default)s]")
    parser.add_argument("--watch-pids", default="", help="comma list of pids whose CPU time each snapshot reads")
    parser.add_argument("--watch-cores", default="", help="comma list of cores whose busy time each snapshot reads")
    args = parser.parse_args()
    args.watch_pids = [int(p) for p in args.watch_pids.split(",") if p.strip()]
    args.watch_cores = [c.strip() for c in args.watch_cores.split(",") if c.strip()]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.streams + 64 > hard:
        print(f"RLIMIT_NOFILE {hard} is too low for {args.streams} streams", file=sys.stderr)
        sys.exit(2)
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
