"""Azure OpenAI (`kind: azure`): OpenAI's wire format on Azure's deployment URLs.

A request for target model `m` goes to `{base_url}/openai/deployments/{deployment or m}/{endpoint}`
with `api-version` in the query, and the key in the `api-key` header (or an
Entra ID token as `Authorization: Bearer`, see `policy.provider_schema.AzureSpec`;
a token from `azure.entra_token_file` is kept fresh by a `TokenFileRefresher`).
Bodies and streams are OpenAI's and pass through untouched, Azure's
`prompt_filter_results` and `content_filter_results` included; a response cut by
the content filter ends with `finish_reason: content_filter` as Azure sends it.
A prompt the content filter rejects (HTTP 400, code `content_filter`) is a 400
`content_policy_violation`, which routing never retries on another target.
"""

from __future__ import annotations

from urllib.parse import quote

from ..errors import ContentPolicyViolation, GatewayError
from ..policy.compiled import ProviderConfig
from ..policy.provider_schema import AzureSpec
from ..sanitize import prepare_secrets
from ..schemas.endpoints import Endpoint
from ..secret_removal import use_secrets
from ..upstream.client import ConnectionGate
from .base import Call
from .openai_compat import OpenAICompatProvider, status_error
from .token_refresh import TokenFileRefresher

__all__ = ["AzureProvider"]


_FIRST_STREAM_USAGE_VERSION = "2024-09-01"  # (compared as text: "2024-08-01-preview" comes before it)


class AzureProvider(OpenAICompatProvider):
    endpoints = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS})

    def __init__(self, config: ProviderConfig, gate: ConnectionGate) -> None:
        super().__init__(config, gate)
        options = config.options if isinstance(config.options, AzureSpec) else AzureSpec()
        self._deployment = options.deployment
        self._azure_query = {**config.query, "api-version": options.api_version}
        # API versions before 2024-09-01 refuse `stream_options` (400 "Unrecognized request argument"): the gateway
        # does not ask them for a stream's usage (it counts the text), as with `stream_usage: false`.
        self._streams_usage = options.api_version >= _FIRST_STREAM_USAGE_VERSION
        if not self._streams_usage:
            self.stream_usage_expected = False
        self._deployments: dict[tuple[str, Endpoint], str] = {}  # (deployment, endpoint) -> URL, built once
        self.token_file = None if options.entra_token_file is None else TokenFileRefresher(
            config.name, options.entra_token_file, options.entra_token_refresh_s, self._use_token,
            lambda tokens: prepare_secrets((*config.secrets, *tokens)))  # what `secrets` will be: see below

    def _asks_for_usage(self, call: Call) -> bool:
        return self._streams_usage and super()._asks_for_usage(call)

    async def start(self) -> None:
        await super().start()
        if self.token_file is not None:
            await self.token_file.start()

    async def close(self) -> None:
        if self.token_file is not None:
            await self.token_file.aclose()
            use_secrets(self, None)
        await super().close()

    def _use_token(self, token: str) -> None:
        """Send `token` from the next request on. It goes in the session's default headers, which aiohttp
        copies into every request it makes anyway: a request reads nothing more than with a fixed key."""
        assert self._session is not None, "provider not started"
        self._session.headers["Authorization"] = f"Bearer {token}"
        use_secrets(self, self.secrets())  # the set before it (built for the last rotation) goes: 1.4 MB each

    def secrets(self) -> tuple[str, ...]:
        if self.token_file is None:
            return super().secrets()
        return (*self.config.secrets, *self.token_file.secrets)  # the file's current and previous tokens

    def _url(self, call: Call) -> str:
        deployment = self._deployment or str(call.body.get("model", ""))
        key = (deployment, call.endpoint)
        url = self._deployments.get(key)
        if url is None:
            url = f"{self.config.base_url}/openai/deployments/{quote(deployment, safe='')}/{call.endpoint.path}"
            if len(self._deployments) < 1024:  # bounded: deployments come from the policy's targets
                self._deployments[key] = url
        return url

    def _params(self, call: Call) -> dict[str, str]:
        return self._azure_query

    def _map_status(self, status: int, detail: str, retry_after: float | None, code: str | None, raw: str
                    ) -> GatewayError:
        if status == 400 and code == "content_filter":
            suffix = f": {detail}" if detail else ""
            return ContentPolicyViolation(f"upstream `{self.name}`'s content filter rejected the prompt{suffix}")
        return status_error(self.name, status, detail, retry_after, code, raw)
