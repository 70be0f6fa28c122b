"""Routing's parts on their own: policy validation, strategies, breaker, retry pieces, `gateway route`."""

from __future__ import annotations

import math
import random
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from gateway.auth.keys import hash_key
from gateway.cli import main
from gateway.errors import GatewayError, RateLimited, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.policy import PolicyError, compile_text
from gateway.policy.compiled import RetryPolicy
from gateway.policy.schema import BreakerSpec
from gateway.providers.openai_compat import status_error
from gateway.routing.attempts import aggregate, backoff, classify
from gateway.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breakers
from gateway.routing.rules import Facts
from gateway.routing.stats import TargetStats
from gateway.routing.strategies import order_targets, sticky_point
from gateway.upstream.retry_after import client_retry_after, retry_after_seconds

BASE = textwrap.dedent("""\
    version: 1
    auth: none
    providers:
      a: {kind: demo}
      b: {kind: demo}
      c: {kind: demo}
    """)


def policy(models: str, extra: str = "") -> str:
    return BASE + extra + "models:\n" + textwrap.indent(textwrap.dedent(models), "  ")


def issues_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        compile_text(text, "p.yaml", {})
    return [str(issue) for issue in caught.value.issues]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# -- bad input: located errors ------------------------------------------------------------------------

BAD = [
    ("unknown strategy", """\
        x:
          strategy: fastest-first
          targets: [{provider: a, model: m}]
        """, "", "strategy: fastest", "models.x.strategy: unknown value `fastest-first` (allowed: cost, latency, "
                                       "least_busy, priority, weighted)"),
    ("weights sum to zero", """\
        x:
          strategy: weighted
          targets:
            - {provider: a, model: m, weight: 0}
            - {provider: b, model: m, weight: 0}
        """, "", "targets:", "models.x.targets: the weights of a weighted alias must sum to more than zero"),
    ("negative weight", """\
        x:
          strategy: weighted
          targets:
            - {provider: a, model: m, weight: -1}
        """, "", "weight: -1", "models.x.targets[0].weight: expected `float` >= 0.0"),
    ("sticky on priority", """\
        x:
          sticky: user
          targets: [{provider: a, model: m}]
        """, "", "sticky: user", "models.x.sticky: `sticky` needs `strategy: weighted`"),
    ("bad sticky key", """\
        x:
          strategy: weighted
          sticky: cookie
          targets: [{provider: a, model: m}]
        """, "", "sticky: cookie", "models.x.sticky: expected `str` matching"),
    ("retry count out of range", """\
        x:
          targets: [{provider: a, model: m, retry: {attempts: 11}}]
        """, "", "attempts: 11", "models.x.targets[0].retry.attempts: expected `int` <= 10"),
    ("backoff out of range", """\
        x:
          retry: {backoff_s: 9, backoff_max_s: 2}
          targets: [{provider: a, model: m}]
        """, "", "backoff_s: 9", "models.x.retry.backoff_s: backoff_s must not exceed backoff_max_s"),
    ("negative backoff", """\
        x: {provider: a, model: m}
        """, "routing: {retry: {backoff_s: -1}}\n", "routing:", "routing.retry.backoff_s: expected `float` >= 0.001"),
    ("unknown target provider", """\
        x:
          targets: [{provider: nope, model: m}]
        """, "", "nope", "models.x.targets[0].provider: unknown provider `nope` (defined: a, b, c)"),
    ("rule to an undefined alias", """\
        x: {provider: a, model: m}
        """, "rules:\n  - name: r\n    alias: ghost\n", "alias: ghost", "rules[0].alias: unknown model alias `ghost`"),
    ("rule to an undefined target", """\
        x: {provider: a, model: m}
        """, "rules:\n  - name: r\n    targets: [{provider: ghost, model: m}]\n", "ghost",
     "rules[0].targets[0].provider: unknown provider `ghost`"),
    ("rule matching an undefined alias", """\
        x: {provider: a, model: m}
        """, "rules:\n  - name: r\n    when: {alias: [ghost]}\n    alias: x\n", "ghost",
     "rules[0].when.alias: unknown model alias `ghost`"),
    ("rule with two actions", """\
        x: {provider: a, model: m}
        """, "rules:\n  - name: r\n    alias: x\n    deny: nope\n", "- name: r",
     "rules[0]: a rule needs exactly one of `alias`, `targets` or `deny` (it has alias, deny)"),
    ("context fallback cycle", """\
        x:
          provider: a
          model: m
          context_fallback: y
        y:
          provider: b
          model: m
          context_fallback: x
        """, "", "context_fallback: x", "models.y.context_fallback: a cycle between aliases: x -> y -> x"),
    ("rule cycle", """\
        x: {provider: a, model: m}
        y: {provider: b, model: m}
        """, "rules:\n  - name: r1\n    when: {alias: [x]}\n    alias: y\n"
             "  - name: r2\n    when: {alias: [y]}\n    alias: x\n", "alias: x",
     "rules[1].alias: a cycle between aliases: x -> y -> x"),
    ("cost without a price", """\
        x:
          strategy: cost
          targets: [{provider: a, model: m}, {provider: b, model: m}]
        """, "prices: {m: {input_per_mtok: 1, output_per_mtok: 2}}\n", None, None),
    ("cost without any price", """\
        x:
          strategy: cost
          targets: [{provider: a, model: m, price: {input_per_mtok: 1, output_per_mtok: 1}}, {provider: b, model: n}]
        """, "", "targets:", "models.x.targets[1]: `strategy: cost` needs a price for `b/n`"),
    ("both forms", """\
        x:
          provider: a
          model: m
          targets: [{provider: b, model: m}]
        """, "", "x:", "models.x: give either `provider` and `model` (one target) or `targets`, not both"),
    ("unknown context fallback", """\
        x:
          provider: a
          model: m
          context_fallback: big
        """, "", "context_fallback", "models.x.context_fallback: unknown model alias `big`"),
    ("unknown retry_on", """\
        x:
          retry_on: [timeout, teapot]
          targets: [{provider: a, model: m}]
        """, "", "retry_on", "models.x.retry_on[1]: unknown value `teapot` (allowed: connect, context_length, "
                             "rate_limit, server_error, timeout)"),
]


@pytest.mark.parametrize(("models", "extra", "needle", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_routing_input_is_located(models: str, extra: str, needle: str | None, expected: str | None) -> None:
    text = policy(models, extra)
    if expected is None:  # a good one, for contrast
        compile_text(text, "p.yaml", {})
        return
    assert needle is not None
    found = issues_of(text)
    line = line_of(text, needle)
    assert any(issue.startswith(f"p.yaml:{line}: {expected}") for issue in found), (line, found)


def test_the_one_target_shorthand_and_targets_compile_alike() -> None:
    compiled = compile_text(policy("""\
        short: {provider: a, model: m}
        long:
          targets: [{provider: a, model: m}]
        """), "p.yaml", {})
    short, long = compiled.models["short"], compiled.models["long"]
    assert short.targets == long.targets and short.single and short.provider == "a" and short.upstream_model == "m"
    assert short.targets[0].header == (b"x-gateway-target", b"a/m")


def test_rules_are_attached_only_to_the_aliases_they_can_match() -> None:
    compiled = compile_text(policy("""\
        x: {provider: a, model: m}
        y: {provider: b, model: m}
        z: {provider: c, model: m}
        """, "rules:\n  - {name: for-x, when: {alias: [x]}, alias: y}\n  - {name: all, when: {has_tools: true}, "
             "alias: z}\n"), "p.yaml", {})
    assert [r.name for r in compiled.models["x"].rules] == ["for-x", "all"]
    assert [r.name for r in compiled.models["y"].rules] == ["all"]


# -- strategies ---------------------------------------------------------------------------------------

ROUTES = compile_text(policy("""\
    weighted:
      strategy: weighted
      targets:
        - {provider: a, model: m, weight: 1}
        - {provider: b, model: m, weight: 3}
        - {provider: c, model: m, weight: 0}
    sticky:
      strategy: weighted
      sticky: tenant
      targets: [{provider: a, model: m}, {provider: b, model: m}]
    latency:
      strategy: latency
      explore: 0
      targets: [{provider: a, model: m}, {provider: b, model: m}, {provider: c, model: m}]
    busy:
      strategy: least_busy
      targets: [{provider: a, model: m}, {provider: b, model: m}, {provider: c, model: m}]
    cost:
      strategy: cost
      targets:
        - {provider: a, model: m, price: {input_per_mtok: 3, output_per_mtok: 3}}
        - {provider: b, model: m, price: {input_per_mtok: 1, output_per_mtok: 1}}
        - {provider: c, model: m, price: {input_per_mtok: 2, output_per_mtok: 2}}
    """), "p.yaml", {})
STATS = {name: TargetStats() for name in ("a/m", "b/m", "c/m")}


def names(order: object) -> list[str]:
    return [t.name for t in order]  # type: ignore[attr-defined]


def test_weighted_draws_by_weight_and_keeps_the_rest_as_fallbacks() -> None:
    rng = random.Random(7)
    route = ROUTES.models["weighted"]
    firsts = Counter(names(order_targets(route, None, STATS, False, rng))[0] for _ in range(4000))
    assert firsts["c/m"] == 0 and abs(firsts["b/m"] / 4000 - 0.75) < 0.03
    assert sorted(names(order_targets(route, None, STATS, False, rng))) == ["a/m", "b/m", "c/m"]


def test_sticky_points_are_stable_and_spread() -> None:
    assert sticky_point("acme") == sticky_point("acme") and 0 <= sticky_point("acme") < 1
    route = ROUTES.models["sticky"]
    from gateway.auth.keys import VirtualKey

    def first(tenant: str) -> str:
        facts = Facts({}, VirtualKey("k", tenant, b"", None), [], None)
        return names(order_targets(route, facts, STATS, False, random.Random()))[0]

    assert all(first("acme") == first("acme") for _ in range(20))
    assert {first(f"tenant-{i}") for i in range(40)} == {"a/m", "b/m"}


def test_latency_least_busy_and_cost_orders() -> None:
    stats = {name: TargetStats() for name in ("a/m", "b/m", "c/m")}
    stats["a/m"].observe(False, 0.5)
    stats["b/m"].observe(False, 0.1)
    rng = random.Random(1)
    assert names(order_targets(ROUTES.models["latency"], None, stats, False, rng)) == ["c/m", "b/m", "a/m"]
    stats["c/m"].observe(False, 0.3)
    assert names(order_targets(ROUTES.models["latency"], None, stats, False, rng)) == ["b/m", "c/m", "a/m"]
    stats["b/m"].observe(True, 0.9)  # streams are ranked by their own average
    assert names(order_targets(ROUTES.models["latency"], None, stats, True, rng))[-1] == "b/m"
    stats["a/m"].in_flight, stats["b/m"].in_flight = 2, 1
    assert names(order_targets(ROUTES.models["busy"], None, stats, False, rng)) == ["c/m", "b/m", "a/m"]
    assert names(order_targets(ROUTES.models["cost"], None, stats, False, rng)) == ["b/m", "c/m", "a/m"]


# -- the breaker --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_half_opens_with_one_probe_and_closes() -> None:
    clock = Clock()
    changes: list[tuple[str, int]] = []
    breakers = Breakers(BreakerSpec(failures=3, cooldown_s=10), ["t"], None, lambda t, s: changes.append((t, s)),
                        clock)
    for _ in range(2):
        breakers.failure("t")
    breakers.success("t")  # consecutive failures start again
    for _ in range(3):
        assert breakers.allow("t")
        breakers.failure("t")
    assert breakers.state("t") == OPEN and not breakers.allow("t")
    clock.now += 10
    assert breakers.state("t") == HALF_OPEN
    assert breakers.allow("t") and not breakers.allow("t")  # one probe at a time
    breakers.release("t")  # the probe's client left: the next request may probe
    assert breakers.allow("t")
    breakers.failure("t")
    assert breakers.state("t") == OPEN
    clock.now += 10
    assert breakers.allow("t")
    breakers.success("t")
    assert breakers.state("t") == CLOSED and breakers.allow("t")
    assert [s for _, s in changes] == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_the_breaker_opens_on_a_failure_ratio_and_applies_other_replicas_changes() -> None:
    clock = Clock()
    breakers = Breakers(BreakerSpec(failures=100, failure_ratio=0.5, min_requests=10, window_s=60), ["t", "u"], None,
                        clock=clock)
    for index in range(10):
        (breakers.failure if index % 2 else breakers.success)("t")
    assert breakers.state("t") == OPEN
    import time

    breakers.apply(b"open %.3f u" % (time.time() + 5))
    assert breakers.state("u") == OPEN and breakers.least_recently_failed(["t", "u"]) == "t"
    breakers.apply(b"close u")
    assert breakers.state("u") == CLOSED
    breakers.apply(b"nonsense")


# -- retries -------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_and_retry_after_is_capped() -> None:
    policy_ = RetryPolicy(attempts=3, backoff_s=0.5, backoff_max_s=1.5, retry_after_max_s=2)
    rng = random.Random(3)
    plain = UpstreamError("x")
    waits = [backoff(policy_, retry, plain, rng) for retry in range(4) for _ in range(200)]
    assert min(waits) >= 0 and max(waits[:200]) <= 0.5 and max(waits[200:400]) <= 1.0 and max(waits) <= 1.5
    assert max(waits[600:]) > 1.0  # the ceiling grew to the cap
    assert backoff(policy_, 0, RateLimited("x", headers={"Retry-After": "1"}), rng) == 1.0
    assert backoff(policy_, 0, RateLimited("x", headers={"Retry-After": "30"}), rng) == 2.0


def test_failures_are_classified_by_what_retry_on_can_name() -> None:
    assert classify(UpstreamUnavailable("x")) == "connect"
    assert classify(UpstreamTimeout("x")) == "timeout"
    assert classify(status_error("p", 429, "", "3")) == "rate_limit"
    assert classify(status_error("p", 503, "", None)) == "server_error"
    assert classify(status_error("p", 400, "", None)) == "client_error"
    forbidden = status_error("p", 404, "", None)
    forbidden.upstream_status = 404
    assert classify(forbidden) == "client_error"
    assert classify(status_error("p", 400, "", None, "context_length_exceeded")) == "context_length"
    assert classify(status_error("p", 400, "", None, None, "This model's maximum context length is 8192")) == (
        "context_length")


def test_all_failures_become_one_error() -> None:
    from gateway.policy.compiled import Target

    retry = RetryPolicy(0, 0.1, 1, 1)
    a, b = (Target(n, n, "m", 1, retry, None) for n in ("a", "b"))

    def one(*errors: tuple[Target, GatewayError, str]) -> GatewayError:
        return aggregate("x", list(errors))

    limited = one((a, RateLimited("r", headers={"Retry-After": "9"}), "rate_limit"),
                  (b, RateLimited("r", headers={"Retry-After": "4"}), "rate_limit"))
    assert limited.status == 429 and limited.headers["Retry-After"] == "4"
    assert one((a, UpstreamTimeout("t"), "timeout"), (b, UpstreamTimeout("t"), "timeout")).status == 504
    mixed = one((a, UpstreamTimeout("t"), "timeout"), (b, RateLimited("r"), "rate_limit"))
    assert mixed.status == 502 and "a: t; b: r" in mixed.message
    only = UpstreamError("just one")
    assert one((a, only, "server_error")) is only


NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


@pytest.mark.parametrize(("value", "seconds"), [
    ("3", 3.0), ("007", 7.0), (" 12\t", 12.0), ("0", 0.0),
    ("99999999999999999999", math.inf), ("9" * 5000, math.inf),  # `int` would refuse 5,000 digits
    ("²", None), ("①", None), ("٣", None), ("-1", None), ("1.5", None), ("+3", None), ("Infinity", None),
    ("NaN", None), ("3 s", None), ("", None), (None, None),
    ("Tue, 14 Nov 2023 22:14:20 GMT", 60.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # IMF-fixdate; the past is 0
    ("Tuesday, 14-Nov-23 22:14:20 GMT", 60.0), ("Tue Nov 14 22:14:20 2023", 60.0),  # the obsolete forms
    ("Tue, 14 Nov 2023 22:14:20 +0000", None), ("Tue, 31 Feb 2023 22:14:20 GMT", None),
    ("Tue, 14 Nov 2023 24:00:00 GMT", None), ("Tue, 14 Xyz 2023 22:14:20 GMT", None),
])
def test_retry_after_is_delta_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value, now=NOW) == seconds


def test_what_a_client_is_told_is_whole_seconds_up_to_a_day() -> None:
    from gateway.policy.compiled import Target

    assert [client_retry_after(s) for s in (0.0, 0.2, 7.0, 86_399.5, 2_306_034_460.0, math.inf)] == [
        "0", "1", "7", "86400", "86400", "86400"]
    assert status_error("p", 429, "", "²").headers == {}
    assert status_error("p", 429, "", "99999999999999999999").headers == {"Retry-After": "86400",
                                                                          "retry-after-ms": "86400000"}
    retry = RetryPolicy(0, 0.1, 1, 1)
    a, b = (Target(n, n, "m", 1, retry, None) for n in ("a", "b"))
    huge = aggregate("x", [(a, RateLimited("r", headers={"Retry-After": "2306034460"}), "rate_limit"),
                           (b, RateLimited("r", headers={"Retry-After": "10" + "0" * 20}), "rate_limit")])
    assert huge.headers["Retry-After"] == "86400"
    odd = aggregate("x", [(a, RateLimited("r", headers={"Retry-After": "²"}), "rate_limit"),
                          (b, RateLimited("r", headers={"Retry-After": "①"}), "rate_limit")])
    assert odd.status == 429 and "Retry-After" not in odd.headers
    # Every attempt asked for 250 ms: the client is told 250 ms (the SDKs read it first), `Retry-After` at least 1 s
    fine = aggregate("x", [(a, status_error("a", 429, "", 0.25), "rate_limit"),
                           (b, status_error("b", 429, "", 0.4), "rate_limit")])
    assert (fine.headers["retry-after-ms"], fine.headers["Retry-After"]) == ("250", "1")
    assert backoff(retry, 0, RateLimited("r", headers={"Retry-After": "²"}), random.Random(1)) <= 0.1  # jitter


@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 307, 308])
def test_a_redirect_is_an_upstream_failure_without_its_details(status: int) -> None:
    error = status_error("p", status, "moved to [url]", None)
    error.upstream_status = status
    assert error.status == 502 and classify(error) == "server_error"
    assert error.message == f"upstream `p` answered with a redirect (HTTP {status}), which the gateway does not follow"


# -- gateway route ---------------------------------------------------------------------------------------


def test_gateway_route_prints_the_rule_and_the_candidates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "p.yaml"
    file.write_text(textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: ops, tenant: acme, hash: "{hash_key('gw-route-test-key')}"}}
        providers:
          a: {{kind: demo}}
          b: {{kind: demo}}
        models:
          chat:
            targets: [{{provider: a, model: m1}}, {{provider: b, model: m2}}]
          other: {{provider: b, model: m3}}
        rules:
          - {{name: beta, when: {{header: {{X-Beta: ["*"]}}, tenant: [acme]}}, alias: other}}
          - {{name: refuse, when: {{user: [mallory]}}, deny: not you}}
        """))
    request = tmp_path / "r.json"
    request.write_text('{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}')
    args = ["route", "--policy", str(file), str(request), "--key", "gw-route-test-key"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rule: none matched" in out and "1. a/m1" in out and "2. b/m2" in out
    assert main([*args, "--header", "X-Beta: yes"]) == 0
    out = capsys.readouterr().out
    assert "rule: beta" in out and "1. b/m3" in out
    request.write_text('{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "user": "mallory"}')
    assert main(args) == 1
    assert "400 (no_route): not you" in capsys.readouterr().out
    assert main(args[:-2]) == 1 and "401" in capsys.readouterr().out


def test_a_reload_keeps_what_routing_learnt_about_targets_that_stay() -> None:
    from gateway.routing import Router
    from gateway.telemetry.metrics import Metrics

    extra = "routing: {breaker: {failures: 1}}\n"
    first = Router(compile_text(policy("x: {provider: a, model: m}\ny: {provider: b, model: m}\n", extra),
                                "p.yaml", {}), {}, None, Metrics())
    first.stats["a/m"].observe(False, 0.5)
    first.breakers.failure("a/m")
    second = Router(compile_text(policy("x: {provider: a, model: m}\nz: {provider: c, model: m}\n", extra),
                                 "p.yaml", {}), {}, None, Metrics(), previous=first)
    assert second.stats["a/m"] is first.stats["a/m"] and second.stats["a/m"].full_answer_s == 0.5
    assert second.breakers.state("a/m") == OPEN and second.breakers.state("c/m") == CLOSED
    assert "b/m" not in second.stats


def test_the_offline_plan_skips_targets_that_cannot_serve_the_endpoint() -> None:
    """`gateway explain` and `gateway test` order the targets as the router does: an Anthropic target of a mixed
    alias is not shown first for /v1/responses (the router skips it), but is for chat."""
    from gateway.routing.explain import route_plan
    from gateway.routing.router import Router
    from gateway.schemas.endpoints import Endpoint
    from gateway.telemetry.metrics import Metrics

    policy = compile_text(textwrap.dedent("""\
        version: 1
        auth: none
        providers:
          claude: {kind: anthropic, base_url: "https://api.anthropic.com/v1", api_key_env: A_KEY}
          gpt: {kind: openai, base_url: "https://api.openai.com/v1", api_key_env: O_KEY}
        models:
          mixed: {targets: [{provider: claude, model: c}, {provider: gpt, model: g}]}
        """), "p.yaml", {"A_KEY": "sk-ant-x", "O_KEY": "sk-x"})
    router = Router(policy, {}, None, Metrics())
    facts = Facts({"model": "mixed"}, None, [], None)
    _, _, order = route_plan(router, facts, "mixed", False, Endpoint.RESPONSES)
    assert [t.name for t in order] == ["gpt/g"]
    _, _, order = route_plan(router, facts, "mixed", False, Endpoint.CHAT)
    assert [t.name for t in order] == ["claude/c", "gpt/g"]


@pytest.mark.parametrize(("kind", "slow"), [("credentials", True), ("server_error", True), ("busy", False),
                                            ("client_error", False)])
def test_a_target_whose_key_is_refused_goes_behind_those_that_answer(kind: str, slow: bool) -> None:
    """The latency strategy's sample of a failed attempt: a refused credential (it will not answer until its key is
    fixed) counts as a slow answer, as a server error does; the request's own faults and a full local pool do not."""
    from gateway.routing.stats import FAILED_SAMPLE_S, TargetStats

    stats = TargetStats()
    stats.failed(kind, False, 0.01)
    assert stats.latency(False) == (FAILED_SAMPLE_S if slow else 0.0)


@pytest.mark.parametrize(("body", "endpoint"), [
    ('{"model": "chat", "input": "hi"}', "embeddings"),
    ('{"model": "chat", "input": ["a", "b"], "dimensions": 8}', "embeddings"),
    ('{"model": "chat", "input": [{"role": "user", "content": "hi"}]}', "responses"),
    ('{"model": "chat", "input": "hi", "instructions": "be brief"}', "responses"),
    ('{"model": "chat", "input": "hi", "stream": true}', "responses"),
    ('{"model": "chat", "prompt": "hi"}', "completions"),
])
def test_gateway_route_tells_a_responses_body_from_an_embeddings_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, endpoint: str) -> None:
    """Both carry `input` (a Responses body was routed as an embeddings request)."""
    file = tmp_path / "p.yaml"
    file.write_text("version: 1\nauth: none\nproviders: {a: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}}\n"
                    "models: {chat: {provider: a, model: m}}\n")
    request = tmp_path / "r.json"
    request.write_text(body)
    assert main(["route", "--policy", str(file), str(request)]) == 0
    assert f"endpoint: /v1/{endpoint}" in capsys.readouterr().out
