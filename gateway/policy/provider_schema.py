"""Per-kind provider options, and what each provider kind expects of the common fields.

The common `ProviderSpec` fields (base URL, key variable, headers, timeouts) serve
every kind; what only one upstream API needs lives in that kind's block here
(`openai:`, `azure:`, `anthropic:`, `gemini:`). `KIND_TRAITS` is the policy side of the
provider registry: the compiler reads a kind's defaults from it, so no kind name
is compared as a string outside this table and `providers/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit

from msgspec import Meta, Struct, structs

__all__ = ["KIND_TRAITS", "AnthropicSpec", "AzureSpec", "GeminiSpec", "KindTraits", "MaxTokensField", "OpenAISpec",
           "ProviderOptions"]

EnvVarName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(?!\n)$",
                                  description="name of an environment variable")]


# The field a chat request's output cap (`max_tokens`, or `max_completion_tokens`) goes upstream in.
# `max_completion_tokens`: a request's `max_tokens` is sent as that (unless it has its own: never both), as
# OpenAI's reasoning models (o1, o3, o4-mini, gpt-5) refuse `max_tokens`; `max_tokens`: the request as it is.
MaxTokensField = Literal["max_tokens", "max_completion_tokens"]
_OPENAI_API_HOST = "api.openai.com"  # OpenAI's own API (and its regional hosts, `us.api.openai.com`)


class OpenAISpec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """OpenAI's API and OpenAI-compatible servers (vLLM, Ollama, LM Studio, ...): what a policy leaves unset is
    decided by the provider's host (`for_host`)."""

    # Unset: `max_completion_tokens` when base_url's host is OpenAI's API (it takes that field for every chat
    # model), `max_tokens` for any other (Ollama, LM Studio and older vLLM know no other).
    max_tokens_field: MaxTokensField | None = None

    def for_host(self, base_url: str) -> OpenAISpec:
        """These options with `max_tokens_field` decided, by `base_url`'s host when the policy left it unset:
        once per load, so that a request reads one attribute."""
        if self.max_tokens_field is not None:
            return self
        host = (urlsplit(base_url).hostname or "").lower()
        own = host == _OPENAI_API_HOST or host.endswith("." + _OPENAI_API_HOST)
        return structs.replace(self, max_tokens_field="max_completion_tokens" if own else "max_tokens")


class AzureSpec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Azure OpenAI: `{base_url}/openai/deployments/{deployment}/{endpoint}?api-version=...`."""

    api_version: Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?(?!\n)$",
                                     description="the `api-version` query parameter of every call")] = "2024-10-21"
    # The deployment name; unset: the target's `model` is the deployment name.
    deployment: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}(?!\n)$")] | None = None
    # An Entra ID access token (sent as `Authorization: Bearer`), instead of api_key_env's `api-key`.
    # Read once, when the policy loads: a new value takes a restart (a reload of an unchanged policy reads
    # nothing). For a token that is refreshed while the gateway runs, use entra_token_file.
    entra_token_env: EnvVarName | None = None
    # A file holding an Entra ID access token (sent as `Authorization: Bearer`; a leading `Bearer ` in the file
    # is tolerated), kept fresh by another process (a sidecar, a Vault agent, a CSI or projected volume): read
    # when the provider starts, and again whenever the file changes, without a reload. A relative path is
    # relative to the policy file that names it. At most one of api_key_env, entra_token_env, entra_token_file.
    entra_token_file: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    # How often entra_token_file's metadata (inode, mtime, size) is checked; the file is read only when it
    # changed, or while it is missing or unusable (the last good token is sent meanwhile).
    entra_token_refresh_s: Annotated[float, Meta(ge=0.1, le=300, description="seconds")] = 10.0
    # The field a chat request's output cap goes in: `max_completion_tokens` (its `max_tokens` sent as that,
    # unless it has its own) for deployments of OpenAI's reasoning models (o1, o3, o4-mini, gpt-5), which refuse
    # `max_tokens`, with an api_version that takes the field; `max_tokens`: the request as it is.
    max_tokens_field: MaxTokensField = "max_tokens"


class AnthropicSpec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Anthropic Messages API."""

    version: Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(?!\n)$")] = "2023-06-01"  # anthropic-version
    # Messages requires max_tokens; a chat request without max_tokens / max_completion_tokens gets this.
    default_max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    beta: list[Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}(?!\n)$")]] = []  # anthropic-beta values
    # A `/v1/messages` client's own `anthropic-beta` values go upstream too (after `beta`); false: only `beta`.
    forward_beta: bool = True


class GeminiSpec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Google Gemini (Generative Language API): `{base_url}/models/{model}:generateContent`."""

    # Gemini reports no tool call ids: the gateway makes them (`call_<n>`), and maps a tool
    # result back to its function by the id it gave.


ProviderOptions = OpenAISpec | AzureSpec | AnthropicSpec | GeminiSpec


@dataclass(frozen=True, slots=True)
class KindTraits:
    """What the compiler needs to know about a provider kind."""

    default_base_url: str | None  # None: the policy must give one (or, for `remote=False`, must not)
    default_key_header: str  # where api_key_env's value goes when api_key_header is not given
    options: type[ProviderOptions] | None  # the kind's own block, if it has one
    options_field: str | None  # that block's field name in ProviderSpec
    remote: bool = True  # False: answers in-process (takes no base_url, spends no credit)


KIND_TRAITS: dict[str, KindTraits] = {
    "openai": KindTraits(None, "Authorization", OpenAISpec, "openai"),
    "azure": KindTraits(None, "api-key", AzureSpec, "azure"),
    "anthropic": KindTraits("https://api.anthropic.com/v1", "x-api-key", AnthropicSpec, "anthropic"),
    "gemini": KindTraits("https://generativelanguage.googleapis.com/v1beta", "x-goog-api-key", GeminiSpec, "gemini"),
    "demo": KindTraits(None, "Authorization", None, None, remote=False),
}
