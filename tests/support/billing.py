"""What a request was billed, read back as an operator reads it: its alias's row of `/admin/usage` (the ledger
writes each second) and its access line (written once the request's end hooks ran). For tests that send one request
per alias and check its bill."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

__all__ = ["access_line", "usage_row"]


def usage_row(url: str, admin_token: str, alias: str) -> dict[str, Any]:
    """The alias's usage once its one request is counted (`url`: the gateway's, without `/v1`)."""
    for _ in range(100):
        response = httpx.get(url + "/admin/usage", params={"scope": "model", "name": alias},
                             headers={"Authorization": f"Bearer {admin_token}"}, timeout=10)
        assert response.status_code == 200, response.text
        rows = response.json()["usage"]
        if rows and rows[0]["requests"] >= 1:
            assert rows[0]["requests"] == 1, rows
            return dict(rows[0])
        time.sleep(0.1)
    raise AssertionError(f"no usage counted for {alias}")


def access_line(caplog: pytest.LogCaptureFixture, alias: str) -> dict[str, Any]:
    """The alias's one access line (`caplog` set to capture `gateway.access` at INFO)."""
    for _ in range(100):
        lines = [fields for record in caplog.records if record.name == "gateway.access"
                 and (fields := getattr(record, "fields", {})).get("model") == alias]
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no access line for {alias}")
