"""A file named in an included file (`prices_file`, `server.shadow_policy`) is relative to that file, as its includes
and `azure.entra_token_file` are (they were read relative to the root file); and a byte UTF-8 cannot decode is
reported at its own line (it was line 1, with a byte offset)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from gateway.policy import PolicyError, load_policy
from tests.conftest import REPO

ROOT = """\
    version: 1
    include: [platform/providers.yaml]
    auth: none
    models: {chat: {provider: demo, model: demo-1}}
    """
CANDIDATE = """\
    version: 1
    auth: none
    providers: {demo: {kind: demo}}
    models: {chat: {provider: demo, model: demo-1}, shadowed: {provider: demo, model: demo-1}}
    """


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def gateway_check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def issues(path: Path) -> list[str]:
    try:
        load_policy(path, require_env=False)
    except PolicyError as exc:
        return [str(issue) for issue in exc.issues]
    return []


def platform(tmp_path: Path, named: str) -> Path:
    """policy.yaml includes platform/providers.yaml, which names (`named`) a file beside it: its prices file, its
    shadow policy."""
    write(tmp_path, "platform/providers.yaml", "providers: {demo: {kind: demo}}\n" + named)
    write(tmp_path, "platform/prices.yaml", PRICES.format(1.5))
    write(tmp_path, "platform/candidate.yaml", CANDIDATE)
    return write(tmp_path, "policy.yaml", ROOT)


PRICES = "prices:\n  demo-1: {{input_per_mtok: {}, output_per_mtok: 2}}\nversion: 1\n"


def test_a_prices_file_named_in_an_included_file_is_beside_it(tmp_path: Path) -> None:
    root = platform(tmp_path, "prices_file: prices.yaml   # beside this file\n")
    write(tmp_path, "prices.yaml", PRICES.format(9))  # beside the root file: not this one
    run = gateway_check("policy.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    policy = load_policy(root, require_env=False)
    assert policy.prices.entries()["demo-1"].input_per_mtok == 1.5
    assert str(tmp_path / "platform" / "prices.yaml") in policy.watch  # a price change reloads
    write(tmp_path, "platform/prices.yaml", PRICES.format(3))
    assert load_policy(root, require_env=False).version != policy.version  # the prices file read is the one hashed
    (tmp_path / "platform" / "prices.yaml").unlink()
    assert issues(root) == [f"{tmp_path}/platform/providers.yaml:2: prices_file: cannot read the prices file "
                            f"`{tmp_path}/platform/prices.yaml`: FileNotFoundError"]


def test_a_shadow_policy_named_in_an_included_file_is_beside_it(tmp_path: Path) -> None:
    root = platform(tmp_path, "server: {shadow_policy: candidate.yaml}\n")
    write(tmp_path, "candidate.yaml", CANDIDATE.replace("shadowed", "wrong"))  # beside the root file: not this one
    run = gateway_check("policy.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    policy = load_policy(root, require_env=False)
    assert policy.shadow is not None and set(policy.shadow.models) == {"chat", "shadowed"}
    assert str(tmp_path / "platform" / "candidate.yaml") in policy.watch
    (tmp_path / "platform" / "candidate.yaml").unlink()
    assert (f"{tmp_path}/platform/providers.yaml:2: server.shadow_policy: the shadow policy "
            f"{tmp_path}/platform/candidate.yaml is invalid") in issues(root)


def test_an_undecodable_byte_is_reported_at_its_line(tmp_path: Path) -> None:
    text = (b"version: 1\nauth: none\nproviders: {demo: {kind: demo}}\nmodels:\n"
            b"  chat: {provider: demo, model: demo-1}\n")
    write(tmp_path, "p5.yaml", text + b"# caf\xe9\n")
    run = gateway_check("p5.yaml", cwd=tmp_path)
    assert (run.returncode, run.stderr) == (1, "p5.yaml:6: cannot read the policy file p5.yaml: it is not UTF-8 text "
                                               "(invalid continuation byte, byte 0xe9)\n")
    write(tmp_path, "crlf.yaml", text.replace(b"\n", b"\r\n") + b"\r\n\r# \xff\n")  # lines as read: \r\n, \r, \n
    assert issues(tmp_path / "crlf.yaml") == [f"{tmp_path}/crlf.yaml:8: cannot read the policy file "
                                              f"{tmp_path}/crlf.yaml: it is not UTF-8 text (invalid start byte, "
                                              "byte 0xff)"]


def test_an_undecodable_byte_in_an_included_file_is_reported_in_that_file(tmp_path: Path) -> None:
    root = write(tmp_path, "policy.yaml", ROOT)
    write(tmp_path, "platform/providers.yaml", b"providers:\n  demo: {kind: demo}\n# na\xefve\n")
    assert issues(root) == [f"{tmp_path}/platform/providers.yaml:3: cannot read the policy file "
                            f"{tmp_path}/platform/providers.yaml: it is not UTF-8 text (invalid continuation byte, "
                            "byte 0xef)"]
