"""Readiness on shutdown: flip `/readyz` to 503 as soon as SIGTERM arrives.

uvicorn drains on SIGTERM but tells the app only after the drain (lifespan
shutdown). Chaining its handler lets the gateway report "draining" at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["install_drain_signal"]


def install_drain_signal(mark_draining: Callable[[], None]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signals belong to the main thread (e.g. a test server in a thread)
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            mark_draining()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)
