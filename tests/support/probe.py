"""A probe of `/healthz` from a thread while a test does something slow: the slowest answer it waited for.

A request whose work held the event loop (a long analysis, a count) held up every other request with it: the
probe's slowest wait shows it, against how long the slow request itself took.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

__all__ = ["healthz_probe"]


@contextmanager
def healthz_probe(url: str, pause_s: float = 0.02) -> Iterator[list[float]]:
    """`GET {url}/healthz` again and again, `pause_s` apart, while the block runs; yields a list whose one item is
    the slowest answer so far (read it after the block)."""
    done = threading.Event()
    slowest = [0.0]

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert httpx.get(url + "/healthz", timeout=60).status_code == 200
            slowest[0] = max(slowest[0], time.monotonic() - started)
            time.sleep(pause_s)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        yield slowest
    finally:
        done.set()
        prober.join()
