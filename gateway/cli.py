"""The `gateway` command: serve, check, schema, keys."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .auth.keys import generate_key, hash_key
from .policy import PolicyError, load_policy
from .policy.compile import open_to_network
from .policy.default import resolve_policy_path
from .policy.schema import json_schema
from .telemetry.logs import configure_logging

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible LLM gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--policy", type=Path, default=None,
                       help="policy file (default: ./policies/gateway.yaml if it exists, else the built-in one)")
    serve.add_argument("--host", help="listen address (default: the policy's server.host)")
    serve.add_argument("--port", type=int, help="listen port (default: the policy's server.port)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    serve.add_argument("--allow-open", action="store_true",
                       help="serve a non-loopback address with `auth: none` and real providers "
                            "(anyone who reaches it can spend their credit)")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate policy files; print every error; exit 1 on any")
    check.add_argument("files", nargs="+", type=Path)
    check.add_argument("--strict-env", action="store_true", help="also fail when a referenced env var is unset")
    check.set_defaults(run=_check)

    route = commands.add_parser("route", help="show which rule a request matches and its candidate targets")
    route.add_argument("request", type=Path, help="the request body as JSON (a file, or - for stdin)")
    route.add_argument("--policy", type=Path, default=None, help="policy file (default: as for serve)")
    route.add_argument("--key", help="the virtual key the request would carry (its tenant and name)")
    route.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                       help="a request header rules may read (repeat for more)")
    route.set_defaults(run=_route)

    schema = commands.add_parser("schema", help="print the policy's JSON Schema")
    schema.set_defaults(run=_schema)

    keys = commands.add_parser("keys", help="virtual keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    hash_cmd = key_commands.add_parser("hash", help="print the policy form (sha256:...) of a key")
    hash_cmd.add_argument("key", nargs="?", help="the key (default: read one line from stdin)")
    hash_cmd.set_defaults(run=_keys_hash)
    gen_cmd = key_commands.add_parser("generate", help="make a new random key and print it with its hash")
    gen_cmd.set_defaults(run=_keys_generate)
    return parser


def _serve(args: argparse.Namespace) -> int:
    configure_logging()
    if args.workers < 1:
        print("gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    path = resolve_policy_path(args.policy)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    host = args.host or policy.server.host
    if open_to_network(policy, host) and not args.allow_open:
        print(f"gateway: refusing to serve {host} with `auth: none`: anyone who reaches it could use your "
              "providers' credentials. Use `auth: keys`, listen on 127.0.0.1, or pass --allow-open.", file=sys.stderr)
        return 2
    from .server import serve

    return serve(path, policy, args.host, args.port, args.workers)


def _check(args: argparse.Namespace) -> int:
    failed = False
    for file in args.files:
        try:
            policy = load_policy(file, require_env=args.strict_env)
        except PolicyError as exc:
            failed = True
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            continue
        for warning in policy.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{file}: ok ({len(policy.models)} model aliases, {len(policy.providers)} providers, "
              f"auth: {policy.auth}, version {policy.version})")
    return 1 if failed else 0


def _route(args: argparse.Namespace) -> int:
    from .errors import GatewayError
    from .routing.explain import explain_route

    try:
        policy = load_policy(resolve_policy_path(args.policy), require_env=False)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        raw = sys.stdin.buffer.read() if str(args.request) == "-" else args.request.read_bytes()
    except OSError as exc:
        print(f"gateway: cannot read {args.request}: {exc}", file=sys.stderr)
        return 2
    headers = []
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            print(f"gateway: --header wants 'Name: value', not {header!r}", file=sys.stderr)
            return 2
        headers.append((name, value))
    try:
        lines = explain_route(policy, raw, args.key, headers)
    except GatewayError as exc:
        print(f"the gateway would answer {exc.status} ({exc.code or exc.type}): {exc.message}")
        return 1
    print("\n".join(lines))
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    key = args.key if args.key is not None else sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("gateway: no key given", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    key = generate_key()
    print(f"key:  {key}\nhash: {hash_key(key)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig()
    raise SystemExit(main())
