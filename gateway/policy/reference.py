"""The policy's documented JSON Schema (`gateway schema`) and reference (`gateway schema --markdown`).

Both are generated from the structs of `policy.schema` and its sibling modules, so they cannot
drift from what the loader accepts. A field's description is, in order: its `Meta(description=...)`,
else the comment written on its line (or the comment lines just above it) in the struct's source,
else the entry of `_DESCRIPTIONS` below, for fields whose meaning their name alone does not carry
a comment for. A test checks that every field of every section has one; `docs/policies.md` holds
the markdown, and a test checks it is current.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import json
import pkgutil
import tokenize
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as types

from . import schema
from .reference_text import DESCRIPTIONS as _DESCRIPTIONS
from .reference_text import EXAMPLES as _EXAMPLES

__all__ = ["field_descriptions", "policy_schema", "reference_markdown"]

# `schema.py` and every `*_schema.py` beside it (each feature keeps its shapes in a module of its own).
_MODULES = (schema, *(importlib.import_module(f"{__package__}.{info.name}")
                      for info in pkgutil.iter_modules([str(Path(__file__).parent)])
                      if info.name.endswith("_schema")))

def _structs() -> dict[str, type[msgspec.Struct]]:
    found: dict[str, type[msgspec.Struct]] = {}
    for module in _MODULES:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__module__ == module.__name__:
                found[value.__name__] = value
    return found


@functools.cache
def field_descriptions() -> dict[str, str]:
    """`Struct.field` -> description, from source comments and the table above."""
    found: dict[str, str] = {}
    for name, struct in _structs().items():
        comments: dict[str, str] = {}
        for base in reversed(struct.__mro__):  # a guard kind's common fields are written on its base
            if isinstance(base, type) and issubclass(base, msgspec.Struct) and base is not msgspec.Struct:
                comments.update(_source_comments(base))
        for field in msgspec.structs.fields(struct):
            text = comments.get(field.name) or next(
                (_DESCRIPTIONS[f"{base.__name__}.{field.encode_name}"] for base in struct.__mro__
                 if f"{base.__name__}.{field.encode_name}" in _DESCRIPTIONS), None)
            if text:
                found[f"{name}.{field.encode_name}"] = text
    return found


def _source_comments(struct: type) -> dict[str, str]:
    """The comment on each field's line, or the full-line comments just above it."""
    try:
        source = inspect.getsource(struct)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    above: list[str] = []
    field: str | None = None
    depth = 0
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for index, tok in enumerate(tokens):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                above.append(text)
            elif field is not None and depth == 0:
                found[field] = _sentence(text)
                field = None
        elif tok.type == tokenize.NAME and depth == 0 and tok.start[1] == 4 and index + 1 < len(tokens) \
                and tokens[index + 1].string == ":":
            field = tok.string
            if above:
                found[field] = _sentence(" ".join(above))
            above = []
        elif tok.type == tokenize.NEWLINE:
            field = None
    return found


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] if text else text


def factory_defaults() -> dict[str, dict[str, Any]]:
    """By struct name, the defaults of its fields that a factory makes (a list or a set: `models: ["*"]`), which
    msgspec's schema leaves out, so that the reference shows them as it shows the others."""
    found: dict[str, dict[str, Any]] = {}

    def walk(info: Any) -> None:
        if isinstance(info, types.StructType):
            if info.cls.__name__ in found:
                return
            found[info.cls.__name__] = {field.encode_name: _made(field.default_factory())
                                        for field in info.fields if field.default_factory is not msgspec.NODEFAULT}
            for field in info.fields:
                walk(field.type)
        elif isinstance(info, types.Metadata):
            walk(info.type)
        elif isinstance(info, types.UnionType):
            for option in info.types:
                walk(option)
        elif isinstance(info, (types.ListType, types.SetType, types.FrozenSetType, types.VarTupleType)):
            walk(info.item_type)
        elif isinstance(info, types.DictType):
            walk(info.value_type)

    walk(types.type_info(schema.PolicySpec))
    return found


def _made(value: Any) -> Any:
    """A factory's default as JSON; a set's members sorted (a set's order differs from one process to the next)."""
    return sorted(value) if isinstance(value, (set, frozenset)) else msgspec.to_builtins(value)


def policy_schema(*, fragment: bool = False) -> dict[str, Any]:
    """The JSON Schema of a policy file, every field described. `fragment`: for included files."""
    out: dict[str, Any] = schema.json_schema()
    descriptions = field_descriptions()
    made = factory_defaults()
    for name, definition in out.get("$defs", {}).items():
        for prop, body in definition.get("properties", {}).items():
            key = f"{name}.{prop}"
            if "default" not in body and prop in made.get(name, {}):
                body["default"] = made[name][prop]
            inner = [o.get("description") for o in body.get("anyOf", ()) if isinstance(o, dict)]
            if "description" not in body and any(inner):  # `Annotated[..., Meta(description)] | None`
                body["description"] = next(text for text in inner if text)
            if key in descriptions and body.get("description") != descriptions[key]:
                unit = body.get("description")  # a shared type's Meta: "seconds", "name of an environment variable"
                body["description"] = descriptions[key] + (f" ({unit})" if unit and len(unit) < 40 else "")
            if prop == "kind" and "enum" in body and "description" not in body:  # a guard's tag
                body["description"] = "The kind of guard."
            if key in _EXAMPLES:
                body["examples"] = _EXAMPLES[key]
    root = out["$defs"]["PolicySpec"]
    required = root.pop("required", [])
    if fragment:
        out["title"] = "LLM gateway policy, version 1 (an included file)"
    else:  # a policy that includes files may have its providers and models in them
        root["required"] = ["version"]
        root["if"] = {"not": {"required": ["include"]}}
        root["then"] = {"required": [name for name in required if name != "version"]}
    return out


def reference_markdown() -> str:
    """Every section of the policy, as markdown tables, walking from the top-level section."""
    defs: dict[str, Any] = policy_schema()["$defs"]
    paths: dict[str, list[str]] = {}  # struct -> every path it is found at, breadth first
    queue = [("PolicySpec", "(top level)")]
    while queue:
        name, path = queue.pop(0)
        if name in paths:
            paths[name].append(path)
            continue
        paths[name] = [path]
        for prop, body in defs[name].get("properties", {}).items():
            for ref, suffix in _refs(body):
                queue.append((ref, (prop if path == "(top level)" else f"{path}.{prop}") + suffix))
    lines = ["<!-- generated by `gateway schema --markdown`: do not edit by hand -->", ""]
    for name, where in paths.items():
        lines.extend(_section(defs[name], where))
    return "\n".join(lines)


def _section(definition: dict[str, Any], where: list[str]) -> list[str]:
    tag = definition.get("properties", {}).get("kind", {}).get("enum", [])
    lines = [f"### `{where[0]}`" + (f" (kind: {tag[0]})" if len(tag) == 1 else ""), ""]
    if len(where) > 1:
        lines.extend(["Also at " + ", ".join(f"`{path}`" for path in where[1:]) + ".", ""])
    if definition.get("description"):
        lines.extend([" ".join(definition["description"].split()), ""])
    lines.extend(["| field | type | default | description |", "|---|---|---|---|"])
    required = set(definition.get("required", ())) | set(definition.get("then", {}).get("required", ()))
    for prop, body in definition.get("properties", {}).items():
        default = "required" if prop in required else _default(body)
        description = body.get("description", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{prop}` | {_type(body)} | {default} | {description} |")
    lines.append("")
    return lines


def _refs(body: Any) -> list[tuple[str, str]]:
    """The structs a property holds, each with the path suffix that reaches it (`[]`, `.<name>`)."""
    if not isinstance(body, dict):
        return []
    if isinstance(body.get("$ref"), str):
        return [(body["$ref"].rsplit("/", 1)[-1], "")]
    found: list[tuple[str, str]] = []
    if body.get("type") == "array":
        found += [(ref, "[]" + suffix) for ref, suffix in _refs(body.get("items"))]
    if body.get("type") == "object":
        found += [(ref, ".<name>" + suffix) for ref, suffix in _refs(body.get("additionalProperties"))]
    for option in (*body.get("anyOf", ()), *body.get("oneOf", ())):
        found += _refs(option)
    return found


def _type(body: dict[str, Any]) -> str:
    if "$ref" in body:
        return f"`{body['$ref'].rsplit('/', 1)[-1].removesuffix('Spec').lower()}`"
    if "enum" in body:
        return " \\| ".join(f"`{v}`" for v in body["enum"])
    if "anyOf" in body:
        return " or ".join(_type(option) for option in body["anyOf"])
    kind = body.get("type")
    if kind == "array":
        return f"list of {_type(body.get('items', {}))}"
    if kind == "object":
        values = body.get("additionalProperties")
        return f"map of {_type(values)}" if isinstance(values, dict) and values else "map"
    if "oneOf" in body:
        return " or ".join(_type(option) for option in body["oneOf"])
    return str(kind) if kind else "any"


def _default(body: dict[str, Any]) -> str:
    if "default" not in body:
        return ""
    if "$ref" in body and isinstance(body["default"], dict):
        return "see below"
    return f"`{json.dumps(body['default'])}`"


_START, _END = "<!-- reference:start -->\n", "<!-- reference:end -->"


def write_docs(folder: Path) -> None:
    """Refresh the generated parts of the docs: the reference in policies.md and the two schema files."""
    doc = folder / "policies.md"
    text = doc.read_text(encoding="utf-8")
    head, tail = text[:text.index(_START) + len(_START)], text[text.index(_END):]
    doc.write_text(head + reference_markdown() + tail, encoding="utf-8")
    for name, fragment in (("policy.schema.json", False), ("policy-fragment.schema.json", True)):
        (folder / name).write_text(json.dumps(policy_schema(fragment=fragment), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":  # python -m gateway.policy.reference docs
    import sys

    write_docs(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
