"""`gateway usage`: print spend and tokens per key, tenant or alias from a running gateway.

It asks the gateway's `GET /admin/usage` (so it shows the same figures, from every replica when the state
is in Redis), with the admin token from an environment variable: a token never goes on a command line,
where other users of the machine can read it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

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
    token = os.environ.get(args.token_env)
    if not token:
        print(f"gateway: set {args.token_env} to the gateway's admin token", file=sys.stderr)
        return 2
    query = {k: v for k, v in (("scope", args.scope), ("name", args.name), ("period", args.period),
                                ("date", args.date)) if v}
    request = urllib.request.Request(f"{args.url.rstrip('/')}/admin/usage?{urllib.parse.urlencode(query)}",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            report = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"gateway: {exc.code}: {_message(exc.read())}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"gateway: cannot reach {args.url}: {exc}", file=sys.stderr)
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


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")
