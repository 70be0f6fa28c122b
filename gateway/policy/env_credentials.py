"""Credentials and tokens read from the environment variables a policy names (`*_env` fields): cleaned as a
header carries them (`token_file.header_credential`: a secret mounted from a file ends in a newline), and
reported, when unusable, by the variable's name, never by its value; a credential pasted where the variable's
name belongs is not echoed either. And what marks a value written in the policy as a credential, which must come
from a variable instead (`looks_secret`), and the URLs a message may not quote (`url_shown`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .loader import _Located, format_path
from .provider_schema import KIND_TRAITS
from .token_file import header_credential

__all__ = ["credential", "looks_secret", "token", "unusable", "url_shown"]

# What marks an inline header or query parameter as a credential, which must come from an environment
# variable instead (`looks_secret`). Names are compared lower case, `_` read as `-`. A false alarm costs
# a line in headers_env; a miss puts a credential in the policy file and outside the error scrub.
_SECRET_NAMES = frozenset(
    {trait.default_key_header.lower() for trait in KIND_TRAITS.values()}  # authorization, api-key, x-goog-api-key...
    | {"proxy-authorization", "cookie", "ocp-apim-subscription-key"}
)
_SECRET_PARTS = ("auth", "token", "secret", "passw", "credential", "cookie", "apikey", "api-key", "signature")
_SECRET_WORDS = frozenset({"key", "sig", "pwd"})  # whole words only: `x-functions-key`, `key`, `sig`, not `keep-alive`
_WORD = re.compile(r"[^a-z0-9]+")
_CREDENTIAL_VALUE = re.compile(r"\s*(?:bearer|basic)\s+\S", re.IGNORECASE)  # an Authorization value, whatever its name
_PASTED = ("its value looks like a credential, not the name of an environment variable (so it is not shown): put "
           "the credential in a variable and name the variable here")


def token(
    var: str | None, path: tuple[str, ...], doc: _Located, env: Mapping[str, str], require_env: bool,
    warnings: list[str], consequence: str,
) -> str | None:
    """A bearer token from the environment, stripped as a provider credential is (a secret mounted from a file
    ends in a newline, which no presented token carries). Unset, blank, or holding a control character or one
    outside ASCII: the feature fails closed; what is reported names the variable, never its value."""
    if var is None:
        return None
    value = env.get(var)
    if value is None and _pasted_credential(var):  # the error would echo it into the logs, /admin/reload...
        unusable(doc, path, _PASTED, require_env, warnings, f"; {consequence}")
        return None if path[-1] == "admin_token_env" else ""
    cleaned, problem = header_credential(value) if value else ("", "is not set")
    problem = problem or (None if cleaned else "holds only whitespace")
    if problem is None and not cleaned.isascii():  # (`bearer_matches` takes a header's bytes as Latin-1, as HTTP has
        # it; a client sends UTF-8, or cannot send the character at all: the token would never match, locked for good)
        problem = "holds a character outside ASCII (an accented letter, a no-break or zero-width space...), which " \
                  "no client can present in a header as it is written"
    if problem is None:
        if cleaned != value:
            warnings.append(f"{doc.where(path)}: {format_path(path)}: environment variable `{var}` ends or starts "
                            "with whitespace (a line break...); the token is compared without it")
        return cleaned
    unusable(doc, path, f"environment variable `{var}` {problem}", require_env, warnings, f"; {consequence}")
    return None if path[-1] == "admin_token_env" else ""


def unusable(doc: _Located, path: tuple[str, ...], message: str, require_env: bool, warnings: list[str],
              then: str = "") -> None:
    """A named variable that cannot serve: an issue when serving, else a warning (`check` needs no credentials)."""
    if require_env:
        doc.issue(path, message)
    else:
        warnings.append(f"{doc.where(path)}: {format_path(path)}: {message}{then}")


def credential(value: str | None, var: str, field: tuple[str, ...], doc: _Located, require_env: bool,
                warnings: list[str]) -> str | None:
    """The credential in `var` as its header carries it; None when unset, empty (or only whitespace) or no header
    could carry it, reported at load (an issue; a warning for `gateway check`) rather than each request failing to
    send it. Empty is unset for the upstream: it would get `Authorization: Bearer ` and answer 401 to every call,
    behind a gateway that said it was ready (docker compose's `KEY: ${KEY}` gives an empty one when the host has
    none)."""
    if value is None and _pasted_credential(var):  # the error would echo it into the logs, /admin/reload...
        unusable(doc, field, _PASTED, require_env, warnings)
        return None
    secret, problem = (None, "is not set") if value is None else header_credential(value)
    if secret == "" and problem is None:
        problem = "is empty" if value == "" else "holds only whitespace"
    if secret and problem is None:
        if secret != value:  # a secret mounted from a file ends in a newline
            warnings.append(f"{doc.where(field)}: {format_path(field)}: environment variable `{var}` ends or starts "
                            "with whitespace (a line break...); it is sent without it")
        return secret
    unusable(doc, field, f"environment variable `{var}` {problem}", require_env, warnings)
    return None


def looks_secret(name: str, value: str, own: tuple[str, ...] = ()) -> bool:
    """Whether an inline header or query parameter carries a credential.

    Inline credentials are refused: they would sit in the policy file (and its repository), and only the
    values read from environment variables are scrubbed by value from upstream errors. `own` are names that
    are secret for this provider whatever they look like (its kind's key header, its `api_key_header`)."""
    lowered = name.lower().replace("_", "-")
    if lowered in _SECRET_NAMES or lowered in own or any(part in lowered for part in _SECRET_PARTS):
        return True
    return not _SECRET_WORDS.isdisjoint(_WORD.split(lowered)) or _CREDENTIAL_VALUE.match(value) is not None


def url_shown(url: str) -> str:
    """`url` quoted for a message about its shape, unless it may hold a credential (user information before an `@`,
    a query): a refusal goes to `gateway check`'s output, the reload's answer and the log, so it says what is
    wrong without the value."""
    if "@" in url or "?" in url:
        return "the URL (not quoted: it may hold a credential)"
    return f"`{url[:100]}`"


# A key's own shape where a variable's name belongs (Google AIza..., AWS AKIA/ASIA..., GitHub, Stripe sk_, Hugging
# Face hf_, Slack xox...), or a long name mixing lower case, upper case and digits, as generated keys do and
# variable names do not.
_KEY_PREFIX = re.compile(r"(?:AIza|AKIA|ASIA|gh[pousr]_|github_pat_|sk_|rk_|hf_|xox[a-z]?_)\w{12}")
_MIXED_CASE_AND_DIGITS = re.compile(r"(?=.*[a-z])(?=.*[A-Z])(?=.*[0-9])\w{24,}")


def _pasted_credential(var: str) -> bool:
    """Whether an unset `*_env` name is a credential pasted where its variable's name goes: never echoed."""
    return _KEY_PREFIX.match(var) is not None or _MIXED_CASE_AND_DIGITS.fullmatch(var) is not None
