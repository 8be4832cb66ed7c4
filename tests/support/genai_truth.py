"""Client-side truth for the GenAI metrics: what each answer told the client, summed by model and tenant.

Filled from the responses the client received (JSON bodies and SSE chunks), never
from the gateway's metrics; the tests compare the scraped totals with it.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Received:
    """What one whole answer told the client."""

    model: str  # the model asked for
    tenant: str
    prompt: int
    completion: int
    cached: int
    reasoning: int
    finish: str
    response_model: str
    content_chunks: int = 0  # streams: chunks that carried content (the mock sends one token per chunk)


def received_from(model: str, tenant: str, body: dict | None, events: list) -> Received:
    """Read a chat completion (JSON `body`) or a stream (SSE `events`, ending in [DONE])."""
    if body is not None:
        usage, choice, served, chunks = body["usage"], body["choices"][0], body["model"], 0
        finish = choice["finish_reason"]
    else:
        assert events[-1] == "[DONE]", events[-3:]
        usage, served = events[-2]["usage"], events[-2]["model"]
        deltas = [e["choices"][0] for e in events[:-2] if e["choices"]]
        finish = next(c["finish_reason"] for c in deltas if c["finish_reason"])
        chunks = sum(1 for c in deltas if c["delta"].get("content"))
    return Received(
        model,
        tenant,
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
        usage["completion_tokens_details"]["reasoning_tokens"],
        finish,
        served,
        chunks,
    )


@dataclass
class ClientTruth:
    """Every whole answer the clients received (thread-safe)."""

    answers: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, answer: Received) -> None:
        with self.lock:
            self.answers.append(answer)

    def total(self, what: str, **where: str) -> int:
        """Sum of `what` (prompt, completion, cached, reasoning) over answers matching `where`."""
        return sum(getattr(a, what) for a in self.answers if all(getattr(a, k) == v for k, v in where.items()))

    def finish_reasons(self) -> Counter[str]:
        return Counter(a.finish for a in self.answers)

    def cost(self, prices: dict[str, dict[str, float]], **where: str) -> float:
        """USD at `prices` (per 1M tokens), computed here from the usage the client received."""
        total = 0.0
        for a in self.answers:
            if all(getattr(a, k) == v for k, v in where.items()):
                price = prices[a.model]
                uncached = a.prompt - a.cached
                total += (uncached * price["input"] + a.cached * price["cached_input"]
                          + a.completion * price["output"]) / 1_000_000  # fmt: skip
        return total
