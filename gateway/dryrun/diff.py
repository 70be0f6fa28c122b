"""`gateway diff OLD NEW`: what changes between two policies, section by section.

Compared on the merged raw structs (after includes), so moving a definition to another
file is no change; prices as they take effect (`prices_file`'s entries and the inline
`prices:`, which win), so a changed prices file is a change. Keys are compared by name and
never show their hash: a new hash for the same name is reported as "credential changed".
Every change is one `Change`, in a fixed section order: aliases, targets, rules, guards,
limits, budgets, prices, keys, providers, tenants, settings; settings are every other
section of the policy (server, state, auth, routing, dynamic_keys, accounting, telemetry,
cache, prices_file), so that a section added to the policy is never left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
from msgspec import Struct

from ..policy.compiled import Price
from ..policy.schema import PolicySpec

__all__ = ["Change", "diff_specs", "render_changes"]

Section = Literal["aliases", "targets", "rules", "guards", "limits", "budgets", "prices", "keys", "providers",
                  "tenants", "settings"]
_ORDER: tuple[Section, ...] = ("aliases", "targets", "rules", "guards", "limits", "budgets", "prices", "keys",
                               "providers", "tenants", "settings")
# The sections compared entry by entry above `settings` (and the file's own `version` and `include`); every other
# field of the policy is a section of `settings`.
_ENTRIES = frozenset({"version", "include", "keys", "tenants", "providers", "models", "rules", "prices", "guards"})
_SETTINGS = tuple(f.name for f in msgspec.structs.fields(PolicySpec) if f.name not in _ENTRIES)
_MAX_VALUE = 120
_SPLIT: dict[str, Section] = {"targets": "targets", "limits": "limits", "budget": "budgets"}


class Change(Struct, frozen=True, kw_only=True, omit_defaults=True):
    section: Section
    name: str
    change: Literal["added", "removed", "changed", "moved"]
    details: tuple[str, ...] = ()  # `field: old -> new`


def diff_specs(old: PolicySpec, new: PolicySpec, old_prices: Mapping[str, Price] | None = None,
               new_prices: Mapping[str, Price] | None = None, *, truncate: bool = True) -> list[Change]:
    """The changes from `old` to `new`; `old_prices` and `new_prices`: their prices as they take effect
    (`PriceTable.entries()`, a prices file's included), compared instead of the inline `prices:` alone.
    `truncate`: a long value is shortened (for reading; `--json` keeps every value whole)."""
    changes: list[Change] = []
    width = _MAX_VALUE if truncate else None
    _named(changes, "aliases", _by_name(old.models), _by_name(new.models), width,
           split=("targets", "limits", "budget"))
    _rules(changes, old, new, width)
    _named(changes, "guards", _guards(old), _guards(new), width)
    _named(changes, "prices", _prices(old, old_prices), _prices(new, new_prices), width)
    _named(changes, "keys", _keys(old), _keys(new), width, split=("limits", "budget"))
    _named(changes, "providers", _by_name(old.providers), _by_name(new.providers), width)
    _named(changes, "tenants", _by_name(old.tenants), _by_name(new.tenants), width, split=("limits", "budget"))
    for section in _SETTINGS:
        details = _fields(msgspec.to_builtins(getattr(old, section)), msgspec.to_builtins(getattr(new, section)),
                          width=width)
        if details:
            changes.append(Change(section="settings", name=section, change="changed", details=tuple(details)))
    return sorted(changes, key=lambda c: _ORDER.index(c.section))


def render_changes(changes: list[Change]) -> list[str]:
    if not changes:
        return ["no changes"]
    sign = {"added": "+", "removed": "-", "changed": "~", "moved": "~"}
    lines = []
    for c in changes:
        lines.append(f"{sign[c.change]} {c.section}: {c.name} {c.change}")
        lines.extend(f"    {detail}" for detail in c.details)
    return lines


def _by_name(section: dict[str, Any]) -> dict[str, Any]:
    return {name: msgspec.to_builtins(value) for name, value in section.items()}


def _prices(spec: PolicySpec, effective: Mapping[str, Price] | None) -> dict[str, Any]:
    if effective is None:
        return _by_name(spec.prices)
    return {name: dataclasses.asdict(price) for name, price in effective.items()}


def _keys(spec: PolicySpec) -> dict[str, Any]:
    found = {}
    for index, key in enumerate(spec.keys):
        data = msgspec.to_builtins(key)
        data["hash"] = "credential"  # compared below, never shown
        found[key.name or f"key-{index}"] = (data, key.hash)
    return found


def _guards(spec: PolicySpec) -> dict[str, Any]:
    g = spec.guards
    found: dict[str, Any] = {f"global.{name}": msgspec.to_builtins(s) for name, s in g.global_.items()}
    for scope, groups in (("models", g.models), ("tenants", g.tenants)):
        for owner, guards in groups.items():
            found.update({f"{scope}.{owner}.{name}": msgspec.to_builtins(s) for name, s in guards.items()})
    found["pool"] = msgspec.to_builtins(g.pool)
    found["stream"] = msgspec.to_builtins(g.stream)
    return found


def _named(changes: list[Change], section: Section, old: dict[str, Any], new: dict[str, Any], width: int | None,
           split: tuple[str, ...] = ()) -> None:
    """Added, removed and changed entries; the fields in `split` are reported in their own section."""
    for name in sorted(old.keys() - new.keys()):
        changes.append(Change(section=section, name=name, change="removed"))
    for name in sorted(new.keys() - old.keys()):
        changes.append(Change(section=section, name=name, change="added"))
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        credential: list[str] = []
        if section == "keys":
            (a, old_hash), (b, new_hash) = a, b
            credential = ["credential changed"] if old_hash != new_hash else []
        for field in split:
            part_a = a.pop(field, None) if isinstance(a, dict) else None
            part_b = b.pop(field, None) if isinstance(b, dict) else None
            if part_a != part_b:
                own = _SPLIT[field]
                details = _fields(part_a, part_b, field, width)
                if field == "targets" and _names(part_a) != _names(part_b):
                    details = [f"targets: {_names(part_a) or '(none)'} -> {_names(part_b) or '(none)'}"]
                changes.append(Change(section=own, name=name, change="changed",
                                      details=tuple(details)))
        details = credential + _fields(a, b, width=width)
        if details:
            changes.append(Change(section=section, name=name, change="changed", details=tuple(details)))


def _names(targets: Any) -> str:
    items = targets if isinstance(targets, list) else []
    return ", ".join(f"{t.get('provider')}/{t.get('model')}" for t in items if isinstance(t, dict))


def _rules(changes: list[Change], old: PolicySpec, new: PolicySpec, width: int | None) -> None:
    a = {rule.name: msgspec.to_builtins(rule) for rule in old.rules}
    b = {rule.name: msgspec.to_builtins(rule) for rule in new.rules}
    _named(changes, "rules", a, b, width)
    common = [name for name in a if name in b]
    after = [name for name in b if name in a]
    if common != after:
        changes.append(Change(section="rules", name="order", change="moved",
                              details=(f"{' > '.join(common)} -> {' > '.join(after)}",)))


def _fields(a: Any, b: Any, path: str = "", width: int | None = _MAX_VALUE) -> list[str]:
    """`path: old -> new` for every differing leaf. Lists are compared whole, but for a list of targets naming the
    same targets in the same order (an alias's, a rule's), compared target by target: `targets[1].weight: 3 -> 9`."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(a.keys() | b.keys(), key=str):
            out.extend(_fields(a.get(key), b.get(key), f"{path}.{key}" if path else str(key), width))
        return out
    if a == b:
        return []
    if _same_targets(path, a, b):
        return [line for index, (x, y) in enumerate(zip(a, b, strict=True))
                for line in _fields(x, y, f"{path}[{index}]", width)]
    old, new = _show(a, width), _show(b, width)
    if old == new:  # they differ past the width: shown whole, never as two identical shortened values
        old, new = _show(a, None), _show(b, None)
    return [f"{path or 'value'}: {old} -> {new}"]


def _same_targets(path: str, a: Any, b: Any) -> bool:
    """Two target lists (`targets`, at any depth) of the same targets in the same order."""
    return (path.rpartition(".")[2] == "targets" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
            and all(isinstance(t, dict) for t in (*a, *b)) and _names(a) == _names(b))


def _show(value: Any, width: int | None = _MAX_VALUE) -> str:
    if value is None:
        return "(unset)"
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text if width is None or len(text) <= width else text[:width - 3] + "..."
