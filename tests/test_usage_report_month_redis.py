"""`GET /admin/usage?period=month` on Redis for a policy of many aliases: the report sent one GET per counter, all
at once (20 aliases: 3,720 in the store's pool), which waited past `op_timeout_s`: the report answered 503, with a
message that blamed a counter which was fine, and the store was marked down for every request of the process
(run-time keys answered 503 `key_store_unavailable` meanwhile). Now a row is one MGET, a few rows at a time, and
the 503 says what happened: a counter that is not a count (named), or a store that did not answer.

A real Redis (`GATEWAY_TEST_REDIS_URL`), under a key prefix of each test's own, deleted after."""

from __future__ import annotations

import logging
import textwrap
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url

KEY = "gw-usage-month-test-key-0000000000000000"
ADMIN = "admin-token-for-usage-month-tests"
ALIASES = [f"a{n:02d}" for n in range(20)]
UNITS = 1_000_000  # a counter's units per USD or per count
FIELDS = ("cost_usd", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")


@pytest.fixture
def shared() -> Iterator[tuple[str, str, redis.Redis]]:
    """A Redis URL, a key prefix of this test's own, and a client (the prefix's keys are deleted after)."""
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        raw = redis.Redis.from_url(url)
        try:
            yield url, prefix, raw
        finally:
            keys = list(raw.scan_iter(match=prefix + "*", count=1000))
            if keys:
                raw.delete(*keys)
            raw.close()


def _gateway(upstream: MockUpstream, url: str, prefix: str) -> RunningGateway:
    """20 aliases, run-time keys, the store's own pool and a 1 s operation timeout (the default is 0.25 s: more
    room for a loaded machine; a GET per counter all at once overran it all the same)."""
    models = "".join(f"  {alias}: {{provider: mock, model: mock-model}}\n" for alias in ALIASES)
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: USAGE_ADMIN}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}"}}
        dynamic_keys: {{enabled: true}}
        accounting: {{always: true}}  # usage counted without limits or budgets
        state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 1}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 0, output_per_mtok: 1000}}
        models:
        """) + models
    return RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": url,
                                 "USAGE_ADMIN": ADMIN}).start()


def _ask(gateway: RunningGateway, key: str, alias: str, client: httpx.Client | None = None) -> httpx.Response:
    if client is None:
        with httpx.Client() as own:
            return _ask(gateway, key, alias, own)
    body = {"model": alias, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20}
    return client.post(gateway.base_url + "/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _month(gateway: RunningGateway, **params: str) -> httpx.Response:
    return httpx.get(gateway.url + "/admin/usage", params={"scope": "model", "period": "month", **params},
                     headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def _rows(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {row["name"]: row for row in response.json()["usage"]}


def _other_day() -> str:
    """A day of this month (UTC) other than today."""
    today = datetime.now(UTC)
    return today.strftime("%Y%m") + ("02" if today.day == 1 else "01")


def test_a_month_of_twenty_aliases_is_read_whole_while_clients_are_served(
    shared: tuple[str, str, redis.Redis], upstream: MockUpstream,
) -> None:
    url, prefix, raw = shared
    gateway = _gateway(upstream, url, prefix)
    try:
        spent: Counter[str] = Counter()  # completion tokens per alias, from the answers
        for alias in ALIASES[:5]:
            for _ in range(2):
                answer = _ask(gateway, KEY, alias)
                assert answer.status_code == 200, answer.text
                spent[alias] += answer.json()["usage"]["completion_tokens"]
        day = _other_day()  # and an earlier day of the month, as another replica's flush would have left it
        for field, value in (("cost_usd", 1.5), ("requests", 3), ("completion_tokens", 700)):
            raw.set(f"{prefix}acct:usage:model:a07:{day}:{field}", int(value * UNITS))

        created = [httpx.post(gateway.url + "/admin/keys", json={"tenant": "t"}, timeout=30,
                              headers={"Authorization": f"Bearer {ADMIN}"}) for _ in range(40)]
        fresh = [made.json()["key"] for made in created if made.status_code == 201]
        assert len(fresh) == 40, [made.text for made in created if made.status_code != 201][:1]
        served: Counter[int] = Counter()
        lock = threading.Lock()

        def clients(keys: list[str]) -> None:  # each a run-time key never seen: looked up in the store
            with httpx.Client() as client:
                for key in keys:
                    status = _ask(gateway, key, ALIASES[-1], client).status_code
                    with lock:
                        served[status] += 1

        threads = [threading.Thread(target=clients, args=(fresh[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        reports = [_month(gateway) for _ in range(3)]
        for thread in threads:
            thread.join(60)
        assert [report.status_code for report in reports] == [200] * 3, reports[-1].text
        assert served == Counter({200: 40}), served

        rows = _rows(_month(gateway))
        assert sorted(rows) == ALIASES
        for alias in ALIASES[:5]:
            assert (rows[alias]["requests"], rows[alias]["completion_tokens"]) == (2, spent[alias]), rows[alias]
            assert rows[alias]["cost_usd"] == pytest.approx(spent[alias] / 1000)
        assert (rows["a07"]["requests"], rows["a07"]["completion_tokens"], rows["a07"]["cost_usd"]) == (3, 700, 1.5)
        assert rows[ALIASES[-1]]["requests"] == 40
        assert all(rows[alias]["requests"] == 0 for alias in ALIASES[8:-1])
    finally:
        gateway.stop()


@pytest.mark.parametrize("kind", ["string", "hash"])
def test_a_counter_that_is_not_a_count_is_named(
    shared: tuple[str, str, redis.Redis], upstream: MockUpstream, caplog: pytest.LogCaptureFixture, kind: str,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.accounting")
    url, prefix, raw = shared
    gateway = _gateway(upstream, url, prefix)
    try:
        assert _ask(gateway, KEY, "a03").status_code == 200
        day = _other_day()
        bad = f"acct:usage:model:a03:{day}:cached_tokens"
        raw.set(f"{prefix}acct:usage:model:a03:{day}:requests", 2 * UNITS)
        if kind == "string":
            raw.set(prefix + bad, "not-a-number")
        else:
            raw.hset(prefix + bad, "x", "y")
        report = _month(gateway)
        assert report.status_code == 503, report.text
        error = report.json()["error"]
        assert error["code"] == "store_unavailable" and "does not hold a count" in error["message"], error
        assert bad in error["message"]
        assert [r for r in caplog.records if f"usage report: counter {bad} holds something" in r.getMessage()]
        assert _ask(gateway, KEY, "a03").status_code == 200  # the store is not taken for down
        assert _rows(_month(gateway, name="a04"))["a04"]["requests"] == 0  # nor are other rows unreadable
        raw.delete(prefix + bad)
        assert _rows(_month(gateway))["a03"]["requests"] == 2 + 2
    finally:
        gateway.stop()


def test_a_store_that_does_not_answer_is_said_so(upstream: MockUpstream) -> None:
    gateway = _gateway(upstream, f"redis://127.0.0.1:{free_port()}/0", "gwtest:down:")  # nothing listens there
    try:
        report = _month(gateway)
        assert report.status_code == 503, report.text
        error = report.json()["error"]
        assert error["code"] == "store_unavailable" and "did not answer" in error["message"], error
        assert report.headers["retry-after"] == "1"  # (as every other outage's 503: it had none, H59)
    finally:
        gateway.stop()
