"""A tenant cannot use another tenant's stored image or container through the ids it names (`response_owners`).

Where tenants share the gateway's one provider account, two more handles than a response or a reasoning item name
state the account keeps, whoever made it:

* an `image_generation_call` input item named by its `id` without its `result` (OpenAI's image-generation guide,
  multi-turn editing by image id: `{"type": "image_generation_call", "id": "ig_..."}`), which OpenAI fills in from
  the stored item of that id: another tenant's generated image;
* a container named by id: a `code_interpreter` tool's `"container": "cntr_..."` (the `container_id` of another
  tenant's `code_interpreter_call`), a `shell` tool's `environment` of type `container_reference`, or an input item
  naming one (a `code_interpreter_call`'s `container_id`, a `shell_call`'s `environment`), whose files (another
  tenant's uploads and outputs) the model's code can list and read.

So the gateway records the images and containers of each answer it passes on under its tenant (a container with
`store: false` too: OpenAI makes it all the same), before the answer or the event naming them reaches the client,
and refuses, never forwarding, one named that it did not record for the caller's tenant. An image item that carries
its `result`, and a container given as an object (a new one), go on.
"""

from __future__ import annotations

import json
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway
from tests.support.redis_server import RedisServer, suite_redis_url
from tests.support.threaded_app import ThreadedApp

KEY_A = "gw-hosted-owner-acme-00000000000000000000"
KEY_A2 = "gw-hosted-owner-acme-22222222222222222222"
KEY_B = "gw-hosted-owner-globex-111111111111111111"
AUTO = {"type": "code_interpreter", "container": {"type": "auto"}}


class _Upstream(ThreadedApp):
    """`/v1/responses`: an answer with an image generation call, a code interpreter call and a hosted shell call,
    each with ids of its own (and of this upstream's run: a Redis store may hold an earlier run's), whole or
    streamed (`response.output_item.added` / `.done` for each item); keeps every body."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.run = uuid.uuid4().hex[:8]

    def _output(self, n: int) -> list[dict[str, Any]]:
        tag = f"{self.run}_{n}"
        return [
            {"id": f"ig_{tag}", "type": "image_generation_call", "status": "completed", "result": "aGk="},
            {"id": f"ci_{tag}", "type": "code_interpreter_call", "status": "completed", "code": "print(1)",
             "container_id": f"cntr_{tag}", "outputs": []},
            {"id": f"sh_{tag}", "type": "shell_call", "status": "completed", "call_id": f"call_{tag}",
             "action": {"commands": ["ls"]},
             "environment": {"type": "container_reference", "container_id": f"cntr_sh_{tag}"}},
            {"id": f"msg_{tag}", "type": "message", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "done", "annotations": []}]},
        ]

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.bodies.append(body)
            n = len(self.bodies)
            answer: dict[str, Any] = {
                "id": f"resp_{self.run}_{n}", "object": "response", "created_at": 1, "status": "completed",
                "model": "m", "output": self._output(n), "error": None, "incomplete_details": None, "tools": [],
                "tool_choice": "auto", "parallel_tool_calls": True,
                "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}
            if not body.get("stream"):
                return web.json_response(answer)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            events: list[dict[str, Any]] = [
                {"type": "response.created", "response": {**answer, "status": "in_progress", "output": [],
                                                          "usage": None}}]
            for at, item in enumerate(answer["output"]):
                events.append({"type": "response.output_item.added", "output_index": at, "item": item})
                events.append({"type": "response.output_item.done", "output_index": at, "item": item})
            events.append({"type": "response.completed", "response": answer})
            for number, event in enumerate(events):
                event["sequence_number"] = number
                await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            await response.write_eof()
            return response

        app.router.add_post("/v1/responses", handle)


def _policy(upstream: _Upstream, prefix: str | None = None) -> str:
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: a, tenant: acme, hash: "{hash_key(KEY_A)}"}}
          - {{name: a2, tenant: acme, hash: "{hash_key(KEY_A2)}"}}
          - {{name: b, tenant: globex, hash: "{hash_key(KEY_B)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", api_key_env: UP_KEY}}
        models:
          m: {{provider: up, model: m}}
        """)
    if prefix is not None:  # a run of its own (replicas share one)
        text += (f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "gwtest:{prefix}:", '
                 "op_timeout_s: 0.2}\n")
    return text


@pytest.fixture(scope="module")
def hosted() -> Iterator[_Upstream]:
    with _Upstream() as upstream:
        yield upstream


@pytest.fixture
def start(hosted: _Upstream) -> Iterator[Any]:
    started: list[RunningGateway] = []

    def make(redis_url: str | None = None, prefix: str | None = None) -> RunningGateway:
        env = {"UP_KEY": "sk-up-hosted-owner", **({"GW_TEST_REDIS": redis_url} if redis_url else {})}
        if redis_url is not None and prefix is None:
            prefix = uuid.uuid4().hex
        running = RunningGateway(_policy(hosted, prefix), env).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def env(start: Any, hosted: _Upstream) -> tuple[RunningGateway, _Upstream]:
    return start(), hosted


def _client(gw: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20)


def _item(made: Any, kind: str) -> Any:
    return next(item for item in made.output if item.type == kind)


def _image(image_id: Any, **more: Any) -> dict[str, Any]:
    """An image sent back by id, as OpenAI's multi-turn editing guide sends it."""
    return {"type": "image_generation_call", "id": image_id, **more}


def _interpreter(container: Any) -> dict[str, Any]:
    return {"type": "code_interpreter", "container": container}


def _shell(container: str) -> dict[str, Any]:
    return {"type": "shell", "environment": {"type": "container_reference", "container_id": container}}


def _refused(client: openai.OpenAI, param: str, **request: Any) -> None:
    request.setdefault("input", "cat every file under /mnt/data")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="m", **request)
    error = refused.value.response.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == param, error
    assert "acme" not in refused.value.response.text and "globex" not in refused.value.response.text


def test_another_tenants_image_generation_call_by_id_is_not_forwarded(env: tuple[RunningGateway, _Upstream]) -> None:
    gw, upstream = env
    acme, globex = _client(gw, KEY_A), _client(gw, KEY_B)
    made = acme.responses.create(model="m", input="draw a cat", tools=[{"type": "image_generation"}])
    image_id = _item(made, "image_generation_call").id
    sent = len(upstream.bodies)
    with pytest.raises(openai.BadRequestError) as refused:
        globex.responses.create(model="m", tools=[{"type": "image_generation"}], input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Describe this image in detail"}]},
            {"type": "image_generation_call", "id": image_id},  # OpenAI loads acme's stored image for it
        ])
    assert refused.value.status_code == 400 and refused.value.response.json()["error"]["param"] == "input[1]"
    assert len(upstream.bodies) == sent, json.dumps(upstream.bodies[-1])  # never reached the upstream
    for more in ({"result": None}, {"result": "", "status": "completed"}):  # whichever way the image is left out
        _refused(globex, "input[0]", input=[_image(image_id, **more)])
    _refused(acme, "input[0]", input=[_image("ig_made_elsewhere")])  # one no answer through the gateway had
    for bad in (5, ""):  # an id the gateway cannot have recorded
        answer = httpx.post(gw.base_url + "/responses", headers={"Authorization": f"Bearer {KEY_A}"},
                            json={"model": "m", "input": [_image(bad)]}, timeout=20)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "input[0]", answer.text
    assert len(upstream.bodies) == sent
    # its own tenant's, by any key: goes on as it came
    _client(gw, KEY_A2).responses.create(model="m", input=[_image(image_id)])  # type: ignore[list-item]
    assert upstream.bodies[-1]["input"] == [_image(image_id)]
    # one that carries its image is self-contained: nothing stored is read, it goes on whoever sends it
    globex.responses.create(model="m", input=[_image(image_id, result="aGk=", status="completed")])  # type: ignore
    assert upstream.bodies[-1]["input"] == [_image(image_id, result="aGk=", status="completed")]
    # the tool loop: the answer's output sent back whole (its containers named too) goes on
    loop = [{"role": "user", "content": "draw a cat"}, *(item.model_dump(exclude_none=True) for item in made.output)]
    acme.responses.create(model="m", input=loop, tools=[AUTO])  # type: ignore[arg-type]
    assert upstream.bodies[-1]["input"] == loop


def test_another_tenants_code_interpreter_container_is_not_forwarded(env: tuple[RunningGateway, _Upstream]) -> None:
    gw, upstream = env
    acme, globex = _client(gw, KEY_A), _client(gw, KEY_B)
    made = acme.responses.create(model="m", input="analyse my upload", tools=[AUTO])
    call = _item(made, "code_interpreter_call")
    container = call.container_id
    shell_container = _item(made, "shell_call").environment.container_id
    sent = len(upstream.bodies)
    with pytest.raises(openai.BadRequestError) as refused:
        globex.responses.create(model="m", input="cat every file under /mnt/data", tools=[_interpreter(container)])
    assert refused.value.status_code == 400
    assert len(upstream.bodies) == sent, json.dumps(upstream.bodies[-1])
    _refused(globex, "tools[0].container", tools=[_interpreter(container)])
    _refused(globex, "tools[1].environment", tools=[{"type": "image_generation"}, _shell(shell_container)])
    _refused(globex, "tools[0].container", tools=[_interpreter({"type": "auto", "container_id": container})])
    _refused(acme, "tools[0].container", tools=[_interpreter("cntr_made_elsewhere")])  # (the Containers API's)
    _refused(acme, "tools[0].container", tools=[_interpreter("")])
    # an input item naming another's container (the code interpreter may run on in it) or a shell's
    _refused(globex, "input[1]", tools=[AUTO],
             input=[{"role": "user", "content": "go on"}, call.model_dump(exclude_none=True)])
    _refused(globex, "input[0]", input=[_item(made, "shell_call").model_dump(exclude_none=True)])
    # several at once: the first not the tenant's, in the request's order (input, then tools)
    _refused(acme, "tools[1].container", tools=[_interpreter(container), _interpreter("cntr_other")])
    _refused(acme, "input[0]", input=[{**call.model_dump(exclude_none=True), "container_id": "cntr_other"}],
             tools=[_interpreter("cntr_other_too")])
    assert len(upstream.bodies) == sent
    # its own tenant, by any key, names them: forwarded as they came
    _client(gw, KEY_A2).responses.create(model="m", input="again", tools=[_interpreter(container),
                                                                         _shell(shell_container)])  # type: ignore
    assert upstream.bodies[-1]["tools"] == [_interpreter(container), _shell(shell_container)]
    # a new container (an object), with files or not, and a local shell: anyone's
    fresh = [_interpreter({"type": "auto", "file_ids": ["file-abc"], "memory_limit": "4g"}),
             {"type": "shell", "environment": {"type": "container_auto"}}, {"type": "shell"}, {"type": "local_shell"}]
    globex.responses.create(model="m", input="plot this", tools=fresh)  # type: ignore[arg-type]
    assert upstream.bodies[-1]["tools"] == fresh


def test_a_streamed_answers_image_and_container_are_recorded_before_the_client_has_them(
        env: tuple[RunningGateway, _Upstream]) -> None:
    gw, upstream = env
    acme, globex = _client(gw, KEY_A), _client(gw, KEY_B)
    image_id = container = None
    with acme.responses.create(model="m", input="draw and count", tools=[AUTO], stream=True) as events:
        for event in events:  # each named again at once, the stream not yet ended: already recorded
            if event.type == "response.output_item.added" and event.item.type == "image_generation_call":
                image_id = event.item.id
                acme.responses.create(model="m", input=[_image(image_id)])  # type: ignore[list-item]
            if event.type == "response.output_item.added" and event.item.type == "code_interpreter_call":
                container = event.item.container_id
                acme.responses.create(model="m", input="go on", tools=[_interpreter(container)])
        assert event.type == "response.completed"
    assert upstream.bodies[-1]["tools"] == [_interpreter(container)] and image_id is not None
    sent = len(upstream.bodies)
    _refused(globex, "input[0]", input=[_image(image_id)], stream=True)
    _refused(globex, "tools[0].container", tools=[_interpreter(container)], stream=True)
    assert len(upstream.bodies) == sent


@pytest.mark.parametrize("stream", [False, True])
def test_with_store_false_the_container_is_recorded_and_the_image_is_not(
        env: tuple[RunningGateway, _Upstream], stream: bool) -> None:
    gw, upstream = env
    acme, globex = _client(gw, KEY_A), _client(gw, KEY_B)
    if stream:
        with acme.responses.create(model="m", input="x", tools=[AUTO], store=False, stream=True) as events:
            made = next(event.response for event in events if event.type == "response.completed")
    else:
        made = acme.responses.create(model="m", input="x", tools=[AUTO], store=False)
    container = _item(made, "code_interpreter_call").container_id  # the container outlives the answer
    acme.responses.create(model="m", input="go on", tools=[_interpreter(container)], store=False)
    assert upstream.bodies[-1]["tools"] == [_interpreter(container)]
    _refused(globex, "tools[0].container", tools=[_interpreter(container)])
    # the answer was not kept, nor its image: nothing of it to send back by id
    _refused(acme, "input[0]", input=[_image(_item(made, "image_generation_call").id)])
    with pytest.raises(openai.BadRequestError):
        acme.responses.create(model="m", input="go on", previous_response_id=made.id)


def test_replicas_on_one_redis_share_the_records_and_a_store_gone_refuses_only_what_it_must_check(
        start: Any, hosted: _Upstream) -> None:
    with suite_redis_url() as url:
        prefix = uuid.uuid4().hex
        first, second = start(url, prefix), start(url, prefix)
        made = _client(first, KEY_A).responses.create(model="m", input="hello", tools=[AUTO])
        container = _item(made, "code_interpreter_call").container_id
        image_id = _item(made, "image_generation_call").id
        _client(second, KEY_A).responses.create(model="m", input=[_image(image_id)],  # type: ignore[list-item]
                                                tools=[_interpreter(container)])
        _refused(_client(second, KEY_B), "tools[0].container", tools=[_interpreter(container)])
        _refused(_client(second, KEY_B), "input[0]", input=[_image(image_id)])
    with RedisServer() as redis:
        gw = start(redis.url)
        acme, globex = _client(gw, KEY_A), _client(gw, KEY_B)
        made = acme.responses.create(model="m", input="hello", tools=[AUTO])
        container = _item(made, "code_interpreter_call").container_id
        redis.stop()
        sent = len(hosted.bodies)
        for client in (acme, globex):  # never forwarded unchecked, whoever asks
            for request in ({"tools": [_interpreter(container)]},
                            {"input": [_image(_item(made, "image_generation_call").id)]}):
                with pytest.raises(openai.APIStatusError) as waited:
                    client.responses.create(model="m", **{"input": "go on", **request})
                assert waited.value.status_code == 503 and waited.value.code == "store_unavailable"
                assert waited.value.response.headers["retry-after"] == "1"
        assert len(hosted.bodies) == sent
        # a request that names none reads nothing: served with the store gone (a new container, an image carried)
        globex.responses.create(model="m", input=[_image("ig_x", result="aGk=", status="completed")],  # type: ignore
                                tools=[AUTO])
        during = _item(globex.responses.create(model="m", input="plot", tools=[AUTO]), "code_interpreter_call")
        redis.start()
        deadline = time.monotonic() + 15  # the store notices the recovery within its probe back-off
        while not httpx.get(gw.url + "/readyz", timeout=5).json()["store"]["healthy"]:
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.1)
        _refused(globex, "tools[0].container", tools=[_interpreter(during.container_id)])  # never recorded
        assert 'status="500"' not in gw.metrics()
