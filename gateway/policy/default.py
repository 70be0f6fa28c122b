"""Which policy file `gateway serve` reads when none is given.

The default used to be `policies/gateway.yaml` relative to the working directory,
which only exists in a checkout (or the Docker image's /app). The same default
policy now ships inside the package (`gateway/policies/gateway.yaml`), so that an
installed gateway serves its demo model from any folder.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
from pathlib import Path

__all__ = ["LOCAL_POLICY", "PACKAGED_POLICY", "resolve_policy_path"]

LOCAL_POLICY = Path("policies/gateway.yaml")  # relative to the working directory, as in a checkout or the image
_PACKAGED = importlib.resources.files("gateway").joinpath("policies", "gateway.yaml")
_extracted = contextlib.ExitStack()  # only used when the package is not on a file system (a zip)
atexit.register(_extracted.close)


def _packaged_path() -> Path:
    if isinstance(_PACKAGED, Path):
        return _PACKAGED
    return Path(_extracted.enter_context(importlib.resources.as_file(_PACKAGED)))


PACKAGED_POLICY: Path = _packaged_path()


def resolve_policy_path(given: Path | None) -> Path:
    """The policy to read: `given` if any; else ./policies/gateway.yaml if it exists; else the packaged default."""
    if given is not None:
        return given
    if LOCAL_POLICY.is_file():
        return LOCAL_POLICY
    return PACKAGED_POLICY
