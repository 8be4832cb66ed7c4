"""LLM providers: the deterministic mock (default) and an OpenAI-compatible upstream."""

from __future__ import annotations

from webapp.providers.base import Completion, Provider, ProviderError, StreamDelta, ToolCall
from webapp.settings import GatewaySettings

__all__ = ["Completion", "Provider", "ProviderError", "StreamDelta", "ToolCall", "make_provider"]


def make_provider(settings: GatewaySettings) -> Provider:
    """The provider LLM_PROVIDER names."""
    if settings.provider == "openai":
        from webapp.providers.openai import OpenAIProvider

        return OpenAIProvider(settings)
    from webapp.providers.mock import MockProvider

    return MockProvider(latency_ms=settings.mock_latency_ms)
