"""uvicorn's HTTP/1.1 protocol with the limits it lacks: head size, head and body timeouts, connections.

uvicorn's httptools protocol buffers a request head of any size (httptools accumulates a
header value in memory until it ends), waits forever for a head that never comes and
accepts connections without bound. `server_limits()` returns the `uvicorn.Config` keyword
arguments that fix this with subclasses of uvicorn's own protocols. Who enforces what:

* Request head size (`max_header_bytes`, request line + headers): this protocol, in
  `data_received`. The bytes of a head are counted as they arrive, before the parser sees
  them, and the parser is never fed more than the limit (a read that crosses the limit is
  fed up to the limit only; if the head ends inside, the rest is body). Over the limit:
  `431` with an OpenAI error body, the connection is half-closed, what the client still
  sends is read and dropped for up to 2 s (so that it reads the 431 instead of a reset),
  then it is closed. One gap, bounded: a pipelined request that starts in the same read
  as the end of the previous one is counted from the next read (a read is at most ~256 KB,
  and uvicorn stops reading behind a pipelined request). These refusals happen before
  the app: they are not in its metrics or access log (a warning is logged, at most one
  per kind per 10 s).
* Head timeout (`header_timeout_s`): this protocol. A head must be complete within it,
  counted from the connection's start, or on a keep-alive connection from the first bytes
  of the next head; then `408` (if part of a head came) and close; a silent connection is
  just closed. The idle time between requests stays uvicorn's `timeout_keep_alive`.
  Deadlines are checked by one timer per server (`_Shared`), not one per connection.
* Body idle timeout (`body_timeout_s`): this protocol, one timer per request whose body
  did not arrive with its head. When no body bytes came for `body_timeout_s` while the body
  is incomplete, reading is not paused by flow control (the app not reading) and no
  `100-continue` is pending: `408` if no response started, and close; the app's `receive()`
  returns `http.disconnect`. An idle timeout only: a client trickling a byte per period is
  bounded by the app's own deadlines and `max_body_bytes`, not here.
* Bytes held in incomplete heads, all connections together (`max_pending_head_bytes`):
  this protocol. Above it, the connection whose head grew gets `503` and is closed. Without
  it `max_connections` slow heads could hold `max_connections * max_header_bytes` (1 GiB at
  the defaults); a head that arrives in one read is never held, so normal traffic is not
  affected.
* Concurrent requests (`max_requests`): this protocol, at the end of each head. With that
  many requests in flight (uvicorn's task set): `503` with an OpenAI error body,
  `retry-after: 1`, `connection: close`. It replaces uvicorn's `limit_concurrency`, which
  also counts idle and silent connections: a few thousand silent connections would then
  answer every real request, on every connection, with 503.
* Open connections (`max_connections`): this protocol, in `connection_made`. Above it a new
  connection is closed at once, without a byte, so that a flood cannot use up the file
  descriptors the gateway also needs upstream. Silent connections count until the head
  timeout evicts them.

Cost: per read, one integer comparison and addition; per connection a dict entry for its
head deadline; no timer, no allocation per keep-alive request whose head arrives in one read.

The protocol is a `functools.partial` of a module-level class: uvicorn calls
`config.http_protocol_class(config=..., server_state=..., app_state=..., _loop=...)`, and a
partial pickles, which `--workers N` needs (uvicorn spawns workers with a pickled Config).
Without httptools the same limits apply to uvicorn's h11 protocol, the fallback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .api.asgi import DIRECT_BODY
from .errors import error_body
from .head_joined import HeadJoined
from .http_memory import slim_connection, slim_cycle
from .pipeline.lifecycle import DISCONNECT_HOOK
from .telemetry.metrics import HTTP_REFUSED

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 is the fallback
    HAVE_HTTPTOOLS = False
else:
    HAVE_HTTPTOOLS = True

__all__ = ["HAVE_HTTPTOOLS", "HttpLimits", "LimitedH11Protocol", "LimitedHttpToolsProtocol", "server_limits"]

log = logging.getLogger("gateway.http")

# `_state` of a connection: >= 0 while a request head is expected (the head bytes seen so far;
# 0 = none yet), or one of these.
_BODY = -1  # the head is complete, the body is not
_DONE = -2  # refused, timed out, closed or upgraded: whatever else arrives is dropped
_LINGER_S = 2.0  # after a refusal, how long to read and drop what the client still sends
_FD_RESERVE = 1024  # file descriptors to keep for upstream connections, logs, files


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The limits of one server; see `server_limits`."""

    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 16_384
    max_requests: int = 12_288
    max_pending_head_bytes: int = 64 * 1024 * 1024


def server_limits(
    max_header_bytes: int = 64 * 1024,
    header_timeout_s: float = 10.0,
    body_timeout_s: float = 30.0,
    max_connections: int = 16_384,
    max_requests: int = 12_288,
    max_pending_head_bytes: int = 64 * 1024 * 1024,
    keep_alive_s: int = 30,
    http: Literal["auto", "httptools", "h11"] = "auto",
) -> dict[str, Any]:
    """The `uvicorn.Config` keyword arguments that bound request heads, timeouts and connections.

    `max_header_bytes`: a request line and its headers, line ends included. `header_timeout_s`:
    to receive a whole head. `body_timeout_s`: without a body byte while a body is expected.
    `max_connections`: open connections (more are closed at accept). `max_requests`: requests
    in flight (more get 503). `max_pending_head_bytes`: the bytes of incomplete heads held
    across all connections (more get 503): without it, `max_connections` slow heads could
    hold `max_connections * max_header_bytes` (1 GiB at the defaults). `keep_alive_s`:
    uvicorn's idle timeout between requests. `http`: "auto" is httptools when installed, else h11.

    The result sets `http`, `timeout_keep_alive`, `limit_concurrency` (None: `max_requests`
    and `max_connections` replace it) and `h11_max_incomplete_event_size`: drop those from
    the other Config arguments (given twice as keywords, they are a TypeError).
    """
    limits = HttpLimits(max_header_bytes, header_timeout_s, body_timeout_s, max_connections, max_requests,
                        max_pending_head_bytes)
    for name in HttpLimits.__slots__:
        if not getattr(limits, name) > 0:
            raise ValueError(f"{name} must be positive")
    if keep_alive_s < 0:
        raise ValueError("keep_alive_s must not be negative")
    if http == "httptools" and not HAVE_HTTPTOOLS:
        raise ValueError("http='httptools' but httptools is not installed")
    protocol: Callable[..., asyncio.Protocol] = (
        LimitedHttpToolsProtocol if HAVE_HTTPTOOLS and http != "h11" else LimitedH11Protocol
    )
    _warn_if_few_descriptors(max_connections)
    return {
        "http": functools.partial(protocol, limits=limits),
        "timeout_keep_alive": keep_alive_s,
        "limit_concurrency": None,
        "h11_max_incomplete_event_size": max_header_bytes,
    }


def _warn_if_few_descriptors(max_connections: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max_connections + _FD_RESERVE:
        _warn("nofile", "the open-file limit (%d) is below max_connections (%d) + %d: connections will fail "
              "with EMFILE before the limit; raise `ulimit -n`", soft, max_connections, _FD_RESERVE)


def _json_error(status: bytes, message: str, type_: str, code: str, extra: bytes = b"") -> tuple[bytes, bytes]:
    """(status line, the rest of a complete `connection: close` reply) for an OpenAI-style error."""
    body = error_body(message, type_, None, code)
    rest = b"".join([
        b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
        b"\r\nconnection: close\r\n", extra, b"\r\n", body,
    ])
    return b"HTTP/1.1 " + status + b"\r\n", rest


def _too_large(limit: int) -> tuple[bytes, bytes]:
    return _json_error(b"431 Request Header Fields Too Large", f"the request line and headers exceed {limit} bytes",
                       "invalid_request_error", "headers_too_large")


_OVERLOADED_BODY = error_body("the gateway is at its limit of concurrent requests; retry shortly",
                              "server_error", None, "server_overloaded")
_OVERLOADED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_OVERLOADED_BODY)).encode()),
    (b"retry-after", b"1"),
    (b"connection", b"close"),
]


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The app that runs instead of the real one above `max_requests`."""
    await send({"type": "http.response.start", "status": 503, "headers": _OVERLOADED_HEADERS})
    await send({"type": "http.response.body", "body": _OVERLOADED_BODY, "more_body": False})


class _Shared:
    """What the connections of one server share: head deadlines (one timer) and held head bytes.

    A uvloop timer costs ~2 us to arm and cancel, about a fifth of what uvicorn spends on a
    keep-alive request; a dict entry costs ~0.1 us. The timeout is the same for every
    connection, so insertion order is deadline order and a sweep stops at the first entry
    not yet due. A head is refused between `header_timeout_s` and `header_timeout_s + tick`.
    """

    __slots__ = ("deadlines", "held", "limits", "loop", "tick", "timeout", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: HttpLimits) -> None:
        self.loop = loop
        self.limits = limits
        self.timeout = limits.header_timeout_s
        self.tick = min(1.0, self.timeout / 4)
        self.deadlines: dict[_Guard, float] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.held = 0  # bytes of incomplete heads, all connections

    def arm(self, protocol: _Guard) -> None:
        self.deadlines[protocol] = self.loop.time() + self.timeout
        if self.timer is None:
            self.start()

    def start(self) -> None:
        self.timer = self.loop.call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        try:
            now = self.loop.time()
            expired = []
            for protocol, deadline in self.deadlines.items():
                if deadline > now:
                    break
                expired.append(protocol)
            for protocol in expired:
                del self.deadlines[protocol]
                protocol._head_armed = False
                try:
                    protocol._head_expired()
                except Exception:  # pragma: no cover - a bug; the other connections still time out
                    log.exception("head timeout handler failed")
        finally:
            self.timer = self.loop.call_later(self.tick, self._sweep) if self.deadlines else None


class _Guard:
    """What both protocols share: the timers, the refusals. Mixed in before uvicorn's class."""

    # Provided by uvicorn's protocol classes.
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    server_state: ServerState
    connections: Any
    tasks: Any
    cycle: Any
    flow: Any
    client: tuple[str, int] | None
    timeout_keep_alive_task: asyncio.TimerHandle | None
    limit_concurrency: int | None

    # Per-connection state. The concrete classes keep it in __slots__ (`_SLOTS`): uvicorn's
    # protocol has 27 instance attributes, and past 30 CPython stops sharing the keys of
    # instance dicts, which made each connection's dict 5x larger and slower to build.
    _state: int  # >= 0: head bytes so far; or _BODY, _DONE
    _held: int  # bytes of this connection's incomplete head counted in `_shared.held`
    _head_armed: bool  # in `_shared.deadlines`
    _body_timer: asyncio.TimerHandle | None
    _linger_timer: asyncio.TimerHandle | None
    _body_seen: int  # data_received calls while reading a body
    _body_mark: int  # its value when the body timer was (re)armed
    _max_head: int  # read on every chunk of a head
    _max_requests: int  # read on every request
    _shared: _Shared

    # Construction and connection events: the same for both protocols, around the uvicorn
    # protocol that follows this mixin in the class's MRO (hence `super()`).
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        self.limit_concurrency = None  # see `max_requests`
        self._guard_init(limits, server_state)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        slim_connection(self)
        self._connected()

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _DONE
        self._stop_watching()
        super().connection_lost(exc)  # type: ignore[misc]

    def _guard_init(self, limits: HttpLimits, server_state: ServerState) -> None:
        self._state = self._held = self._body_seen = self._body_mark = 0
        self._head_armed = False
        self._body_timer = self._linger_timer = None
        self._max_head = limits.max_header_bytes
        self._max_requests = limits.max_requests
        shared = getattr(server_state, "_gateway_http_limits", None)
        if shared is None:
            shared = _Shared(self.loop, limits)
            setattr(server_state, "_gateway_http_limits", shared)  # noqa: B010 - one per server
        self._shared = shared

    # Hooks for the concrete protocols.
    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    def _head_pending(self) -> bool:
        """True while the connection waits for (the rest of) a request head."""
        raise NotImplementedError

    def _body_pending(self) -> bool:
        raise NotImplementedError

    def _receive(self, data: bytes) -> None:
        raise NotImplementedError

    # Connections.
    def _connected(self) -> None:
        shared = self._shared
        if len(self.connections) > shared.limits.max_connections:
            _warn("refused", "refused a connection: %d open (max_connections)", len(self.connections) - 1)
            _count("too_many_connections")
            self._state = _DONE
            self.transport.close()
        else:
            self._head_armed = True
            shared.deadlines[self] = shared.loop.time() + shared.timeout
            if shared.timer is None:
                shared.start()

    def _stop_watching(self) -> None:
        """No head deadline, no held bytes, no timer."""
        self._head_done()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    # Head size.
    def _head_overflow(self, data: bytes) -> None:
        """This read takes the head over the limit, unless the head ends inside the limit."""
        allowed = self._max_head - self._state
        if allowed > 0:
            self._state = self._max_head  # feed exactly what the limit allows
            self._feed(data[:allowed])
            if self.transport.is_closing():
                return  # the parser refused it (400)
            if not self._head_pending():
                self._after_head_feed()
                self._receive(data[allowed:])  # body, or a pipelined request, counted afresh
                return
        _warn("431", "431: a request head over %d bytes from %s", self._max_head, _peer(self.client))
        _count("headers_too_large")
        self._refuse_head(_too_large(self._max_head))

    def _refuse_head(self, reply: tuple[bytes, bytes]) -> None:
        self._state = _DONE  # from here on, what arrives is dropped
        self._stop_watching()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self.transport.is_closing():
            # The refused head is pipelined behind a response still being sent (its cycle is
            # the last one parsed): answer once that response is complete.
            respond = cycle.on_response

            def respond_then_refuse() -> None:
                respond()
                self._send_refusal(reply)

            cycle.on_response = respond_then_refuse
            return
        self._send_refusal(reply)

    def _send_refusal(self, reply: tuple[bytes, bytes]) -> None:
        if self.transport.is_closing():
            return
        if self.timeout_keep_alive_task is not None:  # armed by uvicorn after a response
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self._write_reply(*reply)
        if self.transport.can_write_eof():
            # Half-close and drop what the client still sends, so that it reads the reply
            # instead of a reset; the client's own close (eof_received) or the timer ends it.
            self.transport.write_eof()
            self._linger_timer = self.loop.call_later(_LINGER_S, self.transport.abort)
        else:
            self.transport.close()

    def _write_reply(self, status: bytes, rest: bytes) -> None:
        parts = [status]
        for name, value in self.server_state.default_headers:
            parts += [name, b": ", value, b"\r\n"]
        parts.append(rest)
        self.transport.write(b"".join(parts))

    # Timeouts, and the bytes held in incomplete heads.
    def _after_head_feed(self) -> None:
        """After bytes of a head were parsed: account and time an incomplete head, or time the body."""
        if self._head_pending():
            if self._state > 0:
                shared = self._shared
                shared.held += self._state - self._held
                self._held = self._state
                if shared.held > shared.limits.max_pending_head_bytes:
                    _warn("held", "503: incomplete request heads hold over %d bytes (max_pending_head_bytes)",
                          shared.limits.max_pending_head_bytes)
                    _count("heads_held")
                    self._refuse_head(_json_error(
                        b"503 Service Unavailable", "the gateway holds too many incomplete requests; retry shortly",
                        "server_error", "server_overloaded", b"retry-after: 1\r\n"))
                elif not self._head_armed:
                    self._head_armed = True
                    shared.arm(self)
        elif self._body_pending() and self._body_timer is None:
            self._body_mark = self._body_seen
            self._body_timer = self.loop.call_later(self._shared.limits.body_timeout_s, self._on_body_timeout)

    def _head_done(self) -> None:
        """The head is complete (or the connection is done with heads): stop its clock and accounting."""
        if self._head_armed:
            self._head_armed = False
            del self._shared.deadlines[self]
        if self._held:
            self._shared.held -= self._held
            self._held = 0

    def _head_expired(self) -> None:
        if self._state < 0 or not self._head_pending() or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is in flight; after it, uvicorn's keep-alive timer takes over
        log.debug("request head timeout (%d bytes received) from %s", self._state, _peer(self.client))
        _count("header_timeout")
        if self._state > 0:
            self._write_408(f"the request headers were not received within {self._shared.timeout:g} s")
        self._state = _DONE
        self._stop_watching()
        self.transport.close()

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self._state == _DONE or cycle is None or not self._body_pending() or self.transport.is_closing():
            return
        timeout = self._shared.limits.body_timeout_s
        if self._body_seen != self._body_mark or self.flow.read_paused or cycle.waiting_for_100_continue:
            # Progress, or nothing to blame on the client (the app is not reading, or has not
            # yet asked for the body): look again later.
            self._body_mark = self._body_seen
            self._body_timer = self.loop.call_later(timeout, self._on_body_timeout)
            return
        log.debug("request body stalled for %g s from %s", timeout, _peer(self.client))
        _count("body_timeout")
        self._state = _DONE
        if not cycle.response_started and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns http.disconnect, its send() is dropped
            cycle.message_event.set()
            self._write_408(f"no request body bytes were received for {timeout:g} s")
        self.transport.close()

    def _write_408(self, message: str) -> None:
        self._write_reply(*_json_error(b"408 Request Timeout", message, "invalid_request_error", "request_timeout"))


_SLOTS = ("_state", "_held", "_head_armed", "_body_timer", "_linger_timer", "_body_seen", "_body_mark",
          "_max_head", "_max_requests", "_shared")


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


_last_warning: dict[str, float] = {}
_refused = HTTP_REFUSED.labels


def _count(reason: str) -> None:
    """Refusals never reach the app, so they are counted here (`gateway_http_refused_total`)."""
    _refused(reason).inc()


def _warn(kind: str, message: str, *args: object) -> None:
    """A warning, at most one per kind per 10 s: refusals come in floods."""
    now = time.monotonic()
    if now - _last_warning.get(kind, -1e9) >= 10.0:
        _last_warning[kind] = now
        log.warning(message, *args)


if HAVE_HTTPTOOLS:

    class LimitedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with `HttpLimits`. See the module docstring."""

        __slots__ = _SLOTS

        def data_received(self, data: bytes) -> None:
            n = self._state
            if n >= 0:  # a request head
                n += len(data)
                if n > self._max_head:
                    self._head_overflow(data)
                    return
                self._state = n
                HttpToolsProtocol.data_received(self, data)
                if self._state != 0:  # else: the whole request came in this read, as usual
                    self._after_head_feed()
            elif n == _BODY:
                self._body_seen += 1
                HttpToolsProtocol.data_received(self, data)
            # else _DONE: refused; drop

        _receive = data_received

        def _feed(self, data: bytes) -> None:
            HttpToolsProtocol.data_received(self, data)

        def _head_pending(self) -> bool:
            return self._state >= 0

        def _body_pending(self) -> bool:
            return self._state == _BODY

        # Parser callbacks: where a head and a message end.
        def on_headers_complete(self) -> None:
            self._state = _BODY
            if self._head_armed or self._held:
                self._head_done()
            if len(self.tasks) >= self._max_requests:
                _warn("503", "503: %d requests in flight (max_requests)", len(self.tasks))
                _count("too_many_requests")
                app, self.app = self.app, _overloaded
                try:
                    HttpToolsProtocol.on_headers_complete(self)
                finally:
                    self.app = app
            else:
                HttpToolsProtocol.on_headers_complete(self)
            cycle = self.cycle  # uvicorn's request cycle writes through `cycle.transport` (checked, not assumed)
            if cycle is not None and type(getattr(cycle, "transport", None)) is not HeadJoined \
                    and hasattr(cycle, "transport"):
                cycle.transport = HeadJoined(self.transport, self.loop, cycle)
            if cycle is not None:
                slim_cycle(cycle)
                setattr(cycle, DISCONNECT_HOOK, None)  # this protocol calls the request back on a lost connection
                setattr(cycle, DIRECT_BODY, True)  # and its body parts may be written directly (`api.asgi.ChunkWriter`)

        def connection_lost(self, exc: Exception | None) -> None:
            cycle = self.cycle
            _Guard.connection_lost(self, exc)
            hook = getattr(cycle, DISCONNECT_HOOK, None) if cycle is not None else None
            if hook is not None:  # a request watching for its client (`pipeline.lifecycle`)
                setattr(cycle, DISCONNECT_HOOK, None)
                hook()

        def on_message_complete(self) -> None:
            self._state = 0  # what comes next is the next request's head
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            HttpToolsProtocol.on_message_complete(self)

        def handle_websocket_upgrade(self) -> None:
            self._state = _DONE
            self._stop_watching()
            HttpToolsProtocol.handle_websocket_upgrade(self)


class LimitedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with `HttpLimits`: the fallback when httptools is missing."""

    __slots__ = _SLOTS

    def data_received(self, data: bytes) -> None:
        if self._state == _DONE:
            return
        if self.conn.their_state is h11.IDLE:  # a request head
            n = self._state + len(data)
            if n > self._max_head:
                self._head_overflow(data)
                return
            self._state = n
            self._feed(data)
            self._after_head_feed()
        else:
            self._body_seen += 1
            H11Protocol.data_received(self, data)
            if self._body_timer is not None and self.conn.their_state is not h11.SEND_BODY:
                self._body_timer.cancel()
                self._body_timer = None

    _receive = data_received

    def _feed(self, data: bytes) -> None:
        if len(self.tasks) >= self._max_requests:
            app, self.app = self.app, _overloaded
            try:
                H11Protocol.data_received(self, data)
            finally:
                self.app = app
        else:
            H11Protocol.data_received(self, data)
        if self._state != _DONE and self.conn.their_state is not h11.IDLE:
            self._state = 0  # the head is complete; count the next one from zero
            self._head_done()

    def _head_pending(self) -> bool:
        return self._state != _DONE and self.conn.their_state is h11.IDLE

    def _body_pending(self) -> bool:
        return self._state != _DONE and self.conn.their_state is h11.SEND_BODY

    def send_400_response(self, msg: str) -> None:
        # h11 refuses an incomplete event over `h11_max_incomplete_event_size` (= the head limit)
        # as a 400; that happens to a pipelined head, which arrives while a response is in flight
        # and is not counted here. It is a 431.
        if len(self.conn.trailing_data[0]) > self._max_head:
            self._refuse_head(_too_large(self._max_head))
        else:
            H11Protocol.send_400_response(self, msg)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._state = _DONE
        self._stop_watching()
        H11Protocol.handle_websocket_upgrade(self, event)
