"""An OpenAI refusal reaches a `/v1/messages` client as its text, with `stop_reason: "refusal"`.

An OpenAI-compatible answer that refuses has `content: null` and the reason in `refusal` (streamed: `delta.refusal`
pieces). Translated for a Messages client it was an empty answer that ended its turn normally (`content: []`,
`end_turn`): the refusal's text was lost.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import anthropic
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

PROMPT = "I cannot help with that request"


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    policy = textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          refuses: {{provider: mock, model: fault-echo-refusal}}
          answers: {{provider: mock, model: fault-echo}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _sdk(gw: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=30)


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_is_the_answers_text_and_its_stop_reason(gw: RunningGateway, stream: bool) -> None:
    with _sdk(gw) as sdk:
        ask = {"model": "refuses", "max_tokens": 64, "messages": [{"role": "user", "content": PROMPT}]}
        if stream:
            with sdk.messages.stream(**ask) as events:  # type: ignore[arg-type]
                message = events.get_final_message()
        else:
            message = sdk.messages.create(**ask)  # type: ignore[arg-type]
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == PROMPT  # type: ignore[union-attr]
    assert message.stop_reason == "refusal"


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_ends_its_turn_as_before(gw: RunningGateway, stream: bool) -> None:
    with _sdk(gw) as sdk:
        ask = {"model": "answers", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}
        if stream:
            with sdk.messages.stream(**ask) as events:  # type: ignore[arg-type]
                message = events.get_final_message()
        else:
            message = sdk.messages.create(**ask)  # type: ignore[arg-type]
    assert message.stop_reason == "end_turn" and message.content[0].text == "hello there"  # type: ignore[union-attr]
