"""Pseudonyms are never restored into the model's reasoning.

Anthropic signs a thinking block over the text it wrote, `<EMAIL_ADDRESS_1>` included: an original written back
into it broke the signature, and a tool loop's next turn (which must send the thinking back) reached the upstream
with the original in clear (input guards do not read an assistant turn's reasoning) and was refused with a 400
blaming the client. Unsigned reasoning (`reasoning_content` on chat) comes back unread the same way.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, hash_key
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_upstream import MockUpstream

ANT_KEY = "sk-ant-test"
EMAIL = "alice.smith@corp-mail.org"
TOOLS = [{"name": "echo", "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}]
THINKING = {"type": "enabled", "budget_tokens": 1024}


def _policy(openai_url: str, ant_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          ant: {{kind: anthropic, base_url: {ant_url}, api_key_env: ANT_KEY}}
        models:
          reason: {{provider: mock, model: fault-echo-reasoning}}
          claudetool: {{provider: ant, model: fault-echo-tool}}
        guards:
          global:
            pii: {{kind: pii, engine: patterns, places: [input], action: pseudonymize}}
        """)


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[RunningGateway, MockUpstream, MockAnthropic]]:
    with MockUpstream(api_key=UPSTREAM_KEY) as up, MockAnthropic(api_key=ANT_KEY) as ant:
        gateway = RunningGateway(_policy(up.base_url, ant.base_url),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANT_KEY": ANT_KEY}).start()
        try:
            yield gateway, up, ant
        finally:
            gateway.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_signed_thinking_keeps_its_placeholders_through_a_tool_loop(env, stream: bool) -> None:
    gateway, _, ant = env
    client = anthropic.Anthropic(base_url=gateway.url, api_key=FULL_KEY, max_retries=0)
    kw = dict(model="claudetool", max_tokens=2048, tools=TOOLS, thinking=THINKING)
    messages: list[dict] = [{"role": "user", "content": f"please mail {EMAIL} today"}]
    if stream:
        with client.messages.stream(messages=messages, **kw) as events:
            first = events.get_final_message()
    else:
        first = client.messages.create(messages=messages, **kw)
    assert EMAIL not in ant.requests[-1].body.decode()
    thinking = [block for block in first.content if block.type == "thinking"]
    assert thinking and all("<EMAIL_ADDRESS_1>" in block.thinking and EMAIL not in block.thinking
                            for block in thinking)
    tool = next(block for block in first.content if block.type == "tool_use")
    messages += [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True, exclude={"caller", "citations"})
                                          for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "sent"}]},
    ]
    second = client.messages.create(messages=messages, **kw)  # refused with a 400 when the signature broke
    assert second.stop_reason is not None
    sent = ant.requests[-1].body.decode()
    assert EMAIL not in sent
    assert any(block.get("type") == "thinking" for message in json.loads(sent)["messages"]
               if isinstance(message["content"], list) for block in message["content"])


@pytest.mark.parametrize("stream", [False, True])
def test_unsigned_reasoning_keeps_its_placeholders(env, stream: bool) -> None:
    gateway, up, _ = env
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=FULL_KEY, max_retries=0)
    messages: list[dict] = [{"role": "user", "content": f"please mail {EMAIL} today"}]
    if stream:
        reasoning = "".join(getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
                            for chunk in client.chat.completions.create(model="reason", messages=messages,
                                                                        stream=True) if chunk.choices)
    else:
        answer = client.chat.completions.create(model="reason", messages=messages)
        reasoning = getattr(answer.choices[0].message, "reasoning_content", None) or ""
    assert "<EMAIL_ADDRESS_1>" in reasoning and EMAIL not in reasoning
    # sent back in the history, where the input guards do not read it: nothing of the original goes upstream
    messages += [{"role": "assistant", "content": "ok", "reasoning_content": reasoning},
                 {"role": "user", "content": "thanks"}]
    client.chat.completions.create(model="reason", messages=messages)
    assert EMAIL not in up.requests[-1].body.decode()
