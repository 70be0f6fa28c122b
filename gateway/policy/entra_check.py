"""An Azure provider's credential: one of `api_key_env`, `azure.entra_token_env`, `azure.entra_token_file`.

Two of them would send two credentials (or silently drop one), so giving more than one is a
policy error, as is an `Authorization` entry in `headers_env` beside an Entra token (the token
sets that header). `azure.entra_token_file` is checked here as `policy.compile` checks an
environment variable: a file that holds no usable token is an error when the loader requires
credentials (`gateway serve`, a reload) and a warning when it does not (`gateway check`), with
the file, line and field that name it. The provider reads the file again when it starts, and
whenever it changes (`providers.token_refresh`).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from .loader import _Located
from .provider_schema import AzureSpec
from .schema import ProviderSpec
from .token_file import read_token_file

__all__ = ["check_azure_credentials"]


def check_azure_credentials(
    name: str, spec: ProviderSpec, options: AzureSpec, doc: _Located, require_env: bool, warnings: list[str],
) -> AzureSpec:
    """Report conflicting credentials and an unusable token file; `options` with the file's path made absolute."""
    path = ("providers", name)
    given = [(field, where) for field, where, value in (
        ("api_key_env", path + ("api_key_env",), spec.api_key_env),
        ("azure.entra_token_env", path + ("azure", "entra_token_env"), options.entra_token_env),
        ("azure.entra_token_file", path + ("azure", "entra_token_file"), options.entra_token_file),
    ) if value is not None]
    if len(given) == 2:
        doc.issue(given[1][1], f"give {given[0][0]} or {given[1][0]}, not both")
    elif len(given) == 3:
        doc.issue(given[2][1], "give one of api_key_env, azure.entra_token_env or azure.entra_token_file, "
                               "not all three")
    entra = [field for field, _ in given if field.startswith("azure.")]
    if entra:  # the token is the Authorization header
        for header in spec.headers_env:
            if header.lower() == "authorization":
                doc.issue(path + ("headers_env", header), f"the Authorization header is set from {entra[0]}; "
                                                          "do not repeat it")
    refresh = path + ("azure", "entra_token_refresh_s")
    if options.entra_token_file is None:
        if refresh in doc.lines:
            doc.issue(refresh, "entra_token_refresh_s applies to azure.entra_token_file, which is not given")
        return options
    field = path + ("azure", "entra_token_file")
    if "\0" in options.entra_token_file:  # (`os.stat` raises ValueError)
        doc.issue(field, "a file name cannot hold a NUL character (`\\0`)")
        return options
    # Made absolute, not resolved: the symlinks in it are followed at every read (a Kubernetes volume swaps one).
    file = os.path.abspath(Path(doc.locate(field)[0]).parent / options.entra_token_file)
    problem = read_token_file(file).problem
    if problem is not None:
        message = f"the token file `{file}` {problem}"
        if require_env:
            doc.issue(field, message)
        else:
            warnings.append(f"{doc.where(field)}: providers.{name}.azure.entra_token_file: {message}; "
                            "`gateway serve` refuses this policy until it holds a token")
    return msgspec.structs.replace(options, entra_token_file=file)
