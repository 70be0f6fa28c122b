"""The proxied endpoints served in front of litestar's router (`DirectRoutes`), for the hot path; and, in front of
every request of a gateway without keys (`auth: none`), its `Host` and `Origin` checks (`LoopbackGate`).

Why a module of its own: it is the one place that second-guesses litestar (its router, and the private `Host`
check it must agree with), apart from the wiring in `app.py`, which builds the handlers it serves.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from litestar import Litestar

from .errors import error_body
from .http_replies import count_refusal, warn_once
from .translate.anthropic_errors import error_envelope, messages_path, status_type

try:  # litestar's own Host check (private; without it every request takes litestar's router, as before)
    from litestar._asgi.utils import is_valid_host
except ImportError:  # pragma: no cover -- a litestar that moved it
    is_valid_host = None  # type: ignore[assignment]

__all__ = ["ASGIApp", "DirectRoutes", "LoopbackGate", "install_direct_routes", "loopback_gate"]

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class DirectRoutes:
    """The proxied endpoints, reached before litestar's router: the hot path pays no routing.

    A request whose path is exactly one of them (and whose `Host` header litestar would accept)
    goes straight to its handler, which answers every error itself; anything else, other paths and
    spellings included, goes through litestar as before. The same handlers are mounted in litestar
    too, so both ways serve a request the same. litestar's router cost about 6% of the CPU of a
    cache hit (path normalization, route lookup, its exception middleware wrapping `send`).

    Served in front of litestar (`in_front_of`, with the gateway), it is also where the `auth: none` checks of
    `LoopbackGate` run, before routing and before a byte of the body is read, on every path: the gate of the
    policy in force, rebuilt when a reload swaps the policy (one identity comparison a request finds it current).
    A policy with keys has none: its requests pay that comparison and a test of `None`.
    """

    __slots__ = ("_fallback", "_gate", "_gateway", "_hosts", "_policy", "_routes")

    def __init__(self, routes: dict[str, ASGIApp], fallback: ASGIApp, gateway: Any = None) -> None:
        self._routes = routes
        self._fallback = fallback
        self._hosts: set[bytes] = set()  # `Host` values seen valid (a gateway is reached under few names)
        self._gateway = gateway  # whose `runtime.policy` says whether `LoopbackGate` checks requests (None: never)
        self._policy: Any = None  # the policy `_gate` was made for
        self._gate: LoopbackGate | None = None

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        """The chosen app's own coroutine: not a coroutine itself, so that a streamed request's task,
        woken on every event, resumes through one frame fewer (about 1,500 instructions an event)."""
        if scope["type"] != "http":
            return self._fallback(scope, receive, send)
        if self._gateway is not None:
            policy = self._gateway.runtime.policy
            if policy is not self._policy:
                self._gate, self._policy = loopback_gate(policy), policy
            gate = self._gate
            if gate is not None:
                refused = gate.refusal(scope["headers"])
                if refused is not None:
                    return refused(scope, receive, send)
        handler = self._routes.get(scope["path"])
        if handler is None or not self._plain_host(scope["headers"]):
            return self._fallback(scope, receive, send)
        return handler(scope, receive, send)

    def in_front_of(self, app: ASGIApp, gateway: Any = None) -> DirectRoutes:
        """The same routes, falling back to `app`: served in front of litestar itself (`app.served_app`); with
        `gateway`, checking every request of a policy without keys (`LoopbackGate`)."""
        return DirectRoutes(self._routes, app, gateway)

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


# A `Host` header: a name or IPv4 address, or a bracketed IPv6 address; then an optional port.
_HOST = re.compile(r"(?:\[([0-9a-f:.]+)\]|([^\[\]:]+))(?::[0-9]{0,5})?")
# The origins of this machine's own pages: http or https, on a loopback name or address, any port.
_LOOPBACK_ORIGIN = re.compile(rb"https?://(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?", re.IGNORECASE)
_SEEN = 64  # accepted `Host` and `Origin` values remembered per gate (a gateway is reached under few names)


class LoopbackGate:
    """What a gateway without keys (`auth: none`) answers: requests for itself, from no other site's page.

    No credential protects such a gateway; binding to loopback keeps other machines out, not the web pages a
    browser on this machine runs. Two attacks reach it through a browser, and each is refused here with 403:

    - DNS rebinding: a page whose name an attacker re-resolves to 127.0.0.1 is, to the browser, same-origin with
      the gateway, so it can call the whole API and read the answers (and `/metrics`). Its requests carry the
      attacker's name in `Host`: only `localhost`, an IP address (a page served from an IP address is that
      address's own, never an attacker's name) and the names in `server.allowed_hosts` are answered
      (`host_not_allowed`). A request without a `Host` (HTTP/1.0) comes from no browser and passes.
    - Cross-site requests: any page can POST a `<form enctype=text/plain>` (or a no-cors `fetch`) to
      127.0.0.1 without a preflight, spending the providers' credit; the browser says whose page it is in
      `Origin`. Only loopback origins and `server.allowed_origins` are answered (`origin_not_allowed`); a
      request without `Origin` (curl, the SDKs, a same-origin GET) passes.

    Every path is checked, probes included: without keys the gateway serves loopback (`gateway serve` refuses
    otherwise in front of a real provider), so probes and scrapes come from this machine, or by IP address.
    The cost, per request: one pass over the headers, comparing each name with two constants, and a set look-up
    for the `Host` (and any `Origin`) value, which is parsed only the first time it is seen.
    """

    __slots__ = ("_host_names", "_host_suffixes", "_hosts", "_origin_list", "_origins")

    def __init__(self, allowed_hosts: Sequence[str] = (), allowed_origins: Sequence[str] = ()) -> None:
        names = [name.lower() for name in allowed_hosts]
        self._host_names = frozenset({"localhost", *(name for name in names if not name.startswith("*."))})
        self._host_suffixes = tuple(name[1:] for name in names if name.startswith("*."))  # ".example.com"
        self._origin_list = frozenset(origin.lower().encode("ascii") for origin in allowed_origins)
        self._hosts: set[bytes] = set()  # `Host` values accepted so far
        self._origins: set[bytes] = set()  # `Origin` values accepted so far

    def refusal(self, headers: Sequence[tuple[bytes, bytes]]) -> ASGIApp | None:
        """The app that refuses a request these headers disallow; None (the usual answer) to serve it."""
        for name, value in headers:
            if name == b"host":
                if value not in self._hosts and not self._known(value, self._host_allowed(value), self._hosts):
                    warn_once("host_not_allowed", "403: a request for a host name not in server.allowed_hosts "
                              "(auth: none: a DNS-rebinding defence)")
                    count_refusal("host_not_allowed")
                    return _host_refused
            elif name == b"origin":
                if value not in self._origins and not self._known(value, self._origin_allowed(value), self._origins):
                    warn_once("origin_not_allowed", "403: a request from a web page of an origin not in "
                              "server.allowed_origins (auth: none)")
                    count_refusal("origin_not_allowed")
                    return _origin_refused
        return None

    @staticmethod
    def _known(value: bytes, allowed: bool, seen: set[bytes]) -> bool:
        if allowed and len(seen) < _SEEN:
            seen.add(value)
        return allowed

    def _host_allowed(self, value: bytes) -> bool:
        try:
            text = value.decode("ascii").lower()
        except UnicodeDecodeError:
            return False
        match = _HOST.fullmatch(text)
        if match is None:
            return False
        bracketed, name = match.groups()
        if bracketed is not None:
            return _is_address(bracketed)
        return name in self._host_names or name.endswith(self._host_suffixes) or _is_address(name)

    def _origin_allowed(self, value: bytes) -> bool:
        return _LOOPBACK_ORIGIN.fullmatch(value) is not None or value.lower() in self._origin_list


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def loopback_gate(policy: Any) -> LoopbackGate | None:
    """The checks a policy's requests get at the edge: a `LoopbackGate` without keys (`auth: none`), else none."""
    if policy.auth != "none":
        return None
    server = policy.server
    return LoopbackGate(server.allowed_hosts, server.allowed_origins)


def _refusal(code: str, message: str) -> ASGIApp:
    """A 403 in OpenAI's error envelope, or Anthropic's for a Messages API path; built once."""
    openai = error_body(message, "invalid_request_error", None, code)
    anthropic = error_envelope(message, status_type(403))

    def head(body: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    openai_head, anthropic_head = head(openai), head(anthropic)

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        messages = messages_path(scope.get("path", ""))
        await send({"type": "http.response.start", "status": 403,
                    "headers": anthropic_head if messages else openai_head})
        await send({"type": "http.response.body", "body": anthropic if messages else openai, "more_body": False})

    return refuse


_host_refused = _refusal(
    "host_not_allowed", "this gateway has no keys (auth: none), so it answers requests only for localhost, an IP "
    "address or a name in server.allowed_hosts (a defence against DNS rebinding); add the name there if it is yours")
_origin_refused = _refusal(
    "origin_not_allowed", "this gateway has no keys (auth: none), so it answers no web page of another origin "
    "than a loopback one or those in server.allowed_origins; add the page's origin there if it is yours")


def install_direct_routes(app: Litestar, routes: dict[str, ASGIApp]) -> None:
    """`routes` as `app`'s `asgi_handler`, in front of its own; not at all when this litestar's `Host` check cannot
    be found (or it has no such handler): every request then takes its router."""
    if is_valid_host is not None and hasattr(app, "asgi_handler"):
        app.asgi_handler = DirectRoutes(routes, app.asgi_handler)
