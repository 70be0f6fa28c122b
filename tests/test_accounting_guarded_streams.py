"""A stream behind an output guard is billed by the upstream's chunks, not by the chunks the guard released.

When the upstream's usage does not come (the stream reset, the client left, the server ignores
`include_usage`), the gateway bills a stream by its chunk count. That count was taken after every stream stage,
so behind an output guard, which holds text back and releases it in merged chunks, a stream of 15 chunks was
billed 3 tokens, and a hard budget's cut-off, which follows the same count, came several times too late.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import openai
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_accounting import ADMIN, MESSAGES, accounting_policy, client, usage_of

GUARDED = """\
  guarded-reset: {provider: mock, model: fault-reset-after-15}
  plain-reset: {provider: mock, model: fault-reset-after-15}
  guarded-chat: {provider: mock, model: mock-model}
guards:
  models:
    guarded-reset: {deny: {kind: denylist, terms: ["project falcon"], action: redact, places: [output]}}
    guarded-chat: {deny: {kind: denylist, terms: ["project falcon"], action: redact, places: [output]}}
"""


@pytest.fixture
def start(upstream: MockUpstream) -> Iterator[Callable[..., RunningGateway]]:
    """A gateway on the accounting tests' policy, with the aliases above (each started one stopped after)."""
    started: list[RunningGateway] = []

    def make(**parts: str) -> RunningGateway:
        extra = GUARDED.replace("\n", "\n" + " " * 8)  # (the policy's template is indented: see `accounting_policy`)
        running = RunningGateway(accounting_policy(upstream, extra=extra, **parts),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ACCT_ADMIN": ADMIN}).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


def _usage(gateway: RunningGateway, scope: str, name: str) -> dict[str, object]:
    """The usage report's row, once the ledger has written it (once a second)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return usage_of(gateway, scope, name)
        except AssertionError:
            assert time.monotonic() < deadline, f"no usage for {scope} {name}"
            time.sleep(0.2)


def _streamed_words(gateway: RunningGateway, model: str) -> int:
    """The words a client got of a stream that fails mid-way (the SDK raises at its error event)."""
    text = ""
    with pytest.raises(openai.APIError):
        for chunk in client(gateway).chat.completions.create(
                model=model, messages=MESSAGES, stream=True):
            for choice in chunk.choices:
                text += choice.delta.content or ""
    return len(text.split())


def test_a_guarded_stream_without_usage_is_billed_as_an_unguarded_one(start: Callable[..., RunningGateway]) -> None:
    gateway = start(accounting="always: true")
    guarded_words = _streamed_words(gateway, "guarded-reset")
    plain_words = _streamed_words(gateway, "plain-reset")
    guarded, plain = _usage(gateway, "model", "guarded-reset"), _usage(gateway, "model", "plain-reset")
    assert 10 <= plain_words and guarded_words <= plain_words  # (the guard may hold back the last word)
    assert guarded["completion_tokens"] == plain["completion_tokens"] >= plain_words, (guarded, plain)


def test_a_hard_budget_cuts_a_guarded_stream(start: Callable[..., RunningGateway]) -> None:
    """$0.008 of budget, 5 tokens reserved a step at $0.001 a token: behind the guard the stream ran to its end,
    billed about 5 tokens. It is cut now, on the upstream's chunk that crossed the budget (the cut reads the
    upstream's chunks before the guard does), and billed for at least the text the client got."""
    gateway = start(key="budget: {usd: 0.008}", accounting="default_max_tokens: 5")
    text = ""
    with pytest.raises(openai.APIError) as caught:
        for chunk in client(gateway).chat.completions.create(model="guarded-chat", messages=MESSAGES, stream=True):
            for choice in chunk.choices:
                text += choice.delta.content or ""
    assert "budget" in str(caught.value.message)
    billed = _usage(gateway, "key", "main")
    # (the guard releases what it held at the cut: the client gets the text it is billed for)
    assert int(str(billed["completion_tokens"])) >= max(1, len(text.split())), (billed, text)
    assert float(str(billed["cost_usd"])) == pytest.approx(int(str(billed["completion_tokens"])) * 0.001)
