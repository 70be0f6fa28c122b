"""A 405 names the methods the path takes in `Allow` (RFC 9110 15.5.6), on the proxied endpoints and on the
litestar routes (`/v1/models`, `/v1/models/{id}`), whose 405s lost the header in `api.errors`' handler."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import FULL_KEY, RunningGateway

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/v1/chat/completions", "POST"),
    ("POST", "/v1/models", "GET"),
    ("PUT", "/v1/models", "GET"),
    ("DELETE", "/v1/models/chat", "GET"),
])
def test_a_405_names_the_allowed_methods(gateway: RunningGateway, method: str, path: str, allowed: str) -> None:
    response = httpx.request(method, gateway.url + path, headers=AUTH)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    listed = {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}
    assert allowed in listed and method not in listed, dict(response.headers)
