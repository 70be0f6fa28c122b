"""Statements of the docs that the code decides, checked against the code (each was found wrong once).

- docs/architecture.md: the layers, and every import of a module from a layer above its own (listed by name).
- docs/metrics.md: the time-per-output-token buckets below the GenAI conventions' range, and each gauge's
  multiprocess mode in the tables.
- docs/policies.md: the `blocked_by` values a test case may expect.
- docs/guards.md: `places` is the field (`on` is an unknown one), and what `x-gateway-guards` shows of a shadow
  guard (a real gateway's header).
"""

from __future__ import annotations

import ast
import re
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from prometheus_client import Gauge

from gateway.auth.keys import hash_key
from gateway.dryrun.cases import ExpectSpec
from gateway.policy import PolicyError, compile_text
from gateway.telemetry import metrics as metrics_module
from gateway.telemetry.metrics import Metrics
from tests.conftest import FULL_KEY, REPO, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

DOCS = REPO / "docs"
PACKAGE = REPO / "gateway"
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}


# -- docs/architecture.md -------------------------------------------------------------------------


def _layers(doc: str) -> list[list[str]]:
    """The modules of each layer, top to bottom, as the table lists them (`api/`: a folder)."""
    lines = doc[doc.index("| layer | modules |"):].splitlines()[2:]
    rows = lines[:next(index for index, line in enumerate(lines) if not line.startswith("|"))]
    return [re.findall(r"`([\w/]+(?:\.py|/))`", row.split("|")[2]) for row in rows]


def _layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The layer of a module path (relative to gateway/): the last row that names it or its folder."""
    found = None
    for index, names in enumerate(layers):
        if any(module == name or (name.endswith("/") and module.startswith(name)) for name in names):
            found = index
    return found


def _imported(path: Path, node: ast.ImportFrom) -> Iterator[str]:
    """The gateway modules an import names (a module, or the package whose names it imports)."""
    module = (node.module or "").split(".") if node.module else []
    if node.level:
        here = list(path.relative_to(PACKAGE).parts[:-1])
        parts = here[:len(here) - node.level + 1] + module
    elif module[:1] == ["gateway"]:
        parts = module[1:]
    else:
        return
    for candidate in [parts, *([*parts, alias.name] for alias in node.names)]:
        target = PACKAGE.joinpath(*candidate)
        if target.with_suffix(".py").is_file():
            yield str(target.with_suffix(".py").relative_to(PACKAGE))
        elif candidate is parts and (target / "__init__.py").is_file():
            yield str((target / "__init__.py").relative_to(PACKAGE))


def _type_hint_only(tree: ast.Module) -> set[int]:
    """The nodes inside `if TYPE_CHECKING:` blocks."""
    blocks = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    return {id(inner) for block in blocks for inner in ast.walk(block)}


def _upward_imports(layers: list[list[str]]) -> set[tuple[str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        module = str(path.relative_to(PACKAGE))
        own = _layer_of(module, layers)
        if own is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_hint_only(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in skipped:
                for target in _imported(path, node):
                    layer = _layer_of(target, layers)
                    if layer is not None and layer < own:
                        found.add((module, target))
    return found


def test_every_upward_import_is_one_the_architecture_page_lists() -> None:
    doc = (DOCS / "architecture.md").read_text(encoding="utf-8")
    layers = _layers(doc)
    assert len(layers) >= 10 and layers[0][0] == "cli.py", layers
    paragraph = doc[doc.index("Each layer imports only"):doc.index("| layer | modules |")]
    named = set(re.findall(r"`([^`]+)`", paragraph))
    upward = _upward_imports(layers)
    assert upward, "the check found no exception at all: it reads nothing"
    for importer, target in sorted(upward):
        shown = target.removesuffix("__init__.py") or target
        assert importer in named and shown in named, f"{importer} imports {target}, which the page does not list"
    count = re.search(r"with (\w+)\s+exceptions", paragraph)
    assert count is not None and _NUMBERS[count.group(1)] == len({importer for importer, _ in upward}), \
        (count and count.group(1), sorted(upward))


# -- docs/metrics.md --------------------------------------------------------------------------------

# The GenAI conventions' advised buckets for gen_ai.server.time_per_output_token.
OTEL_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def test_the_time_per_output_token_buckets_are_as_the_metrics_page_says() -> None:
    ours = metrics_module._TPOT_BUCKETS
    below = [bound for bound in ours if bound < 0.05]
    assert [bound for bound in ours if bound >= 0.05] == [bound for bound in OTEL_TPOT if bound >= 0.05]
    doc = " ".join((DOCS / "metrics.md").read_text(encoding="utf-8").split())
    listed = ", ".join(f"{bound:g}" for bound in below[:-1]) + f" and {below[-1]:g} s below 0.05 s"
    otel_below = [bound for bound in OTEL_TPOT if bound < 0.05]
    advised = f"the conventions advise {otel_below[0]:g} and {otel_below[1]:g} s"
    assert f"output token has {listed}, where {advised}" in doc


def test_each_gauge_shows_its_multiprocess_mode_in_the_metrics_tables() -> None:
    doc = (DOCS / "metrics.md").read_text(encoding="utf-8")
    gauges = [value for value in vars(Metrics()).values() if isinstance(value, Gauge)]
    assert len(gauges) >= 5
    for gauge in gauges:
        row = re.search(rf"^\| `{gauge._name}` \| G \(([^)]*)\)", doc, re.M)
        assert row is not None and row.group(1).split(", ")[-1] == gauge._multiprocess_mode, (gauge._name, row)
    assert re.search(r"^\| `gateway_policy_info` \| G \(per process\)", doc, re.M)


# -- docs/policies.md -------------------------------------------------------------------------------


def test_the_case_example_lists_every_blocked_by_value() -> None:
    doc = (DOCS / "policies.md").read_text(encoding="utf-8")
    line = next(line for line in doc.splitlines() if line.strip().startswith("blocked_by:"))
    listed = [word.strip() for word in line.split("#", 1)[1].split(",")]
    field = next(f for f in msgspec.structs.fields(ExpectSpec) if f.name == "blocked_by")
    literal = next(arg for arg in typing.get_args(field.type) if typing.get_origin(arg) is typing.Literal)
    assert listed == list(typing.get_args(literal))


# -- docs/guards.md ---------------------------------------------------------------------------------

BASE = textwrap.dedent("""\
    version: 1
    auth: none
    providers: {demo: {kind: demo}}
    models: {m: {provider: demo, model: demo}}
    """)


def test_a_guard_runs_where_places_says_and_on_is_an_unknown_field() -> None:
    compile_text(BASE + "guards: {global: {pii: {kind: pii, places: [input]}}}\n", "p.yaml")
    with pytest.raises(PolicyError, match="unknown field `on`"):
        compile_text(BASE + "guards: {global: {pii: {kind: pii, on: [input]}}}\n", "p.yaml")
    row = next(line for line in (DOCS / "guards.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| `places` |"))
    assert "unknown field" in row and "YAML reads `on` as `true`" not in row


@pytest.fixture(scope="module")
def guarded(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: fault-echo}}
        guards:
          global:
            watch: {{kind: secrets, mode: shadow, places: [input]}}
            deny: {{kind: denylist, terms: [project falcon], places: [input]}}
            pii: {{kind: pii, places: [input], entities: {{EMAIL_ADDRESS: {{}}, CREDIT_CARD: {{action: mask}}}}}}
        """), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def test_the_guards_header_lists_a_shadow_guard_twice_and_an_entity_action_beside_the_guards(
        guarded: RunningGateway) -> None:
    """docs/guards.md, "Every successful guarded answer": each guard under its own action (0 when it found nothing),
    a finding under its own action, a shadow guard's findings as `shadow_<action>`."""
    text = "key AKIAIOSFODNN7EXAMPLQ, card 4111 1111 1111 1111"
    response = httpx.post(guarded.base_url + "/chat/completions", timeout=20,
                          headers={"Authorization": f"Bearer {FULL_KEY}"},
                          json={"model": "chat", "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-guards"] == \
        "deny.block=0,pii.mask=1,pii.redact=0,watch.block=0,watch.shadow_block=1"
