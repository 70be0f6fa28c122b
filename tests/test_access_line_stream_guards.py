"""The access line of an answer an output guard blocked names the block, streamed or not.

The access log's `guards` was copied from the `x-gateway-guards` header, which for a stream leaves before any output
is read: a streamed answer an output guard ended with `content_filter` was logged as `words.block=0` (or with no
`guards` at all when every guard is on the output), while the metrics counted the block (H54). It is now read from
the request's guard session when the line is made."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from tests.conftest import FULL_KEY, policy_text

GUARDS = ("guards:\n  global:\n"
          "    words: {kind: denylist, terms: [forbidden-word], action: block}\n"  # input and output
          "    echoed: {kind: denylist, terms: [echoed-word], action: block, places: [output]}\n")


@pytest.mark.parametrize("stream", [False, True])
def test_access_line_of_an_answer_an_output_guard_blocked_names_the_block(
    make_gateway: Any, upstream: Any, caplog: pytest.LogCaptureFixture, stream: bool,
) -> None:
    running = make_gateway(policy_text(upstream.base_url, access_log="true") + GUARDS)
    body = {"model": "fault-echo", "stream": stream, "messages": [{"role": "user", "content": "say echoed-word"}]}
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        with httpx.stream("POST", f"{running.base_url}/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {FULL_KEY}"}, timeout=20) as answer:
            text = answer.read().decode()
    assert answer.status_code == 200 and "content_filter" in text and "echoed-word" not in text  # blocked
    (line,) = [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    assert line["guards"] == "echoed.block=1,words.block=0"  # (streamed, it read "words.block=0")
