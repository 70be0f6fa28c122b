"""A `process` guard pool whose worker dies (the OOM killer, a crash in a native library) is replaced.

Such a death breaks Python's `ProcessPoolExecutor` for good: before, every later check failed
(`BrokenProcessPool`) and every guarded request was refused until a restart, with /readyz at 200.
The gateway runs as `gateway serve` (its own process group: the spawn pool's workers and resource
tracker go with it, and the test checks that none is left); the pool-level test runs in a child
process for the same reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, SHARED, UPSTREAM_KEY, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.processes import ManagedProcess, group_members
from tests.test_serve import serving

REPO = Path(__file__).resolve().parents[1]
MODEL = SHARED / "models" / "en_ner_sm_port-1.0.0"
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}


def guarded_policy(port: int, upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: {port}}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          g: {{provider: mock, model: fault-echo}}
        guards:
          pool: {{kind: process, workers: 2}}
          global:
            pii: {{kind: pii, places: [input], engine: ner, model: {MODEL}, timeout_s: 20, entities: {{PERSON: {{}}}}}}
        """)


def pool_workers(server: ManagedProcess) -> set[int]:
    """The spawn pool's workers in the server's group (not its resource tracker)."""
    found = set()
    for pid in server.members():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    found.add(pid)
        except OSError:
            pass
    return found


def ask(port: int) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "g", "messages": [{"role": "user", "content": "My name is John Smith."}]})


def assert_guarded(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert "John Smith" not in response.text  # redacted before the upstream (which echoes it) saw it


def test_a_killed_pool_worker_is_replaced_and_the_next_requests_are_guarded(
    tmp_path: Path, upstream: MockUpstream,
) -> None:
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(guarded_policy(port, upstream.base_url))
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GATEWAY_SHARED_DIR": str(SHARED)}
    with serving([sys.executable, "-m", "gateway", "serve", "--policy", str(policy)], port, env=env) as server:
        assert_guarded(ask(port))
        before = pool_workers(server)
        assert len(before) == 2, server.text()[-2000:]
        os.kill(min(before), signal.SIGKILL)  # as the OOM killer would
        # At once, several together: on the broken pool, or waiting while it is replaced.
        with ThreadPoolExecutor(4) as requests:
            answers = list(requests.map(lambda _: ask(port), range(4)))
        for answer in answers:
            assert_guarded(answer)
        for _ in range(3):
            assert_guarded(ask(port))
        assert len(upstream.requests) == 8
        assert not [r for r in upstream.requests if b"John Smith" in r.body]
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 200
        assert ready.json()["guard_pool"] == {"kind": "process", "healthy": True, "replacements": 1}
        after = pool_workers(server)
        assert after and not after & before  # the broken pool's other worker went with it
        assert "guard pool: a worker died; starting a new process pool (replacement 1)" in server.text()
        assert "John Smith" not in server.text()
        group = server.pid
    assert group_members(group) == []  # no worker, old or new, nor resource tracker outlives the gateway


_BACKOFF_SCRIPT = """
import asyncio, os, time
from concurrent.futures.process import BrokenProcessPool
import gateway.guards.pool as pool_module
from gateway.guards.pool import GuardPool
from gateway.policy.guard_schema import GuardPoolSpec

async def main():
    # The back-off is counted from the start of the replacement before: longer than a replacement can take on a busy
    # machine (at 1 s, one that took longer left no back-off to see).
    pool_module._BACKOFF_FIRST_S = 5.0
    pool = GuardPool(GuardPoolSpec(kind="process", workers=1))
    pool.start()
    try:
        first = await pool.run(os.getpid)
        try:  # kills its worker, and again on the replacement: the pool gives up on it
            await pool.run(os._exit, 1)
        except BrokenProcessPool:
            print("poison: refused")
        print("replacements", pool.replacements, "healthy", pool.healthy)
        started = time.monotonic()
        try:  # backing off: refused at once, no third pool yet
            await pool.run(os.getpid)
        except BrokenProcessPool:
            print("during back-off: refused", time.monotonic() - started < 0.5, pool.replacements)
        deadline = time.monotonic() + 60
        while not pool.healthy and time.monotonic() < deadline:  # the back-off over, the pool replaced again
            await asyncio.sleep(0.1)
        second = await pool.run(os.getpid)
        print("after back-off: served", second != first, "replacements", pool.replacements, "healthy", pool.healthy)
    finally:
        await pool.aclose()

if __name__ == "__main__":  # (not in the spawned workers, which import this file)
    asyncio.run(main())
"""


def test_a_pool_whose_workers_keep_dying_backs_off_and_says_so(tmp_path: Path) -> None:
    script = tmp_path / "backoff.py"
    script.write_text(_BACKOFF_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                            start_new_session=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "poison: refused",
        "replacements 1 healthy False",
        "during back-off: refused True 1",
        "after back-off: served True replacements 2 healthy True",
    ], result.stderr[-2000:]
