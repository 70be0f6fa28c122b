"""The linters pass: ruff on the code and the tests, mypy --strict on the package.

Both are pinned in the `dev` extra (`pip install -e '.[test,dev]'`, as tests/run.sh does);
without them these tests are skipped, and with other versions they fail, since
another version checks other things.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pinned(name: str) -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(name)}==([^"]+)"', text)
    assert match, f"{name} is not pinned in pyproject.toml"
    return match.group(1)


def _installed(name: str) -> str:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    assert version == _pinned(name), f"{name} {version} is installed, the dev extra pins {_pinned(name)}"
    return version


def test_ruff() -> None:
    _installed("ruff")
    ruff = Path(sys.executable).with_name("ruff")
    command = str(ruff) if ruff.exists() else shutil.which("ruff")
    assert command, "ruff is installed but its command is not found"
    result = subprocess.run([command, "check", "--no-cache", "gateway", "tests", "bench", "evals"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    _installed("mypy")
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "gateway"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
