"""The HTTP request metrics every framework integration records: their names, labels, buckets and label values.

``promfork.flask`` (WSGI) and ``promfork.asgi`` both count requests through
``HttpRecorder``, so a Flask service and a FastAPI service expose the same
series: ``http_requests_total{method,route,status}``,
``http_request_duration_seconds{method,route}``, ``http_requests_in_flight``
(livesum) and the request/response size histograms. Label values are bounded:
routes are framework templates or ``UNMATCHED``, methods outside
``KNOWN_METHODS`` become ``other``. A request with a sampled trace
(promfork.trace) also leaves its trace as the exemplar of the duration bucket
it was counted in (promfork.writer.exemplars), after its values are stored.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from promfork.config import Settings
from promfork.trace import TraceContext
from promfork.writer import exemplars
from promfork.writer.values import Samples

UNMATCHED = "unmatched"  # the route label of every path no route matched
OTHER_METHOD = "other"  # the method label of every method outside KNOWN_METHODS
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SIZE_BUCKETS = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
# The callable an app calls right before sending its final chunk (WSGI environ and ASGI scope).
RESPONSE_COMPLETE_KEY = "promfork.response_complete"


class HttpRecorder:
    """The HTTP metric objects, with each label set's children bound once for the hot path."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None) -> None:
        name = settings.metric_name
        self.requests = Counter(
            name("http_requests_total"),
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            name("http_request_duration_seconds"),
            "Time from request start until the last byte of the response body.",
            ["method", "route"],
            buckets=settings.latency_buckets,
            registry=registry,
        )
        self.in_flight = Gauge(
            name("http_requests_in_flight"),
            "Requests being served now, over all live workers.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.request_size = Histogram(
            name("http_request_size_bytes"),
            "Request body size (Content-Length).",
            ["method", "route"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.response_size = Histogram(
            name("http_response_size_bytes"),
            "Response body bytes sent.",
            ["method", "route"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.in_flight_samples = Samples(self.in_flight)
        # (method, route, status) -> its children, updated together: one dict lookup per request.
        self.bound: dict[tuple[str, str, str], Samples] = {}

    def series(self, method: str, route: str, status: str) -> Samples:
        """What counting one request updates: its counter, duration and size histograms, and in-flight.

        Bound once per label set; ``update(1, seconds, request_bytes, response_bytes, -1)``.
        """
        key = (method, route, status)
        found = self.bound.get(key)
        if found is None:
            found = self.bound[key] = Samples(
                self.requests.labels(method, route, status),
                self.duration.labels(method, route),
                self.request_size.labels(method, route),
                self.response_size.labels(method, route),
                self.in_flight,
            )
        return found

    def record_exemplar(self, method: str, route: str, seconds: float, trace: TraceContext) -> None:
        """Leave `trace` as the exemplar of the ``http_request_duration_seconds`` bucket `seconds` was counted in.

        Call it after ``series(...).update``, for requests that carry a trace only.
        """
        exemplars.record_trace(self.duration, (method, route), seconds, trace)
