"""The `gateway` command: serve, check, route, explain, diff, test, schema, keys, usage."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from . import __version__
from .accounting.command import add_usage_command
from .auth.keys import generate_key, hash_key
from .dryrun.commands import add_commands, read_request_args
from .policy import PolicyError, load_policy
from .policy.default import resolve_policy_path
from .policy.reference import policy_schema, reference_markdown
from .reload import Listener, serving_refusals
from .telemetry.logs import configure_logging

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # (here: a reader gone is met below, not in the interpreter's flush at exit)
    except BrokenPipeError:
        # The reader stopped reading (`gateway schema | head`): stop quietly, as CLIs do, with stdout pointed at
        # /dev/null so that the interpreter's own flush at exit does not fail again with a second message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible LLM gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--policy", type=Path, default=None,
                       help="policy file (default: ./policies/gateway.yaml if it exists, else the built-in one)")
    serve.add_argument("--host", help="listen address (default: the policy's server.host)")
    serve.add_argument("--port", type=_port, help="listen port, 1 to 65535 (default: the policy's server.port)")
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

    add_commands(commands)  # explain, diff, test

    schema = commands.add_parser("schema", help="print the policy's JSON Schema")
    schema.add_argument("--markdown", action="store_true", help="the policy reference (docs/policies.md) instead")
    schema.add_argument("--fragment", action="store_true",
                        help="for an included file: no section is required")
    schema.set_defaults(run=_schema)

    keys = commands.add_parser("keys", help="virtual keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    hash_cmd = key_commands.add_parser("hash", help="print the policy form (sha256:...) of a key")
    hash_cmd.add_argument("key", nargs="?", help="the key (default: read one line from stdin)")
    hash_cmd.set_defaults(run=_keys_hash)
    gen_cmd = key_commands.add_parser("generate", help="make a new random key and print it with its hash")
    gen_cmd.set_defaults(run=_keys_generate)
    _key_api_commands(key_commands)
    add_usage_command(commands)
    return parser


def _port(text: str) -> int:
    """A TCP port, 1 to 65535, as the policy's `server.port`. Unchecked, the socket layer took 99999 as 34463
    (modulo 65536) while the log said 99999; and 0 (elsewhere "any free port") silently meant the policy's port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65_535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: give 1 to 65535 (0, any free port, is not "
                                         "supported: clients and probes need to know the port)")
    return port


def _key_api_commands(key_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`gateway keys create|list|get|revoke|rotate`: the admin API's `/admin/keys` from a shell."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway (default: %(default)s)")
    common.add_argument("--admin-token-env", default="GATEWAY_ADMIN_TOKEN", metavar="VAR",
                        help="environment variable holding the admin token (default: %(default)s)")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    create = key_commands.add_parser("create", parents=[common], help="create a key (its secret is shown once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="unique name (default: the key's id)")
    create.add_argument("--model", action="append", dest="models", metavar="ALIAS",
                        help="an alias the key may use (repeat; default: every alias)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=_finite_number, metavar="SECONDS", help="expire this many seconds from now")
    expiry.add_argument("--expires-at", type=_finite_number, metavar="UNIX_SECONDS", help="expire at this time")
    create.add_argument("--limits", type=_json_object, metavar="JSON", help='e.g. \'{"rpm": 60, "tpm": 100000}\'')
    create.add_argument("--budget", type=_json_object, metavar="JSON", help='e.g. \'{"usd": 50, "period": "month"}\'')
    create.set_defaults(run=_keys_create)
    listing = key_commands.add_parser("list", parents=[common], help="list keys (never their secrets)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(run=_keys_list)
    for verb, text in (("get", "show one key"), ("revoke", "revoke a key: it stops working at once")):
        command = key_commands.add_parser(verb, parents=[common], help=text)
        command.add_argument("id", help="the key's id (vk_...)")
        command.set_defaults(run=_keys_get if verb == "get" else _keys_revoke)
    rotate = key_commands.add_parser("rotate", parents=[common], help="a new secret for a key; the old one stops")
    rotate.add_argument("id", help="the key's id (vk_...)")
    rotate.add_argument("--grace", type=_finite_number, default=0.0, metavar="SECONDS",
                        help="the old secret keeps working this long (default: 0, it stops at once)")
    rotate.set_defaults(run=_keys_rotate)


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
    # The same rules refuse a reload onto a policy that breaks them (`Gateway._reload`), and a worker's start.
    listener = Listener(args.host or policy.server.host, allow_open=args.allow_open, workers=args.workers)
    refusals = serving_refusals(policy, listener)
    for refusal in refusals:
        print(f"gateway: {refusal}", file=sys.stderr)
    if refusals:
        return 2
    from .server import serve

    return serve(path, policy, listener, args.port)


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
              f"auth: {policy.auth}, version {policy.version}"
              + (f", {len(policy.files)} files" if len(policy.files) > 1 else "") + ")")
    return 1 if failed else 0


def _route(args: argparse.Namespace) -> int:
    from .errors import GatewayError
    from .routing.explain import explain_route

    try:
        policy = load_policy(resolve_policy_path(args.policy), require_env=False)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    given = read_request_args(args)
    if given is None:
        return 2
    raw, headers = given
    try:
        lines = explain_route(policy, raw, args.key, headers)
    except GatewayError as exc:
        print(f"the gateway would answer {exc.status} ({exc.code or exc.type}): {exc.message}")
        return 1
    print("\n".join(lines))
    return 0


def _schema(args: argparse.Namespace) -> int:
    if args.markdown:
        print(reference_markdown(), end="")
        return 0
    print(json.dumps(policy_schema(fragment=args.fragment), indent=2))
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


def _finite_number(text: str) -> float:
    """Seconds or a unix time: `float` takes `nan` and `inf`, which JSON cannot carry (the gateway answered
    "the request body is not valid JSON")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"rpm\": 60}'")
    return value


def _admin(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None,
           query: dict[str, str] | None = None) -> dict[str, Any] | None:
    """One admin API call; None (after printing why) when it failed."""
    from .admin_client import AdminClient, AdminError

    try:
        return AdminClient(args.url, args.admin_token_env).call(method, path, body, query)
    except AdminError as exc:
        status = f" ({exc.status})" if exc.status else ""
        print(f"gateway: {exc}{status}", file=sys.stderr)
        return None


_SHOWN = ("id", "name", "tenant", "models", "expires_at", "rotated_at", "previous_key_valid_until", "limits", "budget")
_WIDTH = max(len(field) for field in _SHOWN) + 2  # every value in one column, after the longest name and its colon


def _show_key(key: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(key, indent=2))
        return
    if "key" in key:
        print(f"{'key:':<{_WIDTH}}{key['key']}\n{'':<{_WIDTH}}(shown this once: give it to its owner now)")
    for field in _SHOWN:
        value = key.get(field)
        if value is not None:
            print(f"{field + ':':<{_WIDTH}}{', '.join(value) if field == 'models' else value}")


def _keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tenant": args.tenant}
    for field, value in (("name", args.name), ("models", args.models), ("ttl_s", args.ttl),
                         ("expires_at", args.expires_at), ("limits", args.limits), ("budget", args.budget)):
        if value is not None:
            body[field] = value
    answer = _admin(args, "POST", "/admin/keys", body)
    if answer is None:
        return 1
    _show_key(answer, args.json)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    keys: list[dict[str, Any]] = []
    query = {"limit": "1000", **({"tenant": args.tenant} if args.tenant else {})}
    while True:
        page = _admin(args, "GET", "/admin/keys", query=query)
        if page is None:
            return 1
        keys.extend(page["data"])
        if not page.get("has_more") or not page["data"]:
            break
        query["after"] = page["data"][-1]["id"]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    print(f"{'id':<20} {'name':<24} {'tenant':<16} {'models':<24} {'expires_at':<12} state")
    for key in keys:
        state = "expired" if key["expired"] else "active"
        print(f"{key['id']:<20} {key['name'][:24]:<24} {key['tenant'][:16]:<16} {','.join(key['models'])[:24]:<24} "
              f"{key['expires_at'] or '-'!s:<12} {state}")
    return 0


def _keys_get(args: argparse.Namespace) -> int:
    answer = _admin(args, "GET", f"/admin/keys/{urllib.parse.quote(args.id, safe='')}")
    if answer is None:
        return 1
    _show_key(answer, args.json)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    answer = _admin(args, "DELETE", f"/admin/keys/{urllib.parse.quote(args.id, safe='')}")
    if answer is None:
        return 1
    print(json.dumps(answer) if args.json else f"revoked {answer['id']}")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    answer = _admin(args, "POST", f"/admin/keys/{urllib.parse.quote(args.id, safe='')}/rotate",
                    {"grace_s": args.grace})
    if answer is None:
        return 1
    _show_key(answer, args.json)
    return 0


if __name__ == "__main__":
    logging.basicConfig()
    raise SystemExit(main())
