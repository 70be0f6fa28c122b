"""What a bearer token file must hold, read the same way when the policy loads and while it serves.

An Azure provider's Entra ID token may come from a file (`azure.entra_token_file`) that another
process keeps fresh: a sidecar, a Vault agent, a CSI secret volume, a Kubernetes projected volume.
The policy check (`policy.entra_check`) and the provider's refresher (`providers.token_refresh`)
both read it with `read_token_file`, so that a file the check accepts is one the refresher uses.

A change is noticed by the metadata of `os.stat(path)`, which follows symlinks: a Kubernetes
volume swaps its `..data` symlink rather than writing the file, and the swap shows as another
inode. What is reported (`TokenRead.problem`) never holds any of the file's text.

A credential read from an environment variable (`api_key_env`, `headers_env`, `azure.entra_token_env`)
travels in a header too: `header_credential` is what `policy.compile` makes of one.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

__all__ = ["EMPTY", "MISSING", "Fingerprint", "TokenRead", "fingerprint_of", "header_credential", "read_token_file"]

# (st_ino, st_mtime_ns, st_size): what changes when the file is rewritten, replaced or swapped.
Fingerprint = tuple[int, int, int]
# An Entra access token is a JWT of a few KiB: a much larger file is not a token (a wrong path, say).
MAX_TOKEN_FILE_BYTES = 64 * 1024
# An Entra token is a JWT, far longer: a shorter text is a placeholder (`null`, `TODO`), not a credential.
MIN_TOKEN_CHARS = 16
# A token travels in a header: visible ASCII, no spaces or line breaks (a JWT's alphabet fits).
_TOKEN = re.compile(r"[!-~]+")
_BEARER = re.compile(r"bearer(?:\s+|$)", re.IGNORECASE)  # the scheme, tolerated in front of the token
# What no header value may hold: aiohttp refuses CR, LF and the other C0 controls but the tab (every request would
# fail), and a tab inside a credential is a paste error, not part of it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A file whose metadata changes while it is read is read again, this many times at most.
_READ_TRIES = 3

# The problems, each a predicate of "the token file `<path>`" (and never any of the file's text).
MISSING = "is missing"
EMPTY = "is empty"
_BEING_WRITTEN = "changed while it was read"


@dataclass(frozen=True, slots=True)
class TokenRead:
    """One reading of a token file: its metadata, and either its token or why it holds none."""

    fingerprint: Fingerprint | None  # None: `os.stat` failed (missing, or its folder unreadable)
    token: str | None = field(default=None, repr=False)  # never printed
    problem: str | None = None  # what is wrong ("is missing"...); None exactly when `token` is set


def fingerprint_of(path: str) -> Fingerprint | None:
    """The metadata that tells a rewritten file from the one last read (None: cannot be stat'ed)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_ino, found.st_mtime_ns, found.st_size)


def read_token_file(path: str) -> TokenRead:
    """The token in `path` (whitespace stripped, a leading `Bearer ` dropped), or the problem with it.

    Blocking file I/O: the event loop calls it through `asyncio.to_thread`. The file's metadata is
    read before and after its content; when they differ a writer was at work, and it is read again.
    """
    read = _read_once(path)
    for _ in range(_READ_TRIES - 1):
        if read.problem != _BEING_WRITTEN:
            break
        read = _read_once(path)
    return read


def header_credential(value: str) -> tuple[str, str | None]:
    """(`value` with its surrounding whitespace stripped, what is wrong with it or None).

    Stripped as a token file's text is: a secret mounted from a file, or written with `echo`, ends in a
    newline, and no credential ends in whitespace. What is left must be one header value: no control
    character, and text that UTF-8 can spell (undecodable bytes in the environment reach Python as lone
    surrogates). The problem never holds any of the value."""
    text = value.strip()
    if _CONTROL.search(text) is not None:
        return text, "holds a control character (a line break, a tab...) inside it, which no header value may"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text, "is not UTF-8 text (undecodable bytes), which no header value may be"
    return text, None


def _read_once(path: str) -> TokenRead:
    try:
        before = os.stat(path)
    except FileNotFoundError:
        return TokenRead(None, problem=MISSING)
    except OSError as exc:
        return TokenRead(None, problem=f"cannot be read ({type(exc).__name__})")
    seen = (before.st_ino, before.st_mtime_ns, before.st_size)
    if not stat.S_ISREG(before.st_mode):
        return TokenRead(seen, problem="is not a regular file")
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except FileNotFoundError:  # removed between the two calls
        return TokenRead(None, problem=MISSING)
    except OSError as exc:
        return TokenRead(seen, problem=f"cannot be read ({type(exc).__name__})")
    if fingerprint_of(path) != seen:
        return TokenRead(seen, problem=_BEING_WRITTEN)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        return TokenRead(seen, problem=f"is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return TokenRead(seen, problem="is not ASCII text: not a token")
    scheme = _BEARER.match(text)
    if scheme is not None:
        text = text[scheme.end():]
    if not text:
        return TokenRead(seen, problem=EMPTY)
    if _TOKEN.fullmatch(text) is None:
        return TokenRead(seen, problem="holds spaces or control characters: not one token")
    if len(text) < MIN_TOKEN_CHARS:
        return TokenRead(seen, problem=f"is shorter than {MIN_TOKEN_CHARS} characters: not a token")
    return TokenRead(seen, token=text)
