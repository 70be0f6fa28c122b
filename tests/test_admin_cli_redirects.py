"""The `gateway keys` / `gateway usage` commands never send the admin token where a redirect points: whatever answers
`--url` (an ingress, a login page, a moved host) may answer 3xx, and urllib would follow it with every header but
the content ones, the `Authorization` that holds the admin token included. The command refuses the redirect and
says so, naming the status and where it pointed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from gateway.admin_client import AdminClient, AdminError
from tests.conftest import REPO

TOKEN = "b8-admin-token-0123456789abcdef"


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _Elsewhere(_Quiet):
    """Another host: records what reaches it, answers an empty key list."""

    seen: list[str | None]

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        body = b'{"object": "list", "data": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(handler: type[BaseHTTPRequestHandler]) -> HTTPServer:
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def redirected(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[str | None], int]]:
    """(the URL that redirects, what the other host received, the status it redirects with)."""
    status: int = request.param
    seen: list[str | None] = []
    other = _serve(type("Elsewhere", (_Elsewhere,), {"seen": seen}))
    target = f"http://localhost:{other.server_address[1]}"  # another host name: another origin

    class Redirecting(_Quiet):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    front = _serve(Redirecting)
    try:
        yield f"http://127.0.0.1:{front.server_address[1]}", seen, status
    finally:
        for server in (front, other):
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("redirected", [301, 302, 303, 307, 308], indirect=True)
def test_the_client_refuses_a_redirect(redirected: tuple[str, list[str | None], int],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, seen, status = redirected
    monkeypatch.setenv("B8_ADMIN", TOKEN)
    with pytest.raises(AdminError) as refused:
        AdminClient(url, "B8_ADMIN", timeout_s=5).call("GET", "/admin/keys")
    assert seen == []  # nothing reached the other host, the token least of all
    assert refused.value.status == status
    message = str(refused.value)
    assert str(status) in message and "localhost" in message and "redirect" in message, message
    assert TOKEN not in message


@pytest.mark.parametrize("redirected", [307], indirect=True)
def test_the_keys_command_refuses_a_redirect(redirected: tuple[str, list[str | None], int]) -> None:
    url, seen, _ = redirected
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "list", "--url", url, "--admin-token-env", "B8_CLI_TOKEN"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "B8_CLI_TOKEN": TOKEN}, check=False)
    assert done.returncode != 0, done.stdout
    assert seen == []
    assert "307" in done.stderr and "localhost" in done.stderr, done.stderr
    assert TOKEN not in done.stdout + done.stderr
