"""A reasoning item sent back by id alone names a stored item: only its own tenant's goes on (`response_owners`).

Where tenants share the gateway's one provider account, OpenAI loads a reasoning input item that comes without its
`encrypted_content` (`{"type": "reasoning", "id": "rs_...", "summary": []}`) from the account's stored items, by its
id, whichever tenant's answer made it: a tenant holding another's reasoning item id would have that reasoning read
into its own request. The usual tool loop sends an answer's `output` back whole, reasoning items included, so such
items cannot all be refused: the gateway records the reasoning items of each answer it passes on under its tenant
(a whole answer's `output`; a stream's `response.output_item.added` events, before they reach the client), and
refuses, never forwarding, one named by id that it did not record for the caller's tenant. One that carries its
`encrypted_content` is self-contained, and goes on. With the store gone such an item cannot be checked: 503, as a
continuation gets.
"""

from __future__ import annotations

import textwrap
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, LIMITED_KEY, OTHER_TENANT_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url


def _policy(upstream: MockUpstream, redis: bool = False) -> str:
    text = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
          - {{name: second, tenant: acme, hash: "{hash_key(LIMITED_KEY)}"}}
          - {{name: other, tenant: globex, hash: "{hash_key(OTHER_TENANT_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: mock-model}}
          reason: {{provider: mock, model: fault-echo-reasoning}}
        """)
    if redis:  # a run of its own: the mock's item ids repeat across runs
        text += (f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "gwtest:{uuid.uuid4().hex}:", '
                 "op_timeout_s: 0.2}\n")
    return text


def _client(gateway: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=20)


def _forwarded(upstream: MockUpstream) -> list[dict]:
    return [r.json for r in upstream.requests if r.path.endswith("/responses")]


def _by_id(item_id: str, **more: Any) -> dict[str, Any]:
    """A reasoning item sent back by id, as a client that kept no more of it (or OpenAI's docs) sends it."""
    return {"type": "reasoning", "id": item_id, "summary": [], **more}


def _reasoning_id(answer: Any) -> str:
    (item,) = [item for item in answer.output if item.type == "reasoning"]
    return str(item.id)


def _refused_at(client: openai.OpenAI, items: list[Any], param: str, **more: Any) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="chat", input=items, **more)
    error = refused.value.response.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == param, error
    assert "encrypted_content" in error["message"] and "previous_response_id" in error["message"]
    assert "acme" not in refused.value.response.text


def test_only_the_tenant_whose_answer_had_a_reasoning_item_sends_it_back_by_id(
        make_gateway, upstream: MockUpstream) -> None:
    gateway = make_gateway(_policy(upstream))
    acme, globex = _client(gateway, FULL_KEY), _client(gateway, OTHER_TENANT_KEY)
    made = acme.responses.create(model="reason", input="acme plans to acquire Initech")
    item_id = _reasoning_id(made)
    # the tool loop: the answer's output sent back whole (its reasoning item with its id, no encrypted content)
    loop = [{"role": "user", "content": "acme plans to acquire Initech"},
            *(item.model_dump(exclude_none=True) for item in made.output), {"role": "user", "content": "go on"}]
    acme.responses.create(model="chat", input=loop)  # type: ignore[arg-type]
    assert _forwarded(upstream)[-1]["input"] == loop
    _client(gateway, LIMITED_KEY).responses.create(model="chat", input=[_by_id(item_id)])  # any key of the tenant
    assert _forwarded(upstream)[-1]["input"] == [_by_id(item_id)]
    sent = len(_forwarded(upstream))
    # another tenant naming it: refused, whichever way the item is written, and never forwarded
    _refused_at(globex, [{"role": "user", "content": "hi"}, _by_id(item_id)], "input[1]")
    _refused_at(globex, [_by_id(item_id, encrypted_content="")], "input[0]")
    _refused_at(globex, [_by_id(item_id, encrypted_content=None, status="completed")], "input[0]")
    _refused_at(globex, [_by_id("rs_made_elsewhere")], "input[0]")  # and one no answer through the gateway had
    _refused_at(acme, [_by_id("rs_made_elsewhere")], "input[0]")
    for bad in (5, ""):  # an id the gateway cannot have recorded
        answer = httpx.post(gateway.base_url + "/responses", headers={"Authorization": f"Bearer {FULL_KEY}"},
                            json={"model": "chat", "input": [_by_id(bad)]}, timeout=20)  # type: ignore[arg-type]
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "input[0]", answer.text
    # several checked in one read: the first not recorded named; a continuation checked with them
    _refused_at(acme, [_by_id(item_id), _by_id("rs_other"), _by_id(item_id)], "input[1]")
    _refused_at(acme, [_by_id(item_id), _by_id("rs_other")], "input[1]", previous_response_id=made.id)
    with pytest.raises(openai.BadRequestError) as continued:  # another's response and another's item: the response
        globex.responses.create(model="chat", input=[_by_id(item_id)], previous_response_id=made.id)
    assert continued.value.code == "previous_response_not_found"
    assert len(_forwarded(upstream)) == sent
    acme.responses.create(model="chat", input=[_by_id(item_id)], previous_response_id=made.id)
    # an item that carries its encrypted content is self-contained: nothing stored is read, it goes on
    sealed = [_by_id(item_id, encrypted_content="gAAAAABo-sealed")]
    globex.responses.create(model="chat", input=sealed)  # type: ignore[arg-type]
    assert _forwarded(upstream)[-1]["input"] == sealed


def test_a_streamed_answers_reasoning_item_is_recorded_before_the_client_has_it(
        make_gateway, upstream: MockUpstream) -> None:
    gateway = make_gateway(_policy(upstream))
    acme, globex = _client(gateway, FULL_KEY), _client(gateway, OTHER_TENANT_KEY)
    item_id = None
    with acme.responses.create(model="reason", input="think it over", stream=True) as events:
        for event in events:
            if event.type == "response.output_item.added" and event.item.type == "reasoning":
                item_id = event.item.id  # sent back at once, the stream not yet ended: already recorded
                acme.responses.create(model="chat", input=[_by_id(item_id)])
        assert event.type == "response.completed"
    assert item_id is not None and _forwarded(upstream)[-1]["input"] == [_by_id(item_id)]
    sent = len(_forwarded(upstream))
    _refused_at(globex, [_by_id(item_id)], "input[0]", stream=True)
    assert len(_forwarded(upstream)) == sent
    # an answer not kept at the upstream (`store: false`) records none
    with acme.responses.create(model="reason", input="forget it", stream=True, store=False) as events:
        unkept = [event.item.id for event in events if event.type == "response.output_item.done"
                  and event.item.type == "reasoning"]
    _refused_at(acme, [_by_id(unkept[0])], "input[0]")


def test_replicas_on_one_redis_share_the_reasoning_records(make_gateway, upstream: MockUpstream) -> None:
    with suite_redis_url() as url:
        text = _policy(upstream, redis=True)
        first, second = (make_gateway(text, {"GW_TEST_REDIS": url}) for _ in range(2))
        made = _client(first, FULL_KEY).responses.create(model="reason", input="hello")
        _client(second, FULL_KEY).responses.create(model="chat", input=[_by_id(_reasoning_id(made))])
        _refused_at(_client(second, OTHER_TENANT_KEY), [_by_id(_reasoning_id(made))], "input[0]")


def test_with_the_store_gone_a_reasoning_item_by_id_waits(make_gateway, upstream: MockUpstream) -> None:
    with RedisServer() as redis:
        gateway = make_gateway(_policy(upstream, redis=True), {"GW_TEST_REDIS": redis.url})
        acme, globex = _client(gateway, FULL_KEY), _client(gateway, OTHER_TENANT_KEY)
        item_id = _reasoning_id(acme.responses.create(model="reason", input="hello"))
        redis.stop()
        sent = len(_forwarded(upstream))
        for client in (acme, globex):  # never forwarded unchecked, whoever asks
            with pytest.raises(openai.APIStatusError) as waited:
                client.responses.create(model="chat", input=[_by_id(item_id)])
            assert waited.value.status_code == 503 and waited.value.code == "store_unavailable"
            assert waited.value.response.headers["retry-after"] == "1"
        assert len(_forwarded(upstream)) == sent
        globex.responses.create(model="chat", input=[_by_id(item_id, encrypted_content="gAAAAABo-sealed")])
        during = _reasoning_id(acme.responses.create(model="reason", input="a new one"))  # served, not recorded
        redis.start()
        deadline = time.monotonic() + 15  # the store notices the recovery within its probe back-off
        while not httpx.get(gateway.url + "/readyz", timeout=5).json()["store"]["healthy"]:
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.1)
        after = _reasoning_id(acme.responses.create(model="reason", input="back"))  # (the restart kept nothing)
        acme.responses.create(model="chat", input=[_by_id(after)])
        _refused_at(acme, [_by_id(during)], "input[0]")  # made while the store was gone: never recorded
        assert 'status="500"' not in gateway.metrics()
