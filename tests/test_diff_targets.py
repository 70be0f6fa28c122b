"""`gateway diff` shows what changed inside a target list, and `--json` never shortens a value.

Target lists were compared whole and each side shortened to 120 characters: two policies differing in a second
target's weight printed two identical prefixes. Now two lists of the same targets (an alias's, a rule's) are compared
target by target (`targets[1].weight: 3.0 -> 9.0`); a value is shortened in the text only, and only while the two
shortened sides still differ. The CLI runs in a subprocess, as a policy repository's CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO

LONG = "x" * 200  # a value longer than the text's width


def _policy(weight: int, rule_weight: int, deny: str, extra: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          p1: {{kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: NONE_KEY}}
          p2: {{kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: NONE_KEY}}
        models:
          chat:
            strategy: weighted
            targets:
              - {{provider: p1, model: model-a-with-a-rather-long-name, weight: 1, timeouts: {{first_byte_s: 3}}}}
              - {{provider: p2, model: model-b-with-a-rather-long-name, weight: {weight},
                  extra_body: {{note: "{extra}"}}}}
          other: {{provider: p1, model: model-c}}
        rules:
          - name: alt
            when: {{alias: [chat], header: {{x-route: [alt]}}}}
            targets:
              - {{provider: p1, model: model-alt-a, weight: 2}}
              - {{provider: p2, model: model-alt-b, weight: {rule_weight}}}
          - name: nope
            when: {{alias: [other], has_tools: true}}
            deny: "{deny}"
        """)


def _diff(folder: Path, old: str, new: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (folder / "old.yaml").write_text(old)
    (folder / "new.yaml").write_text(new)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_KEY")}
    return subprocess.run([sys.executable, "-m", "gateway", "diff", str(folder / "old.yaml"),
                           str(folder / "new.yaml"), *extra], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=env)


def test_a_changed_weight_inside_a_target_list_is_shown_by_target(tmp_path: Path) -> None:
    old, new = _policy(3, 5, "no", "n"), _policy(9, 7, "no", "n")
    run = _diff(tmp_path, old, new)
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines() == [
        "~ targets: chat changed",
        "    targets[1].weight: 3.0 -> 9.0",
        "~ rules: alt changed",
        "    targets[1].weight: 5.0 -> 7.0",
    ]
    as_json = json.loads(_diff(tmp_path, old, new, "--json").stdout)
    assert [(c["section"], c["name"], c["details"]) for c in as_json] == [
        ("targets", "chat", ["targets[1].weight: 3.0 -> 9.0"]),
        ("rules", "alt", ["targets[1].weight: 5.0 -> 7.0"]),
    ]


def test_a_changed_target_list_still_names_its_targets(tmp_path: Path) -> None:
    old = _policy(3, 5, "no", "n")
    new = old.replace("model-b-with-a-rather-long-name", "model-d")
    run = _diff(tmp_path, old, new)
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines() == [
        "~ targets: chat changed",
        "    targets: p1/model-a-with-a-rather-long-name, p2/model-b-with-a-rather-long-name -> "
        "p1/model-a-with-a-rather-long-name, p2/model-d",
    ]


def test_long_values_are_whole_in_json_and_never_two_identical_prefixes_in_text(tmp_path: Path) -> None:
    old, new = _policy(3, 5, "A" + LONG, "n" + LONG), _policy(3, 5, "B" + LONG, "n" + LONG + "!")
    run = _diff(tmp_path, old, new)
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    # differing within the width: shortened in the text
    assert f"    deny: {('A' + LONG)[:117]}... -> {('B' + LONG)[:117]}..." in lines, lines
    # differing past the width: shown whole rather than as two identical prefixes
    assert f"    targets[1].extra_body.note: n{LONG} -> n{LONG}!" in lines, lines
    as_json = json.loads(_diff(tmp_path, old, new, "--json").stdout)
    details = [detail for change in as_json for detail in change["details"]]
    assert f"deny: A{LONG} -> B{LONG}" in details, details  # never shortened
    assert f"targets[1].extra_body.note: n{LONG} -> n{LONG}!" in details, details
    assert not any(detail.endswith("...") or "... ->" in detail for detail in details)
