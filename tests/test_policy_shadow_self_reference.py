"""A shadow policy that names itself (the candidate made as `cp gateway.yaml candidate.yaml`, the live policy
naming `shadow_policy: candidate.yaml`) is refused with one clear error, at once: not by recursing once per level
until Python's stack runs out (hundreds of issues, a misleading `nested more than 100 levels deep`, and a policy's
size times ~330 in memory). The candidate's own candidate is never read."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.policy import PolicyError, load_policy

POLICY = """\
version: 1
server:
  shadow_policy: {shadow}
auth: none
providers:
  demo: {{kind: demo}}
models:
  demo: {{provider: demo, model: demo-1}}
"""


@pytest.mark.parametrize("layout", ["self", "copy", "pair"])
def test_a_shadow_policy_naming_itself_is_one_clear_error(tmp_path: Path, layout: str) -> None:
    if layout == "self":  # the live policy names itself
        (tmp_path / "gateway.yaml").write_text(POLICY.format(shadow="gateway.yaml"))
    elif layout == "copy":  # the candidate copied from the live policy names itself
        (tmp_path / "gateway.yaml").write_text(POLICY.format(shadow="candidate.yaml"))
        (tmp_path / "candidate.yaml").write_text(POLICY.format(shadow="candidate.yaml"))
    else:  # each names the other
        (tmp_path / "gateway.yaml").write_text(POLICY.format(shadow="candidate.yaml"))
        (tmp_path / "candidate.yaml").write_text(POLICY.format(shadow="gateway.yaml"))
    started = time.monotonic()
    with pytest.raises(PolicyError) as refused:
        load_policy(tmp_path / "gateway.yaml", env={})
    elapsed = time.monotonic() - started
    messages = [issue.message for issue in refused.value.issues]
    assert len(messages) <= 3, f"{len(messages)} issues, e.g. {messages[:3]}"  # observed: ~330
    assert not any("nested more than" in message for message in messages), messages[:3]
    expected = "is the policy itself" if layout == "self" else "has a shadow policy of its own"
    assert [message for message in messages if expected in message], messages[:3]
    assert all(issue.path == "server.shadow_policy" for issue in refused.value.issues), refused.value.issues
    assert elapsed < 0.5, elapsed  # observed: ~1 s for this 8-line policy; 32 s and +400 MB for a 60 KB one


def test_a_candidate_naming_a_shadow_is_refused_before_its_candidate_is_read(tmp_path: Path) -> None:
    """The candidate's own `shadow_policy` is refused as written: the file it names (here absent) is never opened,
    and the refusal watches the candidate, so that dropping the line reloads."""
    (tmp_path / "gateway.yaml").write_text(POLICY.format(shadow="candidate.yaml"))
    (tmp_path / "candidate.yaml").write_text(POLICY.format(shadow="missing.yaml"))
    with pytest.raises(PolicyError) as refused:
        load_policy(tmp_path / "gateway.yaml", env={})
    [issue] = refused.value.issues
    assert issue.path == "server.shadow_policy" and issue.file.endswith("gateway.yaml"), issue
    assert "has a shadow policy of its own" in issue.message and "missing" not in issue.message, issue
    assert str(tmp_path / "candidate.yaml") in refused.value.watch, refused.value.watch


def test_a_candidate_without_a_shadow_still_loads(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(POLICY.format(shadow="candidate.yaml"))
    (tmp_path / "candidate.yaml").write_text(POLICY.format(shadow="null"))
    policy = load_policy(tmp_path / "gateway.yaml", env={})
    assert policy.shadow is not None and policy.shadow.shadow is None
    assert str(tmp_path / "candidate.yaml") in policy.watch
