"""The `/admin/keys` API on one gateway with the memory store: create, use through the official SDK, list,
rotate, revoke, expiry; every bad input answered 4xx in OpenAI's shape; the `gateway keys` commands; and
that a policy with only static keys pays no store call for them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.auth.keys import VirtualKey, digest_of
from gateway.store.memory import MemoryStore
from tests.conftest import FULL_KEY, REPO, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

ADMIN_TOKEN = "admin-token-for-key-tests-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MESSAGES = [{"role": "user", "content": "hello"}]
ENV = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN}


def keyed_policy(upstream: MockUpstream, dynamic: str = "{enabled: true}", extra_alias: bool = False,
                 **server: object) -> str:
    extra = "  extra: {provider: mock, model: mock-model}\n" if extra_alias else ""  # the models section is last
    return (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN", **server) + extra
            + f"dynamic_keys: {dynamic}\n")


@pytest.fixture
def keyed(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(keyed_policy(upstream), ENV).start()
    yield running
    running.stop()


def create(running: RunningGateway, **body: Any) -> dict[str, Any]:
    response = httpx.post(running.url + "/admin/keys", headers=ADMIN, json={"tenant": "acme", **body}, timeout=10)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def client(running: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.base_url, api_key=key, max_retries=0, timeout=10)


def chat(running: RunningGateway, key: str, model: str = "chat") -> str:
    answer = client(running, key).chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
    return answer.choices[0].message.content or ""


def refused(running: RunningGateway, key: str) -> bool:
    try:
        chat(running, key)
    except openai.AuthenticationError:
        return True
    return False


def find(running: RunningGateway, key: str) -> VirtualKey | None:
    """The record the running gateway's look-up gives for a key (in its own event loop)."""
    dynamic, loop = running.gateway.runtime.dynamic_keys, running.gateway.loop
    assert dynamic is not None and loop is not None
    return asyncio.run_coroutine_threadsafe(dynamic.find(digest_of(key), key), loop).result(10)


def test_create_use_list_rotate_revoke(keyed: RunningGateway) -> None:
    made = create(keyed, name="search-svc", models=["chat"], limits={"rpm": 60, "concurrent": 4},
                  budget={"usd": 25, "period": "day", "mode": "soft"})
    key, key_id = made["key"], made["id"]
    assert key.startswith("gw-") and key_id.startswith("vk_") and key_id not in key
    assert made["models"] == ["chat"] and made["expires_at"] is None and made["tenant"] == "acme"
    assert "twenty words" in chat(keyed, key)
    streamed = client(keyed, key).chat.completions.create(model="chat", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert "twenty words" in "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    with pytest.raises(openai.NotFoundError):  # an alias the key may not use
        chat(keyed, key, model="embed")
    assert [m.id for m in client(keyed, key).models.list()] == ["chat"]
    record = find(keyed, key)  # what the accounting stage reads: the record's limits and budget
    assert record is not None and record.key_id == key_id and record.tenant == "acme"
    assert record.limits is not None and (record.limits.rpm, record.limits.concurrent) == (60, 4)
    assert record.budget is not None and (record.budget.usd, record.budget.period, record.budget.mode) == (
        25, "day", "soft")

    shown = httpx.get(f"{keyed.url}/admin/keys/{key_id}", headers=ADMIN).json()
    assert shown["name"] == "search-svc" and "key" not in shown and shown["limits"]["rpm"] == 60

    rotated = httpx.post(f"{keyed.url}/admin/keys/{key_id}/rotate", headers=ADMIN, timeout=10)
    assert rotated.status_code == 200
    new_key = rotated.json()["key"]
    assert rotated.json()["id"] == key_id and new_key != key and rotated.json()["rotated_at"] is not None
    assert refused(keyed, key)  # at once
    assert "twenty words" in chat(keyed, new_key)

    revoked = httpx.delete(f"{keyed.url}/admin/keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json() == {"id": key_id, "object": "gateway.key.deleted",
                                                             "deleted": True}
    assert refused(keyed, new_key)
    assert httpx.get(f"{keyed.url}/admin/keys/{key_id}", headers=ADMIN).status_code == 404
    assert httpx.delete(f"{keyed.url}/admin/keys/{key_id}", headers=ADMIN).status_code == 404
    assert httpx.post(f"{keyed.url}/admin/keys/{key_id}/rotate", headers=ADMIN).status_code == 404
    assert "twenty words" in chat(keyed, FULL_KEY)  # the policy's keys are untouched


def test_a_rotation_grace_period_keeps_the_old_secret_for_a_while(keyed: RunningGateway) -> None:
    made = create(keyed)
    answer = httpx.post(f"{keyed.url}/admin/keys/{made['id']}/rotate", headers=ADMIN, json={"grace_s": 1.5}).json()
    assert answer["previous_key_valid_until"] is not None
    assert "twenty words" in chat(keyed, made["key"]) and "twenty words" in chat(keyed, answer["key"])
    time.sleep(1.7)
    assert refused(keyed, made["key"])
    assert "twenty words" in chat(keyed, answer["key"])


def test_keys_expire(keyed: RunningGateway) -> None:
    made = create(keyed, ttl_s=1)
    assert made["expires_at"] == pytest.approx(time.time() + 1, abs=2)
    assert "twenty words" in chat(keyed, made["key"])
    time.sleep(1.2)
    assert refused(keyed, made["key"])
    listed = httpx.get(f"{keyed.url}/admin/keys", headers=ADMIN).json()["data"]
    assert [k["expired"] for k in listed if k["id"] == made["id"]] == [True]
    # still listed, but a rotation would hand out a secret that never works: refused
    error = _error(httpx.post(f"{keyed.url}/admin/keys/{made['id']}/rotate", headers=ADMIN, timeout=10), 409)
    assert error["code"] == "key_expired"
    at = create(keyed, expires_at=int(time.time()) + 3600)
    assert at["expires_at"] == int(time.time()) + 3600 or at["expires_at"] > time.time()


def test_listing_never_shows_a_key_or_a_hash(keyed: RunningGateway) -> None:
    made = [create(keyed, name=f"k{n}", tenant=tenant) for n, tenant in enumerate(["acme", "acme", "globex"])]
    for response in (httpx.get(f"{keyed.url}/admin/keys", headers=ADMIN),
                     httpx.get(f"{keyed.url}/admin/keys", headers=ADMIN, params={"tenant": "acme"}),
                     httpx.get(f"{keyed.url}/admin/keys/{made[0]['id']}", headers=ADMIN)):
        assert response.status_code == 200
        for key in made:
            digest = digest_of(key["key"]).hex()
            assert key["key"] not in response.text and digest not in response.text
            assert key["key"][3:20] not in response.text
        assert '"key"' not in response.text and "digest" not in response.text and "sha256" not in response.text
    acme = httpx.get(f"{keyed.url}/admin/keys", headers=ADMIN, params={"tenant": "acme"}).json()
    assert sorted(k["name"] for k in acme["data"]) == ["k0", "k1"] and not acme["has_more"]
    first = httpx.get(f"{keyed.url}/admin/keys", headers=ADMIN, params={"limit": 2}).json()
    assert len(first["data"]) == 2 and first["has_more"]
    rest = httpx.get(f"{keyed.url}/admin/keys", headers=ADMIN, params={"after": first["last_id"]}).json()
    assert len(rest["data"]) == 1 and not rest["has_more"]


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_the_admin_token_guards_the_key_api(keyed: RunningGateway, make_gateway: Callable[..., RunningGateway],
                                            upstream: MockUpstream) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {FULL_KEY}"},
                    {"Authorization": ADMIN_TOKEN}):
        for method, path in (("POST", "/admin/keys"), ("GET", "/admin/keys"), ("GET", "/admin/keys/vk_0"),
                             ("DELETE", "/admin/keys/vk_0"), ("POST", "/admin/keys/vk_0/rotate")):
            answer = httpx.request(method, keyed.url + path, headers=headers, json={"tenant": "acme"})
            assert _error(answer, 401)["code"] == "invalid_admin_token"
    assert httpx.get(keyed.url + "/admin/keys", headers=ADMIN).json()["data"] == []  # nothing was created
    plain = make_gateway()  # no admin_token_env: the admin API does not exist
    _error(httpx.post(plain.url + "/admin/keys", headers=ADMIN, json={"tenant": "acme"}), 404)
    _error(httpx.get(plain.url + "/admin/keys", headers=ADMIN), 404)
    off = make_gateway(policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN"), ENV)  # token, keys off
    assert "dynamic_keys" in _error(httpx.post(off.url + "/admin/keys", headers=ADMIN, json={"tenant": "a"}),
                                    404)["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"tenant": 5}, "tenant"),
    ({}, None),
    ({"tenant": ""}, "tenant"),
    ({"tenant": "bad tenant!"}, "tenant"),
    ({"tenant": "acme", "models": "chat"}, "models"),
    ({"tenant": "acme", "models": []}, "models"),
    ({"tenant": "acme", "models": ["chat", "no-such-alias"]}, "models[1]"),
    ({"tenant": "acme", "models": ["*", "chat"]}, "models"),
    ({"tenant": "acme", "models": ["chat"] * 1001}, "models"),
    ({"tenant": "acme", "models": ["c" * 300]}, "models[0]"),
    ({"tenant": "acme", "name": "n" * 129}, "name"),
    ({"tenant": "acme", "name": ["x"]}, "name"),
    ({"tenant": "acme", "name": "ci\n"}, "name"),  # (`$` matched before a final newline: "ci" and "ci\n" both)
    ({"tenant": "acme\n"}, "tenant"),
    ({"tenant": "acme", "expires_at": 1000}, "expires_at"),
    ({"tenant": "acme", "expires_at": "tomorrow"}, "expires_at"),
    ({"tenant": "acme", "ttl_s": -5}, "ttl_s"),
    ({"tenant": "acme", "ttl_s": 60, "expires_at": 4_000_000_000}, "ttl_s"),
    ({"tenant": "acme", "budget": {"usd": -1}}, "budget.usd"),
    ({"tenant": "acme", "budget": {"usd": 0}}, "budget.usd"),
    ({"tenant": "acme", "budget": {"usd": 5, "period": "fortnight"}}, "budget.period"),
    ({"tenant": "acme", "budget": {"usd": 5, "period": "rolling"}}, "budget.window_s"),
    ({"tenant": "acme", "budget": {"usd": 5, "downgrade": {"at": 0.8, "alias": "nope"}}}, "budget.downgrade.alias"),
    ({"tenant": "acme", "limits": {"rpm": 0}}, "limits.rpm"),
    ({"tenant": "acme", "limits": {"rpm": "sixty"}}, "limits.rpm"),
    ({"tenant": "acme", "limits": {"rps": 5}}, "limits.rps"),
    ({"tenant": "acme", "hash": "sha256:" + "0" * 64}, "hash"),
    ({"tenant": "acme", "key": "gw-my-own-key"}, "key"),
])
def test_bad_fields_are_400_naming_the_field(keyed: RunningGateway, body: dict[str, Any], param: str | None) -> None:
    error = _error(httpx.post(keyed.url + "/admin/keys", headers=ADMIN, json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_requests_are_4xx_never_500(keyed: RunningGateway) -> None:
    url = keyed.url + "/admin/keys"
    _error(httpx.post(url, headers=ADMIN, content=b"{not json"), 400)
    _error(httpx.post(url, headers=ADMIN, content=b"[1, 2]"), 400)
    _error(httpx.post(url, headers=ADMIN, content=b'{"tenant": "\xff"}'), 400)
    _error(httpx.post(url, headers=ADMIN, content=b"[" * 100_000), 413)
    _error(httpx.post(url, headers=ADMIN, content=json.dumps({"tenant": "acme", "name": "x" * 300_000})), 413)
    _error(httpx.post(url, headers=ADMIN, content=b"{}" + b" " * 70_000), 413)
    bad_queries = ({"limit": "0"}, {"limit": "lots"}, {"limit": "100000"}, {"limit": "\u00b2"}, {"limit": "\uff15"},
                   {"tenant": "no spaces"}, {"after": "x" * 99},
                   {"after": "zzz"}, {"after": ""}, {"after": "vk_0"}, {"after": "vk_000000000000000g"},
                   {"after": "VK_0000000000000000"})
    for query in bad_queries:
        error = _error(httpx.get(url, headers=ADMIN, params=query), 400)
        assert error["param"] == next(iter(query)) and error["type"] == "invalid_request_error"
    assert httpx.get(url, headers=ADMIN, params={"after": "vk_" + "f" * 16}).json()["data"] == []
    for path in ("/vk_0000000000000000", "/..%2F..%2Fetc", "/" + "x" * 300):
        _error(httpx.get(url + path, headers=ADMIN), 404)
    made = create(keyed)
    _error(httpx.post(f"{url}/{made['id']}/rotate", headers=ADMIN, json={"grace_s": -1}), 400)
    _error(httpx.post(f"{url}/{made['id']}/rotate", headers=ADMIN, json={"grace_s": 10 * 86_400}), 400)
    _error(httpx.post(f"{url}/{made['id']}/rotate", headers=ADMIN, json={"grace": 1}), 400)
    _error(httpx.put(f"{url}/{made['id']}", headers=ADMIN, json={}), 405)
    assert _error(httpx.post(url, headers=ADMIN, json={"tenant": "acme", "name": "full"}), 409)["param"] == "name"
    create(keyed, name="taken")
    assert _error(httpx.post(url, headers=ADMIN, json={"tenant": "globex", "name": "taken"}), 409)["code"] == \
        "name_taken"
    metrics = keyed.metrics()
    assert 'gateway_admin_key_operations_total{operation="create",status="413"} 3.0' in metrics
    assert 'gateway_admin_key_operations_total{operation="list",status="400"}' in metrics
    assert 'status="500"' not in metrics  # litestar's own errors are counted by their real status


def test_unknown_and_junk_keys_are_401(keyed: RunningGateway) -> None:
    for key in ("gw-" + "A" * 43, "sk-not-a-gateway-key", "gw-" + "A" * 42 + "!", "x" * 2000):
        assert refused(keyed, key)
    metrics = keyed.metrics()
    assert 'gateway_key_lookups_total{result="malformed"}' in metrics
    assert 'gateway_key_lookups_total{result="unknown"}' in metrics


def test_a_reload_keeps_memory_keys_and_removed_aliases_are_refused(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    source = tmp_path / "gateway.yaml"
    running = RunningGateway(keyed_policy(upstream, extra_alias=True), ENV, source=source).start()
    try:
        made = create(running, models=["extra", "chat"])
        assert "twenty words" in chat(running, made["key"], model="extra")
        source.write_text(keyed_policy(upstream))
        assert running.gateway.loop is not None
        result = asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), running.gateway.loop).result(30)
        assert result["result"] == "ok"
        with pytest.raises(openai.NotFoundError):  # the alias is gone: Authorize refuses it
            chat(running, made["key"], model="extra")
        assert "twenty words" in chat(running, made["key"])  # the key survived the reload (the memory store lives on)
        _error(httpx.post(running.url + "/admin/keys", headers=ADMIN, json={"tenant": "a", "models": ["extra"]}), 400)
    finally:
        running.stop()


class _StoreCalls:
    """Counts every call on every memory store of this process (a probe around the real methods)."""

    METHODS = ("get", "set", "delete", "compare_and_set", "incr_window", "get_window", "reserve", "settle", "publish")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in self.METHODS:
            original = getattr(MemoryStore, name)
            monkeypatch.setattr(MemoryStore, name, self._counting(original))

    def _counting(self, original: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(store: MemoryStore, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await original(store, *args, **kwargs)

        return counted


def test_static_keys_cost_no_store_call(
    upstream: MockUpstream, make_gateway: Callable[..., RunningGateway], monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _StoreCalls(monkeypatch)
    static_only = make_gateway()
    with_dynamic = make_gateway(keyed_policy(upstream), ENV)
    assert static_only.gateway.runtime.dynamic_keys is None
    for running in (static_only, with_dynamic):
        for _ in range(10):
            assert "twenty words" in chat(running, FULL_KEY)
        assert httpx.get(running.base_url + "/models", headers={"Authorization": f"Bearer {FULL_KEY}"}).is_success
    assert calls.count == 0
    made = create(with_dynamic)
    chat(with_dynamic, made["key"])
    before = calls.count
    for _ in range(10):
        chat(with_dynamic, made["key"])
    assert calls.count == before  # a cached run-time key costs no store call either


def _cli(running: RunningGateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GW_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", *args, "--url", running.url, "--admin-token-env", "GW_ADMIN_TOKEN"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False,
    )


def test_the_keys_commands(keyed: RunningGateway) -> None:
    made = _cli(keyed, "create", "--tenant", "acme", "--name", "cli-key", "--model", "chat", "--ttl", "3600",
                "--budget", '{"usd": 5}', "--json")
    assert made.returncode == 0, made.stderr
    answer = json.loads(made.stdout)
    assert answer["budget"]["usd"] == 5 and answer["models"] == ["chat"]
    assert "twenty words" in chat(keyed, answer["key"])
    listed = _cli(keyed, "list", "--tenant", "acme")
    assert listed.returncode == 0 and "cli-key" in listed.stdout and answer["key"] not in listed.stdout
    shown = _cli(keyed, "get", answer["id"])
    assert shown.returncode == 0 and "cli-key" in shown.stdout and answer["key"] not in shown.stdout
    fields = dict(line.split(":", 1) for line in shown.stdout.splitlines() if line and not line.startswith(" "))
    assert fields["expires_at"].startswith(" ") and fields["name"].strip() == "cli-key"  # a name, a space, its value
    rotated = _cli(keyed, "rotate", answer["id"])
    assert rotated.returncode == 0 and "shown this once" in rotated.stdout
    new_key = next(line.split()[1] for line in rotated.stdout.splitlines() if line.startswith("key:"))
    assert refused(keyed, answer["key"]) and "twenty words" in chat(keyed, new_key)
    revoked = _cli(keyed, "revoke", answer["id"])
    assert revoked.returncode == 0 and answer["id"] in revoked.stdout
    assert refused(keyed, new_key)
    again = _cli(keyed, "revoke", answer["id"])
    assert again.returncode == 1 and "404" in again.stderr
    bad = _cli(keyed, "create", "--tenant", "acme", "--model", "nope")
    assert bad.returncode == 1 and "models[0]" in bad.stderr
    env = {k: v for k, v in os.environ.items() if k != "GW_ADMIN_TOKEN"}
    unset = subprocess.run([sys.executable, "-m", "gateway", "keys", "list", "--url", keyed.url, "--admin-token-env",
                            "GW_UNSET_TOKEN"], capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
                           check=False)
    assert unset.returncode == 1 and "GW_UNSET_TOKEN" in unset.stderr


def test_logs_name_keys_by_id_never_by_secret_or_hash(
    upstream: MockUpstream, make_gateway: Callable[..., RunningGateway], caplog: pytest.LogCaptureFixture,
) -> None:
    running = make_gateway(keyed_policy(upstream, access_log="true"), ENV)
    with caplog.at_level("INFO"):
        made = create(running, name="logged")
        chat(running, made["key"])
        rotated = httpx.post(f"{running.url}/admin/keys/{made['id']}/rotate", headers=ADMIN).json()
        chat(running, rotated["key"])
        assert refused(running, made["key"])
        httpx.delete(f"{running.url}/admin/keys/{made['id']}", headers=ADMIN)
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "key created" in text and "key rotated" in text and "key revoked" in text and made["id"] in text
    assert "'key': 'logged'" in text  # the access line names the key by its name
    for secret in (made["key"], rotated["key"]):
        assert secret not in text and digest_of(secret).hex() not in text and secret[3:15] not in text


def test_a_run_time_key_can_rate_its_own_answers(upstream: MockUpstream) -> None:
    """`POST /v1/feedback` takes the caller's key like any request: a key created at run time too."""
    policy = keyed_policy(upstream) + "telemetry: {feedback: {enabled: true}}\n"
    running = RunningGateway(policy, ENV).start()
    try:
        key = create(running, name="rater")["key"]
        auth = {"Authorization": f"Bearer {key}"}
        answered = httpx.post(running.base_url + "/chat/completions", headers=auth, timeout=10,
                              json={"model": "chat", "messages": MESSAGES})
        assert answered.status_code == 200, answered.text
        feedback = {"request_id": answered.headers["x-request-id"], "score": 1}
        rated = httpx.post(running.base_url + "/feedback", headers=auth, json=feedback, timeout=10)
        assert rated.status_code == 200, rated.text
        unknown = httpx.post(running.base_url + "/feedback", json=feedback, timeout=10,
                             headers={"Authorization": "Bearer gw-" + "x" * 43})
        assert unknown.status_code == 401
    finally:
        running.stop()


def test_a_new_key_that_takes_a_revoked_keys_name_starts_from_nothing(keyed: RunningGateway) -> None:
    """Limits count under a run-time key's id: a new `ci` after the first was revoked got 429 at its first
    request, the first key's requests still in its window."""
    first = create(keyed, name="ci", limits={"rpm": 1})
    chat(keyed, first["key"])
    with pytest.raises(openai.RateLimitError):
        chat(keyed, first["key"])
    assert httpx.delete(f"{keyed.url}/admin/keys/{first['id']}", headers=ADMIN).status_code == 200
    second = create(keyed, name="ci", limits={"rpm": 1})
    assert second["id"] != first["id"] and chat(keyed, second["key"])
    with pytest.raises(openai.RateLimitError):  # its own limit holds
        chat(keyed, second["key"])
