"""A complete (non-streamed) reply written in one step, as uvicorn's `send` would in two calls;
a stream's head written as `send` writes it, without its per-header work.

uvicorn's httptools `send` takes a reply in two messages (the head, then the body), each a
coroutine with its checks, and checks every header with two regular expressions (sixteen
searches for a proxied answer's eight headers). Answering at once took about 3% off the
instructions of a proxied JSON request (`bench/instructions.py`). `send_whole` does the same
work once: the same bytes (status line, the server's default headers, the reply's headers,
`connection: close` when the connection will not be kept), the same checks (uvicorn's two
patterns, each over all names or all values at once, as byte tables: `_finder`) and the same
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
from typing import Any

from .asgi import DIRECT_BODY

try:
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, RequestResponseCycle
except ImportError:  # pragma: no cover - httptools missing (h11 serves) or uvicorn moved them: always `send`
    RequestResponseCycle = None  # type: ignore[assignment,misc]

__all__ = ["send_head", "send_whole"]


def _finder(pattern: re.Pattern[bytes]) -> Callable[[bytes], bool]:
    """Whether `pattern.search(data)` finds anything. uvicorn's header patterns are one character class
    each: then this is a byte-table test (`bytes.translate`), where the regex engine took about 40
    instructions a byte of a joined head; any other pattern is searched as it is."""
    source = pattern.pattern
    if source[:1] == b"[" and source[-1:] == b"]" and b"]" not in source[1:-1].replace(b"\\]", b""):
        # Each byte of the class maps to another byte, every other byte to itself: a changed copy finds one.
        table = bytes(byte ^ 0x80 if pattern.fullmatch(bytes([byte])) else byte for byte in range(256))
        return lambda data: data.translate(table) != data
    return lambda data: pattern.search(data) is not None


_bad_name = _finder(HEADER_RE) if RequestResponseCycle is not None else None
_bad_value = _finder(HEADER_VALUE_RE) if RequestResponseCycle is not None else None


def send_whole(send: Any, status: int, content_type: bytes, headers: Sequence[tuple[bytes, bytes]],
               body: bytes) -> bool:
    """Write a whole reply (`content-type`, `content-length`, then `headers`) at once; False: use `send`.

    On False nothing was written and the cycle is untouched.
    """
    cycle = _plain_cycle(send)
    if cycle is None:
        return False
    parts = _head(cycle, status, [
        (b"content-type", content_type), (b"content-length", b"%d" % len(body)), *headers], b"")
    if parts is None:
        return False
    parts.append(body)
    cycle.chunked_encoding = False
    cycle.expected_content_length = 0
    transport = cycle.transport
    write_all = getattr(transport, "write_all", None)  # `http_server._HeadJoined`: not held for a later write
    (write_all or transport.write)(b"".join(parts))
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
    parts = _head(cycle, status, headers, b"transfer-encoding: chunked\r\n")
    if parts is None:
        return False
    cycle.chunked_encoding = True
    cycle.expected_content_length = 0
    cycle.transport.write(b"".join(parts))
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


def _head(cycle: Any, status: int, headers: Sequence[tuple[bytes, bytes]], framing: bytes) -> list[bytes] | None:
    """The head's parts, checked as `send` checks them, and the cycle marked started; None (nothing changed):
    a status or header that `send` must handle. `framing`: the body's framing line when no header gives it."""
    line = STATUS_LINE.get(status)
    if line is None:
        return None
    parts = [line]
    for name, value in cycle.default_headers:
        parts += (name, b": ", value, b"\r\n")
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    names = parts[1::4]  # four parts a header: name, ": ", value, CRLF
    lengths = names.count(b"content-length")
    if b"connection" in names or b"transfer-encoding" in names or lengths != (0 if framing else 1):
        return None
    joined = b"".join(names)
    assert _bad_name is not None and _bad_value is not None  # set whenever the cycle class is
    if _bad_name(joined) or _bad_value(b"".join(parts[3::4])) or joined.lower() != joined:
        return None
    if not cycle.keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (framing, b"\r\n")
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    return parts
