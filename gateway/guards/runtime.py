"""The guards of one policy: built once per runtime, resolved per (tenant, alias), run with a
timeout and a failure policy.

Resolution merges the scopes by guard name, the most specific winning (tenant,
then alias, then global), and is cached per (tenant, alias): both come from the
policy, so the cache is bounded. A request is checked by the guards of the alias
that may serve it (`served`): its own and those of every alias its
`context_fallback` chain leads to, which the router may switch to after the
guards ran. Every guard of a request sees the same text;
an error, a timeout or a full pool queue is a `GuardFailure`, which blocks the
text under `fail: closed` (the default) and is skipped under `fail: open`; both
are counted (in the request guard series; a runtime built `counted=False`, the payload log's, counts
nothing there: its owner counts what it needs in its own series).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TypeVar

from msgspec.structs import replace

from ..policy.compiled import ModelRoute
from ..policy.guard_schema import (
    DenyListGuardSpec,
    GuardSpec,
    GuardsSpec,
    InjectionGuardSpec,
    LimitsGuardSpec,
    PiiGuardSpec,
    SecretsGuardSpec,
)
from ..telemetry.metrics import Metrics
from .base import Finding, Guard, Where
from .denylist import DenyListGuard
from .injection import InjectionGuard
from .json_view import json_view, whole_escapes
from .limits import LimitsGuard
from .pii import Engine, PiiGuard, analyzer
from .pool import GuardPool, QueueFull
from .secrets import SecretsGuard
from .session import GuardSession
from .verdict import Verdict, decide

__all__ = ["GuardRuntime", "GuardSet"]

log = logging.getLogger("gateway.guards")
G = TypeVar("G")


@dataclass(frozen=True, slots=True)
class GuardSet:
    """The guards that apply to one (tenant, alias), by place. `pseudonymizing`: whether an enforced input guard
    may pseudonymize (numbered per request: a conversation kept at the upstream cannot be continued), set once."""

    input: tuple[Guard, ...]
    output: tuple[Guard, ...]
    limits: tuple[LimitsGuard, ...]
    pseudonymizing: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pseudonymizing", any(_pseudonymizes(guard) for guard in self.input))

    def __bool__(self) -> bool:
        return bool(self.input or self.output or self.limits)


class GuardRuntime:
    def __init__(self, spec: GuardsSpec, metrics: Metrics, count_tokens: Callable[[str], int], *,
                 counted: bool = True) -> None:
        self.spec = spec
        self.metrics = metrics
        # Whether `detect` counts verdicts, durations and failures in the request guard series
        # (`gateway_guard_*`); the payload log's guards are not a request's, and it counts their failures itself.
        self.counted = counted
        self.pool = GuardPool(spec.pool)
        self._count_tokens = count_tokens
        self._built: dict[tuple[str, int], Guard] = {}  # one object per defined guard (scope, name)
        self._global = self._scope("global", spec.global_)
        self._models = {alias: self._scope(f"model:{alias}", g) for alias, g in spec.models.items()}
        self._tenants = {tenant: self._scope(f"tenant:{tenant}", g) for tenant, g in spec.tenants.items()}
        self._sets: dict[tuple[str, str], GuardSet] = {}
        self._served: dict[tuple[str, str], GuardSet] = {}

    def _scope(self, scope: str, guards: dict[str, GuardSpec]) -> dict[str, Guard]:
        return {name: self._build(name, spec) for name, spec in guards.items()}

    def _build(self, name: str, spec: GuardSpec) -> Guard:
        if isinstance(spec, PiiGuardSpec):
            return PiiGuard(name, spec, self.pool)
        if isinstance(spec, SecretsGuardSpec):
            return SecretsGuard(name, spec, self.pool)
        if isinstance(spec, InjectionGuardSpec):
            return InjectionGuard(name, spec, self.pool)
        if isinstance(spec, DenyListGuardSpec):
            return DenyListGuard(name, spec, self.pool)
        assert isinstance(spec, LimitsGuardSpec)
        return LimitsGuard(name, spec, self._count_tokens)

    def _all(self) -> list[Guard]:
        return [*self._global.values(), *(g for s in self._models.values() for g in s.values()),
                *(g for s in self._tenants.values() for g in s.values())]

    async def start(self) -> None:
        """Build every analyzer now (off the loop), and start the pool: every text guard hands it the texts
        longer than `INLINE_CHARS` (and the ner engine and the injection model all of theirs)."""
        active = [g for g in self._all() if g.mode != "off"]
        pii = [g for g in active if isinstance(g, PiiGuard)]
        models = [g for g in active if isinstance(g, InjectionGuard) and (g.model_dir or g.classifier)]
        builds: list[Callable[[], None]] = [*(g.build for g in pii), *(g.build for g in models)]
        await asyncio.gather(*(asyncio.to_thread(build) for build in builds))
        # A process pool's workers build their own analyzers: every pii engine's, since any may be given a long text.
        engines = tuple(dict.fromkeys(g.engine for g in pii))
        model_dirs = tuple(sorted({g.model_dir for g in models if g.model_dir}))
        classifiers = tuple(sorted({g.classifier for g in models if g.classifier}))
        if any(not isinstance(g, LimitsGuard) for g in active):
            self.pool.start(_warm, engines, model_dirs, classifiers)

    async def aclose(self) -> None:
        await self.pool.aclose()

    def resolve(self, tenant: str, alias: str) -> GuardSet:
        key = (tenant, alias)
        found = self._sets.get(key)
        if found is None:
            merged = {**self._global, **self._models.get(alias, {}), **self._tenants.get(tenant, {})}
            active = [g for g in merged.values() if g.mode != "off"]
            limits = tuple(g for g in active if isinstance(g, LimitsGuard))
            text = [g for g in active if not isinstance(g, LimitsGuard)]
            found = self._sets[key] = GuardSet(
                tuple(g for g in text if "input" in g.places), tuple(g for g in text if "output" in g.places), limits,
            )
        return found

    def served(self, tenant: str, alias: str, models: Mapping[str, ModelRoute]) -> GuardSet:
        """The guards of a request served by `alias`, cached per (tenant, alias): its own, and those of each alias
        its `context_fallback` chain leads to. The router takes that fallback after an upstream's "context length
        exceeded", long after the guards ran, so the text it resends must already have passed the guards of the
        alias that receives it; a chain whose aliases share their guards (the common case) is the alias's own set.
        `models` is the policy this runtime was built for (one `GuardRuntime` per policy)."""
        key = (tenant, alias)
        found = self._served.get(key)
        if found is None:
            chain = [alias]
            route = models.get(alias)
            while route is not None and route.context_fallback is not None and route.context_fallback not in chain:
                chain.append(route.context_fallback)  # (a loop is refused at load; `not in chain` is a backstop)
                route = models.get(route.context_fallback)
            found = self._served[key] = _union([self.resolve(tenant, name) for name in chain])
        return found

    async def check(self, guards: Sequence[Guard], text: str, where: Where, session: GuardSession,
                    seams: Sequence[int] = ()) -> Verdict:
        """Run `guards` on `text` together; resolve and apply their enforced findings once. `seams`: see `detect`."""
        enforced, shadow = await self.detect(guards, text, where, seams)
        session.note_findings(enforced, "enforce", where.place)
        session.note_findings(shadow, "shadow", where.place)
        return decide(text, enforced, shadow, session.pseudonyms)

    async def detect(self, guards: Sequence[Guard], text: str, where: Where, seams: Sequence[int] = (),
                     ) -> tuple[list[Finding], list[Finding]]:
        """Every guard's findings on `text`, split into enforced and shadow ones (counted per verdict). A tool call's
        arguments are read with their JSON escapes as the characters they stand for (`json_view`). `seams`: where a
        message's text parts joined had a part without text between them (`joined.Joined.seams`): read both ways
        (`_detect_apart`)."""
        if seams:
            return await self._detect_apart(guards, text, where, seams)
        escapes: list[tuple[int, int]] = []
        if where.part == "tool_arguments" and "\\" in text:
            text, escapes = json_view(text)
        # One after the other: all but the ner engine, the injection model and long texts run on the loop
        # anyway, and tasks for a gather would cost more than they overlap.
        results = [await self._detect(g, text, where) for g in guards]
        if escapes:
            results = [whole_escapes(found, escapes) for found in results]
        enforced: list[Finding] = []
        shadow: list[Finding] = []
        for guard, found in zip(guards, results, strict=True):
            (enforced if guard.mode == "enforce" else shadow).extend(found)
            if self.counted:
                decision = "block" if any(f.action == "block" for f in found) else ("redact" if found else "allow")
                self.metrics.guard_verdicts_of(guard.name, decision, guard.mode, where.place).inc()
        return enforced, shadow

    async def _detect_apart(self, guards: Sequence[Guard], text: str, where: Where, seams: Sequence[int],
                            ) -> tuple[list[Finding], list[Finding]]:
        """A message's text parts with an image (an audio clip, a file) between some (`seams`), read both ways: whole,
        for a value that runs across a seam (a key cut in two around an image), and each stretch between seams on its
        own, for a value that ends at one (`jane.doe@gmail.com` before an image and `or` after it: whole,
        `gmail.comor` is no address; the model reads the image between). Of the whole reading only the findings that
        cross a seam are kept (the rest are the stretches' to find), and a stretch's finding that one of them covers in
        part, a guard's own, is dropped (`sk-proj-...` before an image, read on into the next part's word: one key, the
        longer span), so no finding is counted twice; a guard's failure once. Only a message with a part without text
        between two text parts is read twice."""
        enforced, shadow = await self.detect(guards, text, where)
        enforced, shadow = _across(enforced, seams), _across(shadow, seams)
        bounds = [0, *seams, len(text)]
        for start, end in pairwise(bounds):
            if start < end:
                apart, apart_shadow = await self.detect(guards, text[start:end], where)
                enforced += _uncovered(_moved(apart, start), enforced)
                shadow += _uncovered(_moved(apart_shadow, start), shadow)
        return _failed_once(enforced), _failed_once(shadow)

    async def _detect(self, guard: Guard, text: str, where: Where) -> list[Finding]:
        started = time.perf_counter()
        reason: str
        try:
            # A check on the loop (a text of at most `INLINE_CHARS` characters) never waits, so a timeout could not
            # interrupt it (asyncio's fires at an await only): it runs without one (which cost about 3% of the
            # check). What goes to the pool (`detect`) runs under `timeout_s`, and stops at its deadline there.
            found = guard.detect_now(text, where)
            if found is not None:
                return found
            async with asyncio.timeout(guard.timeout_s):
                return await guard.detect(text, where)
        except TimeoutError:
            reason = "timeout"
        except QueueFull:
            reason = "queue_full"
        except Exception as exc:  # noqa: BLE001 -- any guard bug is a guard failure, decided by `fail:`
            log.error("guard %s failed: %s", guard.name, type(exc).__name__)  # never the text
            reason = "error"
        finally:
            if self.counted:
                self.metrics.guard_duration_of(guard.name, where.place).observe(time.perf_counter() - started)
        if self.counted:
            self.metrics.guard_failures.labels(guard.name, reason, guard.fail).inc()
        if guard.fail == "open":
            return []
        return [Finding(guard.name, "GUARD_FAILURE", 0, 0, 1.0, f"failure.{reason}", "block")]


def _across(findings: list[Finding], seams: Sequence[int]) -> list[Finding]:
    """The findings that run across a seam (and guard failures: `_failed_once` keeps one a guard)."""
    return [f for f in findings if f.type == _FAILURE or any(f.start < seam < f.end for seam in seams)]


def _moved(findings: list[Finding], offset: int) -> list[Finding]:
    """Findings of a stretch of a text, as spans of the whole (a guard failure's stays 0, 0)."""
    return [f if f.type == _FAILURE else replace(f, start=f.start + offset, end=f.end + offset) for f in findings]


def _uncovered(findings: list[Finding], across: list[Finding]) -> list[Finding]:
    """`findings` (a stretch's) but those that a finding of the same guard in `across` overlaps."""
    return [f for f in findings if f.type == _FAILURE or not any(
        c.guard == f.guard and c.type != _FAILURE and c.start < f.end and f.start < c.end for c in across)]


def _failed_once(findings: list[Finding]) -> list[Finding]:
    """`findings` with one guard failure a guard (each reading that failed made one)."""
    failed: set[str] = set()
    out = []
    for f in findings:
        if f.type == _FAILURE:
            if f.guard in failed:
                continue
            failed.add(f.guard)
        out.append(f)
    return out


_FAILURE = "GUARD_FAILURE"


def _pseudonymizes(guard: Guard) -> bool:
    """Whether an enforced `guard` may pseudonymize: its action, or (a pii guard's) one of its entities'."""
    if guard.mode != "enforce":
        return False
    actions = getattr(guard, "actions", None)  # (a pii guard's, per entity: the guard's action where unset)
    if isinstance(actions, dict):
        return "pseudonymize" in actions.values()
    return getattr(guard, "action", None) == "pseudonymize"


def _union(sets: list[GuardSet]) -> GuardSet:
    """Every guard of `sets` once (the same object may be in several: a global or tenant guard), in order."""
    first = sets[0]
    if all(s == first for s in sets[1:]):
        return first
    return GuardSet(_once(s.input for s in sets), _once(s.output for s in sets), _once(s.limits for s in sets))


def _once(groups: Iterable[tuple[G, ...]]) -> tuple[G, ...]:
    return tuple({id(guard): guard for group in groups for guard in group}.values())


def _warm(engines: tuple[Engine, ...], model_dirs: tuple[str, ...] = (), classifiers: tuple[str, ...] = ()) -> None:
    """In a process-pool worker: build the analyzers, load the injection models and make the classifiers
    before the first request needs them."""
    for engine in engines:
        analyzer(engine)
    if model_dirs:
        from .injection_model import warm

        warm(model_dirs)
    if classifiers:
        from .classifiers import warm as make_classifiers

        make_classifiers(classifiers)
