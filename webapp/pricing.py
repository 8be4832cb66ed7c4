"""The price table: USD per million tokens per model, read from LLM_PRICES and validated at start.

LLM_PRICES is inline JSON (it starts with ``{``) or the path of a JSON file:

    {"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60}}

``input`` and ``output`` are required; ``cached_input`` defaults to ``input``
(no cache discount). The mock models have built-in prices; the operator's table
is laid over them. A call is priced by the model the provider says answered,
else by the model asked for; a model in neither table is not priced (its tokens
are counted as unpriced, its cost is never guessed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from promfork.config import ConfigError

PER_TOKENS = 1_000_000  # prices are quoted per million tokens
FIELDS = ("input", "cached_input", "output")


@dataclass(frozen=True)
class Price:
    """USD per million tokens: prompt tokens, prompt tokens served from cache, completion tokens."""

    input: float
    cached_input: float
    output: float

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """USD for one call: uncached and cached prompt tokens and completion tokens at their prices."""
        cached = min(cached_tokens, prompt_tokens)
        return (
            (prompt_tokens - cached) * self.input + cached * self.cached_input + completion_tokens * self.output
        ) / PER_TOKENS


BUILT_IN_PRICES: dict[str, Price] = {
    "mock-small": Price(input=0.15, cached_input=0.075, output=0.60),
    "mock-large": Price(input=2.50, cached_input=1.25, output=10.00),
}

_ACCEPTED = (
    'inline JSON or a path to a JSON file, mapping model names to {"input": USD, "output": USD, '
    '"cached_input": USD (optional)} per 1M tokens, e.g. {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}'
)


def _price(model: str, entry: object) -> Price:
    if not isinstance(entry, dict):
        raise ConfigError(f"LLM_PRICES: the price of {model!r} must be an object; use {_ACCEPTED}")
    unknown = set(entry) - set(FIELDS)
    if unknown:
        raise ConfigError(f"LLM_PRICES: {model!r} has unknown field(s) {sorted(unknown)}; use {', '.join(FIELDS)}")
    values = {}
    for name in FIELDS:
        value = entry.get(name, entry.get("input") if name == "cached_input" else None)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"LLM_PRICES: {model!r} needs {name!r} as a non-negative number (USD per 1M tokens), got {value!r}"
            )
        values[name] = float(value)
    return Price(**values)


def load_prices(env: Mapping[str, str]) -> dict[str, Price]:
    """The built-in prices with LLM_PRICES laid over them; ConfigError naming LLM_PRICES when it is invalid."""
    raw = env.get("LLM_PRICES", "").strip()
    prices = dict(BUILT_IN_PRICES)
    if not raw:
        return prices
    if raw.startswith(("{", "[")):
        text, source = raw, "inline JSON"
    else:
        try:
            text, source = Path(raw).read_text(), raw
        except OSError as exc:
            raise ConfigError(f"LLM_PRICES={raw!r} cannot be read ({exc.strerror}); use {_ACCEPTED}") from None
    try:
        table = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"LLM_PRICES ({source}) is not valid JSON: {exc}; use {_ACCEPTED}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"LLM_PRICES ({source}) must be a JSON object; use {_ACCEPTED}")
    for model, entry in table.items():
        prices[str(model)] = _price(str(model), entry)
    return prices


def price_for(prices: Mapping[str, Price], response_model: str, request_model: str) -> Price | None:
    """The price of a call: by the model that answered, else the model asked for; None when unpriced."""
    return prices.get(response_model) or prices.get(request_model)
