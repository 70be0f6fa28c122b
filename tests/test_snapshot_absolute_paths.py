"""The last policy the workers accepted (`reload.keep_snapshot`, `reload.load_snapshot`) when it names its files by
absolute path: an include, an include glob, the prices file, the shadow policy and the shadow's own include.

Such a policy was never kept: the copy's version hashed the absolute names relative to the copy's root, not the
original's, so every start and reload logged "changed while it was kept ...: not kept", and a worker restarted while
the file was refused had nothing to fall back to (it exited 2, again and again). Its copy would also have read the
live files, not the copies. The copy now reads only copied files and compiles to the version kept.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from gateway.policy import Policy, PolicyError, load_policy
from gateway.reload import keep_snapshot, load_snapshot

PRICES = "version: 1\nprices:\n  demo-1: {{input_per_mtok: {input}, output_per_mtok: 2}}\n"


def write_policy(folder: Path) -> Path:
    """A root file naming every other file by absolute path."""
    (folder / "tenants").mkdir()
    (folder / "models.yaml").write_text("models:\n  demo: {provider: demo, model: demo-1}\n")
    (folder / "tenants" / "acme.yaml").write_text("tenants:\n  acme: {}\n")
    (folder / "prices.yaml").write_text(PRICES.format(input=1))
    (folder / "shadow-models.yaml").write_text("models:\n  demo: {provider: demo, model: demo-2}\n")
    (folder / "shadow.yaml").write_text(textwrap.dedent(f"""\
        version: 1
        include: [{folder}/shadow-models.yaml]
        auth: none
        providers:
          demo: {{kind: demo}}
        """))
    root = folder / "gateway.yaml"
    root.write_text(textwrap.dedent(f"""\
        version: 1
        include: [{folder}/models.yaml, {folder}/tenants/*.yaml]
        prices_file: {folder}/prices.yaml
        server: {{shadow_policy: {folder}/shadow.yaml}}
        auth: none
        providers:
          demo: {{kind: demo}}
        """))
    return root


@pytest.fixture
def policy_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "etc" / "gw"
    folder.mkdir(parents=True)
    return folder


def kept(policy: Policy, snapshots: Path, caplog: pytest.LogCaptureFixture) -> bool:
    with caplog.at_level(logging.WARNING, logger="gateway.reload"):
        result = keep_snapshot(policy, snapshots)
    assert "not kept" not in caplog.text
    return result


def test_a_policy_naming_its_files_by_absolute_path_is_kept_and_served_from_the_copy(
    tmp_path: Path, policy_folder: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    root = write_policy(policy_folder)
    policy = load_policy(root)
    assert policy.shadow is not None
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    assert kept(policy, snapshots, caplog)

    # the live files changed: the include broken (the file refused), the prices and the shadow's include changed
    (policy_folder / "models.yaml").write_text("models:\n  demo: {provider: nosuch, model: demo-1}\n")
    (policy_folder / "prices.yaml").write_text(PRICES.format(input=7))
    (policy_folder / "shadow-models.yaml").write_text("models:\n  demo: {provider: demo, model: demo-3}\n")
    (policy_folder / "tenants" / "acme.yaml").unlink()
    with pytest.raises(PolicyError):
        load_policy(root)

    restored = load_snapshot(snapshots, root)
    assert restored is not None
    assert restored.version == policy.version
    assert restored.shadow is not None and restored.shadow.version == policy.shadow.version
    # what the copy holds, not what the live files hold now
    price = restored.prices.price("demo", "demo-1")
    assert price is not None and price.input_per_mtok == 1
    assert restored.shadow.models["demo"].targets[0].upstream_model == "demo-2"
    assert "acme" in restored.tenants
    # named as the originals: the watcher watches those
    assert restored.source == policy.source
    assert restored.files == policy.files
    assert restored.watch == policy.watch
    assert restored.shadow.source == policy.shadow.source
    assert restored.shadow.files == policy.shadow.files


def test_names_outside_the_snapshot_folder_are_read_as_they_are_again_once_the_copy_is_compiled(
    tmp_path: Path, policy_folder: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The copy's reading of absolute names lasts only while the copy is compiled: a load of the file after a
    snapshot was kept, or loaded, reads the live files."""
    root = write_policy(policy_folder)
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    assert kept(load_policy(root), snapshots, caplog)
    assert load_snapshot(snapshots, root) is not None
    (policy_folder / "prices.yaml").write_text(PRICES.format(input=5))
    price = load_policy(root).prices.price("demo", "demo-1")
    assert price is not None and price.input_per_mtok == 5
