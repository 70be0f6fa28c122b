"""Responses API state kept at the upstream stays with the tenant that made it (`pipeline.response_owners`).

Every tenant's requests go out under the gateway's one provider account, and OpenAI keeps each response
(`store` defaults to true) for anyone on that account who names its id. So the gateway records which tenant
each response it passed on belongs to, and refuses `previous_response_id` of any other tenant's (OpenAI's own
400 `previous_response_not_found`, never forwarded); a `conversation` (the Conversations API, which the gateway
does not serve) and an `item_reference` cannot be tied to a tenant, so they are refused under `auth: keys`.
The records live in the store: replicas on one Redis share them; with the store gone, a continuation gets 503
(never forwarded unchecked), a new response is still served.
"""

from __future__ import annotations

import textwrap
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, LIMITED_KEY, OTHER_TENANT_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


def _client(gateway: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=20)


def _on_redis(upstream: MockUpstream, url_env: str = "GW_TEST_REDIS") -> str:
    prefix = f"gwtest:{uuid.uuid4().hex}:"  # a run of its own: the mock's response ids repeat across runs
    return (policy_text(upstream.base_url)
            + f'state: {{backend: redis, url_env: {url_env}, key_prefix: "{prefix}", op_timeout_s: 0.2}}\n')


def _forwarded(upstream: MockUpstream) -> list[dict]:
    return [r.json for r in upstream.requests if r.path.endswith("/responses")]


def test_another_tenant_cannot_continue_a_response(make_gateway, upstream: MockUpstream) -> None:
    gateway = make_gateway()
    acme, globex = _client(gateway, FULL_KEY), _client(gateway, OTHER_TENANT_KEY)
    first = acme.responses.create(model="chat", input="acme's merger target is Initech, keep it secret")
    sent = len(_forwarded(upstream))
    with pytest.raises(openai.BadRequestError) as refused:
        globex.responses.create(model="chat", input="what was said before?", previous_response_id=first.id)
    error = refused.value.response.json()["error"]
    assert error == {"message": f"Previous response with id '{first.id}' not found.",
                     "type": "invalid_request_error", "param": "previous_response_id",
                     "code": "previous_response_not_found"}
    assert "acme" not in refused.value.response.text
    assert len(_forwarded(upstream)) == sent  # never reached the provider's account
    # the tenant that made it continues it, with any of its keys; the field goes on as it came
    again = acme.responses.create(model="chat", input="go on", previous_response_id=first.id)
    assert _forwarded(upstream)[-1]["previous_response_id"] == first.id
    third = _client(gateway, LIMITED_KEY).responses.create(model="chat", input="and?", previous_response_id=again.id)
    assert third.id != again.id
    # an id no one made through the gateway: the same answer
    with pytest.raises(openai.BadRequestError) as unknown:
        acme.responses.create(model="chat", input="hi", previous_response_id="resp_made_elsewhere")
    assert unknown.value.code == "previous_response_not_found"


def test_a_streamed_response_is_recorded_before_its_id_reaches_the_client(make_gateway) -> None:
    gateway = make_gateway()
    acme, globex = _client(gateway, FULL_KEY), _client(gateway, OTHER_TENANT_KEY)
    continued = None
    with acme.responses.create(model="chat", input="tell me a story", stream=True) as events:
        for event in events:
            if continued is None:  # the first event names the response: continuing it works at once
                assert event.type == "response.created"
                continued = acme.responses.create(model="chat", input="go on", previous_response_id=event.response.id)
                made = event.response.id
    assert continued is not None
    with pytest.raises(openai.BadRequestError) as refused:
        globex.responses.create(model="chat", input="what was said?", previous_response_id=made, stream=True)
    assert refused.value.code == "previous_response_not_found"
    # a streamed continuation is checked too, and its own response is recorded as the others
    with acme.responses.create(model="chat", input="more", previous_response_id=continued.id, stream=True) as events:
        last = [event for event in events][-1]
    assert last.type == "response.completed"
    acme.responses.create(model="chat", input="and more", previous_response_id=last.response.id)


def test_a_response_not_kept_is_recorded_for_no_one(make_gateway) -> None:
    gateway = make_gateway()
    acme = _client(gateway, FULL_KEY)
    unkept = acme.responses.create(model="chat", input="forget this", store=False)
    with pytest.raises(openai.BadRequestError) as refused:
        acme.responses.create(model="chat", input="what was it?", previous_response_id=unkept.id)
    assert refused.value.code == "previous_response_not_found"


def test_state_the_gateway_cannot_tie_to_a_tenant_is_refused_when_there_are_tenants(
        make_gateway, upstream: MockUpstream) -> None:
    gateway = make_gateway()
    acme = _client(gateway, FULL_KEY)
    made = acme.responses.create(model="chat", input="hello")
    sent = len(_forwarded(upstream))
    for conversation in ("conv_123", {"id": "conv_123"}):
        with pytest.raises(openai.BadRequestError) as refused:
            acme.responses.create(model="chat", input="hi", conversation=conversation)
        assert refused.value.response.json()["error"]["param"] == "conversation"
        assert refused.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as referenced:
        acme.responses.create(model="chat", input=[{"type": "item_reference", "id": "msg_mock1"}])
    assert referenced.value.response.json()["error"]["param"] == "input[0]"
    for bad in (5, {"id": made.id}, ""):
        answer = httpx.post(gateway.base_url + "/responses", headers={"Authorization": f"Bearer {FULL_KEY}"},
                            json={"model": "chat", "input": "hi", "previous_response_id": bad}, timeout=20)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "previous_response_id"
    assert len(_forwarded(upstream)) == sent
    acme.responses.create(model="chat", input="hi", conversation=None, previous_response_id=None)  # nulls: absent
    # `auth: none`: one tenant, nothing to keep apart: nothing is checked (nor recorded), all goes on as it came
    single = make_gateway(textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          mock: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: mock-model}}
        """))
    _client(single, "unused").responses.create(model="chat", input=[{"type": "item_reference", "id": "msg_mock1"}],
                                               previous_response_id="resp_made_elsewhere", conversation="conv_123")
    forwarded = _forwarded(upstream)[-1]
    assert forwarded["previous_response_id"] == "resp_made_elsewhere" and forwarded["conversation"] == "conv_123"


def test_replicas_on_one_redis_share_the_records(make_gateway, upstream: MockUpstream, redis_url: str) -> None:
    text = _on_redis(upstream)
    first, second = (make_gateway(text, {"GW_TEST_REDIS": redis_url}) for _ in range(2))
    made = _client(first, FULL_KEY).responses.create(model="chat", input="hello")
    _client(second, FULL_KEY).responses.create(model="chat", input="go on", previous_response_id=made.id)
    with pytest.raises(openai.BadRequestError) as refused:
        _client(second, OTHER_TENANT_KEY).responses.create(model="chat", input="hi", previous_response_id=made.id)
    assert refused.value.code == "previous_response_not_found"


def test_with_the_store_gone_a_continuation_waits_and_a_new_response_is_served(
        make_gateway, upstream: MockUpstream) -> None:
    with RedisServer() as redis:
        gateway = make_gateway(_on_redis(upstream), {"GW_TEST_REDIS": redis.url})
        acme, globex = _client(gateway, FULL_KEY), _client(gateway, OTHER_TENANT_KEY)
        made = acme.responses.create(model="chat", input="hello")
        redis.stop()
        sent = len(_forwarded(upstream))
        for client in (acme, globex):  # never forwarded unchecked, whoever asks
            with pytest.raises(openai.APIStatusError) as waited:
                client.responses.create(model="chat", input="go on", previous_response_id=made.id)
            assert waited.value.status_code == 503 and waited.value.code == "store_unavailable"
            assert waited.value.response.headers["retry-after"] == "1"
        assert len(_forwarded(upstream)) == sent
        during = acme.responses.create(model="chat", input="a new one")  # served; its owner could not be kept
        with acme.responses.create(model="chat", input="a streamed one", stream=True) as events:
            assert [event for event in events][-1].type == "response.completed"
        redis.start()
        deadline = time.monotonic() + 15  # the store notices the recovery within its probe back-off
        while not httpx.get(gateway.url + "/readyz", timeout=5).json()["store"]["healthy"]:
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.1)
        after = acme.responses.create(model="chat", input="back")
        acme.responses.create(model="chat", input="go on", previous_response_id=after.id)
        with pytest.raises(openai.BadRequestError) as lost:  # made while the store was gone: never recorded
            acme.responses.create(model="chat", input="go on", previous_response_id=during.id)
        assert lost.value.code == "previous_response_not_found"
        assert 'status="500"' not in gateway.metrics()


def test_with_one_tenant_nothing_is_kept_apart(make_gateway, upstream: MockUpstream) -> None:
    """Keys of one tenant: no one to keep its responses from, so nothing is checked or recorded (a continuation must
    not depend on which worker of a memory store made the response); run-time keys, each with a tenant of its own,
    make the check apply again."""
    one_tenant = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
          - {{name: second, tenant: acme, hash: "{hash_key(LIMITED_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: mock-model}}
        """)
    acme = _client(make_gateway(one_tenant), FULL_KEY)
    acme.responses.create(model="chat", input="hi", previous_response_id="resp_made_elsewhere")
    assert _forwarded(upstream)[-1]["previous_response_id"] == "resp_made_elsewhere"
    with_run_time_keys = one_tenant + "dynamic_keys: {enabled: true}\nserver: {admin_token_env: MOCK_UPSTREAM_KEY}\n"
    sent = len(_forwarded(upstream))
    with pytest.raises(openai.BadRequestError) as refused:
        _client(make_gateway(with_run_time_keys), FULL_KEY).responses.create(
            model="chat", input="hi", previous_response_id="resp_made_elsewhere")
    assert refused.value.code == "previous_response_not_found"
    assert len(_forwarded(upstream)) == sent
