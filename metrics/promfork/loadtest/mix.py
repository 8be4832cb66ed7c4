"""The request mix, shared by promfork-load and the Locust file: what to send and what it proves.

Two mixes: the gateway's (``RequestMix``: chat completions, streams, tool calls,
client errors, unknown paths) and one of the user's own requests for any app
(``CustomMix``, from ``--request METHOD:PATH[=ROUTE][*WEIGHT]``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

CHAT = "/v1/chat/completions"
UNMATCHED = "unmatched"  # the route label the gateway gives a path it has no rule for
KINDS = ("plain", "stream", "tool", "client_error", "unmatched")
DEFAULT_MIX = {"plain": 40, "stream": 30, "tool": 10, "client_error": 10, "unmatched": 10}
_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")
CALCULATOR = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]


@dataclass(frozen=True)
class RequestSpec:
    """One request to send, and what the gateway makes of it.

    kind (for the report), method, path, body, whether it streams; `route` is the
    route label its metrics get, `status` the status the gateway answers it with and
    `model` the model it asks for (None when it never reaches a provider).
    """

    kind: str
    method: str
    path: str
    body: bytes | None
    stream: bool = False
    route: str = CHAT
    status: int = 200
    model: str | None = None
    usage: bool = True  # a gateway answer carrying OpenAI usage; False: any whole response will do


def parse_mix(text: str) -> dict[str, int]:
    """Parse 'plain=40,stream=30,...' into weights; unknown kinds and bad numbers raise ValueError."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; use: {', '.join(KINDS)}")
        try:
            weights[kind] = int(weight)
        except ValueError:
            raise ValueError(f"weight of {kind!r} must be a whole number, got {weight!r}") from None
        if weights[kind] < 0:
            raise ValueError(f"weight of {kind!r} must not be negative")
    if not sum(weights.values()):
        raise ValueError("the mix sends nothing: give at least one kind a positive weight")
    return weights


class RequestMix:
    """Deterministic stream of RequestSpec drawn by weight (same seed, same requests)."""

    def __init__(self, weights: dict[str, int] | None = None, seed: int = 1) -> None:
        self.weights = weights or DEFAULT_MIX
        self._kinds = [k for k in KINDS if self.weights.get(k)]
        self._cum = [self.weights[k] for k in self._kinds]
        self._rng = random.Random(seed)  # noqa: S311 (reproducible load, not secrets)

    def next(self) -> RequestSpec:
        """The next request to send."""
        rng = self._rng
        kind = rng.choices(self._kinds, weights=self._cum)[0]
        return build(kind, rng)


def build(kind: str, rng: random.Random) -> RequestSpec:
    """A request of `kind` with varied content."""
    model = rng.choice(("mock-small", "mock-large"))
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 40)))
    messages = [{"role": "user", "content": words}]
    if kind == "plain":
        return RequestSpec(kind, "POST", CHAT, _json({"model": model, "messages": messages}), model=model)
    if kind == "stream":
        body = _json({"model": model, "messages": messages, "stream": True})
        return RequestSpec(kind, "POST", CHAT, body, True, model=model)
    if kind == "tool":
        expression = f"{rng.randint(1, 999)} * {rng.randint(1, 999)}"
        body = {"model": model, "messages": [{"role": "user", "content": expression}], "tools": CALCULATOR}
        return RequestSpec(kind, "POST", CHAT, _json(body), model=model)
    if kind == "client_error":
        variant = rng.randrange(3)
        if variant == 0:
            return RequestSpec(kind, "POST", CHAT, b'{"model": "mock-small", "messages": [', status=400)
        if variant == 1:
            body = _json({"model": model, "messages": messages, "tempreature": 1})
            return RequestSpec(kind, "POST", CHAT, body, status=400)
        body = _json({"model": f"no-such-model-{rng.randrange(10**6)}", "messages": messages})
        return RequestSpec(kind, "POST", CHAT, body, status=404)
    return RequestSpec(kind, "GET", f"/no/such/page/{rng.randrange(10**9)}", None, route=UNMATCHED, status=404)


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


_NUMBER = "{n}"  # in a custom path: a fresh number per request


@dataclass(frozen=True)
class CustomRequest:
    """One of the user's requests: method, path (``{n}`` becomes a number), its route label, its weight."""

    method: str
    path: str
    route: str
    weight: int = 1


def parse_request(text: str) -> CustomRequest:
    """Parse ``METHOD:PATH[=ROUTE][*WEIGHT]``, e.g. ``GET:/items/{n}=/items/<item_id>*3``.

    ROUTE is the route label the app's metrics give the request (its route
    template); it may be left out for a path without ``{n}``, which is then its
    own template. Raises ValueError saying what is wrong.
    """
    spec, weight = text, 1
    if "*" in text:
        spec, _, raw = text.rpartition("*")
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{text!r}: the weight after '*' must be a positive whole number")
        weight = int(raw)
    method, colon, rest = spec.partition(":")
    if not colon or not method.isalpha() or not rest.startswith("/"):
        raise ValueError(f"{text!r}: write METHOD:PATH[=ROUTE][*WEIGHT], e.g. GET:/items/{{n}}=/items/<item_id>")
    path, route = rest, ""
    if "=" in rest:
        head, _, tail = rest.rpartition("=")
        if tail.startswith("/") or tail == UNMATCHED:
            path, route = head, tail
    if not route:
        if _NUMBER in path:
            raise ValueError(f"{text!r}: name the route template its metrics use: {method}:{path}=/the/template")
        route = path.partition("?")[0]
    return CustomRequest(method.upper(), path, route, weight)


class CustomMix:
    """Deterministic stream of the user's requests drawn by weight (same seed, same requests)."""

    def __init__(self, requests: list[CustomRequest], seed: int = 1) -> None:
        if not requests:
            raise ValueError("give at least one --request")
        self.requests = requests
        self.weights = {f"{r.method} {r.path}": r.weight for r in requests}
        self._rng = random.Random(seed)  # noqa: S311 (reproducible load, not secrets)

    def next(self) -> RequestSpec:
        """The next request to send."""
        request = self._rng.choices(self.requests, weights=[r.weight for r in self.requests])[0]
        path = request.path.replace(_NUMBER, str(self._rng.randrange(1, 10**6)))
        return RequestSpec(f"{request.method} {request.route}", request.method, path, None, route=request.route,
                           usage=False)  # fmt: skip
