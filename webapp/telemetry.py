"""The gateway's own metrics: OpenTelemetry GenAI instruments in their Prometheus translation, and the extras.

The gateway is a GenAI client toward its provider (``gen_ai_client_*``: one
observation per provider call) and a GenAI server toward its callers
(``gen_ai_server_*``: one per chat completion request). Names, label names,
label values and buckets follow the OpenTelemetry GenAI semantic conventions as
the Collector's Prometheus exporter writes them (``gen_ai.operation.name`` ->
``gen_ai_operation_name``, ``error.type`` -> ``error_type``, unit ``s`` ->
``_seconds``). Beyond the conventions: cost in USD from the price table, cached
and reasoning tokens, finish reasons, aborted streams, tool runs and their
duration, and an optional tenant label on token usage and cost. Time to first
token and time per output token are measured on answers the provider streams; a
stream whose server-side tool rounds the gateway runs gets its answer whole and
has neither.

Label values are bounded: the provider is the configured one, a request model is
one the provider serves or ``other``, a response model is a served model or a
dated version of one (``mock-small-2025-06-01``) or ``other``, a finish reason is
one of FINISH_REASONS or ``other``, a tenant is one of the configured names (at
most METRICS_MAX_TENANTS) or ``other``. Series known in advance start at 0.

A request with a sampled trace (promfork.trace) leaves it as the exemplar of the
duration buckets it was counted in: the provider call's, and the request's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

from flask import Flask
from prometheus_client import Counter, Gauge, Histogram

from promfork.trace import current_trace
from promfork.writer.exemplars import record_trace
from promfork.writer.values import Samples
from webapp.pricing import PER_TOKENS, Price, price_for
from webapp.providers.base import Completion, StreamDelta

OPERATION = "chat"  # gen_ai.operation.name for chat completions
OTHER = "other"
NO_ERROR = ""  # error_type of a successful call: an empty label is an absent one in PromQL
# OpenTelemetry's recommended (advisory) bucket boundaries.
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16 ... 67108864
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOOL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")
TOOL_STATUSES = ("ok", "error")
RATE_LIMIT_REASONS = ("rpm",)
CANCELLED = "cancelled"  # error_type of a call given up because the client went away
MODEL_NOT_FOUND = "model_not_found"  # error_type of a request for a model the provider does not serve
TIMEOUT = "timeout"
_DATED = re.compile(r"-\d{4}-?\d{2}-?\d{2}$")  # gpt-4o-2024-08-06, mock-small-2025-06-01
MAX_BOUND = 4096  # label-set bindings kept per process (raw response models and finish reasons vary)
GEN_AI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")


class _Bound(NamedTuple):
    """What one kind of call or request updates, bound once per label set."""

    samples: Samples  # every child it updates, in one locked pass
    duration: object  # its duration histogram child (for an exemplar next to the update)
    price: Price | None = None  # a provider call's price (None: unpriced)
    request_duration: object = None  # a call bound with its request: the request's duration child


def error_type(status: int) -> str:
    """error_type of a failed provider call: ``timeout``, or the HTTP status the caller got (bounded)."""
    return TIMEOUT if status == 504 else str(status)


class LLMTelemetry:
    """Records what the gateway asks of its provider and serves its callers; a no-op when metrics are disabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.tenant_label = False
        self.prices: Mapping[str, Price] = {}
        self._children: dict[tuple, object] = {}  # (id(metric), *labels) -> child
        self._calls: dict[tuple, _Bound] = {}  # (model, response model, finish, tenant, 4 flags) -> _Bound
        self._served: dict[tuple, _Bound] = {}  # (request model, response label, error, ttft?, tpot?) -> _Bound
        self._tools: dict[tuple[str, str], Samples] = {}  # (tool, status) -> executions and duration
        self._response_labels: dict[str, str] = {}

    def _child(self, metric, *labels: str):
        # .labels() validates and builds a key on every call; the hot path reuses children.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def init_app(
        self,
        app: Flask,
        prices: Mapping[str, Price] | None = None,
        tenant_label: bool = False,
    ) -> None:
        """Create the metrics with the settings and registry the HttpMetrics extension chose.

        `prices` is the price table (USD per 1M tokens per model); `tenant_label` adds
        a ``tenant`` label to token usage and cost.
        """
        http_metrics = app.extensions["promfork"]
        self.enabled = http_metrics.settings.enabled
        self.prices = prices or {}
        self.tenant_label = tenant_label
        if not self.enabled:
            return
        name = http_metrics.settings.metric_name
        registry = http_metrics.registry
        tenant = ["tenant"] if tenant_label else []
        self.token_usage = Histogram(
            name("gen_ai_client_token_usage"),
            "Tokens per provider call, by type (input, output), as the provider reported them "
            "(OTel gen_ai.client.token.usage).",
            [*GEN_AI, "gen_ai_token_type", *tenant],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.operation_duration = Histogram(
            name("gen_ai_client_operation_duration_seconds"),
            "Provider call time, until the last token for streams; error_type set on failures "
            "(OTel gen_ai.client.operation.duration).",
            [*GEN_AI, "error_type"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            name("gen_ai_server_request_duration_seconds"),
            "Chat completion requests the gateway served, tool rounds included; error_type set on failures "
            "(OTel gen_ai.server.request.duration).",
            [*GEN_AI, "error_type"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            name("gen_ai_server_time_to_first_token_seconds"),
            "Streams: time from the request until the first content token (OTel gen_ai.server.time_to_first_token).",
            list(GEN_AI),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            name("gen_ai_server_time_per_output_token_seconds"),
            "Streams of 2 or more output tokens: time per output token after the first "
            "(OTel gen_ai.server.time_per_output_token).",
            list(GEN_AI),
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.cost = Counter(
            name("gen_ai_client_cost_usd_total"),
            "Spend in USD: the provider's reported tokens at the configured prices (LLM_PRICES). No OTel equivalent.",
            [*GEN_AI, *tenant],
            registry=registry,
        )
        self.unpriced = Counter(
            name("gen_ai_client_unpriced_tokens_total"),
            "Tokens of calls to models without a configured price (their cost is not guessed). No OTel equivalent.",
            [*GEN_AI, "gen_ai_token_type"],
            registry=registry,
        )
        self.cached = Counter(
            name("gen_ai_client_cached_input_tokens_total"),
            "Input tokens the provider served from its prompt cache (part of the input tokens). "
            "OTel attribute gen_ai.usage.cache_read.input_tokens.",
            list(GEN_AI),
            registry=registry,
        )
        self.reasoning = Counter(
            name("gen_ai_client_reasoning_tokens_total"),
            "Output tokens the model spent reasoning (part of the output tokens). "
            "OTel attribute gen_ai.usage.reasoning.output_tokens.",
            list(GEN_AI),
            registry=registry,
        )
        self.finish_reasons = Counter(
            name("gen_ai_client_finish_reasons_total"),
            "Provider calls by why the model stopped (stop, length, tool_calls, content_filter, ...). "
            "OTel attribute gen_ai.response.finish_reasons.",
            [*GEN_AI, "finish_reason"],
            registry=registry,
        )
        self.aborted = Counter(
            name("gen_ai_server_streams_aborted_total"),
            "Streams given up because the client went away before the end. No OTel equivalent.",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"],
            registry=registry,
        )
        self.streams = Gauge(
            name("llm_streams_active"),
            "Streaming responses open now, over all live workers. No OTel equivalent.",
            ["provider"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.rejected = Counter(
            name("ratelimit_rejected_total"),
            "Requests refused with 429 by the rate limit, by reason (rpm: RATE_LIMIT_RPM per client). "
            "No OTel equivalent.",
            ["reason"],
            registry=registry,
        )
        self.tools = Counter(
            name("llm_tool_executions_total"),
            "Server-side tool executions, by tool and outcome (ok, error). No OTel equivalent "
            "(gen_ai.operation.name execute_tool spans).",
            ["tool", "status"],
            registry=registry,
        )
        self.tool_duration = Histogram(
            name("llm_tool_duration_seconds"),
            "Server-side tool execution time, by tool and outcome. No OTel metric (execute_tool spans).",
            ["tool", "status"],
            buckets=TOOL_BUCKETS,
            registry=registry,
        )

    def initialise(
        self,
        provider: str,
        models: Mapping[str, str],
        tools: tuple[str, ...],
        tenants: tuple[str, ...] = (),
    ) -> None:
        """Create, at 0, the series whose labels are known before any request, so rates read 0, not nothing.

        `models` maps each served model to the response model its provider is known
        to answer with (itself when unknown); `tenants` are the tenant label values.
        """
        if not self.enabled:
            return
        for model, served in models.items():
            response = self.response_model_label(served, models)
            base = (OPERATION, provider, model, response)
            if not self.tenant_label:
                for token_type in ("input", "output"):
                    self._child(self.token_usage, *base, token_type)
            self._child(self.operation_duration, *base, NO_ERROR)
            self._child(self.operation_duration, OPERATION, provider, model, "", CANCELLED)
            self._child(self.request_duration, *base, NO_ERROR)
            self._child(self.request_duration, OPERATION, provider, model, "", CANCELLED)
            self._child(self.ttft, *base)
            self._child(self.tpot, *base)
            self._child(self.cached, *base)
            self._child(self.reasoning, *base)
            for reason in FINISH_REASONS:
                self._child(self.finish_reasons, *base, reason)
            self._child(self.aborted, OPERATION, provider, model)
            if price_for(self.prices, served, model) is None:
                for token_type in ("input", "output"):
                    self._child(self.unpriced, *base, token_type)
            elif self.tenant_label:
                for tenant in tenants:
                    self._child(self.cost, *base, tenant)
            else:
                self._child(self.cost, *base)
        self._child(self.request_duration, OPERATION, provider, OTHER, "", MODEL_NOT_FOUND)
        self._child(self.streams, provider)
        for reason in RATE_LIMIT_REASONS:
            self._child(self.rejected, reason)
        for tool in tools:
            for status in TOOL_STATUSES:
                self._child(self.tools, tool, status)
                self._child(self.tool_duration, tool, status)

    @staticmethod
    def model_label(model: str, served: frozenset[str]) -> str:
        """The model as a label value: itself if the provider serves it, else `other`."""
        return model if model in served else OTHER

    def response_model_label(self, model: str, served) -> str:
        """The response model as a label value: a served model or a dated version of one, else `other`.

        An empty one (the provider did not say) stays empty: the label is then absent in PromQL.
        """
        if not model:
            return ""
        label = self._response_labels.get(model)
        if label is None:
            label = model if model in served or _DATED.sub("", model) in served else OTHER
            if len(self._response_labels) < 1000:  # the cache is bounded by what the provider says
                self._response_labels[model] = label
        return label

    def call_succeeded(
        self,
        provider: str,
        model: str,
        answer: Completion | StreamDelta,
        tenant: str,
        seconds: float,
        served: frozenset[str],
        request_seconds: float | None = None,
        ttft: float | None = None,
        tpot: float | None = None,
    ) -> None:
        """The hot path: one successful provider call, every metric it touches in one locked pass.

        `model` is the request model's label value; `answer` (its final delta, for a
        stream) carries what the provider reported: usage, finish reason, response
        model (bounded here against `served`, the provider's models). When the call
        was the whole of a request, `request_seconds` (and for a stream `ttft` and
        `tpot`) record the request in the same pass, as ``request_served`` would.
        """
        if not self.enabled:
            return
        prompt, completion = answer.prompt_tokens or 0, answer.completion_tokens or 0
        cached, reasoning = answer.cached_tokens, answer.reasoning_tokens
        details = cached > 0 or reasoning > 0  # most calls report neither: their counters need no update
        response, finish = answer.response_model, answer.finish_reason
        key = (model, response, finish, tenant, details, request_seconds is None, ttft is None, tpot is None)
        call = self._calls.get(key)
        if call is None:
            call = self._bind_call(provider, model, response, finish, tenant, served, key)
        price = call.price
        if price is None:
            amounts = (prompt, completion, seconds, 1, prompt, completion)
        else:  # Price.cost, inlined (the hot path)
            in_cache = cached if cached <= prompt else prompt
            cost = (
                (prompt - in_cache) * price.input + in_cache * price.cached_input + completion * price.output
            ) / PER_TOKENS
            amounts = (prompt, completion, seconds, 1, cost)
        if details:
            amounts += (cached, reasoning)
        if request_seconds is not None:
            amounts += (request_seconds,) if ttft is None else (request_seconds, ttft) if tpot is None else (
                request_seconds, ttft, tpot)  # fmt: skip
        call.samples.update(*amounts)
        trace = current_trace()
        if trace is not None:  # a traced request: its exemplars on the buckets just counted
            record_trace(call.duration, (), seconds, trace)
            if request_seconds is not None:
                record_trace(call.request_duration, (), request_seconds, trace)

    def _bind_call(
        self,
        provider: str,
        model: str,
        response_model: str,
        finish_reason: str | None,
        tenant: str,
        served,
        key: tuple,
    ) -> _Bound:
        """Bind the children one kind of call updates (see ``call_succeeded``), and keep them under `key`."""
        response = self.response_model_label(response_model, served)
        finish = (finish_reason or "stop") if (finish_reason or "stop") in FINISH_REASONS else OTHER
        price = price_for(self.prices, response_model, model)
        base = (OPERATION, provider, model, response)
        tenant_labels = (tenant,) if self.tenant_label else ()
        duration = self.operation_duration.labels(*base, NO_ERROR)
        children = [
            self.token_usage.labels(*base, "input", *tenant_labels),
            self.token_usage.labels(*base, "output", *tenant_labels),
            duration,
            self.finish_reasons.labels(*base, finish),
        ]
        if price is None:
            children += [self.unpriced.labels(*base, "input"), self.unpriced.labels(*base, "output")]
        else:
            children.append(self.cost.labels(*base, *tenant_labels))
        _, _, _, _, details, no_request, no_ttft, no_tpot = key
        if details:
            children += [self.cached.labels(*base), self.reasoning.labels(*base)]
        request_duration = None
        if not no_request:
            request_duration = self.request_duration.labels(*base, NO_ERROR)
            children.append(request_duration)
            if not no_ttft:
                children.append(self.ttft.labels(*base))
                if not no_tpot:
                    children.append(self.tpot.labels(*base))
        bound = _Bound(Samples(*children), duration, price, request_duration)
        if len(self._calls) < MAX_BOUND:  # raw response models come from the provider: keep the cache bounded
            self._calls[key] = bound
        return bound

    def call_failed(self, provider: str, model: str, error: str, seconds: float) -> None:
        """A provider call failed (`error` from ``error_type``) or was given up (``cancelled``)."""
        if self.enabled:
            duration = self._child(self.operation_duration, OPERATION, provider, model, "", error)
            duration.observe(seconds)
            trace = current_trace()
            if trace is not None:
                record_trace(duration, (), seconds, trace)

    def request_served(
        self,
        provider: str,
        model: str,
        response_model: str,
        error: str,
        seconds: float,
        ttft: float | None = None,
        tpot: float | None = None,
        served: frozenset[str] = frozenset(),
    ) -> None:
        """One chat completion request ended: its duration, and for streams its TTFT and time per output token.

        `error` is NO_ERROR on success; `response_model` is "" when no provider answered.
        """
        if not self.enabled:
            return
        key = (model, response_model, error, ttft is not None, tpot is not None)
        bound = self._served.get(key)
        if bound is None:
            response = self.response_model_label(response_model, served) if response_model else ""
            base = (OPERATION, provider, model, response)
            duration = self.request_duration.labels(*base, error)
            children = [duration]
            if ttft is not None:
                children.append(self.ttft.labels(*base))
            if tpot is not None:
                children.append(self.tpot.labels(*base))
            bound = self._served[key] = _Bound(Samples(*children), duration)
        bound.samples.update(seconds, *(v for v in (ttft, tpot) if v is not None))
        trace = current_trace()
        if trace is not None:
            record_trace(bound.duration, (), seconds, trace)

    def stream_aborted(self, provider: str, model: str) -> None:
        """The client went away before its stream ended."""
        if self.enabled:
            self._child(self.aborted, OPERATION, provider, model).inc()

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

    def tool_executed(self, tool: str, status: str, seconds: float) -> None:
        """A server-side tool ran for `seconds` with outcome `status` (ok, error)."""
        if not self.enabled:
            return
        samples = self._tools.get((tool, status))
        if samples is None:
            samples = self._tools[tool, status] = Samples(
                self.tools.labels(tool, status), self.tool_duration.labels(tool, status)
            )
        samples.update(1, seconds)
