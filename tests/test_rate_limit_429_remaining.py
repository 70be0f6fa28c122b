"""What a 429's `x-ratelimit-remaining-*` headers say, and whether a client is told to retry it.

A request one limit refuses gives back what the others took (in the same step of the store: `reserve_together`),
so its headers show the windows without it, on every store: on the in-process one they counted the refused
request's own reservation (a key of `rpm: 2, tpm: 5000` refused its third request by `rpm` with 4344 tokens left
shown, 4952 on Redis; a key of `rpm: 10, concurrent: 1` with one request in flight refused a second by
`concurrent` with 8 requests left shown, 9 on Redis). The window that refused shows nothing left in its kind's
place, as the `Retry-After` beside it says (a `tpm` window showed what it had left, less than the request asked).
A request larger than a whole `tpm` window is refused however long it waits: 429 `rate_limit_exceeded` as OpenAI
answers it, without `Retry-After` and with `x-should-retry: false`, which the OpenAI and Anthropic SDKs obey (they
retried it after 60 s). Real gateway and mock upstream, on the in-process store and on the suite's Redis; the
requests reaching the gateway counted by `gateway_limit_rejections_total`."""

from __future__ import annotations

import re
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis

from gateway.accounting.headers import duration
from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url

MAIN = "gw-429-remaining-main-key-00000000000000000"
OTHER = "gw-429-remaining-other-key-1111111111111111"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A private one-node Redis Cluster: no script takes a request's limits together there, each is taken alone and
    what fit given back after the refusal (`Taking._given_back`)."""
    with RedisServer(cluster=True) as server:
        yield f"redis+cluster://127.0.0.1:{server.port}"


def _states(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """The policy's `state:` line and its environment: the in-process store, the suite's Redis under a prefix of
    the test's own (its keys deleted afterwards), or a private cluster."""
    if request.param == "memory":
        yield "", {}
        return
    if request.param == "cluster":
        url = request.getfixturevalue("cluster")
        prefix = f"gwtest:b13:{uuid.uuid4().hex}:"  # (the server is the module's)
        yield f'state: {{backend: redis, url_env: GW_B13_REDIS, key_prefix: "{prefix}"}}\n', {"GW_B13_REDIS": url}
        return
    with suite_redis_url() as url:
        prefix = f"gwtest:b13:{uuid.uuid4().hex}:"
        yield f'state: {{backend: redis, url_env: GW_B13_REDIS, key_prefix: "{prefix}"}}\n', {"GW_B13_REDIS": url}
        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=prefix + "*"):
                client.delete(key)
        finally:
            client.close()


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """(Named first by a test, so that its gateway, stopped before this ends, writes nothing after the clean-up.)"""
    yield from _states(request)


@pytest.fixture(params=["memory", "redis", "cluster"])
def any_state(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """`state`, and a Redis Cluster: every way a refused request's reservations are given back."""
    yield from _states(request)


def _policy(upstream: MockUpstream, state_line: str, key_limits: str, tenant_limits: str = "{}") -> str:
    return state_line + textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(MAIN)}", limits: {key_limits}}}
          - {{name: other, tenant: acme, hash: "{hash_key(OTHER)}"}}
        tenants:
          acme: {{limits: {tenant_limits}}}
        providers:
          a: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: a, model: mock-model}}
          slow: {{provider: a, model: fault-slow-first-byte-3000}}
        """)


def _call(running: RunningGateway, key: str = MAIN, max_tokens: int = 600, text: str = "hi",
          model: str = "chat") -> httpx.Response:
    return httpx.post(running.base_url + "/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens})


def _used(answer: httpx.Response) -> int:
    assert answer.status_code == 200, answer.text
    return int(answer.json()["usage"]["total_tokens"])


def _rejections(running: RunningGateway, kind: str) -> float:
    series = f'gateway_limit_rejections_total{{kind="{kind}",scope="key"}} '
    found = re.search("^" + re.escape(series) + r"(\S+)$", running.metrics(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _window(answer: httpx.Response, kind: str) -> tuple[str, str]:
    return answer.headers[f"x-ratelimit-limit-{kind}"], answer.headers[f"x-ratelimit-remaining-{kind}"]


def test_an_rpm_429_shows_the_tokens_it_did_not_take(
    any_state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    running = make_gateway(_policy(upstream, any_state[0], "{rpm: 2, tpm: 5000}"), any_state[1])
    used = _used(_call(running)) + _used(_call(running))
    refused = _call(running)  # refused by `rpm`: its 608 tokens were never the window's
    assert refused.status_code == 429, refused.text
    assert "requests per minute" in refused.json()["error"]["message"]
    assert _window(refused, "requests") == ("2", "0")
    assert _window(refused, "tokens") == ("5000", str(5000 - used))
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_a_concurrency_429_shows_the_request_it_did_not_take(
    any_state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    running = make_gateway(_policy(upstream, any_state[0], "{rpm: 10, concurrent: 1}"), any_state[1])
    seen = len(upstream.requests)
    first: list[httpx.Response] = []
    holder = threading.Thread(target=lambda: first.append(_call(running, model="slow")))
    holder.start()
    try:
        for _ in range(200):  # until the upstream has it: the slot is held
            if any(r.model == "fault-slow-first-byte-3000" for r in upstream.requests[seen:]):
                break
            time.sleep(0.05)
        refused = _call(running)
    finally:
        holder.join()
    assert refused.status_code == 429, refused.text
    assert "concurrent requests" in refused.json()["error"]["message"]
    assert _window(refused, "requests") == ("10", "9")  # the one in flight; not the refused one
    assert refused.headers["retry-after"] == "1"
    assert first[0].status_code == 200


def test_a_429_shows_the_fewest_left_once_given_back(
    any_state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """Refused by the key's `rpm`: the key's token window took the request (677 left, 69 counting it) and its
    tenant's did not fit it (454 left); without it, the tenant's has the fewest left, as Redis answers it."""
    running = make_gateway(_policy(upstream, any_state[0], "{rpm: 1, tpm: 1000}", "{tpm: 1100}"), any_state[1])
    long = " ".join(["word"] * 300)
    mine = _used(_call(running, max_tokens=50, text=long))
    tenant = mine + _used(_call(running, OTHER, max_tokens=50, text=long))
    assert 1000 - mine >= 620 and 1100 - tenant < 600  # (the key's fits the next request; the tenant's does not)
    refused = _call(running)
    assert refused.status_code == 429, refused.text
    assert _window(refused, "requests") == ("1", "0")
    assert _window(refused, "tokens") == ("1100", str(1100 - tenant))


def test_a_tpm_429_shows_its_window_with_nothing_left(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    running = make_gateway(_policy(upstream, state[0], "{tpm: 1000}"), state[1])
    used = _used(_call(running, max_tokens=900))
    refused = _call(running, max_tokens=990)  # about 998 tokens: more than the 976 left, less than the window
    assert refused.status_code == 429, refused.text
    assert "tokens per minute" in refused.json()["error"]["message"] and used < 990
    assert _window(refused, "tokens") == ("1000", "0")
    wait = int(refused.headers["retry-after"])  # (whole seconds up; the header's are a millisecond short of that)
    assert refused.headers["x-ratelimit-reset-tokens"] in (duration(wait), duration(wait - 1))
    assert "x-should-retry" not in refused.headers


def test_a_request_larger_than_the_whole_window_is_not_to_be_retried(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    running = make_gateway(_policy(upstream, state[0], "{tpm: 1000}"), state[1])
    refused = _call(running, max_tokens=5000)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    assert "request too large" in error["message"] and "more than the whole limit of 1000" in error["message"]
    assert "max_tokens" in error["message"] and "shorter prompt" in error["message"]
    assert "retry-after" not in refused.headers and refused.headers["x-should-retry"] == "false"
    assert _window(refused, "tokens") == ("1000", "1000")  # the window is as it was: it is the request that is large
    assert _rejections(running, "tpm") == 1

    sdk = openai.OpenAI(base_url=running.base_url, api_key=MAIN, max_retries=2, timeout=30)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="chat", max_tokens=5000, messages=[{"role": "user", "content": "hi"}])
    assert "request too large" in str(caught.value)
    assert _rejections(running, "tpm") == 2  # one request: not retried

    with anthropic.Anthropic(base_url=running.url, api_key=MAIN, max_retries=2, timeout=30) as messages:
        with pytest.raises(anthropic.RateLimitError) as refused_messages:
            messages.messages.create(model="chat", max_tokens=5000, messages=[{"role": "user", "content": "hi"}])
    body: Any = refused_messages.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "request too large" in body["error"]["message"]
    headers = refused_messages.value.response.headers
    assert "retry-after" not in headers and headers["x-should-retry"] == "false"
    assert _rejections(running, "tpm") == 3  # one request: not retried


def test_an_ordinary_429_is_still_retried(make_gateway: Callable[..., RunningGateway], upstream: MockUpstream) -> None:
    """The window's clock held 0.5 s before its reset (`Retry-After: 1`): the SDK's two retries are refused too."""
    running = make_gateway(_policy(upstream, "", "{rpm: 1}"))
    store = running.gateway.runtime.store
    base = time.monotonic()
    now = [base]
    store._clock = lambda: now[0]  # type: ignore[attr-defined]
    assert _call(running).status_code == 200
    now[0] = base + 59.5
    sdk = openai.OpenAI(base_url=running.base_url, api_key=MAIN, max_retries=2, timeout=30)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.response.headers["retry-after"] == "1"
    assert "x-should-retry" not in caught.value.response.headers
    assert _rejections(running, "rpm") == 3  # the request and its two retries
