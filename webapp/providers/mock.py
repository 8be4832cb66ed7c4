"""The built-in mock provider: deterministic answers and token counts, no network, no key.

Same messages and model, same answer and the same usage, every time, in every
worker: that is what lets a load test compare token totals exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator

from webapp.providers.base import Completion, StreamDelta, ToolCall
from webapp.schema import ChatRequest, message_text

MODELS = frozenset({"mock-small", "mock-large"})
_WORDS = (
    "metrics", "gunicorn", "worker", "counter", "histogram", "scrape", "prometheus", "latency",
    "token", "stream", "gateway", "exact", "bounded", "cheap", "proven", "archive", "label",
    "series", "bucket", "gauge", "process", "signal", "request", "response",
)  # fmt: skip
_ARITHMETIC = re.compile(r"^[\d\s+\-*/().%]*\d[\d\s+\-*/().%]*[+\-*/%][\d\s+\-*/().%]*$")


def count_tokens(text: str) -> int:
    """The mock's tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def prompt_tokens(messages: list[dict]) -> int:
    """Prompt usage: the words of every message plus a fixed overhead per message."""
    return 3 + sum(4 + count_tokens(message_text(m)) for m in messages)


class MockProvider:
    """Deterministic stand-in for an LLM, with optional simulated latency."""

    name = "mock"
    models = MODELS

    def __init__(self, latency_ms: int = 0) -> None:
        self.latency_s = latency_ms / 1000.0

    def _answer(self, request: ChatRequest, messages: list[dict]) -> Completion:
        last = messages[-1]
        if last.get("role") == "tool":
            text = f"The result is {message_text(last)}."
        else:
            call = self._tool_call(request, last)
            if call is not None:
                return Completion("", prompt_tokens(messages), count_tokens(call.arguments), "tool_calls", (call,))
            text = self._text(request.model, messages)
        finish = "stop"
        words = text.split()
        if request.max_tokens is not None and len(words) > request.max_tokens:
            words, finish = words[: request.max_tokens], "length"
        return Completion(" ".join(words), prompt_tokens(messages), len(words), finish)

    @staticmethod
    def _tool_call(request: ChatRequest, last: dict) -> ToolCall | None:
        if "calculator" not in request.tool_names() or last.get("role") != "user":
            return None
        choice = request.tool_choice
        forced = isinstance(choice, dict) and choice.get("function", {}).get("name") == "calculator"
        expression = message_text(last).strip()
        if choice == "none" or not (forced or choice == "required" or _ARITHMETIC.match(expression)):
            return None
        digest = hashlib.sha256(expression.encode()).hexdigest()[:24]
        return ToolCall(f"call_{digest}", "calculator", json.dumps({"expression": expression}))

    @staticmethod
    def _text(model: str, messages: list[dict]) -> str:
        seed = hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).digest()
        length = (8 if model == "mock-small" else 24) + seed[0] % 16
        return " ".join(_WORDS[seed[(i % 31) + 1] % len(_WORDS)] for i in range(length))

    def complete(self, request: ChatRequest, messages: list[dict]) -> Completion:
        """Answer in one piece after the simulated latency."""
        if self.latency_s:
            time.sleep(self.latency_s)
        return self._answer(request, messages)

    def stream(self, request: ChatRequest, messages: list[dict]) -> Iterator[StreamDelta]:
        """Answer word by word; the simulated latency comes before the first word."""
        answer = self._answer(request, messages)
        if self.latency_s:
            time.sleep(self.latency_s)
        words = answer.text.split(" ") if answer.text else []
        for i, word in enumerate(words):
            yield StreamDelta(text=word if i == 0 else " " + word)
        yield StreamDelta(
            finish_reason=answer.finish_reason,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
        )
