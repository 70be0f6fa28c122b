"""The accounting parts of a policy: the prices file, and the cross-checks of limits and budgets.

Types already refuse a negative amount, an unknown period or an unknown field, with file, line and field
(`loader`). What types cannot say is checked here the same way: `window_s` only with (and always with) a
rolling period, a downgrade to an alias that exists and is not the alias itself, a tenant that no key names.
A prices file is a second YAML file, read and checked like the policy, its errors carrying its own name.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Literal

import msgspec

from .accounting_schema import BudgetSpec
from .compiled import ModelRoute
from .includes import MAX_POLICY_BYTES, beside, read_capped
from .loader import PolicyError, _check, _Located, parse_file
from .schema import PolicySpec, PriceSpec

__all__ = ["PricesFileSpec", "check_accounting", "has_limits", "load_prices_file", "uses_accounting"]


class PricesFileSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """`prices_file:`: the same entries as the policy's `prices:` (which override them), in a file of their own."""

    version: Literal[1]
    prices: dict[str, PriceSpec]


def load_prices_file(spec: PolicySpec, doc: _Located) -> dict[str, PriceSpec]:
    """The prices file's entries (empty when there is none or it has errors, which go to `doc.issues`)."""
    if spec.prices_file is None:
        return {}
    path = beside(doc, ("prices_file",), spec.prices_file)  # relative to the file naming it
    if "\0" in spec.prices_file:  # (`open` raises ValueError)
        doc.issue(("prices_file",), "a file name cannot hold a NUL character (`\\0`)")
        return {}
    try:
        text = read_capped(path, MAX_POLICY_BYTES)  # (bounded again: it may have grown since `read_tree`)
    except (OSError, UnicodeDecodeError) as exc:
        doc.issue(("prices_file",), f"cannot read the prices file `{path}`: {exc.__class__.__name__}")
        return {}
    if text is None:
        doc.issue(("prices_file",), f"the prices file `{path}` is over {MAX_POLICY_BYTES:,} bytes, the most a policy "
                                    "may be; refused before it is parsed")
        return {}
    try:
        prices_doc = parse_file(text, str(path), "prices file")
    except PolicyError as exc:  # its syntax, a value YAML cannot make, nothing in it: with its own name
        doc.issues.extend(exc.issues)
        return {}
    _check(prices_doc, prices_doc.data, PricesFileSpec, ())
    prices = {} if prices_doc.issues else dict(msgspec.convert(prices_doc.data, PricesFileSpec).prices)
    _check_dates(prices, prices_doc, ("prices",))
    if prices_doc.issues:
        doc.issues.extend(prices_doc.issues)
        return {}
    return prices


def uses_accounting(spec: PolicySpec) -> bool:
    """Whether any limit or budget is set (or the stage is asked for): else no accounting stage is built."""
    return spec.accounting.always or has_limits(spec)


def has_limits(spec: PolicySpec) -> bool:
    """Whether the policy itself sets any limit or budget (on a key, a tenant or an alias)."""
    return bool(
        any(k.limits or k.budget for k in spec.keys)
        or any(t.limits or t.budget for t in spec.tenants.values())
        or any(m.limits or m.budget for m in spec.models.values())
    )


def check_accounting(spec: PolicySpec, doc: _Located, models: Mapping[str, ModelRoute], warnings: list[str]) -> None:
    """Cross-checks of limits and budgets, and a warning for each target accounting cannot price when the
    accounting stage is built: by the policy's own limits, budgets or `accounting.always`, or for the limits
    and budgets of keys created at run time (`dynamic_keys`)."""
    _check_dates(spec.prices, doc, ("prices",))
    for alias, model in spec.models.items():
        for index, written in enumerate(model.targets):
            _check_dates({"price": written.price}, doc, ("models", alias, "targets", index))
    for number, rule in enumerate(spec.rules):
        for index, written in enumerate(rule.targets or ()):
            _check_dates({"price": written.price}, doc, ("rules", number, "targets", index))
    for index, key in enumerate(spec.keys):
        _check_budget(key.budget, ("keys", index, "budget"), doc, models)
    tenants = {key.tenant for key in spec.keys}
    for name, tenant in spec.tenants.items():
        if spec.keys and name not in tenants:
            warnings.append(f"{doc.where(('tenants', name))}: tenants.{name}: no key of the policy "
                            "has this tenant (keys created at run time may)")
        _check_budget(tenant.budget, ("tenants", name, "budget"), doc, models)
    for alias, model in spec.models.items():
        _check_budget(model.budget, ("models", alias, "budget"), doc, models, alias)
    if not uses_accounting(spec) and not spec.dynamic_keys.enabled:  # (keys made at run time may have budgets)
        return
    for alias, route in models.items():
        for target in route.targets:
            if target.price is None:
                warnings.append(
                    f"{doc.where(('models', alias))}: models.{alias}: no price for `{target.name}` "
                    "(add it to `prices` or the prices file): its requests count as costing 0 "
                    "(gateway_cost_unpriced_total)")


def _check_budget(
    budget: BudgetSpec | None, path: tuple[str | int, ...], doc: _Located, models: Mapping[str, ModelRoute],
    alias: str | None = None,
) -> None:
    if budget is None:
        return
    if budget.period == "rolling" and budget.window_s is None:
        doc.issue(path + ("period",), "`period: rolling` needs `window_s` (the window's length in seconds)")
    if budget.period != "rolling" and budget.window_s is not None:
        doc.issue(path + ("window_s",), f"`window_s` is only for `period: rolling`, not `{budget.period}`")
    downgrade = budget.downgrade
    if downgrade is not None:
        if downgrade.alias not in models:
            known = ", ".join(sorted(models)) or "none"
            doc.issue(path + ("downgrade", "alias"), f"unknown model alias `{downgrade.alias}` (defined: {known})")
        elif downgrade.alias == alias:
            doc.issue(path + ("downgrade", "alias"), "a budget cannot downgrade an alias to itself")


def _check_dates(prices: Mapping[str, PriceSpec | None], doc: _Located, path: tuple[str | int, ...]) -> None:
    """Each price's `date` a day of the calendar: its type only says YYYY-MM-DD, and `2025-02-29` is not one."""
    for name, price in prices.items():
        if price is not None and price.date is not None:
            try:
                datetime.date.fromisoformat(price.date)
            except ValueError:
                doc.issue(path + (name, "date"), f"`{price.date}` is not a day of the calendar (YYYY-MM-DD)")
