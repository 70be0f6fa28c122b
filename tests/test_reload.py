"""Hot reload: a new policy swaps in under load, requests keep the one they started with,
an invalid policy changes nothing, and what a reload changes really changes."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy import load_policy
from gateway.reload import Listener, serving_refusals
from gateway.store import MemoryStore, StoreConfig
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = [{"role": "user", "content": "hello"}]
ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
def reloadable(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("GW_ADMIN_TOKEN", ADMIN_TOKEN)
    text = policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN", watch_interval_s=0.2, access_log="false")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN},
                             source=tmp_path / "gateway.yaml").start()
    yield running
    running.stop()


def reload_now(running: RunningGateway) -> dict[str, Any]:
    assert running.gateway.loop is not None
    return asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), running.gateway.loop).result(30)


def admin_reload(running: RunningGateway, token: str = ADMIN_TOKEN) -> httpx.Response:
    return httpx.post(running.url + "/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_twenty_reloads_under_load_fail_no_request_and_close_old_pools_after_their_last_stream(
    reloadable: RunningGateway,
) -> None:
    source = reloadable.gateway.source
    assert source is not None
    versions = {reloadable.gateway.runtime.policy.version}
    runtimes = [reloadable.gateway.runtime]
    failures: list[str] = []
    seen: list[str] = []
    stop = threading.Event()

    def load(stream: bool) -> None:
        with httpx.Client(base_url=reloadable.base_url, headers=AUTH, timeout=30) as client:
            while not stop.is_set():
                body = {"model": "chat", "messages": MESSAGES, "stream": stream}
                with client.stream("POST", "/chat/completions", json=body) as response:
                    text = response.read().decode()
                    seen.append(response.headers.get("x-gateway-policy-version", "none"))
                    ok = response.status_code == 200 and (not stream or text.endswith("data: [DONE]\n\n"))
                    if not ok:
                        failures.append(f"{response.status_code} {text[-200:]}")

    streaming = threading.Event()

    def long_stream() -> None:  # spans several reloads: its runtime must stay open until it ends
        # 12.5 s: longer than twenty reloads take on a loaded machine
        body = {"model": "fault-slow-stream-250", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", reloadable.base_url + "/chat/completions", headers=AUTH, json=body,
                          timeout=30) as response:
            streaming.set()  # it holds the first runtime from here
            text = response.read().decode()
            if not text.endswith("data: [DONE]\n\n"):
                failures.append("long stream: " + text[-200:])

    workers = [threading.Thread(target=load, args=(s,)) for s in (False, False, True, True)]
    workers.append(threading.Thread(target=long_stream))
    for worker in workers:
        worker.start()
    assert streaming.wait(10)  # on a busy machine the thread may start late: reload only once it streams
    try:
        for n in range(20):
            time.sleep(0.1)
            source.write_text(source.read_text() + f"# reload {n}\n")
            result = admin_reload(reloadable).json() if n % 2 else reload_now(reloadable)
            assert result["result"] in ("ok", "unchanged"), result  # "unchanged": the file watcher was first
            versions.add(result["version"])
            runtimes.append(reloadable.gateway.runtime)
        first = runtimes[0]
        assert first.active >= 1  # the long stream still holds the first policy's runtime ...
        assert first.providers["mock-fast"]._session is not None  # ... and its pool is open
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert not failures, failures[:5]
    assert len(versions) == 21 and set(seen) <= versions and len(set(seen)) > 1
    assert wait(lambda: all(r.providers["mock"]._session is None for r in runtimes[:-1]))
    assert runtimes[-1].providers["mock"]._session is not None
    assert 'gateway_policy_reload_total{result="ok"} 20.0' in reloadable.metrics()


def wait(condition: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    return bool(condition())


def test_an_invalid_policy_keeps_the_last_good_one_and_reports_every_error(reloadable: RunningGateway) -> None:
    source = reloadable.gateway.source
    assert source is not None
    before = reloadable.gateway.runtime.policy.version
    broken = source.read_text().replace("max_body_bytes: 1048576", "max_body_bytes: 1048576\n  colour: blue")
    broken = broken.replace("chat: {provider: mock,", "chat: {provider: nowhere,")
    source.write_text(broken)
    result = reload_now(reloadable)
    assert result["result"] == "invalid" and result["version"] == before
    assert len(result["errors"]) == 2
    assert any("server.colour" in e and "unknown field" in e for e in result["errors"])
    assert any("models.chat.provider" in e and "nowhere" in e for e in result["errors"])
    assert all(e.startswith(f"{source}:") for e in result["errors"])  # file and line
    ready = httpx.get(reloadable.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["policy_version"] == before
    assert ready["last_reload"]["result"] == "invalid"
    # a probe with two credentials that differ (an ingress's and a client's) still reads it: it used to get a 400
    probe = httpx.get(reloadable.url + "/readyz", headers={"Authorization": "Bearer one", "x-api-key": "two"})
    assert probe.status_code == 200 and probe.json()["last_reload"] == {**ready["last_reload"]}
    # >= 1: the file watcher (every 0.2 s) may have tried the same invalid file as well
    invalid = re.search(r'^gateway_policy_reload_total\{result="invalid"\} (\S+)$', reloadable.metrics(), re.M)
    assert invalid is not None and float(invalid.group(1)) >= 1
    response = httpx.post(reloadable.base_url + "/chat/completions", headers=AUTH,
                          json={"model": "chat", "messages": MESSAGES})
    assert response.status_code == 200 and response.headers["x-gateway-policy-version"] == before


def test_a_changed_file_is_picked_up_by_the_watcher(reloadable: RunningGateway) -> None:
    source = reloadable.gateway.source
    assert source is not None
    before = reloadable.gateway.runtime.policy.version
    source.write_text(source.read_text().replace("access_log: false", "access_log: true"))
    assert wait(lambda: reloadable.gateway.runtime.policy.version != before)
    assert reloadable.gateway.runtime.policy.server.access_log is True
    assert reloadable.gateway.last_reload is not None and reloadable.gateway.last_reload["trigger"] == "file"


def test_a_reload_compiles_a_large_deny_list_off_the_event_loop(reloadable: RunningGateway) -> None:
    """A deny list of thousands of terms takes a few hundred ms to compile: a reload does that in a thread, and the
    event loop that streams the answers keeps its turns (a ticker on it never waits anywhere near that long)."""
    import random
    import string

    source = reloadable.gateway.source
    assert source is not None and reloadable.gateway.loop is not None
    rnd = random.Random()  # terms never compiled before (`re` keeps the last 512 patterns compiled)
    terms = [" ".join("".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(5, 9))) for _ in range(2))
             for _ in range(5_000)]
    source.write_text(source.read_text() + "guards:\n  global:\n    deny: {kind: denylist, places: [input], terms: ["
                      + ", ".join(terms) + "]}\n")
    gaps: list[float] = []

    async def tick(stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def reload_while_ticking() -> tuple[dict[str, Any], float]:
        stop = asyncio.Event()
        ticker = asyncio.create_task(tick(stop))
        started = time.perf_counter()
        result = await reloadable.gateway.reload("test")
        took = time.perf_counter() - started
        stop.set()
        await ticker
        return result, took

    result, took = asyncio.run_coroutine_threadsafe(reload_while_ticking(), reloadable.gateway.loop).result(60)
    assert result["result"] == "ok", result
    assert took > 0.15  # (the compile did take that long: else this test proves nothing)
    assert max(gaps) < took / 2, (max(gaps), took)
    response = httpx.post(reloadable.base_url + "/chat/completions", headers=AUTH,
                          json={"model": "chat", "messages": [{"role": "user", "content": f"say {terms[7]} now"}]})
    assert response.status_code == 400 and "content_policy" in response.text  # and the new list is in force


def test_settings_read_per_request_change_with_a_reload(reloadable: RunningGateway) -> None:
    source = reloadable.gateway.source
    assert source is not None
    assert httpx.get(reloadable.url + "/metrics").status_code == 200
    body = {"model": "chat", "messages": [{"role": "user", "content": "x" * 600_000}]}
    assert httpx.post(reloadable.base_url + "/chat/completions", headers=AUTH, json=body).status_code == 200
    text = source.read_text().replace("max_body_bytes: 1048576", "max_body_bytes: 500000\n  metrics: false")
    source.write_text(text)
    assert reload_now(reloadable)["result"] == "ok"
    assert httpx.get(reloadable.url + "/metrics").status_code == 404
    assert httpx.post(reloadable.base_url + "/chat/completions", headers=AUTH, json=body).status_code == 413


def test_the_admin_api_needs_its_token_and_is_off_without_one(
    reloadable: RunningGateway, make_gateway: Any,
) -> None:
    assert admin_reload(reloadable, "wrong-token").status_code == 401
    assert httpx.post(reloadable.url + "/admin/reload").status_code == 401
    unchanged = admin_reload(reloadable)
    assert unchanged.status_code == 200 and unchanged.json()["result"] == "unchanged"
    plain = make_gateway()  # no admin_token_env in its policy
    assert admin_reload(plain).status_code == 404


def _without_keys(text: str) -> str:
    """The test policy with `auth: none` (and so without its `keys:` list)."""
    return re.sub(r"auth: keys\nkeys:\n(?:  .*\n)+", "auth: none\n", text)


def test_a_reload_must_suit_how_the_gateway_is_served_as_its_start_had_to(reloadable: RunningGateway) -> None:
    """The rules `gateway serve` applies at start, applied to a reload with the same settings (the listener a
    served gateway gets from `ServeSettings`): refused as an invalid policy, the old one serving on."""
    source = reloadable.gateway.source
    assert source is not None
    keyed = source.read_text()
    before = reloadable.gateway.runtime.policy.version
    reloadable.gateway.listener = Listener("0.0.0.0")  # served on every interface, without --allow-open
    source.write_text(_without_keys(keyed))
    refused = reload_now(reloadable)
    assert refused["result"] == "invalid" and refused["version"] == before
    assert refused["errors"] == [f"{source}: refusing to serve 0.0.0.0 with `auth: none`: anyone who reaches it "
                                 "could use your providers' credentials. Use `auth: keys`, listen on 127.0.0.1, or "
                                 "pass --allow-open to `gateway serve`."]
    assert serving_refusals(load_policy(source), Listener("0.0.0.0")) == [refused["errors"][0].split(": ", 1)[1]]
    assert httpx.post(reloadable.base_url + "/chat/completions", json={"model": "chat", "messages": MESSAGES}
                      ).status_code == 401  # keys still needed
    assert reloadable.gateway.runtime.policy.version == before
    invalid = re.search(r'^gateway_policy_reload_total\{result="invalid"\} (\S+)$', reloadable.metrics(), re.M)
    assert invalid is not None and float(invalid.group(1)) >= 1
    reloadable.gateway.listener = Listener("0.0.0.0", allow_open=True)  # what --allow-open accepts
    assert reload_now(reloadable)["result"] in ("ok", "unchanged")
    assert reloadable.gateway.runtime.policy.auth == "none"

    source.write_text(keyed + "dynamic_keys: {enabled: true}\n")
    reloadable.gateway.listener = Listener("127.0.0.1", workers=2)  # each worker its own memory store
    refused = reload_now(reloadable)
    assert refused["result"] == "invalid" and len(refused["errors"]) == 1
    assert "dynamic_keys with the memory store and 2 workers" in refused["errors"][0]
    served = reloadable.gateway.runtime.policy
    assert served.auth == "none" and not served.dynamic_keys.enabled
    reloadable.gateway.listener = Listener("127.0.0.1", workers=1)
    assert reload_now(reloadable)["result"] in ("ok", "unchanged")
    assert reloadable.gateway.runtime.policy.dynamic_keys.enabled


def test_a_worker_refuses_a_policy_that_gateway_serve_would_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker reads the policy again (a restarted one, later): the file may have changed since `gateway serve`
    checked it, so the worker checks it too, and stops rather than serve it."""
    import gateway.server

    monkeypatch.setattr(gateway.server, "configure_logging", lambda: None)  # the process's logging is pytest's
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    source = tmp_path / "gateway.yaml"
    source.write_text(_without_keys(policy_text("http://127.0.0.1:9")))
    with pytest.raises(SystemExit) as stopped:
        gateway.server.build_served_app(gateway.server.ServeSettings(source, Listener("0.0.0.0"), supervised=False))
    assert stopped.value.code == 2
    assert gateway.server.build_served_app(gateway.server.ServeSettings(source, Listener("127.0.0.1"))) is not None


def on_loop(running: RunningGateway, work: Any) -> Any:
    assert running.gateway.loop is not None
    return asyncio.run_coroutine_threadsafe(work, running.gateway.loop).result(30)


MIB = 1024 * 1024


def test_a_reload_that_changes_only_memory_max_bytes_keeps_the_memory_store(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run-time keys, counters and cached answers live in the memory store; a new byte bound for cache entries
    is applied to it, not a reason for a new, empty one. A smaller bound evicts cache entries only."""
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("GW_ADMIN_TOKEN", ADMIN_TOKEN)
    base = policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN", watch_policy="false")
    base += "dynamic_keys: {enabled: true}\n"
    running = RunningGateway(base + f"cache: {{memory_max_bytes: {4 * MIB}}}\n",
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN},
                             source=tmp_path / "gateway.yaml").start()
    try:
        source, store = running.gateway.source, running.gateway.runtime.store
        assert source is not None and isinstance(store, MemoryStore)
        made = httpx.post(running.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                          json={"tenant": "acme"}, timeout=10)
        assert made.status_code == 201, made.text
        key = {"Authorization": f"Bearer {made.json()['key']}"}

        def served_with_the_key() -> bool:
            return httpx.post(running.base_url + "/chat/completions", headers=key, timeout=10,
                              json={"model": "chat", "messages": MESSAGES}).status_code == 200

        assert served_with_the_key()
        on_loop(running, store.incr_window("test:requests", 7, 600))
        on_loop(running, store.reserve("test:spend", 2.5, 100, 600))
        for name in ("a", "b", "c"):  # 2.1 MB of cache entries, least recently used first
            on_loop(running, store.set(f"cache:entry:{name}", name.encode() * 700_000))

        def counters() -> tuple[int, float]:
            window = on_loop(running, store.get_window("test:requests", 600))
            return window.count, on_loop(running, store.reserve("test:spend", 0, 100, 600)).total

        def cached() -> list[str]:
            found = on_loop(running, store.get_many([f"cache:entry:{n}" for n in "abc"]))
            return [n for n, value in zip("abc", found, strict=True) if value is not None]

        source.write_text(base + f"cache: {{memory_max_bytes: {8 * MIB}}}\n")
        assert reload_now(running)["result"] == "ok"
        assert running.gateway.runtime.store is store and store.bytes == 2_100_000
        assert counters() == (7, 2.5) and cached() == ["a", "b", "c"]
        assert served_with_the_key()  # the run-time key is still there

        on_loop(running, store.get("cache:entry:a"))  # now the most recently used
        source.write_text(base + f"cache: {{memory_max_bytes: {MIB}}}\n")
        assert reload_now(running)["result"] == "ok"
        assert running.gateway.runtime.store is store
        assert cached() == ["a"] and store.bytes == 700_000  # only what fits, the most recent kept
        assert counters() == (7, 2.5)  # counters are never evicted for the byte bound
        assert served_with_the_key()
        on_loop(running, store.set("cache:entry:b", b"b" * 700_000))  # the new bound holds for later writes too
        assert cached() == ["b"]

        # The `state:` fields a memory store never reads (Redis's prefix, timeouts) keep it too; the one it reads,
        # `on_unavailable`, is taken on.
        assert store.on_unavailable == "open"
        source.write_text(base + f"cache: {{memory_max_bytes: {MIB}}}\n"
                          + "state: {key_prefix: 'other:', op_timeout_s: 1, on_unavailable: closed}\n")
        assert reload_now(running)["result"] == "ok"
        assert running.gateway.runtime.store is store and store.on_unavailable == "closed"
        assert counters() == (7, 2.5) and served_with_the_key()
    finally:
        running.stop()


async def test_a_memory_store_takes_a_new_byte_bound_without_touching_other_keys() -> None:
    """`MemoryStore.rebound`, alone: from no bound to one (entries already there are sized, counters stored
    under the prefix included), smaller, and back to none."""
    store = MemoryStore(StoreConfig())
    await store.incr_window("limit", 3, 60)
    await store.incr_window("cache:hits", 12, 60)  # a counter under the bounded prefix: sized as its digits
    for name in "abc":
        await store.set(f"cache:{name}", b"x" * 100)
    assert store.rebound(1_000) == 0 and store.bytes == 302
    assert store.rebound(150) == 3 and store.bytes == 100  # least recently used first: cache:hits, a, b
    assert await store.get_many(["cache:hits", "cache:a", "cache:b", "cache:c"]) == [None, None, None, b"x" * 100]
    assert (await store.get_window("limit", 60)).count == 3 and store.evictions == 3
    assert store.rebound(None) == 0 and store.bytes == 0
    await store.set("cache:d", b"y" * 500)  # no bound any more
    assert await store.get("cache:c") == b"x" * 100 and len(store) == 3
    with pytest.raises(ValueError):
        store.rebound(0)


def test_a_stream_outliving_its_retired_policy_is_cut_with_an_error_event(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the old policy's drain deadline a stream still holding it is ended by the gateway, with the error event
    a shutdown's deadline sends: its pool was closed under it instead, so it hung until its idle timeout and then
    read as the upstream's timeout (a 504 in the access log for every reload)."""
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)  # (a reload reads the process's environment)
    running = RunningGateway(policy_text(upstream.base_url, drain_timeout_s=1), env,
                             source=tmp_path / "gateway.yaml").start()
    try:
        received = b""
        body = {"model": "fault-slow-stream-250", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", running.base_url + "/chat/completions", headers=AUTH, json=body,
                          timeout=20) as response:
            for piece in response.iter_raw():
                received += piece
                if received.count(b"\n\n") == 3:
                    source = running.gateway.source
                    assert source is not None
                    source.write_text(source.read_text() + "  extra: {provider: demo, model: demo-1}\n")
                    result = reload_now(running)
                    assert result["result"] == "ok", result
        events = [e for e in received.decode().split("\n\n") if e]
        assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "shutting_down"
        assert len(events) < 40  # cut at the deadline, not run to its 50 chunks
        assert 'status="503"' in running.metrics() and 'status="504"' not in running.metrics()
    finally:
        running.stop()


_WORKERS_BASE = """version: 1
auth: none
providers:
  demo: {kind: demo}
models:
  chat: {provider: demo, model: demo-chat%s}
"""


@pytest.mark.parametrize(("extra", "alias_extra", "refused"), [
    ("keys: [{hash: 'sha256:%s', tenant: acme, limits: {rpm: 5}}]\nauth: keys\n" % ("0" * 64), "", "limits or budgets"),
    ("tenants: {acme: {budget: {usd: 5, period: day}}}\n", "", "limits or budgets"),
    ("", ", limits: {rpm: 60}", "limits or budgets"),
    ("telemetry: {feedback: {enabled: true}}\n", "", "telemetry.feedback"),
    ("accounting: {always: true}\n", "", None),  # the usage report per worker: partial, not wrong
    ("", ", cache: {ttl_s: 60}", None),  # a cache per worker: fewer hits
    ("state: {backend: redis, url_env: GATEWAY_TEST_REDIS_URL}\ntenants: {acme: {limits: {rpm: 5}}}\n", "", None),
])
def test_several_workers_refuse_what_the_memory_store_would_count_per_worker(
    tmp_path: Path, extra: str, alias_extra: str, refused: str | None,
) -> None:
    """Each worker has its own memory store: a limit or budget would be counted once per worker (N times over) and
    feedback would mostly reach a worker that never saw the request. One worker, or Redis, serves them right."""
    source = tmp_path / "policy.yaml"
    text = (_WORKERS_BASE % alias_extra) + extra
    if "auth: keys" in extra:
        text = text.replace("auth: none\n", "", 1)
    source.write_text(text)
    policy = load_policy(source)
    assert serving_refusals(policy, Listener("127.0.0.1", workers=1)) == []
    found = serving_refusals(policy, Listener("127.0.0.1", workers=2))
    if refused is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(f"{refused} with the memory store and 2 workers"), found
