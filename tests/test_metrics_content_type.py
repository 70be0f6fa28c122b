"""`/metrics` answers with the Prometheus text format's content type, once, with one charset.

Before, the route handed litestar the whole content type as its media type, and litestar adds `; charset=utf-8` to
every `text/` media type: the header read `text/plain; version=0.0.4; charset=utf-8; charset=utf-8`. A scrape of a
real gateway (uvicorn, the app as `gateway serve` builds it), its raw header lines read as sent.
"""

from __future__ import annotations

import socket

import httpx

from gateway.telemetry.metrics import CONTENT_TYPE
from tests.conftest import RunningGateway


def _raw_head(gw: RunningGateway) -> list[str]:
    """The response's head lines as they came off the socket (httpx would join repeated headers)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")


def test_the_content_type_is_the_exposition_format_with_one_charset(gateway: RunningGateway) -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    response = httpx.get(gateway.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    head = _raw_head(gateway)
    assert head[0].startswith("HTTP/1.1 200")
    types = [line.split(":", 1)[1].strip() for line in head[1:] if line.lower().startswith("content-type:")]
    assert types == [CONTENT_TYPE]
