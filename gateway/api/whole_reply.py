"""A complete (non-streamed) reply written in one step, as uvicorn's `send` would in two calls;
a stream's head written as `send` writes it, without its per-header work.

uvicorn's httptools `send` takes a reply in two messages (the head, then the body), each a
coroutine with its checks, and checks every header with two regular expressions (sixteen
searches for a proxied answer's eight headers). Answering at once took about 3% off the
instructions of a proxied JSON request (`bench/instructions.py`). `send_whole` does the same
work once: the same bytes (status line, the server's default headers, the reply's headers,
`connection: close` when the connection will not be kept), the same checks (uvicorn's two
patterns, each over all names or all values at once, as byte tables: `_finder`; names that passed
once are kept, `_good_names`) and the same
end of the cycle (complete, its event set, the connection closed if not kept, uvicorn's
`on_response`). `send_head` does the same for the head of a chunked reply (a stream's), which
its first event or the next loop turn sends.

It relies on the attributes of uvicorn's httptools `RequestResponseCycle`, which are not its
API, so it is taken only for that exact class, on a cycle the gateway's protocol marked
(`api.asgi.DIRECT_BODY`), and only in the plain case: nothing sent yet, no access log, not
HEAD, writing not paused, client still there, lower-case header names and none of the names
that change how uvicorn frames the body (`connection`, `transfer-encoding`, `content-length`:
this function writes the length itself). Anything else returns False, and the caller uses
`send` (tests/test_http_limits.py compares the bytes and the cycle's state of both ways).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

from .asgi import DIRECT_BODY

try:
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, RequestResponseCycle
except ImportError:  # pragma: no cover - httptools missing (h11 serves) or uvicorn moved them: always `send`
    RequestResponseCycle = None  # type: ignore[assignment,misc]

__all__ = ["send_head", "send_whole"]


def _table(pattern: re.Pattern[bytes]) -> bytes | None:
    """For a pattern of one character class (uvicorn's header patterns are): a byte table under which
    `data.translate(table) != data` says whether `pattern.search(data)` finds anything, where the regex engine
    took about 40 instructions a byte of a joined head. None for any other pattern."""
    source = pattern.pattern
    if source[:1] == b"[" and source[-1:] == b"]" and b"]" not in source[1:-1].replace(b"\\]", b""):
        # Each byte of the class maps to another byte, every other byte to itself: a changed copy finds one.
        return bytes(byte ^ 0x80 if pattern.fullmatch(bytes([byte])) else byte for byte in range(256))
    return None


def _finder(pattern: re.Pattern[bytes]) -> Callable[[bytes], bool]:
    """Whether `pattern.search(data)` finds anything: by its byte table (`_table`) when it has one."""
    table = _table(pattern)
    if table is not None:
        return lambda data: data.translate(table) != data
    return lambda data: pattern.search(data) is not None


_bad_name = _finder(HEADER_RE) if RequestResponseCycle is not None else None
_bad_value = _finder(HEADER_VALUE_RE) if RequestResponseCycle is not None else None
_value_table = _table(HEADER_VALUE_RE) if RequestResponseCycle is not None else None  # `_bad_value`, in line


def send_whole(send: Any, status: int, content_type: bytes, headers: Sequence[tuple[bytes, bytes]],
               body: bytes) -> bool:
    """Write a whole reply (`content-type`, `content-length`, then `headers`) at once; False: use `send`.

    On False nothing was written and the cycle is untouched.
    """
    cycle = _plain_cycle(send)
    if cycle is None:
        return False
    head = _head(cycle, status, [
        (b"content-type", content_type), (b"content-length", b"%d" % len(body)), *headers], b"")
    if head is None:
        return False
    cycle.chunked_encoding = False
    cycle.expected_content_length = 0
    transport = cycle.transport
    write_all = getattr(transport, "write_all", None)  # `head_joined.HeadJoined`: not held for a later write
    try:
        (write_all or transport.write)(head + body)
    except RuntimeError:  # uvloop, once the connection is lost: the reply is dropped, as `send` drops it
        if not transport.is_closing():
            raise
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True


def send_head(send: Any, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Start a chunked reply (a stream's head, no `content-length`) as `send` would; False: use `send`.

    The head is written as `send` writes it, through the cycle's transport (the gateway's protocol
    holds it to leave with the first event). On False nothing was written and the cycle is untouched.
    """
    cycle = _plain_cycle(send)
    if cycle is None or status in (204, 304):  # no body: `send` frames neither way
        return False
    head = _head(cycle, status, headers, b"transfer-encoding: chunked\r\n")
    if head is None:
        return False
    cycle.chunked_encoding = True
    cycle.expected_content_length = 0
    cycle.transport.write(head)
    return True


def _plain_cycle(send: Any) -> Any:
    """The uvicorn httptools cycle behind `send` when nothing makes its `send` do more than write; else None."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle or not getattr(cycle, DIRECT_BODY, False):  # (None: never)
        return None
    if cycle.response_started or cycle.disconnected or cycle.access_log or cycle.flow.write_paused \
            or cycle.chunked_encoding is not None or cycle.scope["method"] == "HEAD":
        return None
    return cycle


def _head(cycle: Any, status: int, headers: Sequence[tuple[bytes, bytes]], framing: bytes) -> bytes | None:
    """The head, checked as `send` checks it, and the cycle marked started; None (nothing changed): a status or
    header that `send` must handle. `framing`: the body's framing line when no header gives it.

    The names and values are taken apart in one C-level pass (`flat`), and the lines rendered in one bytes
    formatting: a loop over the headers in Python cost about 2,000 instructions a header. The names are
    nearly always the gateway's own few, so a name that passed the checks once is kept (`_good_names`): a
    head whose names are all kept needs no name check (the values, which vary, are checked every time)."""
    line = STATUS_LINE.get(status)
    if line is None:
        return None
    flat = tuple(chain(*cycle.default_headers, *headers))  # name, value, name, value, ... (each header a pair)
    names = flat[::2]
    count = len(names)
    if not _good_names.issuperset(names) and not _names_pass(names):
        return None
    if names.count(b"content-length") != (0 if framing else 1):
        return None
    values = b"".join(flat[1::2])
    if values.translate(_value_table) != values if _value_table is not None else _bad_value(values):  # type: ignore[misc]
        return None
    rendered = (_LINES[count] if count < len(_LINES) else b"%s: %s\r\n" * count) % flat
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    return b"".join((line, rendered, b"" if cycle.keep_alive else b"connection: close\r\n", framing, b"\r\n"))


_LINES = [b"%s: %s\r\n" * count for count in range(48)]  # a head of `count` headers, formatted from `flat`
_good_names: set[bytes] = set()  # names that passed `_names_pass` (bounded: `_GOOD_NAMES_KEPT`)
_GOOD_NAMES_KEPT = 256
_FRAMING_NAMES = (b"connection", b"transfer-encoding")  # never kept: `send` frames the body by them


def _names_pass(names: tuple[bytes, ...]) -> bool:
    """Whether `send` would take these names as they are (its name pattern, lower case, none of the names that
    change the framing but `content-length`, which the caller counts); if so, they are kept as good."""
    joined = b"".join(names)
    assert _bad_name is not None  # set whenever the cycle class is
    if _bad_name(joined) or joined.lower() != joined or any(name in names for name in _FRAMING_NAMES):
        return False
    if len(_good_names) + len(names) <= _GOOD_NAMES_KEPT:
        _good_names.update(names)
    return True
