"""The lifecycle commands of `gateway`: explain, diff, test. Nothing here calls an upstream.

Policies are loaded without requiring their environment variables (credentials are never
needed to decide), so a policy repository's CI can run these with no secret at hand.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path

import msgspec

from ..policy import Policy, PolicyError, load_policy
from ..policy.default import resolve_policy_path
from ..routing.explain import wire_headers
from ..telemetry.tokens import TokenCounter
from .cases import CallerSpec, CaseFile, CaseResult, caller_of, load_cases, report, run_case
from .decide import Decider, DecisionRequest, endpoint_of
from .decisions import Decisions
from .diff import diff_specs, render_changes
from .render import render

__all__ = ["add_commands"]

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token, as the policy's header names


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = commands.add_parser("explain", help="print every decision the policy makes for a request (nothing "
                                                  "is sent)")
    explain.add_argument("request", type=Path, help="the request body as JSON (a file, or - for stdin)")
    explain.add_argument("--policy", type=Path, default=None, help="policy file (default: as for serve)")
    explain.add_argument("--key", help="the virtual key the request would carry")
    explain.add_argument("--key-name", help="... or a key of the policy, by name")
    explain.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                         help="a request header rules may read (repeat for more)")
    explain.add_argument("--json", action="store_true", help="the decisions as JSON")
    explain.set_defaults(run=_explain)

    diff = commands.add_parser("diff", help="what changes between two policies (exit 1 if anything does)")
    diff.add_argument("old", type=Path)
    diff.add_argument("new", type=Path)
    diff.add_argument("--json", action="store_true", help="the changes as JSON")
    diff.set_defaults(run=_diff)

    test = commands.add_parser("test", help="run policy test cases (YAML); exit 1 on any mismatch")
    test.add_argument("policy", type=Path)
    test.add_argument("cases", nargs="+", type=Path, help="case files")
    test.add_argument("--verbose", "-v", action="store_true", help="print the decisions of failing cases")
    test.set_defaults(run=_test)


def _load(path: Path) -> Policy | None:
    try:
        return load_policy(path, require_env=False)
    except PolicyError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return None


def _tokens(policy: Policy) -> TokenCounter | None:
    """A token counter, loaded only when a rule of the policy counts tokens or a limit or budget applies
    (the accounting decision estimates the prompt)."""
    if not policy.has_accounting and not any(rule.match.needs_tokens for rule in policy.rules):
        return None
    tokens = TokenCounter()
    tokens.load(route.upstream_model for route in policy.models.values())
    return tokens



def read_request_args(args: argparse.Namespace) -> tuple[bytes, list[tuple[str, str]]] | None:
    """The request body (`args.request`, a file or `-` for stdin) and the `--header 'Name: value'` pairs, as
    given; None after printing why (an unreadable file, a header without a name): the caller exits 2."""
    try:
        raw = sys.stdin.buffer.read() if str(args.request) == "-" else args.request.read_bytes()
    except OSError as exc:
        print(f"gateway: cannot read {args.request}: {exc}", file=sys.stderr)
        return None
    headers = []
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or _HEADER_NAME.fullmatch(name.strip()) is None:  # the served gateway refuses such a name
            print(f"gateway: --header wants 'Name: value' (a name of letters, digits and !#$%&'*+.^_`|~-), "
                  f"not {header!r}", file=sys.stderr)
            return None
        headers.append((name, value))
    return raw, headers

def _explain(args: argparse.Namespace) -> int:
    policy = _load(resolve_policy_path(args.policy))
    if policy is None:
        return 2
    given = read_request_args(args)
    if given is None:
        return 2
    raw = given[0]
    headers = wire_headers(given[1])
    key = None
    if args.key_name is not None:
        key, _, error = caller_of(policy, CallerSpec(key_name=args.key_name))
        if error is not None:
            print(f"gateway: {error}", file=sys.stderr)
            return 2
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # (nested too deep: the decider refuses it, as the gateway does)
        body = None
    request = DecisionRequest(raw, endpoint_of(body), args.key, key, headers)
    try:
        decided = asyncio.run(_decide(policy, request))
    except GuardsUnavailable as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(decided)).decode())
    else:
        print("\n".join(render(decided, str(policy.source))))
    return 0


async def _decide(policy: Policy, request: DecisionRequest) -> Decisions:
    decider = Decider(policy, _tokens(policy))
    await _start(decider)
    try:
        return await decider.decide(request)
    finally:
        await decider.aclose()


class GuardsUnavailable(Exception):
    """The policy's guards could not be built here (e.g. a spaCy model that is not installed)."""


async def _start(decider: Decider) -> None:
    try:
        await decider.start()
    except Exception as exc:
        await decider.aclose()
        raise GuardsUnavailable(f"the policy's guards could not be built: {type(exc).__name__}: {exc}") from exc


def _diff(args: argparse.Namespace) -> int:
    old, new = _load(args.old), _load(args.new)
    if old is None or new is None or old.spec is None or new.spec is None:
        return 2
    changes = diff_specs(old.spec, new.spec, old.prices.entries(), new.prices.entries(), truncate=not args.json)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(changes)).decode())
    else:
        print("\n".join(render_changes(changes)))
    return 1 if changes else 0


def _test(args: argparse.Namespace) -> int:
    policy = _load(args.policy)
    if policy is None:
        return 2
    files = []
    failed = False
    for path in args.cases:
        try:
            files.append(load_cases(path))
        except PolicyError as exc:
            failed = True
            for issue in exc.issues:
                print(issue, file=sys.stderr)
    if failed:
        return 2
    try:
        results = asyncio.run(_run(policy, files))
    except GuardsUnavailable as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report(results)))
    if args.verbose:
        for result in results:
            if result.mismatches and result.decisions is not None:
                print(f"\n{result.file}:{result.line}: {result.name}")
                print("\n".join(render(result.decisions, str(policy.source))))
    return 1 if any(r.mismatches for r in results) else 0


async def _run(policy: Policy, files: list[CaseFile]) -> list[CaseResult]:
    decider = Decider(policy, _tokens(policy))
    await _start(decider)
    try:
        return [await run_case(decider, f.file, line, case) for f in files for line, case in f.cases]
    finally:
        await decider.aclose()
