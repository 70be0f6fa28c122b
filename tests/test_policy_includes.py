"""Policies split across files: includes, precedence, conflicts naming both places, cycles, missing files,
the content hash over every file, and a reload when an included file changes."""

from __future__ import annotations

import asyncio
import hashlib
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from gateway.auth.keys import hash_key
from gateway.policy import PolicyError, load_policy
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY_A = "gw-includes-test-key-a-0000000000000000000"
KEY_B = "gw-includes-test-key-b-1111111111111111111"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def tree(tmp_path: Path) -> Path:
    """root.yaml includes providers.yaml and tenants/*.yaml (two tenants, one file each)."""
    write(tmp_path, "providers.yaml", """\
        providers:
          demo: {kind: demo}
        """)
    write(tmp_path, "tenants/b-search.yaml", f"""\
        keys:
          - {{name: search, tenant: search, hash: "{hash_key(KEY_B)}", models: [chat]}}
        tenants:
          search: {{limits: {{rpm: 60}}}}
        rules:
          - {{name: search-to-big, when: {{alias: [chat], tenant: [search]}}, alias: big}}
        """)
    write(tmp_path, "tenants/a-ads.yaml", f"""\
        keys:
          - {{name: ads, tenant: ads, hash: "{hash_key(KEY_A)}"}}
        tenants:
          ads: {{budget: {{usd: 100}}}}
        """)
    return write(tmp_path, "root.yaml", """\
        version: 1
        include: [providers.yaml, "tenants/*.yaml"]
        auth: keys
        models:
          chat: {provider: demo, model: demo-1}
          big: {provider: demo, model: demo-2}
        rules:
          - {name: root-rule, when: {tenant: [ads], alias: [big]}, deny: "not for ads"}
        """)


def issues(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return [str(issue) for issue in caught.value.issues]


def test_included_files_merge_in_a_documented_order(tmp_path: Path) -> None:
    policy = load_policy(tree(tmp_path))
    assert set(policy.providers) == {"demo"}
    assert policy.spec is not None
    # keys and rules: the root's own first, then each included file's, globs in sorted order
    assert [k.name for k in policy.spec.keys] == ["ads", "search"]
    assert [r.name for r in policy.rules] == ["root-rule", "search-to-big"]
    assert set(policy.spec.tenants) == {"ads", "search"}
    assert [Path(f).name for f in policy.files] == ["root.yaml", "providers.yaml", "a-ads.yaml", "b-search.yaml"]
    assert str(tmp_path / "tenants") in policy.watch  # a new tenant file is noticed


def test_the_version_hashes_every_file(tmp_path: Path) -> None:
    root = tree(tmp_path)
    before = load_policy(root).version
    assert load_policy(root).version == before  # stable
    (tmp_path / "tenants" / "a-ads.yaml").write_text((tmp_path / "tenants" / "a-ads.yaml").read_text()
                                                     .replace("usd: 100", "usd: 200"))
    assert load_policy(root).version != before
    single = write(tmp_path, "single.yaml", "version: 1\nauth: none\nproviders: {d: {kind: demo}}\n"
                                            "models: {m: {provider: d, model: x}}\n")
    assert load_policy(single).version == hashlib.sha256(single.read_bytes()).hexdigest()[:16]


def test_a_name_defined_twice_is_an_error_naming_both_places(tmp_path: Path) -> None:
    root = tree(tmp_path)
    write(tmp_path, "tenants/c-dup.yaml", """\
        providers:
          demo: {kind: demo}
        tenants:
          search: {limits: {rpm: 1}}
        rules:
          - {name: root-rule, alias: chat}
        """)
    found = issues(root)
    dup = str(tmp_path / "tenants" / "c-dup.yaml")
    assert f"{dup}:2: providers.demo: also defined at {tmp_path / 'providers.yaml'}:2; each may be defined once" \
        in found
    assert f"{dup}:4: tenants.search: also defined at {tmp_path / 'tenants' / 'b-search.yaml'}:4; " \
           "each may be defined once" in found
    assert f"{dup}:6: rules[0].name: `root-rule` is also defined at {root}:8" in found


def test_a_section_set_in_two_files_is_a_conflict(tmp_path: Path) -> None:
    root = tree(tmp_path)
    write(tmp_path, "tenants/c-server.yaml", "server: {port: 9000}\nauth: none\n")
    root.write_text(root.read_text() + "server: {port: 8000}\n")
    found = issues(root)
    assert any(i.startswith(str(tmp_path / "tenants" / "c-server.yaml") + ":1: server: also defined at "
                            + f"{root}:9") for i in found), found
    assert any(":2: auth: also defined at" in i for i in found)


def test_cycles_missing_files_and_errors_inside_an_included_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "include: [b.yaml]\nproviders: {demo: {kind: demo}}\n")
    write(tmp_path, "b.yaml", "include: [a.yaml]\n")
    root = write(tmp_path, "root.yaml", "version: 1\nauth: none\ninclude: [a.yaml, missing.yaml]\n"
                                        "models: {m: {provider: demo, model: x}}\n")
    found = issues(root)
    assert f"{tmp_path / 'b.yaml'}:1: include: include cycle: root.yaml -> a.yaml -> b.yaml -> a.yaml" in found
    assert any(i.startswith(f"{root}:3: include: included file not found: missing.yaml") for i in found), found

    write(tmp_path, "a.yaml", "providers:\n  demo: {kind: demo, bogus: 1}\n")
    root.write_text("version: 1\nauth: none\ninclude: [a.yaml]\nmodels: {m: {provider: demo, model: x}}\n")
    assert issues(root) == [f"{tmp_path / 'a.yaml'}:2: providers.demo.bogus: unknown field `bogus` (allowed: "
                            "anthropic, api_key_env, api_key_header, azure, base_url, chunk_delay_ms, gemini, "
                            "headers, headers_env, keepalive_s, kind, max_response_bytes, openai, pool_size, "
                            "pool_timeout_s, query, stream_usage, timeouts)"]
    root.write_text("version: 1\nauth: none\ninclude: a.yaml\nmodels: {m: {provider: demo, model: x}}\n")
    assert issues(root) == [f"{root}:3: include: expected a list of file names or globs, relative to this file"]


def test_an_empty_glob_is_no_error_and_a_twice_included_file_is(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", "providers: {demo: {kind: demo}}\n")
    root = write(tmp_path, "root.yaml", "version: 1\nauth: none\ninclude: [p.yaml, 'none/*.yaml']\n"
                                        "models: {m: {provider: demo, model: x}}\n")
    assert load_policy(root).providers["demo"].kind == "demo"
    root.write_text("version: 1\nauth: none\ninclude: [p.yaml, ./p.yaml]\nmodels: {m: {provider: demo, model: x}}\n")
    assert issues(root) == [f"{root}:3: include: `./p.yaml` is already included at {root}:3"]


def test_changing_an_included_file_reloads_the_gateway(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    models = write(tmp_path, "models.yaml", "models:\n  chat: {provider: mock, model: first-model}\n")
    text = textwrap.dedent(f"""\
        version: 1
        include: [models.yaml]
        server: {{watch_interval_s: 0.1}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    try:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        first = httpx.post(running.base_url + "/chat/completions", json=body, timeout=10)
        assert first.status_code == 200 and upstream.requests[-1].model == "first-model"
        version = first.headers["x-gateway-policy-version"]
        time.sleep(0.05)
        models.write_text("models:\n  chat: {provider: mock, model: second-model}\n")
        deadline = time.monotonic() + 10
        while running.gateway.runtime.policy.version == version and time.monotonic() < deadline:
            time.sleep(0.05)
        second = httpx.post(running.base_url + "/chat/completions", json=body, timeout=10)
        assert second.headers["x-gateway-policy-version"] != version
        assert upstream.requests[-1].model == "second-model"
        assert f'gateway_policy_info{{version="{second.headers["x-gateway-policy-version"]}"}} 1.0' in running.metrics()
        assert running.gateway.last_reload is not None and running.gateway.last_reload["trigger"] == "file"
        # an invalid included file changes nothing; the last good policy keeps serving
        models.write_text("models:\n  chat: {provider: nowhere, model: x}\n")
        loop = running.gateway.loop
        assert loop is not None
        assert asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), loop).result(10)["result"] == "invalid"
        assert httpx.post(running.base_url + "/chat/completions", json=body, timeout=10).status_code == 200
    finally:
        running.stop()


def test_a_new_file_in_an_included_folder_is_picked_up_by_reload(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    write(tmp_path, "tenants/a.yaml", f'keys:\n  - {{name: a, tenant: a, hash: "{hash_key(KEY_A)}"}}\n')
    text = textwrap.dedent(f"""\
        version: 1
        include: ["tenants/*.yaml"]
        server: {{watch_interval_s: 0.1}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: m}}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    try:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

        def status(key: str) -> int:
            return httpx.post(running.base_url + "/chat/completions", json=body, timeout=10,
                              headers={"Authorization": f"Bearer {key}"}).status_code

        assert (status(KEY_A), status(KEY_B)) == (200, 401)
        write(tmp_path, "tenants/b.yaml", f'keys:\n  - {{name: b, tenant: b, hash: "{hash_key(KEY_B)}"}}\n')
        deadline = time.monotonic() + 10
        while len(running.gateway.runtime.policy.files) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (status(KEY_A), status(KEY_B)) == (200, 200)
    finally:
        running.stop()


def test_a_prices_file_is_hashed_watched_and_reloaded(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prices file is part of the policy: editing it is a new version, which the watcher loads, and the
    answers' cost follows it (`x-gateway-cost-usd`)."""
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    prices = write(tmp_path, "prices.yaml", "version: 1\nprices:\n  m: {input_per_mtok: 500000, output_per_mtok: 0}\n")
    text = textwrap.dedent(f"""\
        version: 1
        prices_file: prices.yaml
        server: {{watch_interval_s: 0.1}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: m}}
        """)
    root = write(tmp_path, "gateway.yaml", text)
    assert str(prices) in load_policy(root).watch
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=root).start()
    try:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        first = httpx.post(running.base_url + "/chat/completions", json=body, timeout=10)
        version, cost = first.headers["x-gateway-policy-version"], float(first.headers["x-gateway-cost-usd"])
        assert cost > 0
        time.sleep(0.05)
        prices.write_text(prices.read_text().replace("input_per_mtok: 500000", "input_per_mtok: 1000000"))
        deadline = time.monotonic() + 10
        while running.gateway.runtime.policy.version == version and time.monotonic() < deadline:
            time.sleep(0.05)
        second = httpx.post(running.base_url + "/chat/completions", json=body, timeout=10)
        assert second.headers["x-gateway-policy-version"] != version
        assert float(second.headers["x-gateway-cost-usd"]) == pytest.approx(2 * cost)
        assert running.gateway.last_reload is not None and running.gateway.last_reload["result"] == "ok"
    finally:
        running.stop()


def test_an_odd_included_value_is_located_not_a_crash(tmp_path: Path) -> None:
    """A key named by a list, and an include whose name no file system takes: each raised in the merge (a reload
    answered 500, `gateway check` printed a traceback)."""
    root = tree(tmp_path)
    write(tmp_path, "tenants/c-odd.yaml", """\
        keys:
          - {name: [odd], tenant: odd, hash: "sha256:%s"}
        """ % ("cd" * 32))
    found = issues(root)
    assert any(issue.startswith(f"{tmp_path / 'tenants/c-odd.yaml'}:2:") for issue in found), found
    (tmp_path / "tenants/c-odd.yaml").unlink()
    long_name = "x" * 300 + ".yaml"
    root.write_text(root.read_text().replace("include: [providers.yaml,", f"include: [{long_name}, providers.yaml,"))
    found = issues(root)
    assert any("included file cannot be looked for" in issue for issue in found), found


def test_an_error_in_an_included_list_item_names_its_place_in_that_file_and_comes_with_the_others(
    tmp_path: Path,
) -> None:
    """b-search.yaml's key is `keys[0]` there (the second key of the merged list): its error says `keys[0]`. And a
    name defined twice is reported with the schema's errors, not alone (which left them for the next run)."""
    root = tree(tmp_path)
    search = tmp_path / "tenants" / "b-search.yaml"
    search.write_text(search.read_text().replace("models: [chat]}", "models: [chat], limits: {rpm: zero}}"))
    write(tmp_path, "tenants/c-dup.yaml", "tenants:\n  search: {limits: {rpm: 1}}\n")
    found = issues(root)
    assert any(i.startswith(f"{search}:2: keys[0].limits.rpm: expected `int`") for i in found), found
    assert any("tenants.search: also defined at" in i for i in found), found
