"""A lone target's paths: the stream that is not held back (one target, no retry, no context fallback, no deadline),
the shared per-target measurements it must not corrupt, a target listed by several aliases, and a lone alias's
deadline.

- A `provider/model`'s `TargetStats` are shared by every alias that lists it: streams of a lone alias stay counted in
  flight until they end (`least_busy` sends elsewhere meanwhile) and give the time to their first content, not to
  their response headers (`latency` keeps a slow target slow).
- A target's `health_check` runs whichever of its listings gives it; two listings that give different ones are refused.
- A lone alias's `deadline_s` runs until the stream's first chunk (504 `deadline_exceeded`), as a two-target alias's.

End to end: a served gateway, the suite's mock upstreams (`a`, `b`: `fault-slow-stream-<ms>` streams a chunk every
<ms> ms), and `Late`, an OpenAI-shaped upstream that answers a stream's headers at once and its first chunk later.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.policy import PolicyError, compile_text
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp
from tests.test_routing import AUTH, MESSAGES, routing_policy

Make = Callable[..., RunningGateway]
SLOW = "fault-slow-stream-100"  # 50 chunks, 0.1 s apart: about 5 s


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(autouse=True)
def _clear(upstream: MockUpstream, upstream_b: MockUpstream) -> None:
    upstream.clear()
    upstream_b.clear()


class Late(ThreadedApp):
    """An OpenAI chat upstream that streams: the response headers at once, the first chunk after the delay
    `delays` gives the request's model (seconds), then the rest at once."""

    def __init__(self, delays: dict[str, float]) -> None:
        super().__init__()
        self.delays = delays

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(self.delays[body["model"]])
        base = {"id": "chatcmpl-late", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        try:
            for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": "late"}, None),
                                  ({}, "stop")):
                chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the gateway left (its deadline): nothing to send to
            pass
        return response


def late_policy(late: Late, models: str, first_byte_s: float = 10) -> str:
    return (
        "version: 1\n"
        "server: {host: 127.0.0.1}\n"
        "auth: keys\n"
        f"keys: [{{name: full, tenant: acme, hash: \"{hash_key(FULL_KEY)}\"}}]\n"
        "providers:\n"
        f"  up: {{kind: openai, base_url: \"{late.base_url}\", api_key_env: MOCK_UPSTREAM_KEY, "
        f"timeouts: {{connect_s: 1, first_byte_s: {first_byte_s}, idle_s: 10, total_s: 30}}}}\n"
        "models:\n" + textwrap.indent(textwrap.dedent(models), "  ")
    )


def open_stream(client: httpx.Client, running: RunningGateway, model: str) -> httpx.Response:
    """A stream whose headers came (its body not read yet): close it to leave."""
    request = client.build_request("POST", running.base_url + "/chat/completions", headers=AUTH,
                                   json={"model": model, "messages": MESSAGES, "stream": True})
    return client.send(request, stream=True)


def stream_through(running: RunningGateway, model: str) -> tuple[int, str, str]:
    """The status, `x-gateway-target` and body of a whole stream."""
    with httpx.stream("POST", running.base_url + "/chat/completions", headers=AUTH, timeout=30,
                      json={"model": model, "messages": MESSAGES, "stream": True}) as response:
        body = response.read().decode()
    return response.status_code, response.headers.get("x-gateway-target", ""), body


# -- the measurements every alias shares -------------------------------------------------------------------------


def test_streams_of_a_lone_alias_stay_in_flight_for_least_busy_until_they_end(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream,
) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, f"""\
        lone: {{provider: a, model: {SLOW}}}
        balanced:
          strategy: least_busy
          targets: [{{provider: a, model: {SLOW}}}, {{provider: b, model: {SLOW}}}]
        """, timeouts="timeouts: {connect_s: 1, first_byte_s: 5, idle_s: 5, total_s: 30}"))
    with httpx.Client(timeout=30) as client:
        streams = [open_stream(client, running, "lone") for _ in range(3)]  # their headers came: under way (~5 s)
        try:
            assert [(s.status_code, s.headers["x-gateway-target"]) for s in streams] == [(200, f"a/{SLOW}")] * 3
            picked = open_stream(client, running, "balanced")
            picked.close()
            assert picked.headers["x-gateway-target"] == f"b/{SLOW}"  # a has 3 in flight, b none
        finally:
            for s in streams:
                s.close()  # the client leaves mid-stream: their end hooks take them out of flight
        deadline = time.monotonic() + 15
        while True:  # (once the gateway saw them go: at its next write)
            picked = open_stream(client, running, "balanced")
            picked.close()
            if picked.headers["x-gateway-target"] == f"a/{SLOW}":  # none in flight anywhere: the listed order
                break
            assert time.monotonic() < deadline, "the lone streams left a count behind once they ended"
            time.sleep(0.2)


def test_streams_of_a_lone_alias_time_the_first_content_for_latency_not_the_headers(make_gateway: Make) -> None:
    with Late({"slow": 1.5, "fast": 0.1}) as late:
        running = make_gateway(late_policy(late, """\
            lone: {provider: up, model: slow}
            fastest:
              strategy: latency
              explore: 0
              targets: [{provider: up, model: slow}, {provider: up, model: fast}]
            """))
        # Unmeasured targets go first (in listed order): each is measured once, then the faster one wins.
        assert [stream_through(running, "fastest")[1] for _ in range(3)] == ["up/slow", "up/fast", "up/fast"]
        done: list[tuple[int, str, str]] = []
        threads = [threading.Thread(target=lambda: done.append(stream_through(running, "lone"))) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [(status, picked) for status, picked, _ in done] == [(200, "up/slow")] * 12
        assert all('"late"' in body for _, _, body in done)
        # Twelve samples of their headers' time (milliseconds) would have made `up/slow` the fastest.
        status, picked, _ = stream_through(running, "fastest")
        assert (status, picked) == (200, "up/fast")


# -- a target listed by several aliases ----------------------------------------------------------------------------


def test_a_health_check_runs_whichever_listing_of_the_target_gives_it(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream,
) -> None:
    make_gateway(routing_policy(upstream, upstream_b, """\
        plain:
          targets: [{provider: a, model: mock-model}, {provider: b, model: mock-model}]
        checked:
          targets:
            - {provider: a, model: mock-model, health_check: {interval_s: 1, timeout_s: 1}}
            - {provider: b, model: other}
        """))
    deadline = time.monotonic() + 10
    while not [r for r in upstream.requests if r.headers.get("x-request-id") == "health-check"]:
        assert time.monotonic() < deadline, "the health check given by the second listing never ran"
        time.sleep(0.1)
    check = next(r for r in upstream.requests if r.headers.get("x-request-id") == "health-check")
    assert check.json is not None and check.json["model"] == "mock-model" and check.json["max_tokens"] == 1


def test_two_listings_of_a_target_with_different_health_checks_are_refused(
    upstream: MockUpstream, upstream_b: MockUpstream,
) -> None:
    text = routing_policy(upstream, upstream_b, """\
        one:
          targets:
            - {provider: a, model: mock-model, health_check: {interval_s: 5}}
            - {provider: b, model: mock-model}
        two:
          targets:
            - {provider: b, model: other}
            - {provider: a, model: mock-model, health_check: {interval_s: 30}}
        same:
          targets:
            - {provider: a, model: mock-model, health_check: {interval_s: 5}}
            - {provider: b, model: third}
        """)
    with pytest.raises(PolicyError) as caught:
        compile_text(text, "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    assert [(issue.path, "models.one.targets[0]" in issue.message) for issue in caught.value.issues] == [
        ("models.two.targets[1].health_check", True)]  # `same` agrees with `one`: no issue of its own
    agreeing = text.replace("interval_s: 30", "interval_s: 5")
    compile_text(agreeing, "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})


# -- a lone alias's deadline ---------------------------------------------------------------------------------------


def test_a_lone_alias_deadline_runs_until_the_streams_first_chunk(make_gateway: Make) -> None:
    with Late({"late": 4.0, "prompt": 0.5}) as late:
        running = make_gateway(late_policy(late, """\
            lone: {provider: up, model: late, deadline_s: 1}
            roomy: {provider: up, model: prompt, deadline_s: 20}
            """, first_byte_s=0.2))
        status, picked, body = stream_through(running, "lone")
        assert (status, picked) == (504, "up/late")
        assert json.loads(body)["error"]["code"] == "deadline_exceeded"
        # Within its deadline a lone target's first chunk may come after the provider's `first_byte_s` (which bounds
        # the wait for the headers, and for the first chunk only where a fallback or a retry could replace it).
        status, picked, body = stream_through(running, "roomy")
        assert (status, picked) == (200, "up/prompt")
        assert '"late"' in body and body.rstrip().endswith("data: [DONE]")
