"""A gateway without keys (`auth: none`) answers requests for itself only, and no other site's web page.

Bound to loopback, such a gateway is out of other machines' reach, not of the pages a browser on this machine runs:
a DNS-rebinding page (its name re-resolved to 127.0.0.1, so same-origin with the gateway to the browser) could call
the whole API and read the answers, `/metrics` too; and any page could POST a `<form enctype=text/plain>` (no
preflight) that spends the providers' credit. The first carries the attacker's name in `Host`, the second the page's
origin in `Origin`: both get 403 before routing and before the body is read (`direct_routes.LoopbackGate`).
`server.allowed_hosts` / `server.allowed_origins` add names and origins, and a reload applies them. A policy with
keys is left as it was. Real gateways on real ports, the mock upstream; the suite's Redis is not used.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.auth.keys import hash_key
from gateway.policy import PolicyError, compile_text
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
FOREIGN = "rebind.evil.example"


def open_policy(upstream_url: str, server: str = "") -> str:
    """A policy without keys; `server`: more lines of its `server` section, each indented by two spaces."""
    return (
        "version: 1\n"
        "server:\n"
        "  host: 127.0.0.1\n"
        "  watch_policy: false\n"
        + (server + "\n" if server else "")
        + "auth: none\n"
        "providers:\n"
        f"  mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}\n"
        "models:\n"
        "  chat: {provider: mock, model: mock-model}\n"
    )


@pytest.fixture(scope="module")
def opened(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(open_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def call(running: RunningGateway, method: str, path: str, **headers: str) -> httpx.Response:
    """A request with the headers given (`Host` too: the connection always goes to 127.0.0.1)."""
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    body = json.dumps(CHAT).encode() if method == "POST" else None
    if body is not None:
        named.setdefault("Content-Type", "application/json")
    return httpx.request(method, running.url + path, headers=named, content=body, timeout=10)


def refused(response: httpx.Response, code: str) -> bool:
    return response.status_code == 403 and response.json()["error"]["code"] == code


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/healthz"),
    ("GET", "/readyz"), ("POST", "/v1/embeddings"), ("GET", "/no/such/path"),
])
def test_a_foreign_host_is_refused_on_every_path(opened: RunningGateway, upstream: MockUpstream, method: str,
                                                 path: str) -> None:
    for host in (FOREIGN, f"{FOREIGN}:{opened.port}", "LOCALHOST.evil.example", "localhost.", "2130706433"):
        assert refused(call(opened, method, path, Host=host), "host_not_allowed"), (host, path)
    assert upstream.requests == []  # nothing reached the provider


def test_the_rebinding_page_of_the_report_is_refused_and_reads_nothing(opened: RunningGateway,
                                                                      upstream: MockUpstream) -> None:
    """/tmp/h38/repro_rebind.sh, step 2: the attacker's name in `Host`, and its own origin (same-origin)."""
    response = call(opened, "POST", "/v1/chat/completions", Host=f"{FOREIGN}:{opened.port}",
                    Origin=f"http://{FOREIGN}:{opened.port}")
    assert refused(response, "host_not_allowed")
    assert "choices" not in response.text and upstream.requests == []


def test_loopback_names_and_ip_addresses_are_answered(opened: RunningGateway) -> None:
    port = opened.port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", "127.0.0.1", "[::1]",
                 f"LocalHost:{port}", f"10.1.2.3:{port}", f"[fd00::5]:{port}"):
        assert call(opened, "POST", "/v1/chat/completions", Host=host).status_code == 200, host
    assert call(opened, "GET", "/v1/models", Host=f"localhost:{port}").status_code == 200
    assert call(opened, "GET", "/metrics", Host=f"[::1]:{port}").status_code == 200


def test_a_cross_site_form_post_is_refused_before_any_upstream_call(opened: RunningGateway,
                                                                   upstream: MockUpstream) -> None:
    """/tmp/h38/repro_rebind.sh, step 1: an HTML form's `text/plain` POST from another site (no preflight)."""
    form = b'{"model":"chat","messages":[{"role":"user","content":"=spend"}],"x":"=y"}'
    for origin in ("https://evil.example", "null", "http://localhost.evil.example", "http://127.0.0.1.evil.example"):
        response = httpx.post(opened.url + "/v1/chat/completions", content=form, timeout=10,
                              headers={"Origin": origin, "Content-Type": "text/plain"})
        assert refused(response, "origin_not_allowed"), origin
    assert upstream.requests == []
    assert refused(call(opened, "GET", "/metrics", Origin="https://evil.example"), "origin_not_allowed")
    assert refused(call(opened, "GET", "/v1/models", Origin="https://evil.example"), "origin_not_allowed")


def test_loopback_origins_are_answered(opened: RunningGateway) -> None:
    for origin in ("http://localhost:3000", "https://localhost", "http://127.0.0.1:5173", "http://[::1]:8000",
                   f"http://127.0.0.1:{opened.port}"):
        assert call(opened, "POST", "/v1/chat/completions", Origin=origin).status_code == 200, origin


def test_a_refused_messages_request_gets_anthropics_envelope(opened: RunningGateway) -> None:
    response = call(opened, "POST", "/v1/messages", Host=FOREIGN)
    assert response.status_code == 403
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "permission_error"


def test_refusals_are_counted(opened: RunningGateway) -> None:
    call(opened, "GET", "/v1/models", Host=FOREIGN)
    call(opened, "GET", "/v1/models", Origin="https://evil.example")
    text = opened.metrics()
    assert 'gateway_http_refused_total{reason="host_not_allowed"}' in text
    assert 'gateway_http_refused_total{reason="origin_not_allowed"}' in text


def _reload(running: RunningGateway, text: str) -> None:
    assert running.gateway.source is not None and running.gateway.loop is not None
    running.gateway.source.write_text(text)
    result = asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), running.gateway.loop).result(30)
    assert result["result"] == "ok", result


def test_allowed_hosts_and_origins_are_honoured_and_a_reload_applies_them(tmp_path: Path,
                                                                         upstream: MockUpstream,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    allowing = open_policy(upstream.base_url, "  allowed_hosts: [gw.internal, '*.corp.example']\n"
                                              "  allowed_origins: ['https://app.corp.example']")
    running = RunningGateway(allowing, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    try:
        port = running.port
        assert call(running, "POST", "/v1/chat/completions", Host=f"gw.internal:{port}").status_code == 200
        assert call(running, "POST", "/v1/chat/completions", Host="GW.Internal").status_code == 200
        assert call(running, "GET", "/v1/models", Host=f"llm.corp.example:{port}").status_code == 200
        assert refused(call(running, "GET", "/v1/models", Host="corp.example"), "host_not_allowed")  # `*.` only
        assert refused(call(running, "GET", "/v1/models", Host="gw.internal.evil.example"), "host_not_allowed")
        assert call(running, "POST", "/v1/chat/completions", Origin="https://app.corp.example").status_code == 200
        assert refused(call(running, "POST", "/v1/chat/completions", Origin="http://app.corp.example"),
                       "origin_not_allowed")  # another scheme is another origin
        assert refused(call(running, "GET", "/v1/models", Host=FOREIGN), "host_not_allowed")

        _reload(running, open_policy(upstream.base_url, f"  allowed_hosts: [{FOREIGN}]\n"
                                                        "  allowed_origins: ['https://other.example:8443']"))
        assert call(running, "GET", "/v1/models", Host=FOREIGN).status_code == 200
        assert refused(call(running, "GET", "/v1/models", Host="gw.internal"), "host_not_allowed")
        assert call(running, "GET", "/v1/models", Origin="https://other.example:8443").status_code == 200
        assert refused(call(running, "GET", "/v1/models", Origin="https://app.corp.example"), "origin_not_allowed")

        keyed = open_policy(upstream.base_url).replace("auth: none", "auth: keys\nkeys:\n  - {name: k, tenant: t, "
                                                       "hash: \"" + hash_key(FULL_KEY) + "\"}")
        _reload(running, keyed)  # a reload onto keys: no gate any more
        key = f"Bearer {FULL_KEY}"
        assert call(running, "POST", "/v1/chat/completions", Host="gw.internal", Authorization=key).status_code == 200
    finally:
        running.stop()


def test_a_policy_with_keys_is_unaffected(gateway: RunningGateway) -> None:
    """The suite's gateway (`auth: keys`): a foreign `Host` and `Origin` with a valid key are served as before."""
    key = f"Bearer {FULL_KEY}"
    assert call(gateway, "POST", "/v1/chat/completions", Host=FOREIGN, Authorization=key).status_code == 200
    assert call(gateway, "POST", "/v1/chat/completions", Origin="https://evil.example",
                Authorization=key).status_code == 200
    assert call(gateway, "GET", "/v1/models", Host=FOREIGN, Authorization=key).status_code == 200
    assert call(gateway, "POST", "/v1/chat/completions", Host=FOREIGN).status_code == 401  # the key still decides


@pytest.mark.parametrize("entry", ["evil.example:8080", "http://evil.example", "*", "*.", "a..b", "-", "ex ample"])
def test_an_allowed_host_is_a_name_without_a_port(entry: str) -> None:
    with pytest.raises(PolicyError, match="allowed_hosts"):
        compile_text(open_policy("http://127.0.0.1:1/v1", f"  allowed_hosts: ['{entry}']"), "p.yaml",
                     {"MOCK_UPSTREAM_KEY": "k"})


@pytest.mark.parametrize("entry", ["*", "null", "evil.example", "https://evil.example/", "https://evil.example/x"])
def test_an_allowed_origin_is_scheme_host_and_port(entry: str) -> None:
    with pytest.raises(PolicyError, match="allowed_origins"):
        compile_text(open_policy("http://127.0.0.1:1/v1", f"  allowed_origins: ['{entry}']"), "p.yaml",
                     {"MOCK_UPSTREAM_KEY": "k"})
