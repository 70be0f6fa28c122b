"""`/v1/models` for the Anthropic SDK: a request with `anthropic-version` (Anthropic's SDKs send it on every request,
OpenAI's never) gets Anthropic's Models API shape (`type`, `display_name`, `created_at`; pages with `has_more`,
`first_id`, `last_id` and `limit`, `after_id`, `before_id`) and its errors in Anthropic's envelope; the same key
sees the same aliases as in OpenAI's shape, which a request without the header still gets."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import anthropic
import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, LIMITED_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

VERSION = {"anthropic-version": "2023-06-01"}


@pytest.fixture
def running(make_gateway: Callable[..., RunningGateway], upstream: MockUpstream) -> RunningGateway:
    text = policy_text(upstream.base_url).replace("chat: {provider: mock, model: mock-model}",
                                                  'chat: {provider: mock, model: mock-model, description: "Chat"}', 1)
    return make_gateway(text)


def ant(gateway: RunningGateway, key: str = FULL_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)


def oai(gateway: RunningGateway, key: str = FULL_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


def test_the_anthropic_sdk_lists_and_pages_the_models(running: RunningGateway) -> None:
    listed = oai(running).models.list().data
    ids = [m.id for m in listed]
    assert len(ids) > 5
    first = ant(running).models.list(limit=2)
    assert [m.id for m in first.data] == ids[:2]
    assert first.has_more is True and first.first_id == ids[0] and first.last_id == ids[1]
    assert [m.id for m in ant(running).models.list(limit=2)] == ids  # the SDK follows `last_id` to the end
    assert [m.id for m in ant(running).models.list()] == ids  # 20 a page by default
    created = datetime.fromtimestamp(listed[0].created, UTC)
    for model in ant(running).models.list(limit=1000).data:
        assert model.type == "model"
        assert model.created_at == created and model.created_at.isoformat() == created.isoformat()
        assert model.display_name == model.id  # the alias: never its description (a note for the policy's readers)
    last = ant(running).models.list(after_id=ids[-2], limit=5)
    assert [m.id for m in last.data] == ids[-1:] and last.has_more is False
    before = ant(running).models.list(before_id=ids[3], limit=2)
    assert [m.id for m in before.data] == ids[1:3] and before.has_more is True
    assert before.first_id == ids[1] and before.last_id == ids[2]
    start = ant(running).models.list(before_id=ids[1], limit=5)
    assert [m.id for m in start.data] == ids[:1] and start.has_more is False
    assert [m.id for m in ant(running).models.list(before_id=ids[3], limit=1)] == ids[:3][::-1]  # pages backwards
    assert [m.id for m in ant(running).models.list(after_id=ids[-1]).data] == []


def test_the_anthropic_sdk_retrieves_a_model_and_gets_its_404(running: RunningGateway) -> None:
    model = ant(running).models.retrieve("chat")
    assert (model.type, model.id, model.display_name) == ("model", "chat", "chat")
    assert model.created_at == datetime.fromtimestamp(oai(running).models.retrieve("chat").created, UTC)
    for missing, key in (("nope", FULL_KEY), ("embed", LIMITED_KEY)):  # not there, and hidden from the key: alike
        with pytest.raises(anthropic.NotFoundError) as caught:
            ant(running, key).models.retrieve(missing)
        body = caught.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        assert body["error"] == {"type": "not_found_error",
                                 "message": f"The model `{missing}` does not exist or you do not have access to it."}
        assert caught.value.request_id == caught.value.response.headers["x-request-id"]


def test_a_key_sees_only_its_aliases_and_a_bad_request_is_anthropic_shaped(running: RunningGateway) -> None:
    page = ant(running, LIMITED_KEY).models.list()
    assert [m.id for m in page.data] == ["chat"] and page.has_more is False
    messages = []
    for cursor in ("embed", "nope"):  # a hidden alias is no cursor, as one that does not exist: the same answer
        with pytest.raises(anthropic.BadRequestError) as caught:
            ant(running, LIMITED_KEY).models.list(after_id=cursor)
        assert isinstance(caught.value.body, dict) and caught.value.body["error"]["type"] == "invalid_request_error"
        messages.append(caught.value.body["error"]["message"].replace(cursor, "?"))
    assert messages[0] == messages[1]
    for limit in (0, 1001):
        with pytest.raises(anthropic.BadRequestError):
            ant(running).models.list(limit=limit)
    with pytest.raises(anthropic.BadRequestError):
        ant(running).models.list(after_id="chat", before_id="embed")
    with pytest.raises(anthropic.AuthenticationError) as refused:
        ant(running, "gw-not-a-key").models.list()
    assert isinstance(refused.value.body, dict) and refused.value.body["error"]["type"] == "authentication_error"


def test_without_the_header_the_shape_stays_openais(running: RunningGateway) -> None:
    listed = oai(running).models.list().data
    assert listed and all(m.object == "model" and m.owned_by and m.created for m in listed)
    assert [m.id for m in oai(running, LIMITED_KEY).models.list()] == ["chat"]
    raw = httpx.get(running.base_url + "/models", headers={"authorization": f"Bearer {FULL_KEY}"}).json()
    assert set(raw) == {"object", "data"} and set(raw["data"][0]) == {"id", "object", "created", "owned_by"}
    with pytest.raises(openai.NotFoundError) as caught:
        oai(running).models.retrieve("nope")
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "model_not_found"
    with_header = httpx.get(running.base_url + "/models/chat",
                            headers={"authorization": f"Bearer {FULL_KEY}", **VERSION}).json()
    assert set(with_header) == {"type", "id", "display_name", "created_at", "lifecycle"}
