"""Answers checked against a client's JSON schema (`schema_violation`, `malformed_tool_call`), within a bound.

The schema and the answer are the client's and the check runs on the event loop, so whatever they are, one
answer's checks hold it for about `BUDGET_S` at most. Past that, and where no bound can be kept, the check
cannot tell, which counts nothing against the target (as a broken schema does). Not checked: a schema over
`MAX_SCHEMA_BYTES` of JSON, an answer (or tool call arguments) over `MAX_ANSWER_CHARS`, a schema with a
nested `$schema` (it would switch to jsonschema's own, unbounded, validator class), `unevaluatedProperties` or
`unevaluatedItems` (evaluated by walking the schema, with unbounded regexes), a draft older than 4, or a
pattern longer than `_MAX_PATTERN_CHARS` or whose counted repeats make `regex` build more than
`_MAX_PATTERN_SIZE` nodes (compiling cannot be interrupted). Bounded: every subschema the validator enters
checks the clock first (jsonschema's classes rebuilt by `validators.create` around a timed
`applicable_validators`); `pattern`, `patternProperties` and `additionalProperties` match with `regex`, the
budget left as the timeout; `uniqueItems` compares hashable copies (linear; jsonschema's own is quadratic for
objects); references resolve within the schema only (nothing fetched, no meta-schema). jsonschema's meta-schema
check takes about 5 ms per KB of schema: `_well_formed` walks the schema once instead (each keyword's value of
the JSON type it must have, each pattern compiling). A schema's verdict is cached by a hash of its JSON, for
`_MAX_SCHEMAS` schemas (a check that ran out of time is not cached). On the event loop's thread only.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

import msgspec
import regex  # type: ignore[import-untyped]  # no stubs

__all__ = ["BUDGET_S", "MAX_ANSWER_CHARS", "MAX_SCHEMA_BYTES", "SchemaChecks", "load"]

BUDGET_S = 0.005  # one answer's schema checks, all of them
MAX_SCHEMA_BYTES = 32 * 1024  # a schema's JSON; a larger one is not checked
MAX_ANSWER_CHARS = 8 * 1024  # an answer's text or a tool call's arguments; larger is not checked (see `_budgeted`)
_MAX_SCHEMAS = 128  # schemas whose verdict is cached (each at most MAX_SCHEMA_BYTES of JSON)
_MAX_PATTERN_CHARS = 512
_MAX_PATTERN_SIZE = 4096  # `_pattern_size`: compiling costs about 0.3 µs per node, so at most about 1 ms
_NOT_CHECKED = None

_encode = msgspec.json.Encoder().encode
_COUNT = re.compile(r"\{(\d*)(?:,\d*)?\}")  # a counted repeat's `{m}`, `{m,}`, `{m,n}`


class Undecided(Exception):
    """The check cannot tell: out of time, or a schema jsonschema cannot apply."""


class _Budget:
    __slots__ = ("ends",)

    def __init__(self) -> None:
        self.ends = 0.0


_budget = _Budget()  # the current answer's deadline (`SchemaChecks.violates` sets it: one check at a time)


def _tick() -> None:
    if perf_counter() > _budget.ends:
        raise Undecided


class SchemaChecks:
    """One answer's schema checks: one time budget, each schema looked up once."""

    __slots__ = ("ends", "found")

    def __init__(self) -> None:
        load()  # (imported already, with the quality signals on: the first check's budget is not spent on that)
        self.ends = perf_counter() + BUDGET_S
        self.found: dict[int, Any] = {}  # id(schema) -> its validator or _NOT_CHECKED (the schemas outlive this)

    def violates(self, schema: dict[str, Any], value: Any, chars: int) -> bool:
        """Whether `value` (parsed from `chars` characters of text) surely does not fit `schema`: False when it
        fits, and when the check cannot tell (out of time, a schema not checked, a broken one)."""
        if chars > MAX_ANSWER_CHARS or perf_counter() > self.ends:
            return False
        _budget.ends = self.ends
        try:
            validator = self.found.get(id(schema), False)
            if validator is False:
                validator = self.found[id(schema)] = _validator(schema)
            return validator is not _NOT_CHECKED and not validator.is_valid(value)
        except Exception:  # noqa: BLE001 -- out of time, or a schema jsonschema cannot apply (an unknown type, a
            return False  # reference that does not resolve, a recursion too deep): cannot tell


_VALIDATORS: OrderedDict[bytes, Any] = OrderedDict()  # hash of a schema's JSON -> validator or _NOT_CHECKED (LRU)


def load() -> None:
    """Imports jsonschema now (the quality signals on), not on the event loop at the first check (70 ms)."""
    from jsonschema import Draft202012Validator

    _budgeted(Draft202012Validator)  # (and builds the common draft's class: cached)


def _validator(schema: dict[str, Any]) -> Any:
    """`schema`'s validator, or _NOT_CHECKED; cached (the same schemas come back request after request)."""
    encoded = b"" if _larger_than(schema, MAX_SCHEMA_BYTES) else _encode(schema)  # (megabytes: not even encoded)
    if not encoded or len(encoded) > MAX_SCHEMA_BYTES:
        return _NOT_CHECKED
    key = hashlib.blake2b(encoded, digest_size=20).digest()
    found = _VALIDATORS.get(key, False)
    if found is not False:
        _VALIDATORS.move_to_end(key)
        return found
    found = _compiled(schema, encoded)  # (out of time: raises, and nothing is cached)
    _VALIDATORS[key] = found
    if len(_VALIDATORS) > _MAX_SCHEMAS:
        _VALIDATORS.popitem(last=False)
    return found


def _larger_than(value: Any, limit: int) -> bool:
    """Whether `value`'s JSON is surely longer than `limit` bytes: counted roughly (a string's characters, one
    per other scalar), and only until past `limit`, so at most about `limit` / 2 nodes are visited."""
    size = 0
    pending = [value]
    while pending:
        node = pending.pop()
        if len(node) > limit:
            return True
        items = node.values() if type(node) is dict else node
        size += 2 + 2 * len(node) + (sum(map(len, node)) if type(node) is dict else 0)
        if size > limit:
            return True
        for item in items:
            kind = type(item)
            if kind is str:
                size += len(item)
            elif kind is dict or kind is list:
                pending.append(item)
        if size > limit:
            return True
    return False


def _compiled(schema: dict[str, Any], encoded: bytes) -> Any:
    from jsonschema import Draft4Validator, Draft202012Validator, validators  # (imported by `load`)

    if (encoded.count(b'"$schema":') > ("$schema" in schema) or b'"unevaluatedProperties":' in encoded
            or b'"unevaluatedItems":' in encoded):
        return _NOT_CHECKED
    dialect = schema.get("$schema")
    if dialect is not None and not isinstance(dialect, str):
        return _NOT_CHECKED
    base = validators.validator_for(schema, default=Draft202012Validator)
    budgeted = _budgeted(base)
    if budgeted is None or not _well_formed(schema, base is Draft4Validator):
        return _NOT_CHECKED
    cls, specification = budgeted
    import referencing

    contents = {k: v for k, v in schema.items() if k != "$schema"}  # a `$ref: "#"` stays with `cls`
    resolver = referencing.Registry().resolver_with_root(specification.create_resource(contents))
    return cls(contents, _resolver=resolver)  # (an empty registry: nothing is fetched, no meta-schema resolved)


@functools.cache  # one per jsonschema draft class
def _budgeted(base: Any) -> tuple[Any, Any] | None:
    """`base` (a jsonschema draft's validator class) rebuilt to check the clock on entering each subschema and
    to bound its pattern and uniqueness keywords, with its `referencing` specification; None for drafts 3 and
    older. Not registered: `validator_for` never returns it to anyone else."""
    from jsonschema import Draft3Validator, validators
    from referencing.jsonschema import specification_with

    if base is Draft3Validator:  # (`required` a boolean, `extends`, `disallow`: not what `_well_formed` knows)
        return None
    applicable = base._APPLICABLE_VALIDATORS

    def applicable_in_time(schema: Any) -> Any:
        # Every subschema the validator enters (`descend`, `evolve`) comes here: the budget's one way in. A
        # keyword's own loop over an answer's items into `true` (no subschema to enter) is bounded by
        # MAX_ANSWER_CHARS: about 1 ms.
        _tick()
        return applicable(schema)

    keywords = {**base.VALIDATORS, **_BOUNDED_KEYWORDS}
    cls = validators.create(meta_schema=base.META_SCHEMA, validators=keywords, type_checker=base.TYPE_CHECKER,
                            format_checker=base.FORMAT_CHECKER, id_of=base.ID_OF,
                            applicable_validators=applicable_in_time)
    return cls, specification_with(base.ID_OF(base.META_SCHEMA) or "urn:unknown-dialect")


@functools.lru_cache(maxsize=256)
def _pattern(pattern: str) -> Any:
    """`pattern` compiled with `regex`, or None: it does not compile, or compiling it could take long."""
    if len(pattern) > _MAX_PATTERN_CHARS or _pattern_size(pattern) > _MAX_PATTERN_SIZE:
        return None
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError):
        return None


def _pattern_size(pattern: str) -> int:
    """An upper estimate of the nodes `regex` builds for `pattern`: it copies what a counted repeat `x{m}` repeats
    m times (nested, the counts multiply: `(?:(?:a{100}){100}){100}` would take it half a second)."""
    sizes = [0]  # per open group: the size so far
    last = index = 0  # the size of the last atom (what a repeat repeats)
    while index < len(pattern):
        char = pattern[index]
        counted = _COUNT.match(pattern, index) if char == "{" else None
        if char == "(":
            sizes.append(0)
        elif char == ")" and len(sizes) > 1:
            last = max(sizes.pop(), 1)
            sizes[-1] += last
        elif counted is not None:
            times = max(int(counted[1] or 0), 1)
            sizes[-1] += last * (times - 1)
            last *= times
            index = counted.end() - 1
        else:  # one atom: a character, an escape, a class
            index = _class_end(pattern, index) - 1 if char == "[" else index + (char == "\\")
            last = 1
            sizes[-1] += 1
        index += 1
    return sum(sizes)


def _class_end(pattern: str, index: int) -> int:
    """Where the character class opening at `index` ends (past its `]`)."""
    index += 1
    if pattern.startswith("^", index):
        index += 1
    if pattern.startswith("]", index):
        index += 1
    while index < len(pattern) and pattern[index] != "]":
        index += 2 if pattern[index] == "\\" else 1
    return index + 1


def _search(pattern: str, text: str) -> bool:  # (`pattern` from a path `_well_formed` did not walk: any JSON)
    compiled = _pattern(pattern) if isinstance(pattern, str) else None
    left = _budget.ends - perf_counter()
    if compiled is None or left <= 0:
        raise Undecided
    try:
        return compiled.search(text, timeout=left) is not None
    except TimeoutError:
        raise Undecided from None


# The keywords that would match with `re` (no timeout) or compare items pairwise, bounded. Each yields one error
# when the answer does not fit (only whether there is one is read: `is_valid`).
def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield _error("does not match its pattern")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "object"):
        for pattern, subschema in patterns.items():
            for key, value in instance.items():
                if _search(pattern, key):
                    yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, allowed: Any, instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    properties, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    extras = [key for key in instance
              if key not in properties and not any(_search(pattern, key) for pattern in patterns)]
    if validator.is_type(allowed, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], allowed, path=extra)
    elif not allowed and extras:
        yield _error("has properties the schema does not allow")


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[Any]:
    if unique and validator.is_type(instance, "array"):
        seen: set[Any] = set()
        for item in instance:
            _tick()
            frozen = _hashable(item)
            if frozen in seen:
                yield _error("has non-unique items")
                return
            seen.add(frozen)


_BOOL, _LIST, _OBJECT = object(), object(), object()


def _hashable(value: Any) -> Any:
    """`value` as a hashable thing equal to another's exactly when JSON Schema calls them equal: 1 and 1.0
    equal, `true` and 1 not, objects whatever their keys' order."""
    if value is True or value is False:
        return (_BOOL, value)
    if isinstance(value, dict):
        return (_OBJECT, frozenset((key, _hashable(item)) for key, item in value.items()))
    if isinstance(value, list):
        return (_LIST, tuple(_hashable(item) for item in value))
    return value


def _error(message: str) -> Any:
    from jsonschema import ValidationError

    return ValidationError(message)


_BOUNDED_KEYWORDS: dict[str, Callable[..., Iterator[Any]]] = {
    "pattern": _pattern_keyword, "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties, "uniqueItems": _unique_items,
}


# `_well_formed`: what each keyword's value must be (the meta-schemas' rules that matter to a verdict). Each check
# takes the value and the list of subschemas still to walk (a subschema is put there, not checked in place).
_TYPES = frozenset({"array", "boolean", "integer", "null", "number", "object", "string"})
_Check = Callable[[Any, list[Any]], bool]


def _subschema(value: Any, pending: list[Any]) -> bool:
    if isinstance(value, dict | bool):
        pending.append(value)
        return True
    return False


def _subschemas(value: Any, pending: list[Any]) -> bool:
    return isinstance(value, list) and bool(value) and all(_subschema(item, pending) for item in value)


def _named_subschemas(value: Any, pending: list[Any]) -> bool:
    return isinstance(value, dict) and all(_subschema(item, pending) for item in value.values())


def _names(value: Any, pending: list[Any]) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _number(value: Any, pending: list[Any]) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flag(value: Any, pending: list[Any]) -> bool:
    return isinstance(value, bool)


def _type(value: Any, pending: list[Any]) -> bool:
    if isinstance(value, str):
        return value in _TYPES
    return isinstance(value, list) and all(isinstance(item, str) and item in _TYPES for item in value)


_KEYWORDS: dict[str, _Check] = {
    **dict.fromkeys(("additionalItems", "additionalProperties", "contains", "else", "if", "not", "propertyNames",
                     "then"), _subschema),
    **dict.fromkeys(("allOf", "anyOf", "oneOf", "prefixItems"), _subschemas),
    **dict.fromkeys(("$defs", "definitions", "dependentSchemas", "properties"), _named_subschemas),
    **dict.fromkeys(("maxContains", "maxItems", "maxLength", "maxProperties", "minContains", "minItems",
                     "minLength", "minProperties"),
                   lambda value, pending: _number(value, pending) and value >= 0 and value == int(value)),
    **dict.fromkeys(("exclusiveMaximum", "exclusiveMinimum", "maximum", "minimum"), _number),
    **dict.fromkeys(("$anchor", "$dynamicAnchor", "$dynamicRef", "$id", "$recursiveRef", "$ref", "$schema",
                     "format"), lambda value, pending: isinstance(value, str)),
    **dict.fromkeys(("deprecated", "readOnly", "uniqueItems", "writeOnly"), _flag),
    "items": lambda value, pending: _subschema(value, pending) or _subschemas(value, pending),
    "patternProperties": lambda value, pending: (_named_subschemas(value, pending)
                                                 and all(_pattern(key) is not None for key in value)),
    "dependencies": lambda value, pending: isinstance(value, dict) and all(
        _subschema(item, pending) or _names(item, pending) for item in value.values()),
    "dependentRequired": lambda value, pending: isinstance(value, dict) and all(
        _names(item, pending) for item in value.values()),
    "enum": lambda value, pending: isinstance(value, list),
    "multipleOf": lambda value, pending: _number(value, pending) and value > 0,
    "pattern": lambda value, pending: isinstance(value, str) and _pattern(value) is not None,
    "required": _names,
    "type": _type,
}
_DRAFT4_KEYWORDS = {**_KEYWORDS, "exclusiveMaximum": _flag, "exclusiveMinimum": _flag}  # draft 4: booleans


def _well_formed(schema: dict[str, Any], draft4: bool) -> bool:
    """Whether every keyword of `schema` and of its subschemas has a value of the kind it must have (and every
    pattern compiles). Linear in the schema (jsonschema's meta-schema check: about 5 ms per KB)."""
    keywords = _DRAFT4_KEYWORDS if draft4 else _KEYWORDS
    pending: list[Any] = [schema]
    while pending:
        _tick()
        node = pending.pop()
        if node is True or node is False:
            continue
        for key, value in node.items():
            check = keywords.get(key)
            if check is not None and not check(value, pending):
                return False
    return True
