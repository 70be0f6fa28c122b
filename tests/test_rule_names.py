"""A rule's `when.key` or `when.tenant` naming no key or tenant of the policy is a typo that turns the rule off (a
`deny` fencing off one key then lets it through): an error with file, line and field when no caller can carry the
name, a warning with `dynamic_keys`, whose keys, made at run time, may."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.auth.keys import hash_key
from gateway.policy import PolicyError, compile_text
from tests.conftest import REPO

INTERN_KEY = "gw-rule-names-intern-key-00000000000000000"


def _policy(rules: str, *, keys: int = 0, dynamic: bool = False, auth: str = "keys") -> str:
    listed = "".join(f"  - {{name: k{n:02}, tenant: t{n:02}, hash: \"{hash_key(f'gw-rule-names-{n:036}')}\"}}\n"
                     for n in range(keys))
    key_section = "keys:\n" + (
        f"  - {{name: intern, tenant: acme, hash: \"{hash_key(INTERN_KEY)}\"}}\n"
        f"  - {{name: ops, tenant: acme, hash: \"{hash_key('gw-rule-names-ops-key-0000000000000000000')}\"}}\n"
        f"  - {{tenant: globex, hash: \"{hash_key('gw-rule-names-unnamed-0000000000000000000')}\"}}\n"
        + listed
    ) if auth == "keys" else ""
    return (f"version: 1\nauth: {auth}\n{key_section}"
            + ("dynamic_keys: {enabled: true}\n" if dynamic else "")
            + "providers:\n  d: {kind: demo}\nmodels:\n  big: {provider: d, model: big}\n"
            + "  small: {provider: d, model: small}\nrules:\n" + rules)


TYPOS = """\
  - name: no-big-model-for-interns
    when: {key: [intren], alias: [big]}
    deny: interns may not use the big model
  - name: no-big-model-for-contractors
    when: {tenant: [acmee], alias: [big]}
    deny: contractors may not use the big model
"""


def _lines(text: str, *words: str) -> tuple[int, ...]:
    """The 1-based line of each word's first appearance in `text`."""
    lines = text.splitlines()
    return tuple(next(n for n, line in enumerate(lines, 1) if word in line) for word in words)


def test_a_rule_naming_no_key_or_tenant_is_an_error_with_its_line() -> None:
    with pytest.raises(PolicyError) as refused:
        compile_text(_policy(TYPOS), "p.yaml")
    issues = {issue.path: issue for issue in refused.value.issues}
    key, tenant = issues["rules[0].when.key"], issues["rules[1].when.tenant"]
    assert (key.file, key.line, tenant.line) == ("p.yaml", *_lines(_policy(TYPOS), "intren", "acmee"))
    assert "`intren`" in key.message and "intern, key-2, ops" in key.message
    assert "`acmee`" in tenant.message and "acme, globex" in tenant.message


def test_names_that_exist_pass() -> None:
    rules = ("  - {name: a, when: {key: [intern, key-2], alias: [big]}, deny: no}\n"
             "  - {name: b, when: {tenant: [acme, globex]}, alias: small}\n")
    assert len(compile_text(_policy(rules), "p.yaml").rules) == 2


def test_with_dynamic_keys_an_unknown_name_is_a_warning() -> None:
    policy = compile_text(_policy(TYPOS, dynamic=True), "p.yaml")
    warned = [w for w in policy.warnings if "when." in w]
    key_line, tenant_line = _lines(_policy(TYPOS, dynamic=True), "intren", "acmee")
    assert len(warned) == 2
    assert warned[0].startswith(f"p.yaml:{key_line}: rules[0].when.key: ") and "run time" in warned[0]
    assert warned[1].startswith(f"p.yaml:{tenant_line}: rules[1].when.tenant: ")


def test_the_names_listed_are_bounded() -> None:
    with pytest.raises(PolicyError) as refused:
        compile_text(_policy("  - {name: a, when: {key: [nobody]}, deny: no}\n", keys=30), "p.yaml")
    message = refused.value.issues[0].message
    assert "and 23 more" in message and "k29" not in message


def test_with_no_keys_the_only_tenant_is_anonymous() -> None:
    rules = "  - {name: a, when: {tenant: [anonymous]}, alias: small}\n"
    assert len(compile_text(_policy(rules, auth="none"), "p.yaml").rules) == 1
    with pytest.raises(PolicyError) as refused:
        compile_text(_policy("  - {name: a, when: {key: [intern]}, deny: no}\n", auth="none"), "p.yaml")
    assert refused.value.issues[0].path == "rules[0].when.key"


def test_gateway_check_reports_the_typo(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(_policy(TYPOS))
    done = subprocess.run([sys.executable, "-m", "gateway", "check", str(tmp_path / "policy.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    report = done.stdout + done.stderr
    assert done.returncode != 0 and "rules[0].when.key" in report and "rules[1].when.tenant" in report, report
