"""Watching the policy file: a cheap poll of its metadata, and a reload when it changes.

Polling (one `stat` every `server.watch_interval_s`) rather than inotify: it works
the same on every filesystem, in containers and for Kubernetes ConfigMaps (which
swap a symlink rather than write the file), and costs nothing measurable. A change
of metadata only triggers a reload; the reload itself compares the content's hash
with the policy being served, so a touch without a change is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

__all__ = ["watch_policy_file"]

log = logging.getLogger("gateway.reload")


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap's swap shows as a new inode
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def watch_policy_file(
    path: Path, interval_s: Callable[[], float], on_change: Callable[[], Awaitable[object]],
) -> None:
    """Run until cancelled: call `on_change` after the file's metadata changed."""
    last = _fingerprint(path)
    while True:
        await asyncio.sleep(interval_s())
        current = _fingerprint(path)
        if current != last and current is not None:
            last = current
            try:
                await on_change()
            except Exception:
                log.exception("policy reload failed")
