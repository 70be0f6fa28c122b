"""Pure logic of accounting: prices by token kind, budget periods, OpenAI's reset format, prompt estimates."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.accounting.headers import duration, rate_limit_headers, tightest
from gateway.accounting.periods import PeriodKeys, current_period, day_id
from gateway.policy.accounting_schema import BudgetSpec
from gateway.policy.compiled import Price
from gateway.store.base import WindowReservation
from gateway.telemetry.tokens import TokenCounter

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken"))


def test_each_token_kind_has_its_rate() -> None:
    price = Price(input_per_mtok=2.0, output_per_mtok=10.0, cached_input_per_mtok=0.5, cache_write_per_mtok=2.5,
                  reasoning_per_mtok=20.0)
    # 1000 prompt tokens: 600 cached, 100 written, 300 plain; 500 completion tokens: 200 reasoning
    expected = (300 * 2.0 + 600 * 0.5 + 100 * 2.5 + 300 * 10.0 + 200 * 20.0) / 1e6
    assert price.cost(1000, 500, cached=600, cache_write=100, reasoning=200) == pytest.approx(expected)
    plain = Price(input_per_mtok=2.0, output_per_mtok=10.0)  # unset kinds: input and output rates
    assert plain.cost(1000, 500, cached=600, reasoning=200) == pytest.approx((1000 * 2.0 + 500 * 10.0) / 1e6)


def test_reported_details_never_exceed_their_totals() -> None:
    price = Price(input_per_mtok=1.0, output_per_mtok=1.0, cached_input_per_mtok=0.0, reasoning_per_mtok=0.0)
    assert price.cost(10, 10, cached=50, reasoning=-5) == pytest.approx(10 / 1e6)  # all cached: 0 + 10 out


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("period", "moment", "ident", "left_s"), [
    ("day", "2026-12-02T23:00:00", "d20261202", 3600),
    ("week", "2026-12-02T00:00:00", "w202649", 5 * 86400),  # a Wednesday; the week ends Monday 00:00
    ("week", "2026-12-31T12:00:00", "w202653", 3.5 * 86400),  # ISO week 53 of 2026
    ("month", "2024-02-29T23:00:00", "m202402", 3600),  # leap day
    ("month", "2026-12-31T00:00:00", "m202612", 86400),
])
def test_calendar_periods_are_utc(period: str, moment: str, ident: str, left_s: float) -> None:
    found, ttl = current_period(BudgetSpec(usd=1, period=period), _at(moment))  # type: ignore[arg-type]
    assert found == ident
    assert ttl == pytest.approx(left_s + 3600)  # a counter outlives its period by an hour


def test_rolling_windows_are_aligned_to_the_epoch() -> None:
    budget = BudgetSpec(usd=1, period="rolling", window_s=600)
    first, ttl = current_period(budget, 1_200.0 + 30)
    assert first == "r600-2" and ttl == pytest.approx(570 + 3600)
    assert current_period(budget, 1_799.0)[0] == first
    assert current_period(budget, 1_800.0)[0] == "r600-3"
    assert day_id(_at("2026-01-05T10:00:00")) == "20260105"


@pytest.mark.parametrize("budget", [BudgetSpec(usd=1, period="day"), BudgetSpec(usd=1, period="week"),
                                    BudgetSpec(usd=1, period="month"),
                                    BudgetSpec(usd=1, period="rolling", window_s=600)])
def test_period_keys_agree_with_current_period_across_boundaries(budget: BudgetSpec) -> None:
    keys = PeriodKeys("acct:budget:key:k:", budget)  # made once per period, then reused
    start = _at("2026-12-27T23:50:00")  # a Sunday: the day, the ISO week and (days later) the month end
    for step in range(0, 6 * 86_400, 277):
        now = start + step + 0.123
        ident, ttl = current_period(budget, now)
        assert keys.at(now) == ("acct:budget:key:k:" + ident, ttl)


@pytest.mark.parametrize(("seconds", "shown"), [(0.02, "20ms"), (0, "0ms"), (1, "1s"), (59.2, "1m0s"),
                                                (360, "6m0s"), (3723, "1h2m3s")])
def test_reset_times_in_openai_format(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


def test_headers_describe_the_tightest_limit() -> None:
    roomy = WindowReservation(True, 10, 1000, 30.0)
    tight = WindowReservation(True, 9, 10, 12.0)
    assert tightest([roomy, tight]) is tight and tightest([]) is None
    headers = dict(rate_limit_headers(tight, None))
    assert headers == {b"x-ratelimit-limit-requests": b"10", b"x-ratelimit-remaining-requests": b"1",
                       b"x-ratelimit-reset-requests": b"12s"}


@pytest.mark.parametrize("reset", [0.0, 0.0004, 0.2, 0.9994, 0.9995, 1.0, 1.0004, 59.2, 60.0, 3722.5])
def test_reset_headers_read_as_duration(reset: float) -> None:
    """The reset value is formatted once per whole second (cached): it must read exactly as `duration`."""
    headers = dict(rate_limit_headers(None, WindowReservation(False, 12.5, 10.4, reset)))
    assert headers == {b"x-ratelimit-limit-tokens": b"10", b"x-ratelimit-remaining-tokens": b"0",
                       b"x-ratelimit-reset-tokens": duration(reset).encode()}


def test_prompt_estimate_counts_overhead_tools_and_images() -> None:
    from types import SimpleNamespace

    from gateway.accounting.prompt import PromptEstimator
    from gateway.schemas.endpoints import Endpoint
    from gateway.translate.image_tokens import MAX_IMAGE_TOKENS as IMAGE_TOKENS  # an image of unknown size

    tokens = TokenCounter()
    tokens.load(["gpt-4o"])
    estimator = PromptEstimator(tokens)
    route = SimpleNamespace(upstream_model="gpt-4o")

    def request(body: dict[str, object], endpoint: Endpoint = Endpoint.CHAT) -> SimpleNamespace:
        return SimpleNamespace(body=body, route=route, endpoint=endpoint)

    text = {"messages": [{"role": "user", "content": "hello world"}]}
    base = estimator.estimate(request(text))  # type: ignore[arg-type]
    assert base == 3 + 3 + tokens.count("user", "gpt-4o") + tokens.count("hello world", "gpt-4o")
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"},
                                                       {"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert estimator.estimate(request(image)) == base + IMAGE_TOKENS  # type: ignore[arg-type]
    tools = {**text, "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}
    assert estimator.estimate(request(tools)) > base  # type: ignore[arg-type]
    completion = {"prompt": ["hello world", [1, 2, 3]]}
    assert estimator.estimate(request(completion, Endpoint.COMPLETIONS)) == (  # type: ignore[arg-type]
        tokens.count("hello world", "gpt-4o") + 3)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", None])
def test_prompt_estimate_of_plain_chat_equals_the_general_count(model: str | None) -> None:
    """The estimator's short loop for role-and-text messages counts exactly what `count_messages` counts."""
    from gateway.accounting.prompt import PromptEstimator

    tokens = TokenCounter()
    tokens.load(["gpt-4o"])
    estimator = PromptEstimator(tokens)
    shapes = [
        [{"role": "user", "content": "hello world"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sag hallo, 你好 🎉"},
         {"role": "assistant", "content": ""}, {"role": "developer", "content": "x" * 300}],
        [{"role": "user", "content": "hi", "name": "ann"}],  # a name: the general count
        [{"role": "custom-role", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [],
    ]
    for _ in range(2):  # the second time with the role counts kept
        for messages in shapes:
            assert estimator.estimate_body({"messages": messages}, model) == tokens.count_messages(messages, model)


def test_scope_index_rereads_a_key_whose_record_changed() -> None:
    """Scopes are kept per (key, alias); a run-time key updated by the admin API is a new record: re-read."""
    from types import SimpleNamespace
    from typing import Any

    from gateway.accounting.scopes import ScopeIndex
    from gateway.auth.keys import VirtualKey
    from gateway.policy.accounting_schema import LimitSpec

    policy: Any = SimpleNamespace(tenants={}, alias_limits={"m": LimitSpec(rpm=5)}, alias_budgets={}, models={})
    index = ScopeIndex(policy, cap=1)
    before = VirtualKey("k", "t", b"", None, limits=LimitSpec(rpm=10))
    ctx: Any = SimpleNamespace(key=before, alias_label="m", route=None)
    first = index.of(ctx)
    assert [(s.kind, s.name, s.rpm_key) for s in first.all] == [("key", "k", "acct:rpm:key:k"),
                                                                  ("model", "m", "acct:rpm:model:m")]
    assert index.of(ctx) is first  # kept
    ctx.key = VirtualKey("k", "t", b"", None, budget=BudgetSpec(usd=2, period="day"))
    changed = index.of(ctx)
    assert changed.all[0].limits is None and changed.all[0].budget is ctx.key.budget and changed.budgeted
    assert index.of(ctx) is changed
    ctx.alias_label = "other"  # past the cap: made per request, still right
    assert [s.kind for s in index.of(ctx).all] == ["key"] and index.of(ctx) is not index.of(ctx)


def test_budget_gauges_show_the_last_values_written() -> None:
    """In one process the gauges read the last values when scraped; a multiprocess value is written to."""
    from typing import Any

    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from gateway.accounting.gauges import BudgetLeft

    registry = CollectorRegistry()
    usd, share = (Gauge(name, "help", ("scope", "name"), registry=registry) for name in ("usd_left", "share_left"))
    left = BudgetLeft(usd.labels("key", "k"), share.labels("key", "k"))
    left.show(12.5, 0.25)
    left.show(10.0, 0.2)
    text = generate_latest(registry).decode()
    assert 'usd_left{name="k",scope="key"} 10.0' in text and 'share_left{name="k",scope="key"} 0.2' in text

    class FileValue:  # what prometheus_client's multiprocess mode keeps per child
        _multiprocess = True

        def __init__(self) -> None:
            self.written: list[float] = []

        def set(self, value: float, timestamp: Any = None) -> None:
            self.written.append(value)

    child = usd.labels("key", "m")
    child._value = FileValue()  # type: ignore[attr-defined]
    other = share.labels("key", "m")
    other._value = FileValue()  # type: ignore[attr-defined]
    BudgetLeft(child, other).show(3.0, 0.5)
    assert child._value.written == [3.0] and other._value.written == [0.5]  # type: ignore[attr-defined]


def test_prompt_estimate_keeps_recent_short_texts_bounded_and_counts_them_the_same() -> None:
    """Repeated message texts are counted once per model (exact encodings only), the kept ones bounded."""
    from gateway.accounting import prompt
    from gateway.accounting.prompt import PromptEstimator

    tokens = TokenCounter()
    tokens.load(["gpt-4o"])
    estimator = PromptEstimator(tokens)
    long_text = "word " * (prompt.TEXT_CHARS_KEPT // 5 + 1)
    for _ in range(2):  # the second time from the kept counts
        for text in ("hello world", "Sag hallo, 你好 🎉", "", long_text):
            messages = [{"role": "user", "content": text}]
            expected = tokens.count_messages(messages, "gpt-4o")
            assert estimator.estimate_body({"messages": messages}, "gpt-4o") == expected
    roles, kept = estimator._texts["gpt-4o"]
    assert roles == {"user": 3 + tokens.count("user", "gpt-4o")}  # a role's tokens with the message's overhead
    assert "hello world" in kept and long_text not in kept  # a long text is counted every time
    for index in range(prompt.TEXTS_KEPT + 10):
        estimator.estimate_body({"messages": [{"role": "user", "content": f"text {index}"}]}, "gpt-4o")
    assert len(kept) == prompt.TEXTS_KEPT and "hello world" not in kept  # the oldest went first
    assert estimator._texts.keys() == {"gpt-4o"}
    estimator.estimate_body({"messages": [{"role": "user", "content": "hi"}]}, None)  # no model: nothing kept
    assert prompt._NOTHING_KEPT == ({}, {})
    if not tokens.exact_for("gpt-4"):  # an estimated count may become exact once its encoding loads: not kept
        estimator.estimate_body({"messages": [{"role": "user", "content": "hi"}]}, "gpt-4")
    assert estimator._texts.keys() == {"gpt-4o"} and prompt._NOTHING_KEPT == ({}, {})


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 9, "completion_tokens": 20},
    {"prompt_tokens": 9, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 0},
     "completion_tokens_details": {"reasoning_tokens": 0}},
    {"prompt_tokens": 1234, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": None}},
    {"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"cached_tokens": 600}},
    {"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"cache_write_tokens": 100}},
    {"prompt_tokens": 1000, "completion_tokens": 500, "completion_tokens_details": {"reasoning_tokens": 200}},
    {"prompt_tokens": -3, "completion_tokens": 7},
])
@pytest.mark.parametrize("price", [Price(0.15, 0.60, cached_input_per_mtok=0.075), Price(3.0, 15.0, 0.3, 3.75, 30.0),
                                   Price(0.1, 0.4)])
def test_cost_of_plain_usage_equals_the_price_table_figure(usage: dict[str, object], price: Price) -> None:
    """`usage_cost` skips `Price.cost`'s clamps when every token is plain: the same float as it, exactly."""
    from types import SimpleNamespace

    import msgspec

    from gateway.accounting.cost import usage_cost
    from gateway.schemas.openai import Usage

    typed = msgspec.convert(usage, Usage)
    ctx = SimpleNamespace(target=SimpleNamespace(price=price), upstream_started=1.0)
    assert usage_cost(ctx, typed) == price.cost(typed.prompt_tokens, typed.completion_tokens,  # type: ignore[arg-type]
                                                typed.cached_tokens, typed.cache_write_tokens, typed.reasoning_tokens)


def test_incremental_tightest_window_agrees_with_tightest() -> None:
    from gateway.accounting.admission import _tighter

    answers = [WindowReservation(True, 10, 1000, 30.0), WindowReservation(True, 9, 10, 12.0),
               WindowReservation(True, 1, 10, 5.0), WindowReservation(True, 90, 100, 1.0),
               WindowReservation(False, 0, 0, 3.0)]
    for count in range(1, len(answers) + 1):
        for start in range(count):
            group = answers[start:count]
            found = group[0]
            for answer in group[1:]:
                if _tighter(answer, found):
                    found = answer
            assert found is tightest(group)


async def test_ledger_adds_each_request_to_its_alias_key_and_tenant() -> None:
    """Requests are kept per (alias, key, tenant, day) and fanned out to each scope's counters at the flush."""
    from gateway.accounting.ledger import FIELDS, Ledger, usage_key
    from gateway.store.memory import MemoryStore

    store = MemoryStore()
    ledger = Ledger(store)
    ledger.record("chat", "k1", "acme", "20261203", 1_500, 10, 2, 20, 5)
    ledger.record("chat", "k2", "acme", "20261203", 500, 1, 0, 2, 0)
    ledger.record("chat", None, None, "20261203", 1_000, 3, 0, 4, 0)  # no key: the alias only
    ledger.record("embed", "k1", "acme", "20261203", 0, 7, 0, 0, 0)
    await ledger.flush()
    ledger.record("chat", "k1", "acme", "20261203", 2_000, 1, 0, 1, 0)  # after a flush: added to the stored figures
    await ledger.flush()

    async def figures(scope: str, name: str) -> dict[str, float]:
        found = await store.get_many([usage_key(scope, name, "20261203", f) for f in FIELDS])
        return {f: float(v) / 1e6 for f, v in zip(FIELDS, found, strict=True) if v}  # kept in millionths

    assert await figures("model", "chat") == {"cost_usd": 5e-3, "requests": 4, "prompt_tokens": 15, "cached_tokens": 2,
                                              "completion_tokens": 27, "reasoning_tokens": 5}
    assert await figures("key", "k1") == {"cost_usd": 3.5e-3, "requests": 3, "prompt_tokens": 18, "cached_tokens": 2,
                                          "completion_tokens": 21, "reasoning_tokens": 5}
    assert await figures("tenant", "acme") == {"cost_usd": 4e-3, "requests": 4, "prompt_tokens": 19,
                                               "cached_tokens": 2, "completion_tokens": 23, "reasoning_tokens": 5}
    assert await figures("model", "embed") == {"requests": 1, "prompt_tokens": 7}


def test_day_span_agrees_with_day_id() -> None:
    from gateway.accounting.periods import day_span

    for moment in ("2026-12-31T23:59:59.999", "2027-01-01T00:00:00", "2024-02-29T12:00:00"):
        start, end, ident = day_span(_at(moment))
        assert ident == day_id(_at(moment)) == day_id(start) == day_id(end - 0.001) != day_id(end)
        assert start <= _at(moment) < end


def test_memory_store_integer_operations_answer_as_the_float_ones() -> None:
    """The accounting stage's in-line path uses the in-process store's millionths forms: on new, live and
    expired counters (and a refusal), each answers and counts exactly as its float form."""
    from gateway.store._common import to_units
    from gateway.store.memory import MemoryStore

    now = [1000.0]
    floats, units = MemoryStore(clock=lambda: now[0]), MemoryStore(clock=lambda: now[0])
    for step, amount in enumerate((0.25, 0.000_001_4, 2.5, 0.75, 3.0)):
        cap = to_units(3.5, "limit")
        assert floats.reserve_now("b", amount, 3.5, 30.0) == units.reserve_units_now("b", to_units(amount), cap, 3.5,
                                                                                      30.0)
        assert floats.reserve_window_now("w", amount, 3.5, 60.0) == units.reserve_window_units_now(
            "w", to_units(amount), cap, 3.5, 60.0)
        assert floats.settle_now("s", amount, 0.1, 30.0) == units.settle_units_now(
            "s", to_units(0.1) - to_units(amount), 30.0) / 1_000_000
        now[0] += 20.0 if step != 2 else 45.0  # one step past the budget's TTL and the window's end
    assert {k: e.value for k, e in floats._data.items()} == {k: e.value for k, e in units._data.items()}


def test_responses_input_and_instructions_are_counted_as_the_chat_messages_they_stand_for() -> None:
    """A Responses request is estimated like the chat it stands for: `instructions` a system message, a string
    `input` a user message, message items (string or content-part text) as chat messages, tool calls and
    outputs as the chat messages that carry them; before, a list `input` read 0 and instructions were ignored."""
    from gateway.accounting.prompt import PromptEstimator
    from gateway.translate.image_tokens import MAX_IMAGE_TOKENS as IMAGE_TOKENS  # an image of unknown size

    tokens = TokenCounter()
    tokens.load(["gpt-4o"])
    estimator = PromptEstimator(tokens)

    def chat(*messages: dict[str, object]) -> int:
        return estimator.estimate_body({"messages": list(messages)}, "gpt-4o")

    system = {"role": "system", "content": "Answer in French."}
    user = {"role": "user", "content": "hello world, how are you today?"}
    items = [{"role": "user", "content": "hello world, how are you today?"}]
    assert estimator.estimate_body({"input": items}, "gpt-4o") == chat(user) > 10
    parts = [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "hello world, how are you today?"}]}]
    assert estimator.estimate_body({"input": parts}, "gpt-4o") == chat(user)
    both = {"input": items, "instructions": "Answer in French."}
    assert estimator.estimate_body(both, "gpt-4o") == chat(system, user)
    text = {"input": "hello world, how are you today?", "instructions": "Answer in French."}
    assert estimator.estimate_body(text, "gpt-4o") == chat(system, user)
    assert estimator.estimate_body({"input": "hello world"}, "gpt-4o") == tokens.count("hello world", "gpt-4o")
    history = [*items, {"role": "assistant", "content": [{"type": "output_text", "text": "Bonjour !"}]}]
    assert estimator.estimate_body({"input": history}, "gpt-4o") == chat(
        user, {"role": "assistant", "content": "Bonjour !"})
    image = [{"role": "user", "content": [{"type": "input_text", "text": "what is this?"},
                                          {"type": "input_image", "image_url": "https://example.com/a.png"}]}]
    assert estimator.estimate_body({"input": image}, "gpt-4o") == chat(
        {"role": "user", "content": "what is this?"}) + IMAGE_TOKENS
    calls = [*items, {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny, 24 degrees"}]
    assert estimator.estimate_body({"input": calls}, "gpt-4o") == tokens.count_messages([
        {"role": "user", "content": "hello world, how are you today?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny, 24 degrees"}], "gpt-4o")
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    assert estimator.estimate_body({"input": items, "tools": tools}, "gpt-4o") > chat(user)
    template = {"prompt": {"id": "pmpt_1"}, "input": items}  # a Responses prompt template is no completion prompt
    assert estimator.estimate_body(template, "gpt-4o") == chat(user)
    # embeddings share `input`: text and token ids, as before
    assert estimator.estimate_body({"input": ["hello world", [1, 2, 3]]}, "gpt-4o") == (
        tokens.count("hello world", "gpt-4o") + 3)


@pytest.mark.parametrize(("body", "cap"), [
    ({"input": "hi", "max_output_tokens": 300}, (300, True)),  # the Responses API's own field
    ({"input": "hi"}, (4096, False)),
    ({"messages": [], "max_tokens": 20, "n": 3}, (60, True)),
    ({"messages": [], "max_completion_tokens": 20, "max_tokens": 99}, (20, True)),
    # a field the API does not honour is not trusted: the upstream would not stop at it
    ({"messages": [], "max_output_tokens": 1}, (4096, False)),
    ({"prompt": "hi", "max_output_tokens": 1}, (4096, False)),
    ({"input": "hi", "max_tokens": 1}, (4096, False)),
    ({"messages": [], "max_tokens": 10**15}, (100_000_000, True)),  # at most `MAX_TOKENS`
    ({"messages": [], "max_tokens": 10**7, "n": 128}, (100_000_000, True)),
    # a completion per prompt listed, and `best_of` completions generated (and billed) per prompt
    ({"prompt": ["a", "b", "c"], "max_tokens": 10}, (30, True)),
    ({"prompt": [[1, 2], [3]], "max_tokens": 10, "n": 2}, (40, True)),
    ({"prompt": [1, 2, 3], "max_tokens": 10}, (10, True)),  # one prompt, as token ids
    ({"prompt": "hi", "max_tokens": 10, "best_of": 5, "n": 2}, (50, True)),
    ({"prompt": ["a", "b"], "max_tokens": 10, "best_of": True}, (20, True)),
    ({"messages": [], "max_tokens": 10, "best_of": 50}, (10, True)),  # a field chat does not honour: not trusted
])
def test_completion_cap_reads_the_field_of_each_api(body: dict[str, object], cap: tuple[int, bool]) -> None:
    from gateway.accounting.outright import completion_cap

    assert completion_cap(True, body, 4096) == cap
    assert completion_cap(False, body, 4096) == (0, True)  # embeddings generate nothing


@pytest.mark.parametrize(("usage", "ok"), [
    ({"prompt_tokens": 10, "completion_tokens": 20}, True),
    ({"prompt_tokens": 0, "completion_tokens": 0}, True),
    ({"prompt_tokens": 10, "completion_tokens": -100_000}, False),
    ({"prompt_tokens": -1, "completion_tokens": 20}, False),
    ({"prompt_tokens": 10, "completion_tokens": 10**18}, False),
    ({"prompt_tokens": 100_000_001, "completion_tokens": 0}, False),
    ({"prompt_tokens": 10, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": None}}, True),
    ({"prompt_tokens": 10, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": -5}}, False),
    ({"prompt_tokens": 10, "completion_tokens": 20, "prompt_tokens_details": {"cache_write_tokens": 10**12}}, False),
    ({"prompt_tokens": 10, "completion_tokens": 20, "completion_tokens_details": {"reasoning_tokens": -1}}, False),
])
def test_only_usage_in_range_is_billed(usage: dict[str, object], ok: bool) -> None:
    import msgspec

    from gateway.accounting.settling import usable
    from gateway.schemas.openai import Usage

    assert usable(msgspec.convert(usage, Usage)) is ok


async def test_settling_gives_the_slots_back_whatever_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A settle that fails for any reason (a bug, not the store being away) still gives the concurrency slots
    back: in line (the error goes on up, after the release) and through the store's coroutines (logged)."""
    from types import SimpleNamespace
    from typing import Any

    from gateway.accounting.bill import Bill, Held
    from gateway.accounting.ledger import Ledger
    from gateway.accounting.stage import Accounting
    from gateway.policy import compile_text
    from gateway.store.memory import MemoryStore
    from gateway.telemetry.metrics import Metrics
    from gateway.telemetry.usage import CountTokens
    from tests.test_accounting import accounting_policy

    text = accounting_policy(SimpleNamespace(base_url="http://127.0.0.1:9/v1"),  # type: ignore[arg-type]
                             key="limits: {concurrent: 1}")
    policy = compile_text(text, "acct.yaml", {"MOCK_UPSTREAM_KEY": "x", "ACCT_ADMIN": "y"})
    store = MemoryStore()

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    async def broken_async(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "settle_units_now", broken)
    monkeypatch.setattr(store, "settle", broken_async)
    stage = Accounting(policy, store, Ledger(store), Metrics(), CountTokens(TokenCounter()))
    ctx: Any = SimpleNamespace(usage=None, usage_estimated=False, upstream_started=0.0, route=None, key=None,
                               target=None, cost_usd=0.0, rejected=None)
    for settle in ("in line", "through the store"):
        assert store.acquire_slot_now("slot:key:main", "first", 1, 900)[0]
        bill = Bill()
        bill.slots = (("slot:key:main", "first"),)
        bill.budgets.append(Held("budget:key:main", 0.5, 3600.0, SimpleNamespace(), None, 500_000))  # type: ignore[arg-type]
        if settle == "in line":
            with pytest.raises(RuntimeError):
                stage._settle_in_line(ctx, bill, 0.1)
        else:
            await stage._settle(ctx, bill)
        assert store.acquire_slot_now("slot:key:main", "next", 1, 900)[0], settle  # the slot was given back
        store.release_slot_now("slot:key:main", "next")


async def test_a_token_reservation_whose_window_ended_is_not_settled_into_the_next() -> None:
    """A long request reserved tokens in one window and ends in the next (the same key, a new count): its settle
    would take its reservation off the new window, which never held it, and that window would admit as much more
    than its limit. Settled only while its own window lasts."""
    import time
    from types import SimpleNamespace
    from typing import Any

    from gateway.accounting.bill import Bill, Held
    from gateway.accounting.ledger import Ledger
    from gateway.accounting.stage import Accounting
    from gateway.policy import compile_text
    from gateway.schemas.openai import Usage
    from gateway.store._common import AMOUNT_SCALE
    from gateway.store.memory import MemoryStore
    from gateway.telemetry.metrics import Metrics
    from gateway.telemetry.usage import CountTokens
    from tests.test_accounting import accounting_policy

    text = accounting_policy(SimpleNamespace(base_url="http://127.0.0.1:9/v1"),  # type: ignore[arg-type]
                             key="limits: {tpm: 1000}")
    policy = compile_text(text, "acct.yaml", {"MOCK_UPSTREAM_KEY": "x", "ACCT_ADMIN": "y"})
    store = MemoryStore()
    stage = Accounting(policy, store, Ledger(store), Metrics(), CountTokens(TokenCounter()))
    ctx: Any = SimpleNamespace(usage=Usage(40, 10, 50), usage_estimated=False, upstream_started=1.0, route=None,
                               key=None, target=None, cost_usd=0.0, rejected=None)
    window = "tpm:key:main"
    for settle in ("in line", "through the store"):
        for ended in (True, False):
            await store.delete(window)
            assert store.reserve_window_now(window, 300, 1000, 60).ok  # this window's own requests
            bill = Bill()
            until = time.monotonic() + (-1 if ended else 60)
            bill.tokens = (Held(window, 909.0, 60.0, SimpleNamespace(), None, 909 * AMOUNT_SCALE, until),)  # type: ignore[arg-type]
            if not ended:  # (its reservation is in this window, as it would be)
                assert store.reserve_window_now(window, 909, 10_000, 60).ok
            if settle == "in line":
                stage._settle_in_line(ctx, bill, 0.0)
            else:
                await stage._settle(ctx, bill)
            count = (await store.get_window(window, 60)).count / AMOUNT_SCALE
            assert count == (300 if ended else 300 + 50), (settle, ended, count)


async def test_a_slot_release_the_store_refuses_does_not_hold_back_the_others() -> None:
    """Owed releases are given back in turn; one the store refuses while it answers (a bad key) is kept for the
    next flush, and the others behind it are given back now."""
    from gateway.accounting.ledger import Ledger
    from gateway.store.base import StoreRefused
    from gateway.store.memory import MemoryStore

    class Refusing(MemoryStore):
        async def release_slot(self, key: str, holder: str) -> None:
            if key == "bad":
                raise StoreRefused("test: refused")  # (an error reply: a store that answers refused it)
            await super().release_slot(key, holder)

    store = Refusing()
    ledger = Ledger(store)
    for key in ("bad", "a", "b"):
        assert store.acquire_slot_now(key, "r1", 1, 900)[0]
        ledger.owe_release(key, "r1", 900)
    await ledger.flush()
    assert store.acquire_slot_now("a", "r2", 1, 900)[0] and store.acquire_slot_now("b", "r2", 1, 900)[0]
    assert not store.acquire_slot_now("bad", "r2", 1, 900)[0]
    assert list(ledger._releases) == [("bad", "r1")]


def test_a_cost_is_rounded_to_a_millionth_up_with_the_probability_of_its_fraction() -> None:
    from gateway.accounting.settling import micro

    assert micro(0.0) == 0 and micro(0.02) == 20_000 and micro(2.5e-6) in (2, 3)
    total = sum(micro(3e-7) for _ in range(100_000))  # 0.3 millionths each: 30,000 on average (sd 145)
    assert 29_000 < total < 31_000


def test_refused_outright_compares_budgets_in_the_stores_millionths() -> None:
    """`gateway explain` decides as the stage does: a cost within half a millionth above the budget rounds to it,
    which the store admits (whole millionths), so explain does not call it refused; one millionth more is."""
    from gateway.accounting.outright import refused_outright

    budget = BudgetSpec(usd=0.05)
    scopes = [("key", "k", None, budget)]
    assert refused_outright(scopes, 10, 0.0500004) is None
    assert refused_outright(scopes, 10, 0.050001) == ("budget", "key", "k")
