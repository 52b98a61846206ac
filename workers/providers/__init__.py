"""LLM providers: the `Provider` interface, a scripted fake and an OpenAI-compatible HTTP client."""

from __future__ import annotations

from workers.providers.base import Completion, Provider
from workers.providers.fake import FakeProvider
from workers.providers.openai_compatible import DEFAULT_TIMEOUT_S, OpenAICompatibleProvider

__all__ = [
    "Completion",
    "FakeProvider",
    "OpenAICompatibleProvider",
    "Provider",
    "build_provider",
]


def build_provider(
    name: str,
    *,
    base_url: str | None,
    api_key: str | None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Provider:
    """The provider a deployment configured under `name`.

    "fake" is the offline `FakeProvider` (base_url, api_key and timeout_s are ignored); any
    other name is an `OpenAICompatibleProvider` of that name and needs a base_url.
    """
    if not name:
        raise ValueError("provider name must not be empty")
    if name == "fake":
        return FakeProvider()
    if not base_url:
        raise ValueError(
            f"provider {name!r} needs a base_url (an OpenAI-compatible endpoint such as "
            "'https://api.openai.com/v1'); only 'fake' works without one"
        )
    return OpenAICompatibleProvider(name, base_url, api_key, timeout_s=timeout_s)
