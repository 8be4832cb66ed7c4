"""What every provider returns: a completion, or a stream of text deltas ending with usage."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from webapp.schema import ApiError, ChatRequest


class ProviderError(ApiError):
    """The provider failed; status and message are what the client should see."""


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Completion:
    """A finished answer with the provider's reported token usage.

    `cached_tokens` (part of the prompt tokens) and `reasoning_tokens` (part of the
    completion tokens) are what the provider reports, 0 when it reports nothing;
    `response_model` is the model the provider says answered ("" if it did not say).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    tool_calls: tuple[ToolCall, ...] = field(default_factory=tuple)
    response_model: str = ""
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class StreamDelta:
    """One piece of a streamed answer; the last one carries usage, a finish reason and the response model."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    response_model: str = ""
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] = ()


class Provider(Protocol):
    """A source of chat completions."""

    name: str
    models: frozenset[str]

    def complete(self, request: ChatRequest, messages: list[dict]) -> Completion:
        """Answer `messages` in one piece (tool calls included)."""

    def stream(self, request: ChatRequest, messages: list[dict]) -> Iterator[StreamDelta]:
        """Answer `messages` piece by piece; the last delta carries usage."""
