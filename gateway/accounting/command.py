"""`gateway usage`: print spend and tokens per key, tenant or alias from a running gateway.

It asks the gateway's `GET /admin/usage` (so it shows the same figures, from every replica when the state
is in Redis), with the admin token from an environment variable: a token never goes on a command line,
where other users of the machine can read it.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..admin_client import AdminClient, AdminError

__all__ = ["add_usage_command"]


def add_usage_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = commands.add_parser("usage", help="spend and tokens per key, tenant or alias (from a running gateway)")
    usage.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway (default: %(default)s)")
    usage.add_argument("--scope", choices=("key", "tenant", "model"), default="tenant")
    usage.add_argument("--name", help="one key, tenant or alias (default: every one the policy names)")
    usage.add_argument("--period", choices=("day", "month"), default="day")
    usage.add_argument("--date", help="YYYY-MM-DD for a day, YYYY-MM for a month (default: now, UTC)")
    usage.add_argument("--token-env", default="GATEWAY_ADMIN_TOKEN",
                       help="environment variable holding the admin token (default: %(default)s)")
    usage.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    usage.set_defaults(run=_usage)


def _usage(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("scope", args.scope), ("name", args.name), ("period", args.period),
                                ("date", args.date)) if v}
    try:  # (the admin client cleans the token as the gateway does, and none of its messages holds the token)
        client = AdminClient(args.url, args.token_env)
    except AdminError as exc:  # no token, or a bad URL: the command's use
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    try:
        report = client.call("GET", "/admin/usage", query=query)
    except AdminError as exc:
        print(f"gateway: {exc.status}: {exc}" if exc.status else f"gateway: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['scope']} usage, {report['period']} {report['date']} (UTC)")
    columns = ("name", "cost_usd", "requests", "prompt_tokens", "cached_tokens", "completion_tokens",
               "reasoning_tokens")
    rows = [[_cell(row.get(c)) for c in columns] for row in report["usage"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths,
                                                                                      strict=True))))
    for row in rows:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths,
                                                                                         strict=True))))
    return 0


def _cell(value: object) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)
