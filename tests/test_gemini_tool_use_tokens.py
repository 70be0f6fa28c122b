"""Gemini's `usageMetadata.toolUsePromptTokenCount` counts in the prompt tokens, and is billed as input.

Google reports the tokens of a built-in tool's results that the model reads back as input (URL context, code
execution, ...) apart from `promptTokenCount`, and counts them in `totalTokenCount`: "the number of tokens in the
results from tool executions, which are provided back to the model as input" (Vertex AI's `UsageMetadata`). The
gateway read only `promptTokenCount`: a request whose model used a tool was under-billed by those tokens, and its
usage did not add up to Gemini's own total. Through a real gateway, the Gemini mock's `fault-tool-use-prompt` model
(a well-behaved answer whose usage reports `TOOL_USE_PROMPT` such tokens) and the openai SDK as the client.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator

import openai
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_gemini import TOOL_USE_MODEL, TOOL_USE_PROMPT, MockGemini

GEMINI_KEY = "gemini-tool-use-tokens-key"
PROMPT = "one two three four"  # 4 prompt tokens, as the mock counts them (a word each)
PROMPT_TOKENS = 4
INPUT_USD = 0.001  # a prompt token's price; completion tokens are free here


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with MockGemini(GEMINI_KEY) as gemini:
        text = textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              gemini: {{kind: gemini, base_url: {gemini.base_url}, api_key_env: GEMINI_KEY}}
            models:
              tools:
                targets: [{{provider: gemini, model: {TOOL_USE_MODEL},
                            price: {{input_per_mtok: {INPUT_USD * 1e6:g}, output_per_mtok: 0}}}}]
            """)
        running = RunningGateway(text, {"GEMINI_KEY": GEMINI_KEY}).start()
        yield running
        running.stop()


def _client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=30)


def test_tool_use_prompt_tokens_are_prompt_tokens_and_billed_as_input(gw: RunningGateway) -> None:
    raw = _client(gw).chat.completions.with_raw_response.create(
        model="tools", messages=[{"role": "user", "content": PROMPT}])
    usage = json.loads(raw.text)["usage"]
    assert usage["prompt_tokens"] == PROMPT_TOKENS + TOOL_USE_PROMPT, usage  # was 4: the tool's 9 not counted
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]  # Gemini's total
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx((PROMPT_TOKENS + TOOL_USE_PROMPT) * INPUT_USD,
                                                                     abs=1e-6)


def test_a_streamed_answer_counts_them_too(gw: RunningGateway) -> None:
    stream = _client(gw).chat.completions.create(model="tools", messages=[{"role": "user", "content": PROMPT}],
                                                 stream=True, stream_options={"include_usage": True})
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1
    assert usages[0].prompt_tokens == PROMPT_TOKENS + TOOL_USE_PROMPT, usages[0]
    assert usages[0].total_tokens == usages[0].prompt_tokens + usages[0].completion_tokens
