"""An included file's guards and `version`, as `gateway check` and the loader take them: `guards.models.<alias>` and
`guards.tenants.<tenant>` merge into a root file that has no such section (they were refused as a gateway bug), an
included file's own `version` is checked (it was merged unchecked), and a bug in the checks never prints a traceback
from a command (Python printed the logged one on stderr, logging being unconfigured there)."""

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
    include: [team.yaml]
    auth: none
    providers: {demo: {kind: demo}}
    models: {chat: {provider: demo, model: demo-1}}
    """


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
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


def test_guards_of_an_alias_and_a_tenant_in_an_included_file_merge_into_a_root_without_them(tmp_path: Path) -> None:
    root = write(tmp_path, "policy.yaml", ROOT)
    write(tmp_path, "team.yaml", """\
        guards:
          models:
            chat:
              no-secrets: {kind: secrets}
          tenants:
            search:
              no-pii: {kind: pii}
        """)
    run = gateway_check("policy.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout.startswith("policy.yaml: ok (1 model aliases")
    policy = load_policy(root, require_env=False)
    assert set(policy.guards.models["chat"]) == {"no-secrets"}
    assert set(policy.guards.tenants["search"]) == {"no-pii"}


def test_an_alias_guarded_in_two_files_is_a_conflict_naming_both(tmp_path: Path) -> None:
    guards = "    guards: {models: {chat: {no-secrets: {kind: secrets}}}}\n"
    root = write(tmp_path, "policy.yaml", ROOT.rstrip(" ") + guards)
    write(tmp_path, "team.yaml", """\
        guards:
          models:
            chat:
              no-secrets: {kind: secrets}
        """)
    assert issues(root) == [f"{tmp_path}/team.yaml:4: guards.models.chat.no-secrets: also defined at "
                            f"{tmp_path}/policy.yaml:6; each may be defined once"]


def test_an_included_files_version_is_checked_in_its_own_file(tmp_path: Path) -> None:
    root = write(tmp_path, "policy.yaml", ROOT)
    team = write(tmp_path, "team.yaml", "models: {chat2: {provider: demo, model: demo-2}}\nversion: 7\n")
    assert issues(root) == [f"{tmp_path}/team.yaml:2: version: unknown value `7` (allowed: 1)"]
    run = gateway_check("policy.yaml", cwd=tmp_path)
    assert (run.returncode, run.stderr) == (1, "team.yaml:2: version: unknown value `7` (allowed: 1)\n")
    team.write_text("version: true\nmodels: {chat2: {provider: demo, model: demo-2}}\n")  # (True == 1 in Python)
    assert issues(root) == [f"{tmp_path}/team.yaml:1: version: unknown value `true` (allowed: 1)"]
    team.write_text("version: 1\nmodels: {chat2: {provider: demo, model: demo-2}}\n")
    assert issues(root) == []


BROKEN_CHECK = """\
import sys
import gateway.policy.compile as compile_module
from gateway.cli import main

def broken(*_args, **_kwargs):
    raise KeyError("boom")

compile_module.compile_policy = broken
raise SystemExit(main(["check", sys.argv[1]]))
"""


def test_a_bug_in_the_checks_is_one_line_from_gateway_check_never_a_traceback(tmp_path: Path) -> None:
    write(tmp_path, "policy.yaml", ROOT.replace("    include: [team.yaml]\n", ""))
    script = write(tmp_path, "broken_check.py", BROKEN_CHECK)
    run = subprocess.run([sys.executable, str(script), "policy.yaml"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("policy.yaml:1: the policy could not be checked (KeyError: a gateway bug; raised at "
                               "broken_check.py:")
