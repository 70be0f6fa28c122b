"""The proxied endpoints served in front of litestar's router (`DirectRoutes`), for the hot path.

Why a module of its own: it is the one place that second-guesses litestar (its router, and the private `Host`
check it must agree with), apart from the wiring in `app.py`, which builds the handlers it serves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from litestar import Litestar

try:  # litestar's own Host check (private; without it every request takes litestar's router, as before)
    from litestar._asgi.utils import is_valid_host
except ImportError:  # pragma: no cover -- a litestar that moved it
    is_valid_host = None  # type: ignore[assignment]

__all__ = ["ASGIApp", "DirectRoutes", "install_direct_routes"]

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class DirectRoutes:
    """The proxied endpoints, reached before litestar's router: the hot path pays no routing.

    A request whose path is exactly one of them (and whose `Host` header litestar would accept)
    goes straight to its handler, which answers every error itself; anything else, other paths and
    spellings included, goes through litestar as before. The same handlers are mounted in litestar
    too, so both ways serve a request the same. litestar's router cost about 6% of the CPU of a
    cache hit (path normalization, route lookup, its exception middleware wrapping `send`).
    """

    __slots__ = ("_fallback", "_hosts", "_routes")

    def __init__(self, routes: dict[str, ASGIApp], fallback: ASGIApp) -> None:
        self._routes = routes
        self._fallback = fallback
        self._hosts: set[bytes] = set()  # `Host` values seen valid (a gateway is reached under few names)

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        """The chosen app's own coroutine: not a coroutine itself, so that a streamed request's task,
        woken on every event, resumes through one frame fewer (about 1,500 instructions an event)."""
        handler = self._routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or not self._plain_host(scope["headers"]):
            return self._fallback(scope, receive, send)
        return handler(scope, receive, send)

    def in_front_of(self, app: ASGIApp) -> DirectRoutes:
        """The same routes, falling back to `app`: served in front of litestar itself (`app.served_app`)."""
        return DirectRoutes(self._routes, app)

    def _plain_host(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether litestar's router would let the request's `Host` through (else it answers 400 itself)."""
        for name, value in headers:
            if name == b"host":
                if value in self._hosts:
                    return True
                if not is_valid_host(value):
                    return False
                if len(self._hosts) < 64:
                    self._hosts.add(value)
                return True
        return True


def install_direct_routes(app: Litestar, routes: dict[str, ASGIApp]) -> None:
    """`routes` as `app`'s `asgi_handler`, in front of its own; not at all when this litestar's `Host` check cannot
    be found (or it has no such handler): every request then takes its router."""
    if is_valid_host is not None and hasattr(app, "asgi_handler"):
        app.asgi_handler = DirectRoutes(routes, app.asgi_handler)
