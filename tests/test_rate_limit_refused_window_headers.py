"""A 429's `x-ratelimit-*` headers show the window that refused it, the one its `Retry-After` is about.

Ranked with the caller's other windows (`headers.tighter`: the fewest left, then the later reset), the refusing
window (0 left) could lose a tie to a window the refused request had just filled itself, and given back with the
refusal: a key's `rpm: 2` refused with 47 s to go, its tenant's `rpm: 3` at 0 left with 58 s was shown beside
`Retry-After: 47`. A real gateway on the in-process store, whose window clock (`MemoryStore._clock`) the test
sets; both of its in-line paths (requests-per-minute limits only, and with a concurrency limit beside them). The
remote path's choice is `refused_windows`, checked alone at the end."""

from __future__ import annotations

import textwrap
import time

import httpx
import pytest

from gateway.accounting.headers import refused_windows
from gateway.auth.keys import hash_key
from gateway.store.base import WindowReservation
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-refused-window-key-a-000000000000000000000"
OTHER = "gw-refused-window-key-b-000000000000000000000"


@pytest.mark.parametrize("tenant_limits", ["{rpm: 3}", "{rpm: 3, concurrent: 10}"])
def test_a_429_shows_the_window_that_refused_it(upstream: MockUpstream, tenant_limits: str) -> None:
    """The tenant's window opens at 0 (the other key), the key's at 50; at 61 the tenant's opens again. At 63 the
    key's third request in its window is refused (47 s to its reset) while it fills the tenant's (0 left, 58 s):
    the 429 shows the key's window, 2 of 2 used, reset in 47 s, as its `Retry-After` says."""
    policy = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: k, tenant: t, hash: "{hash_key(KEY)}", limits: {{rpm: 2}}}}
          - {{name: k2, tenant: t, hash: "{hash_key(OTHER)}"}}
        tenants:
          t: {{limits: {tenant_limits}}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: mock-model}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    store = running.gateway.runtime.store
    base = time.monotonic()
    now = [base]
    store._clock = lambda: now[0]  # type: ignore[attr-defined]

    def send(key: str, at: float) -> httpx.Response:
        now[0] = base + at
        return httpx.post(running.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)

    try:
        for key, at in ((OTHER, 0), (KEY, 50), (KEY, 61), (OTHER, 62)):
            assert send(key, at).status_code == 200
        refused = send(KEY, 63)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "47"
        assert (refused.headers["x-ratelimit-limit-requests"], refused.headers["x-ratelimit-remaining-requests"],
                refused.headers["x-ratelimit-reset-requests"]) == ("2", "0", "47s")
        after = send(OTHER, 64)  # the refusal gave the tenant's place back: the tenant's window has 1 left
        assert after.status_code == 200, after.text
    finally:
        running.stop()


def test_the_refusing_window_takes_its_kinds_place_whoever_it_is() -> None:
    """`refused_windows`, as the remote path (`Admission._limits`) and a hop use it: the window that refused in its
    kind's place, the caller's own in the other's; a concurrency refusal (no window) shows the caller's own."""
    key = WindowReservation(False, 2, 2, 47.0)
    tenant = WindowReservation(True, 3, 3, 58.0)  # filled by the refused request itself: as few left, later reset
    tokens = WindowReservation(True, 10, 100, 30.0)
    assert refused_windows("rpm", key, tenant, tokens) == (key, tokens)
    assert refused_windows("tpm", key, tenant, tokens) == (tenant, key)
    assert refused_windows("concurrent", None, tenant, tokens) == (tenant, tokens)
