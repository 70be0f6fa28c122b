"""CLI misuse that printed a traceback: a `--url` that cannot be parsed, and a reader that stops reading
(`gateway schema | head`). Each now gets one line (or nothing, for the pipe) and a non-zero exit status."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import cli

GATEWAY = [sys.executable, "-m", "gateway"]


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999", "http://127.0.0.1:port"])
def test_a_url_that_cannot_be_parsed_is_one_line_not_a_traceback(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "cli-admin-token-0123456789")
    assert cli.main(["keys", "list", "--url", url]) != 0
    err = capsys.readouterr().err
    assert err == f"gateway: --url wants http(s)://host:port, not {url!r}\n"


def _policy(folder: Path, name: str, model: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(f"""\
        version: 1
        auth: none
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: {model}}}}}
        """))
    return path


@pytest.mark.parametrize("command", ["schema", "diff"])
def test_a_reader_that_stops_reading_ends_the_command_quietly(command: str, tmp_path: Path) -> None:
    """The read end is closed before the command writes anything, so every write meets a broken pipe."""
    args = ["schema"] if command == "schema" else \
        ["diff", str(_policy(tmp_path, "old.yaml", "demo-1")), str(_policy(tmp_path, "new.yaml", "demo-2")), "--json"]
    process = subprocess.Popen([*GATEWAY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read().decode()
    process.stderr.close()
    code = process.wait(30)
    assert err == "", err
    assert code != 0
