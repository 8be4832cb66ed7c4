"""What the client saw: one Outcome per request, and the Tally of a whole run.

The driver fills these in as responses arrive; the verdict and the report only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Outcome:
    """What the client saw for one request, and what the mix says the gateway makes of it."""

    kind: str
    method: str
    route: str  # the route label the gateway's metrics give it
    expected: int  # the status the mix expects for it
    started: float
    ended: float = 0.0
    status: int | None = None  # from the response headers; None: no response came
    complete: bool = False  # the whole, well-formed response (a stream: usage chunk, then [DONE])
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    reasoning_tokens: int = 0  # usage.completion_tokens_details.reasoning_tokens
    model: str | None = None  # the model asked for


@dataclass
class Tally:
    """Client-side truth of a run, accumulated as responses arrive."""

    outcomes: list[Outcome] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)  # when a worker was sent SIGKILL (perf_counter)
    reloads: int = 0
    scrapes: int = 0
    went_backwards: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0  # CPU time the load generator itself used while driving

    def failed(self) -> list[Outcome]:
        """Requests the client did not receive whole: refused, cut, short or malformed."""
        return [o for o in self.outcomes if not o.complete]
