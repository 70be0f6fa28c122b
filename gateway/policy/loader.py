"""Read a policy file: YAML to typed structs, with every error located.

Why not just `msgspec.yaml.decode`: it stops at the first error and knows no line
numbers. An operator fixing a file wants all of its errors at once, each with
file, line and field path. So the YAML is composed into nodes first (which carry
their marks; `yaml_nodes`: the dialect, the limits, the construction errors), then
checked field by field against the structs of `policy.schema`, collecting issues,
and only then decoded.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import yaml

from .schema import HeaderName, PolicySpec
from .yaml_nodes import MAX_DEPTH, Refused, YamlLoader, check_shape, construct, key_name, refusal

__all__ = ["PolicyError", "PolicyIssue", "check_doc", "parse_file"]

_PathPart = str | int
_Path = tuple[_PathPart, ...]


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class PolicyError(Exception):
    """A policy file that cannot be used; carries every issue found, and the files the refused version is made of.

    `watch`: the files it read or looked for, missing ones included, and the folders of its globs, the root file
    first (the includes' `PolicyTree.watch`, as far as the load got). A served gateway watches them beside the policy
    in force's until a version loads: the file whose absence or error refused it is often one only this version
    names (a new `include`), and its arrival or fix must reload. `missing`: those of them it found missing.
    """

    def __init__(self, issues: list[PolicyIssue], watch: Sequence[str] = (), missing: Collection[str] = ()) -> None:
        self.issues = sorted(issues, key=lambda issue: (issue.file, issue.line))
        self.watch = tuple(watch)
        self.missing = frozenset(missing)
        super().__init__("\n".join(str(issue) for issue in issues))

    def watching(self, watch: Sequence[str], missing: Collection[str] = ()) -> PolicyError:
        """This refusal, naming `watch` (the files of the document refused) before the files it named already, once
        each; returned, for `raise`."""
        self.watch = tuple(dict.fromkeys((*watch, *self.watch)))
        self.missing = self.missing.union(missing)
        return self


def format_path(path: _Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Located:
    """The YAML document as plain data, plus the line of every path in it."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines: dict[_Path, int] = {}
        self.files: dict[_Path, str] = {}  # paths merged in from an included file (`policy.includes`)
        # A list item merged in at another index (`keys[3]` was `keys[0]` in its file): its path there, for errors.
        self.origins: dict[_Path, _Path] = {}
        self.issues: list[PolicyIssue] = []
        loader = YamlLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                check_shape(node, text)
                # Indexed before it is constructed: constructing flattens merge keys (`<<: *base`) into the mapping's
                # own, where a key that overrides a merged one would read as a duplicate.
                self._index(node, ())
            self.data: Any = None if node is None else construct(loader, node)
        except Refused as exc:
            raise PolicyError([PolicyIssue(file, exc.line, format_path(exc.path), exc.problem)]) from exc.__cause__
        finally:
            loader.dispose()

    def _index(self, node: yaml.Node, path: _Path) -> None:
        if len(path) > MAX_DEPTH:  # through aliases (as written, `check_shape` refused it): the checks recurse
            raise refusal(node.start_mark.line + 1, f"nested more than {MAX_DEPTH} levels deep through its YAML "
                                                    "aliases (this anchor's)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":  # (a list as a key: refused)
                    continue
                key = key_name(key_node)
                if key in seen:
                    self.issue(path + (key,), f"duplicate key `{key}`", key_node.start_mark.line + 1)
                seen.add(key)
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                self._index(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._index(item, path + (index,))

    def line_of(self, path: _Path) -> int:
        return self.locate(path)[1]

    def locate(self, path: _Path) -> tuple[str, int]:
        """The file and line `path` (or its nearest written ancestor) comes from."""
        while path and path not in self.lines:
            path = path[:-1]
        return self.files.get(path, self.file), self.lines.get(path, 1)

    def where(self, path: _Path) -> str:
        """`file:line` of `path`, for warnings."""
        file, line = self.locate(path)
        return f"{file}:{line}"

    def issue(self, path: _Path, message: str, line: int | None = None) -> None:
        file, found = self.locate(path)
        self.issues.append(PolicyIssue(file, found if line is None else line, format_path(self.shown(path)), message))

    def shown(self, path: _Path) -> _Path:
        """`path` as its own file has it (an included file's list item was merged in at another index)."""
        if self.origins:
            for size in range(len(path), 0, -1):
                origin = self.origins.get(path[:size])
                if origin is not None:
                    return origin + path[size:]
        return path


def _struct_type(tp: Any) -> type[msgspec.Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _check(doc: _Located, value: Any, tp: Any, path: _Path) -> None:
    """Check `value` against type `tp`, recording every issue found under `path`."""
    struct = _struct_type(tp)
    if struct is not None:
        _check_struct(doc, value, struct, path)
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and _tagged(args):
        _check_tagged(doc, value, args, path)
        return
    if origin in (typing.Union, types.UnionType) and value is not None:  # `X | None` given a value: check as X
        present = [arg for arg in args if arg is not types.NoneType]
        if len(present) == 1:
            _check(doc, value, present[0], path)
            return
    if origin is dict:  # each key and each value on its own, so that an error names the entry at fault
        if isinstance(value, dict):
            for key, item in value.items():
                _convert(doc, key, args[0], path + (_show(key),), what="name")
                _check(doc, item, args[1], path + (_show(key),))
            return
        if _struct_type(args[1]) is not None:
            doc.issue(path, f"expected a mapping, got {_kind(value)}")
            return
    if origin is list:
        if isinstance(value, list):
            for index, item in enumerate(value):
                _check(doc, item, args[0], path + (index,))
            return
        if _struct_type(args[0]) is not None:
            doc.issue(path, f"expected a list, got {_kind(value)}")
            return
        allowed = _literal_values(args[0])
        if allowed and isinstance(value, (str, int, float, bool)):  # `retry_on: timeout`: name the choices
            message = "expected a list, got a single value" if value in allowed else None
            if message is None:
                _convert(doc, value, args[0], path)
            else:
                doc.issue(path, message)
            return
    _convert(doc, value, tp, path)


def _tagged(args: tuple[Any, ...]) -> bool:
    """A union of structs told apart by a tag field (`kind: pii`, ...)."""
    return bool(args) and all(
        _struct_type(arg) is not None and arg.__struct_config__.tag_field is not None for arg in args
    )


def _check_tagged(doc: _Located, value: Any, args: tuple[Any, ...], path: _Path) -> None:
    """Check a tagged union: pick the struct its tag names, and check against that one."""
    if not isinstance(value, dict):
        doc.issue(path, f"expected a mapping, got {_kind(value)}")
        return
    field = args[0].__struct_config__.tag_field
    by_tag = {arg.__struct_config__.tag: arg for arg in args}
    tag = value.get(field)
    if tag is None:
        doc.issue(path, f"missing required field `{field}` (one of: {', '.join(sorted(by_tag))})")
    elif not isinstance(tag, str) or tag not in by_tag:
        doc.issue(path + (field,), f"unknown value `{_show(tag)}` (allowed: {', '.join(sorted(by_tag))})")
    else:
        _check_struct(doc, value, by_tag[tag], path)


def _check_struct(doc: _Located, value: Any, struct: type[msgspec.Struct], path: _Path) -> None:
    if not isinstance(value, dict):
        doc.issue(path, f"expected a mapping, got {_kind(value)}")
        return
    fields = _fields(struct)
    tag_field = struct.__struct_config__.tag_field
    for key in value:
        if not isinstance(key, str) or (key not in fields and key != tag_field):  # (`null:` is None, no tag field)
            allowed = ", ".join(sorted(fields))
            doc.issue(path + (_show(key),), f"unknown field `{_show(key)}` (allowed: {allowed})")
    for name, field in fields.items():
        if name in value:
            _check(doc, value[name], field.type, path + (name,))
        elif field.required:
            doc.issue(path, f"missing required field `{name}`")


@functools.cache
def _fields(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    """Cached (read only): `msgspec.structs.fields` evaluates annotations on each call, 90% of a policy's check."""
    return {field.encode_name: field for field in msgspec.structs.fields(struct)}


def _convert(doc: _Located, value: Any, tp: Any, path: _Path, what: str = "value") -> None:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        doc.issue(path, _friendly(exc, value, tp, what))


_HEADER_NAME_CHARACTERS = "letters, digits and !#$%&'*+.^_`|~-"


def _friendly(exc: msgspec.ValidationError, value: Any, tp: Any, what: str) -> str:
    """msgspec's message, said in the policy's terms where it has better ones."""
    allowed = _literal_values(tp)
    if allowed:  # a closed set of values: name them
        choices = ", ".join(sorted(map(_show, allowed)))
        if isinstance(value, (str, int, float, bool)):
            quoted = isinstance(value, str) and not all(isinstance(v, str) for v in allowed)  # `'1'` is not `1`
            shown = repr(value) if quoted else _show(value)
            return f"unknown value `{shown}` (allowed: {choices})"
        return f"expected one of {choices}, got {_kind(value)}"
    if isinstance(value, str) and value.lower() in ("on", "off", "yes", "no") and bool in (tp, *typing.get_args(tp)):
        return f"expected true or false, got `{value}` (a string: write true or false)"
    if _is_header_name(tp):
        if isinstance(value, str):
            return f"invalid header name `{value}` (a header name is {_HEADER_NAME_CHARACTERS}; no spaces or colons)"
        return f"invalid header name `{_show(value)}`: expected a string, got {_kind(value)}"
    message, _, where = str(exc).partition(" - at `")
    suffix = where.rstrip("`")
    if suffix.startswith("$") and len(suffix) > 1:
        message = f"{message} (at {suffix[1:].lstrip('.')})"
    if what == "name":
        message = f"invalid name `{_show(value)}`: {message}"
    return message[0].lower() + message[1:]


def _literal_values(tp: Any) -> tuple[Any, ...]:
    """The allowed values when `tp` is a Literal (possibly Annotated, or in a union with None); else ()."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp)
    if origin is typing.Annotated:
        return _literal_values(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        groups = [(None,) if arg is types.NoneType else _literal_values(arg) for arg in typing.get_args(tp)]
        if all(groups):
            return tuple(value for group in groups for value in group)
    return ()


def _is_header_name(tp: Any) -> bool:
    try:
        return bool(tp == HeaderName)
    except TypeError:
        return False


def _show(value: Any) -> str:
    """A scalar as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", types.NoneType: "nothing"}.get(
        type(value), type(value).__name__
    )


def _check_references(doc: _Located, data: Any) -> None:
    """Cross-references, checked on the raw data so that they are reported with type errors."""
    if not isinstance(data, dict):
        return
    providers, models = data.get("providers"), data.get("models")
    providers = providers if isinstance(providers, dict) else {}
    if isinstance(models, dict) and not models:
        doc.issue(("models",), "at least one model alias is required")
    models = models if isinstance(models, dict) else {}
    for alias, model in models.items():
        target = model.get("provider") if isinstance(model, dict) else None
        if isinstance(target, str) and target not in providers:
            known = ", ".join(sorted(map(str, providers))) or "none"
            doc.issue(("models", str(alias), "provider"), f"unknown provider `{target}` (defined: {known})")
    keys = data.get("keys")
    for index, key in enumerate(keys if isinstance(keys, list) else []):
        aliases = key.get("models") if isinstance(key, dict) else None
        if isinstance(aliases, list):
            unknown = [a for a in aliases if isinstance(a, str) and a != "*" and a not in models]  # (others: types)
            if unknown:
                doc.issue(("keys", index, "models"), f"unknown model alias(es): {', '.join(unknown)}")


def parse_file(text: str, file: str, what: str = "policy file") -> _Located:
    """One file's YAML with the line of every path; raises `PolicyError` on a syntax error, a value YAML cannot make,
    or an empty file (`what` names it: a policy file, the prices file)."""
    try:
        doc = _Located(file, text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError([PolicyIssue(file, line, "", f"YAML syntax error: {exc.problem or exc}")]) from exc
    except yaml.YAMLError as exc:
        raise PolicyError([PolicyIssue(file, 1, "", f"YAML error: {exc}")]) from exc
    except RecursionError as exc:  # (PyYAML's own parser, without libyaml; libyaml stops at 1000 levels)
        raise PolicyError([PolicyIssue(file, 1, "", f"nested more than {MAX_DEPTH} levels deep; refused")]) from exc
    if doc.data is None:
        raise PolicyError([PolicyIssue(file, 1, "", f"the {what} is empty")])
    return doc


def check_doc(doc: _Located) -> PolicySpec:
    """Check a (possibly merged) document against the schema; raise `PolicyError` with every issue."""
    _check(doc, doc.data, PolicySpec, ())
    _check_references(doc, doc.data)
    if doc.issues:
        raise PolicyError(doc.issues)
    return msgspec.convert(doc.data, PolicySpec)
