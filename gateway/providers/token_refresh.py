"""An Entra ID token kept fresh from a file another process rewrites, off the request path.

Entra access tokens expire within about an hour. A sidecar, a Vault agent or a mounted volume
(CSI secrets, a Kubernetes projected volume) writes each new one to a file; the provider's
`TokenFileRefresher` reads that file when the provider starts and, in a task of its own, checks
its metadata every `azure.entra_token_refresh_s` (`policy.token_file`: inode, mtime and size of
the path, symlinks followed) and reads it again only when it changed. All file I/O runs in a worker
thread (`asyncio.to_thread`); a request never touches the file: the provider puts each new token
where its requests already read their headers (`AzureProvider._use_token`), once the pattern that
removes it from an upstream's errors is built, in a worker thread too (`prepare`).

A file that goes missing, empty or unreadable does not stop the gateway: the last good token is
kept (it may still be valid), a warning is logged once per change of the file's state (never the
token), and the file is checked again on every tick until it holds a token again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..policy.token_file import Fingerprint, TokenRead, fingerprint_of, read_token_file

__all__ = ["TokenFileRefresher"]

log = logging.getLogger("gateway.providers.token_refresh")


class TokenFileRefresher:
    """The current token of one provider's token file, re-read in the background when the file changes.

    `on_token` is called on the event loop with every new token, the first one included; before it, `prepare`
    (if any) in a worker thread with what `secrets` will then be.
    """

    def __init__(self, provider: str, path: str, interval_s: float, on_token: Callable[[str], None],
                 prepare: Callable[[tuple[str, ...]], None] | None = None) -> None:
        self.provider = provider
        self.path = path
        self.interval_s = interval_s
        self._on_token = on_token
        self._prepare = prepare
        self._token: str | None = None
        self._previous: str | None = None  # the token the current one replaced
        self._seen: Fingerprint | None = None  # the file's metadata when its token was last taken
        self._problem: str | None = None  # what is wrong with the file now (None: it holds a token)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def secrets(self) -> tuple[str, ...]:
        """The current token and the one it replaced: an upstream answering a request sent just before a
        rotation may echo the older one in its error, which must be scrubbed all the same."""
        return tuple(token for token in (self._token, self._previous) if token is not None)

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The background check while it runs (None before `start` and after `aclose`)."""
        return self._task

    async def start(self) -> None:
        """Read the file, then keep checking it in a task of its own until `aclose`."""
        if self._task is not None or self._closed:
            return
        read = await asyncio.to_thread(read_token_file, self.path)
        if not self._closed:
            await self._prepare_for(read)
        if self._closed:  # closed while the file was read: no token for a closed provider, no task to outlive it
            return
        self._take(read)
        self._task = asyncio.create_task(self._watch(), name=f"token-file:{self.provider}")

    async def aclose(self) -> None:
        """Stop checking for good; returns once the task has ended (a read in its worker thread, if one
        is under way, finishes there, unused)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            unchanged = self._seen if self._problem is None else None  # a file with a problem is read every tick
            try:
                read = await asyncio.to_thread(_read_if_changed, self.path, unchanged)
                if read is not None:
                    await self._prepare_for(read)
                    self._take(read)
            except Exception:  # not expected (problems are reported, not raised): the checks go on
                log.exception("provider %s: checking the token file %s failed", self.provider, self.path)

    async def _prepare_for(self, read: TokenRead) -> None:
        """`prepare` what `secrets` will be once `read`'s token is taken, if it is a new one."""
        if self._prepare is not None and read.token is not None and read.token != self._token:
            await asyncio.to_thread(self._prepare, (read.token, *(() if self._token is None else (self._token,))))

    def _take(self, read: TokenRead) -> None:
        """Use a new token; or keep the last one, and say so once, when the file stops holding one."""
        if read.token is None:
            if read.problem != self._problem:
                kept = "the last token is kept" if self._token is not None else "no token is sent until it holds one"
                log.warning("provider %s: the token file %s %s; %s, and the file is checked every %g s",
                            self.provider, self.path, read.problem, kept, self.interval_s)
                self._problem = read.problem
            return
        if self._problem is not None:
            log.info("provider %s: the token file %s now holds a token", self.provider, self.path)
        self._problem = None
        self._seen = read.fingerprint
        if read.token == self._token:
            return  # rewritten with the same token
        if self._token is not None:
            log.info("provider %s: took a new token from %s", self.provider, self.path)
        self._previous, self._token = self._token, read.token
        self._on_token(read.token)


def _read_if_changed(path: str, unchanged: Fingerprint | None) -> TokenRead | None:
    """In a worker thread: None while the file keeps the metadata `unchanged`, else its reading."""
    if unchanged is not None and fingerprint_of(path) == unchanged:
        return None
    return read_token_file(path)
