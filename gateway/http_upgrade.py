"""Upgrades the gateway ignores: a request asking for any upgrade but WebSocket's (`Upgrade: h2c`, as `curl --http2`
sends to an http:// URL), and a CONNECT, is served as HTTP/1.1, as nginx and h11 serve it (`http_server`'s docstring).

httptools (llhttp) ends such a request at its head: uvicorn then dropped the rest of the read, body included, and parsed
the next read as a new request (a body smuggled in as a request, behind a proxy that passes `Upgrade` on). Here the
parse goes on: a parser of its own reads the request's body by its framing fields, then the requests after it. Only a
request with an upgrade takes this path: none of it runs for any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from .http_guard import BODY
from .http_replies import UNPARSABLE

__all__ = ["BodyAfterUpgrade", "IgnoredUpgrades", "framing_head"]

_FRAMING = (b"content-length", b"transfer-encoding")


def framing_head(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """A request head with only the framing fields of `headers` (a head's, as uvicorn lists them), for a parser to read
    that request's body as it would have (`IgnoredUpgrades._ignore_upgrade`); None when the request has no body."""
    fields = [b"%s: %s\r\n" % field for field in headers if field[0] in _FRAMING and field != (b"content-length", b"0")]
    return b"".join([b"POST / HTTP/1.1\r\n", *fields, b"\r\n"]) if fields else None


class BodyAfterUpgrade:
    """The callbacks of the parser that reads the body of a request whose upgrade was ignored
    (`IgnoredUpgrades._ignore_upgrade`), then the requests after it: the protocol's, but its first head (`framing_head`)
    neither begins a message nor makes a request (its URL and fields, added to the ignored request's, which is
    complete, change nothing)."""

    def __init__(self, protocol: Any) -> None:
        self.protocol, self.framing = protocol, True
        self.on_url, self.on_header, self.on_body = protocol.on_url, protocol.on_header, protocol.on_body
        self.on_message_complete = protocol.on_message_complete
        self.on_chunk_header, self.on_chunk_complete = protocol.on_chunk_header, protocol.on_chunk_complete

    def on_message_begin(self) -> None:
        if not self.framing:
            self.protocol.on_message_begin()

    def on_headers_complete(self) -> None:
        if self.framing:
            self.framing = False
        else:
            self.protocol.on_headers_complete()


class IgnoredUpgrades:
    """The httptools protocol's parse (`LimitedHttpToolsProtocol` mixes it in before uvicorn's protocol), with the
    upgrades above ignored."""

    # (the protocol's: uvicorn's state, and `Guard`'s)
    parser: Any
    cycle: Any
    transport: Any
    _state: int
    _unset_keepalive_if_required: Callable[[], None]
    _should_upgrade: Callable[[], bool]
    handle_websocket_upgrade: Callable[[], None]
    send_400_response: Callable[[str], None]
    _after_head_feed: Callable[[], None]

    def _parse(self, data: bytes) -> None:
        """uvicorn's `data_received`, but an upgrade other than WebSocket's does not end the parse: it is ignored
        (`_ignore_upgrade`) and the rest of `data` parsed on (in a loop: a read may hold many such requests)."""
        self._unset_keepalive_if_required()
        while True:
            try:
                self.parser.feed_data(data)
                return
            except HttpParserUpgrade as upgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                    return
                data = data[upgrade.args[0]:]
            except HttpParserError:
                self.send_400_response(UNPARSABLE)
                return
            if not self._ignore_upgrade() or not data:
                return

    def _ignore_upgrade(self) -> bool:
        """A request asking for an upgrade other than WebSocket's, or a CONNECT, is served as HTTP/1.1 (the module
        docstring says why). llhttp ended it at its head: a parser of its own reads its body, if it has one, then
        the requests after it (`BodyAfterUpgrade`). False if nothing more is to be parsed."""
        if self._state != 0 or self.transport.is_closing():
            return False  # (0: the message is complete, as llhttp saw it)
        framing = framing_head(self.cycle.scope["headers"])
        if framing is None:
            return True  # no body: llhttp parses on
        cycle = self.cycle  # made in this read: its app has not run, nor read the body
        cycle.more_body = True
        cycle.message_event.clear()
        self._state = BODY
        self.parser = HttpRequestParser(BodyAfterUpgrade(self))
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn's
        try:
            self.parser.feed_data(framing)
        except HttpParserError:  # as it would have refused it without the upgrade
            self.send_400_response(UNPARSABLE)
            return False
        self._after_head_feed()  # the body's timer
        return True
