"""Policy files: every kind of mistake is reported with file, line and field; `gateway check` fails on it."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.auth.keys import hash_key
from gateway.policy import PolicyError, compile_text, load_policy
from gateway.policy.loader import _check, _Located
from gateway.policy.schema import PolicySpec

REPO = Path(__file__).resolve().parents[1]
GOOD = """\
version: 1
server:
  port: 8080
auth: keys
keys:
  - name: a
    tenant: acme
    hash: "sha256:%s"
    models: [chat]
providers:
  up:
    kind: openai
    base_url: https://api.example.com/v1
    api_key_env: UP_KEY
  local:
    kind: demo
models:
  chat:
    provider: up
    model: gpt-4o-mini
""" % ("ab" * 32)
ENV = {"UP_KEY": "sk-real"}


def issues_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        compile_text(text, "p.yaml", ENV if env is None else env)
    return [str(issue) for issue in caught.value.issues]


def test_the_good_policy_compiles_and_is_frozen() -> None:
    policy = compile_text(GOOD, "p.yaml", ENV)
    assert policy.models["chat"].upstream_model == "gpt-4o-mini"
    assert policy.providers["up"].headers["Authorization"] == "Bearer sk-real"
    assert "sk-real" not in repr(policy.providers["up"])
    with pytest.raises(TypeError):
        policy.models["other"] = policy.models["chat"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("version: 1", "version: 2", "p.yaml:1: version: unknown value `2` (allowed: 1)"),
        ("  port: 8080", "  port: eighty", "p.yaml:3: server.port: expected `int`, got `str`"),
        ("  port: 8080", "  port: 99999", "p.yaml:3: server.port: expected `int` <= 65535"),
        ("  port: 8080", "  port: 8080\n  colour: blue", "p.yaml:4: server.colour: unknown field `colour`"),
        ("auth: keys", "auth: maybe", "p.yaml:4: auth: unknown value `maybe` (allowed: keys, none)"),
        ("    kind: demo", "    kind: martian",
         "p.yaml:16: providers.local.kind: unknown value `martian` (allowed: anthropic, azure, demo, gemini, openai)"),
        ("    model: gpt-4o-mini", "", "p.yaml:18: models.chat: missing required field `model`"),
        ('    hash: "sha256:' + "ab" * 32 + '"', '    hash: "md5:1234"',
         "p.yaml:8: keys[0].hash: expected `str` matching regex"),
        ("    models: [chat]", "    models: chat", "p.yaml:9: keys[0].models: expected `array`, got `str`"),
        ("    api_key_env: UP_KEY", "    api_key_env: sk-live-12345",
         "p.yaml:14: providers.up.api_key_env: expected `str` matching regex"),
        ("    base_url: https://api.example.com/v1", "    base_url: https://api.example.com/v1\n    pool_size: 0",
         "p.yaml:14: providers.up.pool_size: expected `int` >= 1"),
        ("  chat:\n", "  chat:\n    provider: up\n", "p.yaml:20: models.chat.provider: duplicate key `provider`"),
        ("    provider: up", "    provider: nowhere", "p.yaml:19: models.chat.provider: unknown provider `nowhere`"),
        ("    models: [chat]", "    models: [chat, ghost]", "p.yaml:9: keys[0].models: unknown model alias(es): ghost"),
        ("    base_url: https://api.example.com/v1", "    base_url: ftp://files",
         "p.yaml:13: providers.up.base_url: `ftp://files` is not an http(s) URL"),
        ("    base_url: https://api.example.com/v1", "    base_url: https://u:p@api.example.com/v1",
         "p.yaml:13: providers.up.base_url: credentials in base_url are not allowed"),
        ("    base_url: https://api.example.com/v1", "    base_url: https://api.example.com/v1?v=1",
         "p.yaml:13: providers.up.base_url: put query parameters under `query`"),
        ("    base_url: https://api.example.com/v1\n", "",
         "p.yaml:11: providers.up: an `openai` provider needs `base_url`"),
        ("    kind: demo", "    kind: demo\n    base_url: http://x",
         "p.yaml:17: providers.local.base_url: a `demo` provider"),
        ("    api_key_env: UP_KEY", "    api_key_env: UP_KEY\n    headers: {X-Api-Key: sk-inline}",
         "p.yaml:15: providers.up.headers.X-Api-Key: put secrets in headers_env"),
        ("    api_key_env: UP_KEY", "    api_key_env: UP_KEY\n    timeouts: {first_byte_s: 900, total_s: 60}",
         "p.yaml:15: providers.up.timeouts: connect_s and first_byte_s must not exceed total_s"),
        ("    api_key_env: UP_KEY", "    api_key_env: UP_KEY\n    timeouts: {idle_s: -1}",
         "p.yaml:15: providers.up.timeouts.idle_s: expected `float` > 0.0"),
        ("keys:\n  - name: a", "keys: []\nold:\n  - name: a", "p.yaml:6: old: unknown field `old`"),
        ("models:\n  chat:\n    provider: up\n    model: gpt-4o-mini\n", "models: {}\n",
         "p.yaml:17: models: at least one model alias is required"),
    ],
)
def test_each_mistake_is_located(old: str, new: str, expected: str) -> None:
    assert old in GOOD, old
    found = issues_of(GOOD.replace(old, new, 1))
    assert any(issue.startswith(expected) for issue in found), found


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    kind: demo", "    kind: cohere",
         "p.yaml:16: providers.local.kind: unknown value `cohere` (allowed: anthropic, azure, demo, gemini, openai)"),
        ("    kind: demo", "    kind: 5",
         "p.yaml:16: providers.local.kind: unknown value `5` (allowed: anthropic, azure, demo, gemini, openai)"),
        ("    kind: demo", "    kind: [demo]",
         "p.yaml:16: providers.local.kind: expected one of anthropic, azure, demo, gemini, openai, got a list"),
        ("version: 1", "version: true", "p.yaml:1: version: unknown value `true` (allowed: 1)"),
        ("version: 1", "version: '1'", "p.yaml:1: version: unknown value `'1'` (allowed: 1)"),
        ("auth: keys", "auth: ", "p.yaml:4: auth: expected one of keys, none, got nothing"),
    ],
)
def test_a_closed_set_of_values_is_listed(old: str, new: str, expected: str) -> None:
    assert old in GOOD, old
    found = issues_of(GOOD.replace(old, new, 1))
    assert expected in found, found


def _literal_fields(struct: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, tuple[Any, ...]]]:
    """(path, struct, allowed values) of every Literal-typed field reachable from `struct`."""
    found = []
    for field in msgspec.structs.fields(struct):
        tp = field.type
        while typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]
        if typing.get_origin(tp) is typing.Literal:
            found.append((path + (field.encode_name,), struct, typing.get_args(tp)))
        elif isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            found.extend(_literal_fields(tp, path + (field.encode_name,)))
    return found


LITERAL_FIELDS = _literal_fields(PolicySpec)


@pytest.mark.parametrize(("path", "struct", "allowed"), LITERAL_FIELDS, ids=[".".join(f[0]) for f in LITERAL_FIELDS])
def test_every_literal_field_lists_its_allowed_values(path: tuple[str, ...], struct: Any,
                                                      allowed: tuple[Any, ...]) -> None:
    doc = _Located("p.yaml", "x: 1\n")
    _check(doc, {path[-1]: "surely-not-allowed"}, struct, ())
    listed = ", ".join(sorted(str(v).lower() if isinstance(v, bool) else str(v) for v in allowed))
    shown = "surely-not-allowed" if all(isinstance(v, str) for v in allowed) else "'surely-not-allowed'"
    assert f"p.yaml:1: {path[-1]}: unknown value `{shown}` (allowed: {listed})" in map(str, doc.issues)


def test_the_known_literal_fields_are_covered() -> None:
    assert {("version",), ("auth",), ("providers", "kind")} <= {f[0] for f in LITERAL_FIELDS}


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        ('    headers: {"X Bad": "1"}', "p.yaml:15: providers.up.headers.X Bad: invalid header name `X Bad` (a header"),
        ('    headers: {"X-Ok": "1", "X:Colon": "2"}',
         "p.yaml:15: providers.up.headers.X:Colon: invalid header name `X:Colon`"),
        ('    headers_env: {"Bad Header": UP_KEY}',
         "p.yaml:15: providers.up.headers_env.Bad Header: invalid header name `Bad Header`"),
        ('    api_key_header: "api key"', "p.yaml:15: providers.up.api_key_header: invalid header name `api key`"),
        ('    headers: {X-Ok: 5}', "p.yaml:15: providers.up.headers.X-Ok: expected `str`, got `int`"),
        ('    headers_env: {X-Key: not-an-env-var}',
         "p.yaml:15: providers.up.headers_env.X-Key: expected `str` matching regex"),
    ],
)
def test_a_bad_header_is_named(new: str, expected: str) -> None:
    found = issues_of(GOOD.replace("    api_key_env: UP_KEY", "    api_key_env: UP_KEY\n" + new, 1))
    assert any(issue.startswith(expected) for issue in found), found
    assert not any("pattern" in issue or "regex" in issue for issue in found if "header name" in issue)


def test_bad_header_names_are_all_reported_with_their_lines() -> None:
    text = GOOD.replace("    api_key_env: UP_KEY", "    api_key_env: UP_KEY\n    headers:\n      X Bad: a\n"
                        "      X-Good: b\n      Also Bad: c", 1)
    found = issues_of(text)
    assert [i.split(": ", 1)[0] for i in found] == ["p.yaml:16", "p.yaml:18"], found
    assert "`X Bad`" in found[0] and "`Also Bad`" in found[1]


def test_every_error_is_reported_at_once() -> None:
    text = GOOD.replace("  port: 8080", "  port: x\n  bogus: 1").replace("    kind: demo", "    kind: nope")
    found = issues_of(text)
    assert len(found) == 3
    assert [f.split(":")[1] for f in found] == ["3", "4", "17"]


def test_reference_errors_come_with_type_errors() -> None:
    text = GOOD.replace("  port: 8080", "  port: x").replace("    provider: up", "    provider: gone")
    found = issues_of(text)
    assert [f.split(":")[1] for f in found] == ["3", "19"]
    assert "unknown provider `gone`" in found[1]


def test_auth_consistency() -> None:
    no_keys = GOOD.split("keys:")[0] + "providers:" + GOOD.split("providers:")[1]
    assert any("needs at least one entry under `keys`" in i for i in issues_of(no_keys))
    assert any("`auth: none` ignores them" in i for i in issues_of(GOOD.replace("auth: keys", "auth: none")))
    twice = GOOD.replace("    models: [chat]\n",
                         "    models: [chat]\n  - tenant: b\n    hash: \"sha256:" + "ab" * 32 + "\"\n")
    assert any("listed twice" in i for i in issues_of(twice))


def test_a_key_name_used_twice_in_one_file_is_an_error() -> None:
    """Names label a key's usage, metrics and access lines: two keys of one name (as across included files) are
    refused, an unnamed key's own name (`key-<index>`) included."""
    def more(*names: str) -> str:
        keys = "".join(f"  - {f'name: {name}' + chr(10) + '    ' if name else ''}tenant: b\n"
                       f"    hash: \"sha256:{digit * 64}\"\n    models: [chat]\n"
                       for name, digit in zip(names, "cde", strict=False))
        return GOOD.replace("    models: [chat]\n", "    models: [chat]\n" + keys, 1)

    compile_text(more("", "b"), "p.yaml", ENV)  # the second key unnamed (`key-1`): no error
    found = issues_of(more("a"))
    assert len(found) == 1 and "keys[1].name: the key name `a` is also the name of keys[0]" in found[0], found
    found = issues_of(more("", "key-1"))
    assert len(found) == 1 and "keys[2].name: the key name `key-1` is also the name of keys[1]" in found[0], found


def test_missing_secret_env_is_an_error_to_serve_and_a_warning_to_check() -> None:
    assert any("`UP_KEY` is not set" in i and ":14: providers.up.api_key_env" in i for i in issues_of(GOOD, env={}))
    policy = compile_text(GOOD, "p.yaml", {}, require_env=False)
    assert any("UP_KEY" in w for w in policy.warnings)


def test_yaml_syntax_and_shape_errors() -> None:
    assert issues_of("version: 1\nserver: [\n")[0].startswith("p.yaml:3: YAML syntax error")
    assert issues_of("")[0] == "p.yaml:1: the policy file is empty"
    assert issues_of("- 1\n- 2\n")[0].startswith("p.yaml:1: expected a mapping, got a list")
    assert issues_of("version: 1\nproviders: []\nmodels: {}\n")[0].startswith("p.yaml:2: providers: expected a mapping")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "absent.yaml")
    assert "cannot read the policy file" in str(caught.value)


def gateway_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, input=stdin,
                          cwd=REPO, timeout=60)


def test_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD.replace("kind: openai\n    base_url: https://api.example.com/v1\n    api_key_env: UP_KEY",
                                 "kind: demo"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("  port: 8080", "  port: x\n  bogus: 1"))
    ok = gateway_cli("check", str(good), "policies/gateway.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "good.yaml: ok" in ok.stdout
    failed = gateway_cli("check", str(good), str(bad))
    assert failed.returncode == 1
    assert f"{bad}:3: server.port: expected `int`, got `str`" in failed.stderr
    assert f"{bad}:4: server.bogus: unknown field `bogus`" in failed.stderr
    examples = gateway_cli("check", *map(str, sorted((REPO / "policies" / "examples").glob("*.yaml"))))
    assert examples.returncode == 0, examples.stderr
    strict = gateway_cli("check", "--strict-env", str(REPO / "policies" / "examples" / "openai.yaml"))
    assert strict.returncode == 1 and "OPENAI_API_KEY" in strict.stderr


def test_schema_command_describes_the_policy() -> None:
    result = gateway_cli("schema")
    schema = json.loads(result.stdout)
    assert schema["$schema"].endswith("2020-12/schema")
    spec = schema["$defs"]["PolicySpec"]
    assert spec["required"] == ["version"]  # providers and models too, unless they come from included files
    assert spec["if"] == {"not": {"required": ["include"]}}
    assert set(spec["then"]["required"]) == {"providers", "models"}
    assert spec["additionalProperties"] is False


def test_keys_commands() -> None:
    hashed = gateway_cli("keys", "hash", "gw-secret")
    assert hashed.stdout.strip() == hash_key("gw-secret")
    assert gateway_cli("keys", "hash", stdin="gw-secret\n").stdout.strip() == hash_key("gw-secret")
    generated = gateway_cli("keys", "generate").stdout.split()
    key, digest = generated[1], generated[3]
    assert key.startswith("gw-") and len(key) > 40 and digest == hash_key(key)


def test_quality_signals_with_the_metrics_off_is_a_warning() -> None:
    """The quality signals are metrics: with `server.metrics: false` they are not built, which must not
    pass silently."""
    quiet = GOOD.replace("server:\n", "server:\n  metrics: false\n", 1) + "telemetry:\n  quality: {enabled: true}\n"
    warnings = compile_text(quiet, "p.yaml", ENV).warnings
    assert any("telemetry.quality.enabled" in w and "server.metrics is false" in w for w in warnings), warnings
    on = GOOD + "telemetry:\n  quality: {enabled: true}\n"
    assert not any("telemetry.quality" in w for w in compile_text(on, "p.yaml", ENV).warnings)


@pytest.mark.parametrize(("old", "new", "where"), [
    ("    models: [chat]", "    models: [{chat: 1}]", "p.yaml:9: keys[0].models"),  # an alias as a mapping
    ("models:\n", "guards:\n  global:\n    pii: {kind: [pii]}\nmodels:\n", "p.yaml:19: guards.global.pii.kind"),
])
def test_a_value_of_an_unexpected_type_is_located_not_a_crash(old: str, new: str, where: str) -> None:
    """Each raised a TypeError in the checks: a reload answered 500 and recorded nothing, `gateway check` printed
    a traceback."""
    assert old in GOOD
    found = issues_of(GOOD.replace(old, new, 1))
    assert any(issue.startswith(where) for issue in found), found


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded() -> None:
    """A few hundred bytes of nested aliases expand to billions of values: refused by their count, at once."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 9)]
    found = issues_of("\n".join(levels) + "\n" + GOOD)
    assert found == [f"p.yaml:1: the document expands to more than {1_000_000:,} values (through its YAML aliases); "
                     "refused"]


def test_a_merge_key_may_be_overridden() -> None:
    """`<<: *base` then a key of the base's, given again: YAML's override, not a duplicate key."""
    text = GOOD.replace("  chat:\n    provider: up\n    model: gpt-4o-mini\n",
                        "  chat: &base\n    provider: up\n    model: gpt-4o-mini\n"
                        "  mini:\n    <<: *base\n    model: gpt-4.1-mini\n")
    policy = compile_text(text, "p.yaml", ENV)
    assert policy.models["mini"].upstream_model == "gpt-4.1-mini"
    assert policy.models["chat"].upstream_model == "gpt-4o-mini"
    assert any("duplicate key `model`" in issue for issue in issues_of(text.replace(
        "    model: gpt-4.1-mini\n", "    model: gpt-4.1-mini\n    model: again\n")))  # a real duplicate still is


def test_a_bug_in_the_checks_is_a_policy_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a check raises, the policy is refused with a located error (and the traceback logged)."""
    import gateway.policy.compile as compile_module

    def broken(*_: object, **__: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(compile_module, "compile_policy", broken)
    assert issues_of(GOOD) == ["p.yaml:1: the policy could not be checked (KeyError: a gateway bug; the log has its "
                               "traceback)"]


@pytest.mark.parametrize(("when", "where"), [
    ("{tenant: []}", "rules[0].when.tenant"),
    ("{user: []}", "rules[0].when.user"),
    ("{header: {X-Beta: []}}", "rules[0].when.header.X-Beta"),
    ("{metadata: {team: []}}", "rules[0].when.metadata.team"),
])
def test_a_rule_condition_that_matches_nothing_is_an_error(when: str, where: str) -> None:
    """An empty list is not `["*"]`: the rule could never apply, which `gateway check` said nothing of."""
    text = GOOD + f"rules:\n  - {{name: never, when: {when}, deny: \"not here\"}}\n"
    found = issues_of(text)
    assert any(f": {where}: an empty list matches nothing" in issue for issue in found), found


def test_a_name_ending_in_a_newline_is_refused() -> None:
    """Python's `$` matches before a final newline: `acme` and `acme\n` were two tenants, and `acme\n` escaped
    `acme`'s limits."""
    found = issues_of(GOOD.replace("    tenant: acme\n", '    tenant: "acme\\n"\n', 1))
    assert any(issue.startswith("p.yaml:7: keys[0].tenant: expected `str` matching regex") for issue in found), found
