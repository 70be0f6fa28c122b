"""The limits' machinery both HTTP protocols of `http_server` share: a connection's state, its timers and its
refusals (`Guard`, mixed in before uvicorn's protocol class), and the head deadlines of all connections of one
server (`_Shared`). What each limit does, and who enforces it: `http_server`'s docstring. The refusals' replies,
and how refusals are counted and logged: `http_replies` (in the envelope of the refused request's API).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from .http_memory import slim_connection
from .http_replies import NOT_WEBSOCKET, Refusal, count_refusal, heads_held, peer, timed_out, too_large, warn_once
from .pipeline.lifecycle import DISCONNECT_HOOK
from .translate.anthropic_errors import messages_path, messages_target

__all__ = ["BODY", "BODY_PERIODS", "CHUNK", "DONE", "GUARD_SLOTS", "Guard", "HttpLimits"]

log = logging.getLogger("gateway.http")

# `_state` of a connection: >= 0 while a request head is expected (the head bytes seen so far;
# 0 = none yet), or one of these.
BODY = -1  # the head is complete, the body is not
DONE = -2  # refused, timed out, closed or upgraded: whatever else arrives is dropped
CHUNK = -3  # httptools, a chunked body: inside a chunk (its data; after the last chunk, the trailer section)
_LINGER_S = 2.0  # after a refusal, how long to read and drop what the client still sends
# A request body is due within this many `body_timeout_s` periods of the end of its head (the whole-body deadline;
# see `http_server`). Four: a body never idle for a period but still incomplete after four is a trickle, not a
# slow link (at the defaults, 30 s and 4 MiB bodies, 2 minutes: a 4 MiB body at 35 KB/s); and a request slot held
# by a trickle is freed within 4 periods, as one held by a silent body is within 1. Not a policy field: it scales
# with `body_timeout_s`, which an operator with slow clients raises anyway.
BODY_PERIODS = 4


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The limits of one server; see `http_server.server_limits`."""

    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 16_384
    max_requests: int = 12_288
    max_pending_head_bytes: int = 64 * 1024 * 1024
    send_timeout_s: float = 60.0


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
        self.deadlines: dict[Guard, float] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.held = 0  # bytes of incomplete heads, all connections

    def arm(self, protocol: Guard) -> None:
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


class Guard:
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

    # Per-connection state. The concrete classes keep it in __slots__ (`GUARD_SLOTS`): uvicorn's
    # protocol has 27 instance attributes, and past 30 CPython stops sharing the keys of
    # instance dicts, which made each connection's dict 5x larger and slower to build.
    _state: int  # >= 0: head bytes so far; or BODY, DONE
    _held: int  # bytes of this connection's incomplete head counted in `_shared.held`
    _head_armed: bool  # in `_shared.deadlines`
    _body_timer: asyncio.TimerHandle | None
    _linger_timer: asyncio.TimerHandle | None
    _send_timer: asyncio.TimerHandle | None  # while writing is paused (the client does not read): `send_timeout_s`
    _send_left: int  # the bytes waiting to be sent when `_send_timer` was armed (less at its end: progress)
    _body_seen: int  # data_received calls while reading a body
    _body_mark: int  # its value when the body timer was (re)armed
    _body_periods: int  # `body_timeout_s` periods the current body has taken so far (the whole-body deadline)
    _trailer: int  # httptools: bytes read inside a chunk without body data in them (a trailer section)
    _earlier: list[Any] | None  # httptools: cycles parsed before `cycle`, possibly still in flight (pipelining)
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
        self._state = DONE
        self._stop_watching()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    # Writing paused: the transport holds more than its high-water mark of bytes the client has not read. When none of
    # them left for `send_timeout_s` (nginx's `send_timeout`: between two writes), the connection is aborted (`close`
    # would wait for those bytes to leave, which they never do): a client that stopped reading a complete answer held
    # it in the gateway's memory for as long as it kept the connection open, the request long over (up to
    # `max_response_bytes` a connection). A stream's request is then cancelled as a client that left (499), and its
    # upstream released. A client that reads, however slowly, is never cut.
    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._send_timer is None:
            self._send_left = self.transport.get_write_buffer_size()
            self._send_timer = self.loop.call_later(self._shared.limits.send_timeout_s, self._send_stalled)

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()  # type: ignore[misc]

    def _send_stalled(self) -> None:
        left = self.transport.get_write_buffer_size()
        if left < self._send_left:  # some left meanwhile: the client reads (slowly)
            self._send_left = left
            self._send_timer = self.loop.call_later(self._shared.limits.send_timeout_s, self._send_stalled)
            return
        self._send_timer = None
        log.info("closed a connection whose client read nothing for %.0f s (server.send_timeout_s)",
                 self._shared.limits.send_timeout_s)
        self.transport.abort()

    def _guard_init(self, limits: HttpLimits, server_state: ServerState) -> None:
        self._state = self._held = self._body_seen = self._body_mark = self._body_periods = self._trailer = 0
        self._earlier = None
        self._head_armed = False
        self._body_timer = self._linger_timer = self._send_timer = None
        self._send_left = 0
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

    def _should_upgrade_to_ws(self) -> bool:
        """uvicorn asks this of a WebSocket upgrade: yes, so that it calls `handle_websocket_upgrade`, which refuses
        it (`_refuse_upgrade`), with or without a WebSocket library installed (without, uvicorn would serve it
        as a plain request, with two warnings logged each time)."""
        return True

    def _refuse_upgrade(self) -> None:
        warn_once("websocket", "400: a WebSocket upgrade from %s", peer(self.client))
        count_refusal("websocket")
        self._refuse_head(NOT_WEBSOCKET)

    # Connections.
    def _connected(self) -> None:
        shared = self._shared
        if len(self.connections) > shared.limits.max_connections:
            warn_once("refused", "refused a connection: %d open (max_connections)", len(self.connections) - 1)
            count_refusal("too_many_connections")
            self._state = DONE
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
            if self._state == DONE or self.transport.is_closing():
                return  # the parser refused it (400)
            if not self._head_pending():
                self._after_head_feed()
                self._receive(data[allowed:])  # body, or a pipelined request, counted afresh
                return
        warn_once("431", "431: a request head over %d bytes from %s", self._max_head, peer(self.client))
        count_refusal("headers_too_large")
        self._refuse_head(too_large(self._max_head))

    def _messages_head(self) -> bool:
        """Whether the head being refused is a request to the Messages API, as far as its target was read: httptools'
        `url` once this head's message began (a `scope` no cycle has yet); h11's buffered request line, or an
        upgrade's `scope`. False when not known."""
        scope, cycle = getattr(self, "scope", None), self.cycle
        if scope is not None and (cycle is None or getattr(cycle, "scope", None) is not scope):
            path = scope.get("path")
            if isinstance(path, str):
                return messages_path(path)
            url = getattr(self, "url", None)
            if isinstance(url, bytes):
                return messages_target(url)
        conn = getattr(self, "conn", None)
        if conn is not None:
            line = conn.trailing_data[0].lstrip(b"\r\n").partition(b"\r\n")[0].split(b" ", 2)
            return len(line) > 1 and messages_target(line[1])
        return False

    def _refuse_head(self, refusal: Refusal) -> None:
        reply = refusal.reply(self._messages_head())
        self._state = DONE  # from here on, what arrives is dropped
        self._stop_watching()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self.transport.is_closing():
            # The refused head is pipelined behind a response still being sent (its cycle is
            # the last one parsed): answer once that response is complete.
            self._refuse_after(cycle, reply)
            return
        self._send_refusal(reply)

    def _refuse_request(self, refusal: Refusal) -> None:
        """Refuse the request whose body (or trailer section) is being read (`cycle`): its app's `receive()` returns
        `http.disconnect`, its `send()` is dropped; the refusal goes out unless its response has started (then the
        connection is closed) or is complete (the client has its answer; the connection is closed after it)."""
        self._state = DONE
        self._stop_watching()
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._send_refusal(None)
            return
        reply = refusal.reply(messages_path(cycle.scope.get("path", "")))
        cycle.disconnected = True
        cycle.message_event.set()
        hook = getattr(cycle, DISCONNECT_HOOK, None)
        if hook is not None:  # (a request watches only once its body is read: not expected here)
            setattr(cycle, DISCONNECT_HOOK, None)
            hook()
        if cycle.response_started:
            self.transport.close()  # mid-response: no room for another answer
            return
        earlier = self._earlier
        ahead = earlier[-1] if earlier else None
        if ahead is not None and not ahead.response_complete and not self.transport.is_closing():
            self._refuse_after(ahead, reply)  # pipelined behind a response still being sent
            return
        self._send_refusal(reply)

    def _refuse_after(self, cycle: Any, reply: tuple[bytes, bytes]) -> None:
        """Send `reply` once `cycle`'s response is complete (uvicorn calls its `on_response` then)."""
        respond = cycle.on_response

        def respond_then_refuse() -> None:
            respond()
            self._send_refusal(reply)

        cycle.on_response = respond_then_refuse

    def _send_refusal(self, reply: tuple[bytes, bytes] | None) -> None:
        """Write `reply` (if any) and close: half-close, and drop what the client still sends for a while."""
        if self.transport.is_closing():
            return
        if self.timeout_keep_alive_task is not None:  # armed by uvicorn after a response
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if reply is not None:
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
                    warn_once("held", "503: incomplete request heads hold over %d bytes (max_pending_head_bytes)",
                          shared.limits.max_pending_head_bytes)
                    count_refusal("heads_held")
                    self._refuse_head(heads_held())
                elif not self._head_armed:
                    self._head_armed = True
                    shared.arm(self)
        elif self._body_pending() and self._body_timer is None:
            self._body_mark = self._body_seen
            self._body_periods = 0
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
        log.debug("request head timeout (%d bytes received) from %s", self._state, peer(self.client))
        count_refusal("header_timeout")
        if self._state > 0:
            self._write_408(f"the request headers were not received within {self._shared.timeout:g} s")
        self._state = DONE
        self._stop_watching()
        self.transport.close()

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self._state == DONE or cycle is None or not self._body_pending() or self.transport.is_closing():
            return
        timeout = self._shared.limits.body_timeout_s
        if self._body_seen != self._body_mark and not self.flow.read_paused and not cycle.waiting_for_100_continue:
            self._body_periods += 1  # a period of progress: counted toward the whole-body deadline
            if self._body_periods >= BODY_PERIODS:
                log.debug("request body not received within %g s from %s", timeout * BODY_PERIODS,
                          peer(self.client))
                count_refusal("body_too_slow")
                self._refuse_request(timed_out(
                    f"the request body was not received within {timeout * BODY_PERIODS:g} s"))
                return
        if self._body_seen != self._body_mark or self.flow.read_paused or cycle.waiting_for_100_continue:
            # Progress, or nothing to blame on the client (the app is not reading, or has not
            # yet asked for the body): look again later.
            self._body_mark = self._body_seen
            self._body_timer = self.loop.call_later(timeout, self._on_body_timeout)
            return
        log.debug("request body stalled for %g s from %s", timeout, peer(self.client))
        count_refusal("body_timeout")
        self._refuse_request(timed_out(f"no request body bytes were received for {timeout:g} s"))

    def _write_408(self, message: str) -> None:
        self._write_reply(*timed_out(message).reply(self._messages_head()))


GUARD_SLOTS = ("_state", "_held", "_head_armed", "_body_timer", "_linger_timer", "_send_timer", "_send_left",
               "_body_seen", "_body_mark", "_body_periods", "_trailer", "_earlier", "_max_head", "_max_requests",
               "_shared")
