"""A policy file's YAML as nodes: its dialect, its limits, and the errors of its construction, located.

Why a layer of its own: these are the rules that hold before any field is checked (`loader`), for every file the
policy is made of (root, includes, prices). The dialect is YAML 1.2's booleans and no implicit timestamps, where
PyYAML speaks 1.1; the limits refuse a document whose aliases would take the process's memory, or whose nesting its
stack, before it is expanded; and a value YAML cannot make (`!!int eighty`, a list as a key) is refused at its line
and field, where PyYAML gives a mark only. It knows no file: `loader` makes a `Refused` an issue of the file it read.
"""

from __future__ import annotations

import re
import typing
from typing import Any

import yaml

__all__ = ["MAX_DEPTH", "MAX_NODES", "Refused", "YamlLoader", "check_shape", "construct", "key_name", "refusal"]

MAX_NODES = 1_000_000  # values a policy file may expand to, its aliases (`*name`) expanded: far above any real one
MAX_DEPTH = 100  # levels of nesting, aliases expanded: a real policy has about 10; the checks recurse once a level
_CORE_BOOL = ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"))  # YAML 1.2's booleans
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_NULL_TAG = "tag:yaml.org,2002:null"


class Refused(Exception):
    """A document refused before any check: the line (and field path) to report, and why."""

    def __init__(self, line: int, problem: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(problem)
        self.line = line
        self.problem = problem
        self.path = path


def refusal(line: int, problem: str) -> Refused:
    return Refused(line, f"{problem}; refused")


class YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader, on libyaml where installed (same nodes and marks, parsed in C), with YAML 1.2's booleans:
    only true and false. YAML 1.1's on/off/yes/no turned the documented `mode: on` into `true`, an unknown mode.
    Nor YAML 1.1's timestamps: a price's `date: 2024-06-01` is the string its field takes, not a `date` (refused as
    one), and `2025-02-29` is a string the checks refuse, not a crash; an explicit `!!timestamp` still makes one."""

    yaml_implicit_resolvers: typing.ClassVar[dict[Any, list[Any]]] = {
        first: [resolver for resolver in resolvers if resolver[0] not in (_CORE_BOOL[0], _TIMESTAMP_TAG)]
        + [_CORE_BOOL] * (first in "tTfF")
        for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
    }

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's, its constructors' own errors made YAML ones at the value: `!!int eighty` raises ValueError,
        `!!bool maybe` KeyError, `!!timestamp soon` AttributeError."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as exc:
            tag = node.tag.removeprefix("tag:yaml.org,2002:")
            shown = f"!!{tag}" if tag != node.tag else tag
            raise _Unreadable(f"`{str(node.value)[:100]}` is not a valid `{shown}` value", node.start_mark) from exc


class _Unreadable(yaml.constructor.ConstructorError):
    """A value PyYAML's constructor for its tag refuses (`YamlLoader.construct_object`)."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(None, None, problem, mark)


def construct(loader: YamlLoader, node: yaml.Node) -> Any:
    """The document as plain data; a value YAML cannot make (`!!int eighty`, a list as a key) is refused with
    its line and field."""
    try:
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or exc.context_mark
        if mark is None:
            raise
        problem = exc.problem if isinstance(exc, _Unreadable) else f"YAML error: {exc.problem}"
        raise Refused(mark.line + 1, str(problem), _path_at(node, mark.index, ()) or ()) from exc


def check_shape(root: yaml.Node, text: str) -> None:
    """Refuse aliases expanding the document past `MAX_NODES` values (a few lines of "billion laughs" would take the
    memory of the process), nesting past `MAX_DEPTH` (the checks recurse), an alias inside its own anchor (`a: &x
    [*x]`). Linear in the text: each node is counted once (an alias is the node it names)."""
    sizes: dict[int, int] = {}  # node -> values, its aliases expanded; 0 while it is being counted

    def size(node: yaml.Node, depth: int) -> int:
        found = sizes.get(id(node))
        if found == 0:  # met again inside itself
            line, name = _recursive_alias(text)
            raise refusal(line, f"a recursive YAML alias: `*{name}` is inside the `&{name}` it names")
        if found is None:
            if depth > MAX_DEPTH:
                raise refusal(node.start_mark.line + 1, f"nested more than {MAX_DEPTH} levels deep")
            sizes[id(node)] = 0
            found = sizes[id(node)] = min(1 + sum(size(child, depth + 1) for child in _children(node)), MAX_NODES + 1)
        return found

    if size(root, 0) > MAX_NODES:
        raise refusal(root.start_mark.line + 1, f"the document expands to more than {MAX_NODES:,} values "
                                                "(through its YAML aliases)")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _recursive_alias(text: str) -> tuple[int, str]:
    """The line and name of the first alias inside its anchor, read again: a node keeps no mark of its aliases."""
    anchors: list[str | None] = []  # those of the mappings and lists around the event
    for event in yaml.parse(text, Loader=YamlLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            anchors.append(event.anchor)
        elif isinstance(event, yaml.CollectionEndEvent):
            anchors.pop()
        elif isinstance(event, yaml.AliasEvent) and event.anchor in anchors and event.start_mark:
            return event.start_mark.line + 1, str(event.anchor)
    return 1, "?"


def key_name(node: yaml.ScalarNode) -> str:
    """A key as the checks name it in a path: `null:` and `~:` are the key None, shown `null` (`loader._show`), and
    so is `True:`, shown `true`; any other key as written."""
    if node.tag == _NULL_TAG:
        return "null"
    return str(node.value).lower() if node.tag == _CORE_BOOL[0] else str(node.value)


def _path_at(node: yaml.Node, index: int, path: tuple[str | int, ...],
             seen: set[int] | None = None) -> tuple[str | int, ...] | None:
    """The path of the value at `index` in the text (a key there: its mapping's), for an error PyYAML's constructor
    reports by its mark only. Searched once the document is refused: nothing is kept for it while it loads."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: the anchor came first
        return None
    seen.add(id(node))
    if node.start_mark.index == index:
        return path
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if _path_at(key_node, index, path, seen) is not None:
                return path
            merged = not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<"
            found = _path_at(value_node, index, path if merged else path + (key_name(key_node),), seen)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for number, item in enumerate(node.value):
            found = _path_at(item, index, path + (number,), seen)
            if found is not None:
                return found
    return None
