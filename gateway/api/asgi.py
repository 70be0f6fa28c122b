"""Small ASGI helpers shared by the HTTP layer: headers, request ids, error replies."""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Iterable
from typing import Any

from ..errors import GatewayError

__all__ = ["RequestHeaders", "error_header_map", "new_request_id", "send_body", "send_error"]

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
JSON = b"application/json"


# Request ids must be unique, not unpredictable: a random per-process prefix and a
# counter cost a fraction of reading the OS's random source on every request
# (a profile showed `secrets.token_hex` at 2% of the gateway's CPU).
_ID_PREFIX = "req_" + secrets.token_hex(6)
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


class RequestHeaders:
    """The few request headers the gateway reads, found in one pass over the ASGI list."""

    __slots__ = ("content_length", "credential", "request_id", "size")

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        credential = request_id = None
        content_length: int | None = None
        size = 0
        for name, value in raw:
            size += len(name) + len(value) + 4
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    credential = token.strip()
            elif name == b"api-key" and credential is None:
                credential = value.decode("latin-1").strip() or None
            elif name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _SANE_REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else -1
        self.credential = credential
        self.request_id = request_id or new_request_id()
        self.content_length = content_length
        self.size = size


def error_header_map(error: GatewayError, request_id: str) -> dict[str, str]:
    """The headers every error reply carries, whichever layer sends it."""
    headers = {"x-request-id": request_id, **{k.lower(): v for k, v in error.headers.items()}}
    if error.status == 401:
        headers["www-authenticate"] = "Bearer"
    return headers


async def send_body(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Any, error: GatewayError, request_id: str) -> None:
    body = error.body()
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error_header_map(error, request_id).items()]
    await send_body(send, error.status, headers, body)
