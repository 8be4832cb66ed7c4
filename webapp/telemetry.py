"""The gateway's own metrics: provider calls, tokens, time to first token, streams, tools.

Label values are bounded: `provider` is the configured provider's name, `model`
is one of the models it serves or ``other``, `tool` is a server-side tool name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask
from prometheus_client import Counter, Gauge, Histogram

from promfork.values import Samples

LLM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OTHER = "other"


class LLMTelemetry:
    """Records what the gateway asks of its provider; a no-op when metrics are disabled."""

    def __init__(self) -> None:
        self.enabled = False
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels: str):
        # .labels() validates and builds a key on every call; the hot path reuses children.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def init_app(self, app: Flask) -> None:
        """Create the metrics with the settings and registry the HttpMetrics extension chose."""
        http_metrics = app.extensions["promfork"]
        self.enabled = http_metrics.settings.enabled
        if not self.enabled:
            return
        name = http_metrics.settings.metric_name
        registry = http_metrics.registry
        self.requests = Counter(
            name("llm_provider_requests_total"),
            "Calls to the LLM provider, by outcome.",
            ["provider", "model", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            name("llm_provider_request_duration_seconds"),
            "Provider call time, until the last token for streams.",
            ["provider", "model"],
            buckets=LLM_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            name("llm_time_to_first_token_seconds"),
            "Streaming calls: time from the provider call until the first content token.",
            ["provider", "model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            name("llm_tokens_total"),
            "Tokens the provider reported in usage, by type (prompt, completion).",
            ["provider", "model", "type"],
            registry=registry,
        )
        self.streams = Gauge(
            name("llm_streams_active"),
            "Streaming responses open now, over all live workers.",
            ["provider"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.rejected = Counter(
            name("ratelimit_rejected_total"),
            "Requests refused with 429 by the rate limit, by reason (rpm: RATE_LIMIT_RPM per client).",
            ["reason"],
            registry=registry,
        )
        self.tools = Counter(
            name("llm_tool_executions_total"),
            "Server-side tool executions, by tool and outcome (ok, error).",
            ["tool", "status"],
            registry=registry,
        )

    @staticmethod
    def model_label(model: str, served: frozenset[str]) -> str:
        """The model as a label value: itself if the provider serves it, else `other`."""
        return model if model in served else OTHER

    def call_succeeded(self, provider: str, model: str, seconds: float, prompt_tokens: int, completion_tokens: int):
        """The hot path: one successful provider call with its duration and usage."""
        if not self.enabled:
            return
        samples = self._children.get((provider, model))
        if samples is None:
            samples = self._children[(provider, model)] = Samples(
                self.requests.labels(provider, model, "ok"),
                self.duration.labels(provider, model),
                self.tokens.labels(provider, model, "prompt"),
                self.tokens.labels(provider, model, "completion"),
            )
        samples.update(1, seconds, prompt_tokens, completion_tokens)

    def call_finished(self, provider: str, model: str, status: str, seconds: float | None) -> None:
        """One provider call ended with `status` (ok, error, timeout, cancelled, model_not_found)."""
        if not self.enabled:
            return
        self._child(self.requests, provider, model, status).inc()
        if seconds is not None:
            self._child(self.duration, provider, model).observe(seconds)

    def usage(self, provider: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count the tokens the provider reported."""
        if self.enabled:
            self._child(self.tokens, provider, model, "prompt").inc(prompt_tokens)
            self._child(self.tokens, provider, model, "completion").inc(completion_tokens)

    def first_token(self, provider: str, model: str, seconds: float) -> None:
        """A stream produced its first content token after `seconds`."""
        if self.enabled:
            self._child(self.ttft, provider, model).observe(seconds)

    @contextmanager
    def stream_open(self, provider: str) -> Iterator[None]:
        """Count a stream as active for as long as the block runs."""
        if not self.enabled:
            yield
            return
        gauge = self._child(self.streams, provider)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def rate_limited(self, reason: str) -> None:
        """A request was refused by the rate limit."""
        if self.enabled:
            self._child(self.rejected, reason).inc()

    def tool_executed(self, tool: str, status: str) -> None:
        """A server-side tool ran with outcome `status` (ok, error)."""
        if self.enabled:
            self._child(self.tools, tool, status).inc()
