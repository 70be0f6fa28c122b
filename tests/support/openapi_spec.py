"""Validate gateway responses against OpenAI's published OpenAPI spec.

The gateway claims OpenAI compatibility; the only neutral judge of that is
OpenAI's own spec (openai/openai-openapi, OpenAPI 3.1 == JSON Schema 2020-12),
kept read-only outside the repo at ``../shared/openai-openapi/openapi.yaml``
(override with ``OPENAI_OPENAPI_SPEC``).

Two spec quirks are handled here so that validation means what OpenAI means:

* Some schemas (notably the chat stream chunk) still use the OpenAPI 3.0
  keyword ``nullable: true``, which JSON Schema 2020-12 silently ignores.
  Without a rewrite, real chunks (``"finish_reason": null``, ``"usage": null``)
  would be rejected, so each ``nullable: true`` schema becomes
  ``anyOf: [<schema>, {type: null}]``.
* OpenAPI-only keywords (``discriminator``, ``example``, ``x-*``) are unknown to
  JSON Schema and ignored by the validator; ``format`` is annotation-only
  because no format checker is passed (``format: unixtime`` etc. would
  otherwise be meaningless or reject valid responses).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

__all__ = ["errors", "spec_path", "validate"]

SPEC_ENV = "OPENAI_OPENAPI_SPEC"
# tests/support/ -> tests/ -> repo root -> its parent, where shared/ lives.
DEFAULT_SPEC = Path(__file__).resolve().parents[3] / "shared" / "openai-openapi" / "openapi.yaml"
_BASE_URI = "urn:openai-openapi"
_MAX_MESSAGE = 300
_NULL_ONLY = {"anyOf": [{}, {"type": "null"}]}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml is ~10x faster


def spec_path() -> Path:
    """Where the spec is read from: ``$OPENAI_OPENAPI_SPEC`` or the shared copy."""
    return Path(os.environ.get(SPEC_ENV) or DEFAULT_SPEC)


def _fix_nullable(node: Any) -> Any:
    """Return ``node`` with OpenAPI 3.0 ``nullable: true`` made real JSON Schema.

    Walks everything, data (``example``, ``x-*``) included: telling schemas from
    data would need a schema-aware walk, and no data value in the spec has a
    ``nullable`` key (checked for ``enum``/``const``/``default``/``example``/``x-*``).
    """
    if isinstance(node, list):
        return [_fix_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _fix_nullable(value) for key, value in node.items()}
    # 3.0 idiom `allOf: [{$ref: X}, {nullable: true}]` means "X or null"; the
    # member was already rewritten to `_NULL_ONLY` by the recursion above.
    members = out.get("allOf")
    if isinstance(members, list) and _NULL_ONLY in members:
        out["allOf"] = [m for m in members if m != _NULL_ONLY]
        out["nullable"] = True
    if out.pop("nullable", None) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _document() -> dict[str, Any]:
    """Parse the (multi-MB) spec once per process."""
    path = spec_path()
    if not path.is_file():
        raise FileNotFoundError(f"OpenAI OpenAPI spec not found at {path} (set {SPEC_ENV})")
    with path.open("rb") as fh:
        doc = yaml.load(fh, Loader=_Loader)  # noqa: S506 - safe loader variant
    return _fix_nullable(doc)


@functools.cache
def _validator(component: str) -> Draft202012Validator:
    """One validator per component; `$ref`s resolve against the whole document."""
    doc = _document()
    if component not in doc.get("components", {}).get("schemas", {}):
        raise KeyError(f"no #/components/schemas/{component} in {spec_path()}")
    registry: Registry = Registry().with_resource(_BASE_URI, DRAFT202012.create_resource(doc))
    schema = {"$ref": f"{_BASE_URI}#/components/schemas/{component}"}
    return Draft202012Validator(schema, registry=registry)


def _leaves(error: ValidationError) -> list[ValidationError]:
    """Replace an anyOf/oneOf failure by the errors of the one branch that fits the type.

    ``best_match`` gives up on e.g. ``anyOf: [CompletionUsage, null]`` with two
    missing properties, leaving only "is not valid under any of the given schemas".
    """
    branches: dict[object, list[ValidationError]] = {}
    for sub in error.context or ():
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    fitting = [
        subs for subs in branches.values()
        if not any(s.validator == "type" and not s.relative_path for s in subs)
    ]
    if len(fitting) != 1:
        return [error]
    return [leaf for sub in fitting[0] for leaf in _leaves(sub)]


def _describe(component: str, error: ValidationError) -> list[str]:
    """``Component: $.json.path: reason`` lines, without dumping the huge schema."""
    lines = []
    for leaf in _leaves(error):
        message = leaf.message
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        lines.append(f"{component}: {leaf.json_path}: {message}")
    return lines


def _sorted_errors(component: str, instance: object) -> list[ValidationError]:
    found = _validator(component).iter_errors(instance)
    return sorted(found, key=lambda e: [str(p) for p in e.path])


def errors(component: str, instance: object) -> list[str]:
    """All validation errors of ``instance`` against the component, readable; ``[]`` if valid."""
    return [line for e in _sorted_errors(component, instance) for line in _describe(component, e)]


def validate(component: str, instance: object) -> None:
    """Raise ``ValidationError`` unless ``instance`` validates against the component.

    The message names the component, the JSON path and the reason (all errors
    when there are several), without dumping the huge schema.
    """
    found = _sorted_errors(component, instance)
    if found:
        lines = [line for e in found for line in _describe(component, e)]
        first = best_match(found) or found[0]
        raise ValidationError("\n".join(lines), path=first.path, schema_path=first.schema_path)
