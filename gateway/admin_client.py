"""A small client of the gateway's admin API, for the `gateway keys ...` commands (standard library only, and the
policy's own cleaning of a credential read from the environment).

The admin token is read from an environment variable named on the command line, never taken as an
argument: arguments show in `ps` and shell history. It is cleaned as the gateway cleans the token it
compares against (`header_credential`: a secret mounted from a file ends in a newline), and no message
holds it: a refused header value is reported by the variable's name, never by the text of the exception,
which quotes the header. Redirects are refused, not followed: urllib would send every header but the content
ones to where a 3xx points, the admin token to another host (an ingress's login page, a moved host).

A body is sent only if its numbers are finite: Python's JSON writes `NaN` and `Infinity`, which are not JSON, and
the gateway answered "the request body is not valid JSON" (the commands' own arguments refuse them before).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .policy.token_file import header_credential

__all__ = ["AdminClient", "AdminError"]


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: the 3xx is then raised as an `HTTPError`, which `AdminClient.call` reports."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_open = urllib.request.build_opener(_RefuseRedirects).open


class AdminError(Exception):
    """The call did not succeed: the gateway's error message (and status), or why it was not reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    def __init__(self, url: str, token_env: str, timeout_s: float = 30.0) -> None:
        try:  # (a bracket left open, a port out of range or not a number: ValueError)
            parts = urllib.parse.urlsplit(url)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:
            usable = False
        if not usable:
            raise AdminError(f"--url wants http(s)://host:port, not {url!r}")
        token, problem = header_credential(os.environ.get(token_env) or "")
        if not token:
            raise AdminError(f"the environment variable {token_env} (the admin token) is not set")
        if problem is not None:
            raise AdminError(f"the environment variable {token_env} (the admin token) {problem}")
        self.base = url.rstrip("/")
        self._token = token
        self._token_env = token_env
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> dict[str, Any]:
        """The decoded JSON answer of a 2xx; `AdminError` with the gateway's message otherwise."""
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        try:
            data = json.dumps(body, allow_nan=False).encode() if body is not None else None
        except ValueError:  # NaN or an infinity (a number of `--limits` JSON, say): not JSON, never sent
            raise AdminError(f"{method} {path} was not sent: a number in it is not finite (NaN or infinite)") from None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json", "Accept": "application/json",
        })
        try:  # the scheme was checked in __init__: http(s) only
            with _open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise AdminError(_redirected(url, method, path, exc), exc.code) from None
            raise AdminError(_message(exc.read()), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminError(f"cannot reach {self.base}: {getattr(exc, 'reason', exc)}") from None
        except ValueError:  # a URL or header http.client refuses; its text would quote the header (the token)
            raise AdminError(f"the request to {self.base} could not be sent: its URL or a header value (the "
                             f"admin token in {self._token_env}) holds characters HTTP does not allow") from None
        try:
            answer: dict[str, Any] = json.loads(raw or b"{}")
        except ValueError:
            raise AdminError(f"{self.base} answered {method} {path} with no JSON: is it the gateway?") from None
        return answer


def _redirected(url: str, method: str, path: str, exc: urllib.error.HTTPError) -> str:
    """What a refused redirect says: its status and the host it pointed to (never the whole Location: it may hold
    a query the operator should not have to paste anywhere)."""
    location = exc.headers.get("Location") if exc.headers is not None else None
    try:
        host = urllib.parse.urlsplit(urllib.parse.urljoin(url, location)).hostname if location else None
    except ValueError:
        host = None
    where = f"host {host!r}" if host else "no usable Location"
    return (f"{method} {path} was answered {exc.code}, a redirect to {where}, which the admin client does not "
            f"follow (it would carry the admin token there): give --url the gateway's own address")


def _message(raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        param = f" ({error['param']})" if error.get("param") else ""
        return f"{error['message']}{param}"
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace") or "no details"
