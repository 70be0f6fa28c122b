"""What a policy, its environment or a command line can hold that passed the checks and failed later.

- An upstream credential read from the environment with a trailing newline (a secret mounted from a file) is sent
  without it; one with a control character inside is refused at load, naming the field and the variable, never
  the value; a header the upstream request still cannot write is the provider's 502, never a 500.
- A target's `extra_body` may not set the fields the gateway sets itself (`stream`, `model`, ...).
- An alias whose `deadline_s` passes before any target is tried answers the deadline's own 504.
- `gateway route`, `explain` and `test` read a request header with non-latin-1 text as the served gateway does.
- `gateway serve --port` takes 1 to 65535 only.
- `gateway check`'s warnings name the included file an entry comes from.

The run-time cases serve the gateway against the mock upstream (which checks the credential it is sent) and talk
to it with the OpenAI SDK; the command-line cases run `gateway` as a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import httpx
import openai
import pytest

from gateway.policy import PolicyError, compile_text
from tests import conftest
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

Make = Callable[..., RunningGateway]
MESSAGES = [{"role": "user", "content": "hello"}]
NO_SECRETS = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_KEY"))}


def gateway_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120,
                ) -> subprocess.CompletedProcess[str]:
    """`gateway *args`, run to its end (killed at `timeout`: `subprocess.run` kills it before raising)."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**NO_SECRETS, **(env or {})}, check=False)


def sdk(running: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0)


# -- an upstream credential from the environment ---------------------------------------------------------------


def test_a_credential_ending_in_a_newline_is_sent_without_it(make_gateway: Make, upstream: MockUpstream) -> None:
    running = make_gateway(env={"MOCK_UPSTREAM_KEY": UPSTREAM_KEY + "\n"})
    warned = [w for w in running.policy.warnings if "MOCK_UPSTREAM_KEY" in w]
    assert any(": providers.mock.api_key_env: " in w for w in warned), running.policy.warnings
    assert not any(UPSTREAM_KEY in w for w in warned), warned
    client = sdk(running)
    answer = client.chat.completions.create(model="chat", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == upstream.reply_text
    with client.chat.completions.create(model="chat", messages=MESSAGES, stream=True) as events:  # type: ignore
        assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == upstream.reply_text
    assert [r.headers["authorization"] for r in upstream.requests] == [f"Bearer {UPSTREAM_KEY}"] * 2


@pytest.mark.parametrize("value", [f"{UPSTREAM_KEY}\nX-Injected: 1", f"{UPSTREAM_KEY[:4]}\x00{UPSTREAM_KEY[4:]}",
                                   f"sk-{UPSTREAM_KEY}\x7f", "sk-\udcff-undecodable"])
def test_a_credential_no_header_can_carry_is_refused_at_load(value: str, upstream: MockUpstream) -> None:
    with pytest.raises(PolicyError) as refused:
        compile_text(policy_text(upstream.base_url), "p.yaml", {"MOCK_UPSTREAM_KEY": value})
    shown = [str(issue) for issue in refused.value.issues]
    assert any(line.startswith("p.yaml:") and "providers.mock.api_key_env" in line and "`MOCK_UPSTREAM_KEY`" in line
               for line in shown), shown
    assert not any(UPSTREAM_KEY[3:] in line or "Injected" in line for line in shown), shown


def test_serve_refuses_and_check_warns_about_a_credential_with_a_line_break_inside(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        version: 1
        auth: none
        providers:
          up:
            kind: openai
            base_url: http://127.0.0.1:9/v1
            headers_env: {X-Org: UP_ORG}
            api_key_env: UP_KEY
        models:
          chat: {provider: up, model: m}
        """))
    env = {"UP_KEY": "sk-hidden-value\r\nX-Evil: 1", "UP_ORG": "org-visible\n"}
    served = gateway_cli("serve", "--policy", "p.yaml", "--port", "9", cwd=tmp_path, env=env, timeout=30)
    assert served.returncode == 1, served.stderr
    assert "p.yaml:8: providers.up.api_key_env: environment variable `UP_KEY` holds a control character" \
        in served.stderr, served.stderr
    checked = gateway_cli("check", "p.yaml", cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr
    assert "warning: p.yaml:8: providers.up.api_key_env: environment variable `UP_KEY`" in checked.stderr
    assert "warning: p.yaml:7: providers.up.headers_env.X-Org: environment variable `UP_ORG` ends or starts with " \
           "whitespace" in checked.stderr, checked.stderr
    for output in (served.stdout + served.stderr, checked.stdout + checked.stderr):
        assert "sk-hidden-value" not in output and "Evil" not in output and "org-visible" not in output


def test_a_header_the_upstream_request_cannot_write_is_the_providers_502(
    upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The load refuses such a value; were one to reach a provider anyway (a check missed), each request is the
    provider's 502, as any failure to send is, not a 500, and says nothing of the value."""
    policy = compile_text(policy_text(upstream.base_url) + "  once: {provider: mock, model: m, retry: {attempts: 0}}\n",
                          "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    mock = policy.providers["mock"]
    forged = dataclasses.replace(mock, headers=MappingProxyType({**mock.headers,
                                                                 "Authorization": f"Bearer {UPSTREAM_KEY}\n"}))
    policy = dataclasses.replace(policy, providers=MappingProxyType({**policy.providers, "mock": forged}))
    monkeypatch.setattr(conftest, "compile_text", lambda *args, **kwargs: policy)
    running = RunningGateway("", {}).start()
    try:
        client = sdk(running)
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="once", messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as failed_stream:
            client.chat.completions.create(model="once", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    finally:
        running.stop()
    for error in (failed.value, failed_stream.value):
        assert error.status_code == 502, error.response.text
        assert "upstream `mock`" in error.message and UPSTREAM_KEY not in error.response.text
    assert upstream.requests == []  # nothing reached the upstream


# -- extra_body --------------------------------------------------------------------------------------------------


def test_extra_body_may_not_set_the_fields_the_gateway_sets(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        version: 1
        auth: none
        providers:
          d: {kind: demo}
        models:
          chat:
            targets:
              - provider: d
                model: demo-1
                extra_body:
                  top_k: 5
                  stream: true
                  stream_options: {include_usage: false}
              - {provider: d, model: demo-2, extra_body: {model: other, messages: []}}
        rules:
          - {name: r, targets: [{provider: d, model: demo-1, extra_body: {_gateway_cache_control: 1}}]}
        """))
    checked = gateway_cli("check", "p.yaml", cwd=tmp_path)
    assert checked.returncode == 1
    refused = sorted(line.split(": extra_body may not set")[0] for line in checked.stderr.splitlines())
    assert refused == [
        "p.yaml:12: models.chat.targets[0].extra_body.stream",
        "p.yaml:13: models.chat.targets[0].extra_body.stream_options",
        "p.yaml:14: models.chat.targets[1].extra_body.messages",
        "p.yaml:14: models.chat.targets[1].extra_body.model",
        "p.yaml:16: rules[0].targets[0].extra_body._gateway_cache_control",
    ], checked.stderr


# -- deadline ----------------------------------------------------------------------------------------------------


def test_a_deadline_passed_before_any_target_is_tried_is_the_deadlines_504(
    make_gateway: Make, upstream: MockUpstream,
) -> None:
    running = make_gateway(policy_text(upstream.base_url) + "  hasty: {provider: mock, model: m, deadline_s: 1.0e-6}\n")
    client = sdk(running)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as late:
            client.chat.completions.create(model="hasty", messages=MESSAGES, stream=stream)  # type: ignore
        assert late.value.status_code == 504, late.value.response.text
        assert late.value.code == "deadline_exceeded" and "deadline" in late.value.message
        assert late.value.response.headers["x-gateway-attempts"] == "0"
    assert upstream.requests == []


# -- the command line --------------------------------------------------------------------------------------------

_RULED = """\
version: 1
server: {host: 127.0.0.1}
auth: none
providers:
  d: {kind: demo}
models:
  chat: {provider: d, model: demo-1}
rules:
  - {name: snowman, when: {header: {x-user: ["\u2603"]}}, targets: [{provider: d, model: demo-2}]}
  - {name: anyone, when: {header: {x-user: ["*"]}}, targets: [{provider: d, model: demo-3}]}
"""


def test_a_non_latin1_header_is_read_by_the_dry_runs_as_the_served_gateway_reads_it(tmp_path: Path) -> None:
    """A client sends the header's UTF-8 bytes: the served gateway matches the rule written with that text, and
    `route`, `explain` and `test` report the same rule."""
    running = RunningGateway(_RULED, {}).start()
    try:
        answer = httpx.post(running.base_url + "/chat/completions", json={"model": "chat", "messages": MESSAGES},
                            headers={"X-User": "\u2603".encode()}, timeout=30)
    finally:
        running.stop()
    assert answer.status_code == 200, answer.text
    served_rule = {"demo-2": "snowman", "demo-3": "anyone"}[answer.json()["model"]]
    assert served_rule == "snowman"  # the rule's value as the client wrote it (read as latin-1, it matched nothing)
    (tmp_path / "p.yaml").write_text(_RULED)
    (tmp_path / "r.json").write_text(json.dumps({"model": "chat", "messages": MESSAGES}))
    routed = gateway_cli("route", "r.json", "--policy", "p.yaml", "--header", "X-User: \u2603", cwd=tmp_path)
    assert routed.returncode == 0, routed.stderr
    assert f"rule: {served_rule}" in routed.stdout.splitlines()
    explained = gateway_cli("explain", "r.json", "--policy", "p.yaml", "--json", "--header", "X-User: \u2603",
                            cwd=tmp_path)
    assert explained.returncode == 0, explained.stderr
    assert json.loads(explained.stdout)["route"]["rule"] == served_rule
    (tmp_path / "cases.yaml").write_text(
        "cases:\n  - name: snowman\n    request: {model: chat, messages: [{role: user, content: hello}]}\n"
        f"    headers: {{X-User: \"\u2603\"}}\n    expect: {{rule: {served_rule}}}\n")
    tested = gateway_cli("test", "p.yaml", "cases.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_header_name_no_server_takes_is_refused_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(_RULED)
    (tmp_path / "r.json").write_text(json.dumps({"model": "chat", "messages": MESSAGES}))
    for command in ("route", "explain"):
        run = gateway_cli(command, "r.json", "--policy", "p.yaml", "--header", "X Us\u00e9r: a", cwd=tmp_path)
        assert run.returncode == 2 and "--header wants 'Name: value'" in run.stderr, run.stderr
    (tmp_path / "cases.yaml").write_text("cases:\n  - name: bad\n    request: {model: chat, messages: []}\n"
                                         "    headers: {\"X User\": a}\n    expect: {rule: null}\n")
    tested = gateway_cli("test", "p.yaml", "cases.yaml", cwd=tmp_path)
    assert tested.returncode == 2
    assert "cases.yaml:4: cases[0].headers.X User: invalid header name" in tested.stderr, tested.stderr
    assert "Traceback" not in tested.stderr


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1", "http"])
def test_serve_refuses_a_port_out_of_range(port: str, tmp_path: Path) -> None:
    try:
        served = gateway_cli("serve", "--port", port, cwd=tmp_path, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`gateway serve --port {port}` served (99999 listened on 99999 % 65536 = 34463)")
    assert served.returncode == 2
    assert "argument --port:" in served.stderr and "Traceback" not in served.stderr, served.stderr


def test_check_warnings_name_the_included_file(tmp_path: Path) -> None:
    (tmp_path / "tenants").mkdir()
    (tmp_path / "root.yaml").write_text(textwrap.dedent("""\
        version: 1
        include: [tenants/*.yaml, models.yaml, keys.yaml]
        auth: keys
        providers:
          d: {kind: demo}
        keys:
          - {name: k0, tenant: acme, hash: "sha256:0000000000000000000000000000000000000000000000000000000000000000"}
        """))
    (tmp_path / "models.yaml").write_text("# 1\n# 2\n# 3\nmodels:\n"
                                          "  chat: {provider: d, model: demo-1, limits: {rpm: 5}}\n")
    (tmp_path / "tenants" / "b.yaml").write_text("# 1\n# 2\n# 3\n# 4\ntenants:\n  ghost: {budget: {usd: 5}}\n")
    (tmp_path / "keys.yaml").write_text("# 1\ndynamic_keys:\n  enabled: true\n")
    checked = gateway_cli("check", "root.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    warnings = checked.stderr.splitlines()
    assert any(w.startswith("warning: tenants/b.yaml:6: tenants.ghost: ") for w in warnings), warnings
    assert any(w.startswith("warning: models.yaml:5: models.chat: no price") for w in warnings), warnings
    assert any(w.startswith("warning: keys.yaml:3: dynamic_keys.enabled: ") for w in warnings), warnings
