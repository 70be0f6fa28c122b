"""`gateway serve --workers 2` with the payload log's file sink: the workers share the file and its rotation.

Each worker rotated the file on its own, renaming and removing files the other still had open: entries went into
backups out of order, into files past `max_bytes`, and into a file another worker had deleted (lost).
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.support.processes import group_members
from tests.test_serve import serving

MAX_BYTES = 4096
BACKUPS = 5
SENT = 240
RECENT = 20  # the last requests sent: far fewer than the files hold (about 8 entries a file, 6 files)


def _entries(folder: Path) -> list[tuple[str, dict[str, object]]]:
    found = []
    for path in sorted(folder.glob("payloads.jsonl*")):
        found.extend((path.name, json.loads(line)) for line in path.read_text().splitlines())
    return found


def test_workers_share_the_file_and_its_rotation(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: 8080, access_log: false}}
        auth: none
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: demo-1}}}}
        telemetry:
          payload_log: {{enabled: true, path: '{logs / "payloads.jsonl"}', max_bytes: {MAX_BYTES}, backups: {BACKUPS}}}
        """))
    port = free_port()
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port), "--workers", "2"]
    with serving(args, port, env={"TMPDIR": str(tmp_path)}) as server:
        def send(n: int) -> str:
            body = {"model": "demo", "messages": [{"role": "user", "content": f"msg-{n:05d} " + "x" * 100}]}
            with httpx.Client(timeout=30) as fresh:  # a new connection each: both workers get some
                answer = fresh.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
                return answer.headers["x-request-id"]

        ids: list[str] = []
        with ThreadPoolExecutor(4) as pool:
            for start in range(0, SENT, 8):  # in order, 8 at a time
                ids.extend(pool.map(send, range(start, start + 8)))
        assert len({request_id[:16] for request_id in ids}) == 2, "the requests did not reach both workers"
        recent = set(ids[-RECENT:])

        deadline = time.monotonic() + 20
        while not recent <= {str(entry["request_id"]) for _, entry in _entries(logs)}:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # (anything still being written)
        entries = _entries(logs)
        logged = [str(entry["request_id"]) for _, entry in entries]
        assert sorted(recent - set(logged)) == [], "entries of the last requests were lost"
        assert len(logged) == len(set(logged)), "an entry was written twice"
        assert set(logged) <= set(ids)
        # Every request from the oldest one kept on: a worker wrote into a file another had removed, and
        # entries were missing from the middle of what the files hold
        kept = sorted(ids.index(request_id) for request_id in logged)
        missing = [n for n in range(kept[0], SENT) if ids[n] not in set(logged)]
        assert len(missing) <= 8, f"{len(missing)} entries missing after the oldest one kept"  # (8: sent together)
        sizes = {path.name: path.stat().st_size for path in logs.glob("payloads.jsonl*")}
        assert all(size <= MAX_BYTES for size in sizes.values()), sizes
        assert sorted(sizes) == ["payloads.jsonl", *(f"payloads.jsonl.{n}" for n in range(1, BACKUPS + 1))], sizes
        assert sorted(p.name for p in logs.iterdir()) == sorted(sizes)  # no other file (no lock file)
        server.signal_group(signal.SIGTERM)
        assert server.wait(20) in (0, -signal.SIGTERM), server.text()
    assert not group_members(server.pgid)
