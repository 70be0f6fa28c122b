"""Watching the policy's files: a cheap poll of their metadata, and a reload when one changes.

Every file a policy is made of is watched (its `include:`s, and the shadow policy's), and
the folder of every include glob, so that a file added to `tenants/` is noticed too.

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
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

__all__ = ["Fingerprints", "fingerprints", "watch_policy_file", "watch_policy_files"]

Fingerprints = tuple[tuple[Path, tuple[int, int, int] | None], ...]
# After a change, the files must keep their metadata this long before they are read: an editor or `cp`
# writing a policy in several steps is not caught half-way (and reported as an invalid policy).
SETTLE_S = 0.05

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
    await watch_policy_files(lambda: (path,), interval_s, on_change)


def fingerprints(paths: Sequence[Path]) -> Fingerprints | None:
    """The metadata of `paths`, to compare with a later reading; None while the root file is missing."""
    found = tuple((path, _fingerprint(path)) for path in paths)
    return None if found and found[0][1] is None else found  # the root file missing: mid-swap, wait


async def watch_policy_files(
    paths: Callable[[], Sequence[Path]], interval_s: Callable[[], float], on_change: Callable[[], Awaitable[object]],
    loaded: Callable[[], Fingerprints | None] = lambda: None,
) -> None:
    """Run until cancelled: call `on_change` after the metadata of any of `paths` (read per tick) changed.

    `loaded` gives the files' metadata as the last reload read them, whatever started it: a change that a
    reload by signal or by the admin API has already read is not read again (and an invalid file is not
    reported twice).
    """
    last = fingerprints(paths())
    while True:
        await asyncio.sleep(interval_s())
        current = fingerprints(paths())
        if current == last or current is None:
            continue
        await asyncio.sleep(SETTLE_S)
        settled = fingerprints(paths())
        if settled != current:
            continue  # still being written: look again on the next tick
        last = current
        if current == loaded():
            continue
        try:
            await on_change()
        except Exception:
            log.exception("policy reload failed")
        last = fingerprints(paths())  # the reload may have changed which files make the policy
