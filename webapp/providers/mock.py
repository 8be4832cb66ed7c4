"""The built-in mock provider: deterministic answers and token counts, no network, no key.

Same messages and model, same answer and the same usage, every time, in every
worker: that is what lets a load test compare token totals exactly. Like OpenAI's
API it reports the dated model that answered (``mock-small`` is answered by
``mock-small-2025-06-01``), cached prompt tokens for some prompts and reasoning
tokens for some ``mock-large`` answers, both decided by the request's content.
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
RESPONSE_MODELS = {"mock-small": "mock-small-2025-06-01", "mock-large": "mock-large-2025-06-01"}
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


def _digest(model: str, messages: list[dict]) -> bytes:
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).digest()


def cached_tokens(seed: bytes, prompt: int) -> int:
    """Prompt tokens served from the (pretend) prompt cache: half the prompt for one request in three."""
    return prompt // 2 if seed[0] % 3 == 0 else 0


def reasoning_tokens(seed: bytes, model: str, completion: int) -> int:
    """Completion tokens spent reasoning: a quarter of the answer for half of mock-large's answers."""
    return completion // 4 if model == "mock-large" and seed[1] % 2 == 0 else 0


class MockProvider:
    """Deterministic stand-in for an LLM, with optional simulated latency."""

    name = "mock"
    models = MODELS
    response_models = RESPONSE_MODELS

    def __init__(self, latency_ms: int = 0) -> None:
        self.latency_s = latency_ms / 1000.0

    def _answer(self, request: ChatRequest, messages: list[dict]) -> Completion:
        model = request.model
        prompt = prompt_tokens(messages)
        served = RESPONSE_MODELS.get(model, model)
        seed = _digest(model, messages)  # the request's content decides everything below
        cached = cached_tokens(seed, prompt)
        last = messages[-1]
        if last.get("role") == "tool":
            text = f"The result is {message_text(last)}."
        else:
            call = self._tool_call(request, last)
            if call is not None:
                return Completion("", prompt, count_tokens(call.arguments), "tool_calls", (call,), served, cached, 0)
            text = self._text(model, seed)
        finish = "stop"
        words = text.split()
        if request.max_tokens is not None and len(words) > request.max_tokens:
            words, finish = words[: request.max_tokens], "length"
        reasoning = reasoning_tokens(seed, model, len(words))
        return Completion(" ".join(words), prompt, len(words), finish, (), served, cached, reasoning)

    @staticmethod
    def _tool_call(request: ChatRequest, last: dict) -> ToolCall | None:
        """The tool call the model makes, if any: the function the client forces (or, with
        ``required``, the first it offers), else the calculator for arithmetic."""
        names = request.tool_names()
        choice = request.tool_choice
        if not names or last.get("role") != "user" or choice == "none":
            return None
        forced = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        expression = message_text(last).strip()
        if forced in names:
            name = forced
        elif "calculator" in names and (choice == "required" or _ARITHMETIC.match(expression)):
            name = "calculator"
        elif choice == "required":
            name = sorted(names)[0]
        else:
            return None
        digest = hashlib.sha256(f"{name}:{expression}".encode()).hexdigest()[:24]
        arguments = {"expression": expression} if name == "calculator" else {"query": expression}
        return ToolCall(f"call_{digest}", name, json.dumps(arguments))

    @staticmethod
    def _text(model: str, seed: bytes) -> str:
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
            response_model=answer.response_model,
            cached_tokens=answer.cached_tokens,
            reasoning_tokens=answer.reasoning_tokens,
            tool_calls=answer.tool_calls,
        )
