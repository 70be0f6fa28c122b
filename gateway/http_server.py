"""uvicorn's HTTP/1.1 protocol with the limits it lacks: head size, head and body timeouts, connections.

uvicorn's httptools protocol buffers a request head of any size (httptools accumulates a header value in memory until
it ends), waits forever for a head that never comes and accepts connections without bound. `server_limits()` returns
the `uvicorn.Config` keyword arguments that fix this with subclasses of uvicorn's own protocols. Who enforces what:

* Request head size (`max_header_bytes`, request line + headers): this protocol, in `data_received`. The bytes of a
  head are counted as they arrive, before the parser sees them, and the parser is never fed more than the limit (a
  read that crosses the limit is fed up to the limit only; if the head ends inside, the rest is body). Over the limit:
  `431` with an OpenAI error body (Anthropic's under `/v1/messages`, as for every refusal here: `http_replies`), the
  connection is half-closed, what the client still sends is read and dropped for up to 2 s (so that it reads the 431
  instead of a reset), then it is closed. One gap, bounded: a pipelined request that starts in the same read as the
  end of the previous one is counted from the next read (a read is at most ~256 KB, and uvicorn stops reading behind a
  pipelined request). These refusals happen before the app: they are not in its metrics or access log (a warning is
  logged, at most one per kind per 10 s).
* Head timeout (`header_timeout_s`): this protocol. A head must be complete within it, counted from the connection's
  start, or on a keep-alive connection from the first bytes of the next head; then `408` (if part of a head came) and
  close; a silent connection is just closed. The idle time between requests stays uvicorn's `timeout_keep_alive`.
  Deadlines are checked by one timer per server (`http_guard._Shared`), not one per connection.
* Body idle timeout and whole-body deadline (`body_timeout_s`): this protocol, one timer per request whose body did
  not arrive with its head. When no body bytes came for `body_timeout_s` while the body is incomplete, reading is not
  paused by flow control (the app not reading) and no `100-continue` is pending: `408` if no response started, and
  close; the app's `receive()` returns `http.disconnect`. And the whole body is due within `http_guard.BODY_PERIODS`
  (4) periods of `body_timeout_s` from the end of its head (periods in which reading was paused or a `100-continue`
  pending are not counted): past it, the same `408`. A client trickling a byte per period holds its request slot for 4
  periods (2 minutes at the default 30 s), not forever (the app's reading, `pipeline.stages.read_body`, has none).
* `Expect: 100-continue` answered before the body was asked for (a 401, a 413 from the declared length):
  `connection: close`, and closed (`_closing_if_unread`), so a client's next request is not read as the body.
* Trailer fields of a chunked body (httptools; h11 drops them and bounds them as a head): read and dropped, never
  request headers (`scope["headers"]` is the head's, frozen at its end: a trailer `Authorization` or `X-Request-Id`
  changes nothing). Their bytes count against `max_header_bytes`: over it, `431` and close, the app's `receive()`
  returns `http.disconnect`. One gap, bounded: those in the read where the last chunk starts are not counted.
* What the parser refuses (conflicting lengths, a malformed head or chunk): `400` with an OpenAI error body
  (`invalid_http_request`, the parser's reason in the message) and `connection: close`, after the response in flight
  if there is one. A WebSocket upgrade: `400` (`websocket_not_supported`): the gateway serves no WebSocket route.
* Any other upgrade (`Upgrade: h2c`, as `curl --http2` sends to an http:// URL): ignored, as nginx and h11 do: the
  request is served as HTTP/1.1, its body read by its `Content-Length` or chunks; its answer is never a `101`, so a
  proxy in front stays in HTTP/1.1 too. CONNECT is never a tunnel: an authority-form target (`host:443`) is a `400`,
  an origin-form one a request as any other (no route takes the method). httptools ends such a
  request at its head: its body was dropped, or read as the next request (smuggled): `http_upgrade` reads it.
* A lost connection (httptools): every request of the connection, the one running first, then those pipelined behind
  it, is marked disconnected and its disconnect hook called (`pipeline.lifecycle`); uvicorn tells the last one only.
* Bytes held in incomplete heads, all connections together (`max_pending_head_bytes`): this protocol. Above it, the
  connection whose head grew gets `503` and is closed. Without it `max_connections` slow heads could hold
  `max_connections * max_header_bytes` (1 GiB at the defaults); a head that arrives in one read is never held, so
  normal traffic is not affected.
* Concurrent requests (`max_requests`): this protocol, at the end of each head. With that many requests in flight
  (uvicorn's task set) a request runs `http_replies.saturated`'s app: `503` with an OpenAI error body,
  `retry-after: 1`, `connection: close`; but `GET`/`HEAD` of `/healthz` and `/metrics` pass (a saturated process is
  alive and worth scraping; a refused liveness probe would restart it, cutting every stream), bounded by
  `max_connections` (uvicorn runs one request of a connection at a time). Not `/readyz`: a saturated replica is not
  ready. It replaces uvicorn's `limit_concurrency`, which also counts idle and silent connections: a few thousand
  silent connections would then answer every real request, on every connection, with 503.
* Open connections (`max_connections`): this protocol, in `connection_made`. Above it a new connection is closed at
  once, without a byte, so that a flood cannot use up the file descriptors the gateway also needs upstream. Silent
  connections count until the head timeout evicts them.

Cost: per read, one integer comparison and addition; per connection a dict entry for its head deadline; per request a
few attribute reads and stores; no timer, no allocation per keep-alive request whose head arrives in one read; chunked
bodies, a call per chunk.

The protocol is a `functools.partial` of a module-level class: uvicorn calls `config.http_protocol_class(config=...,
server_state=..., app_state=..., _loop=...)`, and a partial pickles, which `--workers N` needs (uvicorn spawns workers
with a pickled Config). Without httptools the same limits apply to uvicorn's h11 protocol, the fallback."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .api.asgi import DIRECT_BODY
from .head_joined import HeadJoined
from .http_guard import BODY, CHUNK, DONE, GUARD_SLOTS, Guard, HttpLimits
from .http_memory import slim_cycle
from .http_replies import UNPARSABLE, bad_request, count_refusal, peer, saturated, too_large, warn_once
from .pipeline.lifecycle import DISCONNECT_HOOK

try:
    from httptools import HttpParserCallbackError
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 is the fallback
    HAVE_HTTPTOOLS = False
else:
    HAVE_HTTPTOOLS = True

__all__ = ["HAVE_HTTPTOOLS", "HttpLimits", "LimitedH11Protocol", "LimitedHttpToolsProtocol", "server_limits"]

_FD_RESERVE = 1024  # file descriptors to keep for upstream connections, logs, files


def _closing_if_unread(cycle: Any) -> Any:
    """`cycle.send` that closes after an answer given before the body was asked for (RFC 9110 10.1.1): kept open,
    the next request was read as that body. (Not a method: `whole_reply` takes `send`'s path, which closes.)"""
    send = cycle.send

    async def send_closing(message: Any) -> None:
        if message["type"] == "http.response.start" and cycle.waiting_for_100_continue:
            cycle.keep_alive = False
        await send(message)

    return send_closing


class _HeadComplete(list[tuple[bytes, bytes]]):
    """Where uvicorn's httptools protocol appends header fields once a request's head is complete (its `headers`):
    nowhere. The fields it would append then are a chunked body's trailer fields, which must not join the head's
    (`scope["headers"]`, the list uvicorn appended the head's fields to): they are read and dropped (RFC 9110 6.5.1
    lets a recipient discard them), counted as they arrive (`_chunk_received`)."""

    __slots__ = ()

    def append(self, field: tuple[bytes, bytes]) -> None:
        pass


_HEAD_COMPLETE = _HeadComplete()  # one for all connections: it never holds anything
def server_limits(
    max_header_bytes: int = 64 * 1024,
    header_timeout_s: float = 10.0,
    body_timeout_s: float = 30.0,
    max_connections: int = 16_384,
    max_requests: int = 12_288,
    max_pending_head_bytes: int = 64 * 1024 * 1024,
    keep_alive_s: int = 30,
    send_timeout_s: float = 60.0,
    http: Literal["auto", "httptools", "h11"] = "auto",
) -> dict[str, Any]:
    """The `uvicorn.Config` keyword arguments that bound request heads, timeouts and connections.

    `max_header_bytes`: a request line and its headers, line ends included. `header_timeout_s`: to receive a whole
    head. `body_timeout_s`: without a body byte while a body is expected. `max_connections`: open connections (more
    are closed at accept). `max_requests`: requests in flight (more get 503, probes aside: `http_replies.saturated`).
    `max_pending_head_bytes`: incomplete heads' bytes, all connections (more get 503). `keep_alive_s`: uvicorn's
    idle timeout between requests. `send_timeout_s`: a connection whose client reads nothing of what waits to be sent
    (writing paused) for this long is aborted. `http`: "auto" is httptools when installed, else h11.

    The result sets `http`, `timeout_keep_alive`, `limit_concurrency` (None: `max_requests` and `max_connections`
    replace it) and `h11_max_incomplete_event_size`: drop those from the other Config arguments (else a TypeError).
    """
    limits = HttpLimits(max_header_bytes, header_timeout_s, body_timeout_s, max_connections, max_requests,
                        max_pending_head_bytes, send_timeout_s)
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
        warn_once("nofile", "the open-file limit (%d) is below max_connections (%d) + %d: connections will fail "
              "with EMFILE before the limit; raise `ulimit -n`", soft, max_connections, _FD_RESERVE)


if HAVE_HTTPTOOLS:

    from .http_upgrade import IgnoredUpgrades

    class LimitedHttpToolsProtocol(IgnoredUpgrades, Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with `HttpLimits`. See the module docstring."""

        __slots__ = GUARD_SLOTS

        def data_received(self, data: bytes) -> None:
            n = self._state
            if n >= 0:  # a request head
                n += len(data)
                if n > self._max_head:
                    self._head_overflow(data)
                    return
                self._state = n
                self._parse(data)
                if self._state != 0:  # else: the whole request came in this read, as usual
                    self._after_head_feed()
            elif n == BODY:
                self._body_seen += 1
                self._parse(data)
            elif n == CHUNK:
                self._chunk_received(data)
            # else DONE: refused; drop

        _receive = data_received

        def _chunk_received(self, data: bytes) -> None:
            """A read that starts inside a chunk: its data, or, after the last chunk, the trailer section, whose
            fields the parser buffers until each ends (one endless field would be held whole). A read with no
            body data in it that ends still inside the chunk is all trailer: counted against `max_header_bytes`.
            Two gaps, bounded: the trailer bytes in the read where the last chunk starts are not counted (one
            read); and once the response is complete uvicorn drops body data, so data read then counts too (a
            single chunk over the limit then closes a connection whose answer was already sent)."""
            self._body_seen += 1
            cycle = self.cycle
            had = len(cycle.body)
            self._parse(data)
            if self._state == CHUNK and self.cycle is cycle and len(cycle.body) == had:
                self._trailer += len(data)
                if self._trailer > self._max_head:
                    warn_once("431t", "431: a trailer section over %d bytes from %s", self._max_head,
                              peer(self.client))
                    count_refusal("trailers_too_large")
                    self._refuse_request(too_large(self._max_head, "the trailer fields"))

        def _feed(self, data: bytes) -> None:
            self._parse(data)

        def _head_pending(self) -> bool:
            return self._state >= 0

        def _body_pending(self) -> bool:
            return self._state == BODY or self._state == CHUNK

        # Parser callbacks: where a head and a message end.
        def on_headers_complete(self) -> None:
            self._state = BODY
            if self._head_armed or self._held:
                self._head_done()
            before = self.cycle
            if len(self.tasks) >= self._max_requests:
                app, self.app = self.app, saturated(self.app, self._max_requests)
                try:
                    HttpToolsProtocol.on_headers_complete(self)
                finally:
                    self.app = app
            else:
                HttpToolsProtocol.on_headers_complete(self)
            cycle = self.cycle  # uvicorn's request cycle writes through `cycle.transport` (checked, not assumed)
            if cycle is before:
                return  # no request made: a WebSocket upgrade (refused in `handle_websocket_upgrade`)
            self.headers = _HEAD_COMPLETE  # the head's fields are frozen: trailer fields go nowhere
            if self.pipeline:  # queued behind a request still in flight: keep the cycles before it
                self._queued_behind(before)
            elif self._earlier is not None:  # not queued: every request before this one is complete
                self._earlier = None
            if cycle is not None and type(getattr(cycle, "transport", None)) is not HeadJoined \
                    and hasattr(cycle, "transport"):
                cycle.transport = HeadJoined(self.transport, self.loop, cycle)
            if cycle is not None:
                slim_cycle(cycle)
                setattr(cycle, DISCONNECT_HOOK, None)  # this protocol calls the request back on a lost connection
                setattr(cycle, DIRECT_BODY, True)  # and its body parts may be written directly (`api.asgi.ChunkWriter`)
                if cycle.waiting_for_100_continue:  # (`Expect: 100-continue`: rare; only then a wrapper)
                    cycle.send = _closing_if_unread(cycle)

        def _queued_behind(self, before: Any) -> None:
            """`cycle` waits behind `before` (pipelining): keep `before`, and the cycles before it still in
            flight, in order, so that a lost connection reaches them all (uvicorn knows only the last one)."""
            earlier = [c for c in self._earlier or () if not c.response_complete]
            if before is not None:
                earlier.append(before)
            self._earlier = earlier

        def connection_lost(self, exc: Exception | None) -> None:
            cycle = self.cycle
            earlier, self._earlier = self._earlier, None
            Guard.connection_lost(self, exc)  # uvicorn marks `cycle` (the last request parsed) disconnected
            for gone in (*earlier, cycle) if earlier else (cycle,):  # in order: the one running first
                if gone is None:
                    continue
                if not gone.response_complete:
                    gone.disconnected = True
                    gone.message_event.set()
                hook = getattr(gone, DISCONNECT_HOOK, None)
                if hook is not None:  # a request watching for its client (`pipeline.lifecycle`)
                    setattr(gone, DISCONNECT_HOOK, None)
                    hook()

        def on_chunk_header(self) -> None:  # called for chunked bodies only
            if self._state == BODY:
                self._state = CHUNK

        def on_chunk_complete(self) -> None:
            if self._state == CHUNK:
                self._state = BODY
                self._trailer = 0

        def on_message_complete(self) -> None:
            self._state = 0  # what comes next is the next request's head
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            HttpToolsProtocol.on_message_complete(self)

        def handle_websocket_upgrade(self) -> None:
            self._refuse_upgrade()

        def send_400_response(self, msg: str) -> None:
            """What the parser refused (uvicorn calls this inside its `except HttpParserError`): an error body
            (OpenAI's, or Anthropic's: `http_replies`) with the parser's reason, and close; after the response in
            flight, if one is."""
            if self._state == DONE:
                return
            error = sys.exc_info()[1]
            reason = UNPARSABLE if error is None or isinstance(error, HttpParserCallbackError) \
                else f"{UNPARSABLE}: {error}"
            warn_once("400", "400: %s from %s", reason, peer(self.client))
            count_refusal("bad_request")
            cycle = self.cycle
            if self._state >= 0 or cycle is None or cycle.scope is not self.scope:  # a head, or one no request has
                self._refuse_head(bad_request(reason))  # (`on_headers_complete` failed: a CONNECT's authority)
            else:
                self._refuse_request(bad_request(reason))


class LimitedH11Protocol(Guard, H11Protocol):
    """uvicorn's h11 protocol with `HttpLimits`: the fallback when httptools is missing."""

    __slots__ = GUARD_SLOTS

    def data_received(self, data: bytes) -> None:
        if self._state == DONE:
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
            app, self.app = self.app, saturated(self.app, self._max_requests)
            try:
                H11Protocol.data_received(self, data)
            finally:
                self.app = app
        else:
            H11Protocol.data_received(self, data)
        if self._state != DONE and self.conn.their_state is not h11.IDLE:
            self._state = 0  # the head is complete; count the next one from zero
            self._head_done()

    def _head_pending(self) -> bool:
        return self._state != DONE and self.conn.their_state is h11.IDLE

    def _body_pending(self) -> bool:
        return self._state != DONE and self.conn.their_state is h11.SEND_BODY

    def send_400_response(self, msg: str) -> None:
        if self._state == DONE:
            return
        # h11 refuses an incomplete event over `h11_max_incomplete_event_size` (= the head limit)
        # as a 400; that happens to a pipelined head, which arrives while a response is in flight
        # and is not counted here, and to a trailer section over the limit. It is a 431.
        if len(self.conn.trailing_data[0]) > self._max_head:
            count_refusal("headers_too_large")
            reply = too_large(self._max_head)
        else:  # h11's reasons may quote the request's bytes: not sent back
            count_refusal("bad_request")
            reply = bad_request(UNPARSABLE)
        cycle = self.cycle
        if cycle is not None and cycle.more_body:  # in a request's body
            self._refuse_request(reply)
        else:
            self._refuse_head(reply)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._refuse_upgrade()
