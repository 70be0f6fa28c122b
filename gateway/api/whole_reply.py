"""A complete (non-streamed) reply written in one step, as uvicorn's `send` would in two calls.

uvicorn's httptools `send` takes a reply in two messages (the head, then the body), each a
coroutine with its checks, and checks every header with two regular expressions (sixteen
searches for a proxied answer's eight headers). Answering at once took about 3% off the
instructions of a proxied JSON request (`bench/instructions.py`). `send_whole` does the same
work once: the same bytes (status line, the server's default headers, the reply's headers,
`connection: close` when the connection will not be kept), the same checks (one search over
all names, one over all values) and the same end of the cycle (complete, its event set, the
connection closed if not kept, uvicorn's `on_response`).

It relies on the attributes of uvicorn's httptools `RequestResponseCycle`, which are not its
API, so it is taken only for that exact class, on a cycle the gateway's protocol marked
(`api.asgi.DIRECT_BODY`), and only in the plain case: nothing sent yet, no access log, not
HEAD, writing not paused, client still there, lower-case header names and none of the names
that change how uvicorn frames the body (`connection`, `transfer-encoding`, `content-length`:
this function writes the length itself). Anything else returns False, and the caller uses
`send` (tests/test_http_limits.py compares the bytes and the cycle's state of both ways).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .asgi import DIRECT_BODY

try:
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, RequestResponseCycle
except ImportError:  # pragma: no cover - httptools missing (h11 serves) or uvicorn moved them: always `send`
    RequestResponseCycle = None  # type: ignore[assignment,misc]

__all__ = ["send_whole"]

def send_whole(send: Any, status: int, content_type: bytes, headers: Sequence[tuple[bytes, bytes]],
               body: bytes) -> bool:
    """Write a whole reply (`content-type`, `content-length`, then `headers`) at once; False: use `send`.

    On False nothing was written and the cycle is untouched.
    """
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle or not getattr(cycle, DIRECT_BODY, False):  # (None: never)
        return False
    if cycle.response_started or cycle.disconnected or cycle.access_log or cycle.flow.write_paused \
            or cycle.chunked_encoding is not None or cycle.scope["method"] == "HEAD":
        return False
    line = STATUS_LINE.get(status)
    if line is None:
        return False
    parts = [line]
    for name, value in cycle.default_headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"content-type", b": ", content_type, b"\r\n", b"content-length", b": ", b"%d" % len(body), b"\r\n")
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    names = parts[1::4]  # four parts a header: name, ": ", value, CRLF
    if b"connection" in names or b"transfer-encoding" in names or names.count(b"content-length") != 1:
        return False
    joined = b"".join(names)
    if HEADER_RE.search(joined) or HEADER_VALUE_RE.search(b"".join(parts[3::4])) or joined.lower() != joined:
        return False
    keep_alive = cycle.keep_alive
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (b"\r\n", body)
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.chunked_encoding = False
    cycle.expected_content_length = 0
    transport = cycle.transport
    write_all = getattr(transport, "write_all", None)  # `http_server._HeadJoined`: not held for a later write
    (write_all or transport.write)(b"".join(parts))
    cycle.response_complete = True
    cycle.message_event.set()
    if not keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True
