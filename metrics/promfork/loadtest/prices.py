"""What the load tester expects a request to cost: USD per million tokens per model, as the gateway is configured.

The mock models' prices are the gateway's built-in ones, stated here again on
purpose: the verdict checks the gateway's cost arithmetic against its own.
LLM_PRICES, when set in promfork-load's environment, is read as the gateway
reads it (inline JSON, or a JSON file's path) and laid over them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

MOCK_PRICES: dict[str, dict[str, float]] = {
    "mock-small": {"input": 0.15, "cached_input": 0.075, "output": 0.60},
    "mock-large": {"input": 2.50, "cached_input": 1.25, "output": 10.00},
}


def configured_prices(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """The mock prices with LLM_PRICES (if set) laid over them."""
    raw = (os.environ if environ is None else environ).get("LLM_PRICES", "").strip()
    prices = dict(MOCK_PRICES)
    if raw:
        table = json.loads(raw if raw.startswith("{") else Path(raw).read_text())
        for model, entry in table.items():
            prices[model] = {**entry, "cached_input": entry.get("cached_input", entry["input"])}
    return prices


def request_cost(prices: Mapping[str, Mapping[str, float]], model: str | None, prompt: int, cached: int,
                 completion: int) -> float:  # fmt: skip
    """USD for a request's usage at `model`'s prices; 0 for a model without a price (the gateway does not guess)."""
    price = prices.get(model or "")
    if price is None:
        return 0.0
    return ((prompt - cached) * price["input"] + cached * price["cached_input"] + completion * price["output"]) / 1e6
