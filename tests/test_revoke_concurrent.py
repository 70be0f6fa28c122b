"""Many revocations at once, across two replicas on one Redis: each answers 200 with its audit line. They used to
race for the key index (one value, changed by compare-and-set, 16 tries) as their last step, after the key was
already revoked: the losers answered 409 "too many concurrent key changes; retry" for keys that were revoked
(their secret 401, their GET 404), with no audit line. Removing the index entry is cleanup now (a listing drops
an entry whose record is gone).

A real Redis (`GATEWAY_TEST_REDIS_URL`), under a key prefix of each test's own, deleted after."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from gateway.auth.records import INDEX
from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url

ADMIN_TOKEN = "admin-token-for-revoke-tests-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS = 128


@pytest.fixture
def replicas(upstream: MockUpstream) -> Iterator[tuple[RunningGateway, RunningGateway, redis.Redis, str]]:
    """Two gateways on one Redis key prefix (a generous operation timeout: a loaded machine must not take the
    store for down), a client of that Redis, and the prefix (its keys deleted after)."""
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        text = (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN")
                + "dynamic_keys: {enabled: true, max_keys: 1000}\n"
                + f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 5}}\n')
        env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN, "GW_TEST_REDIS": url}
        first = RunningGateway(text, env).start()
        second = RunningGateway(text, env).start()
        raw = redis.Redis.from_url(url)
        try:
            yield first, second, raw, prefix
        finally:
            first.stop()
            second.stop()
            keys = list(raw.scan_iter(match=prefix + "*", count=1000))
            if keys:
                raw.delete(*keys)
            raw.close()


async def _create(client: httpx.AsyncClient, gateway: RunningGateway) -> list[dict[str, Any]]:
    made = []
    for _ in range(KEYS):
        response = await client.post(gateway.url + "/admin/keys", headers=ADMIN, json={"tenant": "rv"})
        assert response.status_code == 201, response.text
        made.append(response.json())
    return made


async def _use(client: httpx.AsyncClient, gateway: RunningGateway, key: str) -> int:
    response = await client.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "chat", "messages": [{"role": "user", "content": "hello"}]})
    return response.status_code


def test_concurrent_revocations_all_answer_200_and_are_audited(
    replicas: tuple[RunningGateway, RunningGateway, redis.Redis, str], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.keys")
    first, second, raw, prefix = replicas

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            made = await _create(client, first)
            assert {await _use(client, (first, second)[n % 2], key["key"]) for n, key in enumerate(made)} == {200}
            answers = await asyncio.gather(*(
                client.delete((first, second)[n % 2].url + f"/admin/keys/{key['id']}", headers=ADMIN)
                for n, key in enumerate(made)))
            statuses = Counter(answer.status_code for answer in answers)
            assert statuses == Counter({200: KEYS}), [answer.text for answer in answers if answer.status_code != 200]
            for key in made:  # each revoked: its secret opens nothing on either replica, and it is gone
                assert await _use(client, first, key["key"]) == 401
                assert await _use(client, second, key["key"]) == 401
                assert (await client.get(first.url + f"/admin/keys/{key['id']}", headers=ADMIN)).status_code == 404
            listing = await client.get(first.url + "/admin/keys", headers=ADMIN)
            assert listing.status_code == 200 and listing.json()["data"] == [], listing.text
            # Once the listing dropped the entries a lost race left behind, a revoked key is no key (before that,
            # a repeated DELETE "finishes" the revocation the lingering entry stands for, and answers 200).
            again = await client.delete(first.url + f"/admin/keys/{made[0]['id']}", headers=ADMIN)
            assert again.status_code == 404, again.text

            audited = Counter(record.__dict__["fields"]["key_id"] for record in caplog.records
                              if record.getMessage() == "key revoked")
            assert audited == Counter({key["id"]: 1 for key in made})
            left = raw.get(prefix + INDEX)  # the listing dropped any entry a lost race left behind
            assert left is None or not any(key["id"].encode() in left for key in made), left

    asyncio.run(scenario())
