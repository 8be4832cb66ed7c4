"""The trace a request belongs to: its W3C ``traceparent`` header, or OpenTelemetry's current span.

Exemplars point from a histogram bucket to one trace. This module decides
which trace that is, and nothing else:

* ``parse_traceparent`` reads a W3C Trace Context header strictly: version
  ``00``, exactly ``00-<32 lowercase hex trace id>-<16 lowercase hex span
  id>-<2 hex flags>``, neither id all zeros. Anything else (another version,
  upper case, two headers joined by a comma) is ignored, never guessed at.
* Only *sampled* traces are kept (flag bit 0 set, or an OpenTelemetry span
  whose context says sampled): an unsampled trace is not stored by the tracing
  backend, so an exemplar pointing at it would be a dead link. This is the
  ``TraceBased`` exemplar filter OpenTelemetry's SDKs use by default.
* When OpenTelemetry is in use in this process (``opentelemetry.trace`` has
  been imported, which anything creating spans does) and a valid sampled span
  is current, that span wins over the header: it is the span this process's
  own traces are recorded under. If OpenTelemetry was never imported no span
  can be current, so a request without a header costs a dictionary lookup or
  two, nothing more.

The integrations (promfork.flask, promfork.asgi) find the request's trace once,
when it enters, and bind it for the request with ``bind``/``unbind``; code
running inside the request (the gateway's own histograms) asks ``current_trace``.
Binding sets, unbinding clears (requests do not nest): a WSGI request whose
body was never closed cannot hand its trace to the next request of the thread,
because the next one clears or replaces it as it enters (``REQUEST_TRACE``).
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import NamedTuple

TRACEPARENT_HEADER = "traceparent"
_HEX = frozenset("0123456789abcdef")
_NO_TRACE = "0" * 32
_NO_SPAN = "0" * 16


class TraceContext(NamedTuple):
    """One sampled span: ids as lowercase hex, as W3C headers and tracing backends spell them."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits


# The trace bound to the request being served in this thread or task (None outside requests).
# Set it only through bind(): current_trace() reads it only once bind() has bound a trace.
REQUEST_TRACE: ContextVar[TraceContext | None] = ContextVar("promfork_request_trace", default=None)


def parse_traceparent(value: str) -> TraceContext | None:
    """The sampled trace a ``traceparent`` header value names; None when it is invalid or not sampled."""
    value = value.strip(" \t")
    if len(value) != 55 or value[2] != "-" or value[35] != "-" or value[52] != "-" or value[:2] != "00":
        return None
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:]
    if not _HEX.issuperset(trace_id) or not _HEX.issuperset(span_id) or not _HEX.issuperset(flags):
        return None
    if trace_id == _NO_TRACE or span_id == _NO_SPAN or not int(flags, 16) & 1:
        return None
    return TraceContext(trace_id, span_id)


def opentelemetry_trace(context: object | None = None) -> TraceContext | None:
    """OpenTelemetry's current span (or `context`'s), if OpenTelemetry is in use and the span is valid and sampled."""
    otel = sys.modules.get("opentelemetry.trace")
    if otel is None:
        return None
    try:
        context = otel.get_current_span(context).get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return None
        return TraceContext(format(context.trace_id, "032x"), format(context.span_id, "016x"))
    except Exception:  # an API we do not know: never fail a request over an exemplar
        return None


def request_trace(traceparent: str | None) -> TraceContext | None:
    """The trace of a request entering now: OpenTelemetry's current span, else its ``traceparent`` header."""
    if "opentelemetry.trace" in sys.modules:
        found = opentelemetry_trace()
        if found is not None:
            return found
    if traceparent is None:
        return None
    return parse_traceparent(traceparent)


# True once a request of this process has had a trace bound: until then REQUEST_TRACE holds none,
# and the request path skips reading it. Read it, never set it (bind does).
traces_seen = False


def bind(trace: TraceContext | None) -> None:
    """Make `trace` the trace of the request being served (in this thread or task); None clears it."""
    global traces_seen
    if trace is not None:
        traces_seen = True
    REQUEST_TRACE.set(trace)


def unbind() -> None:
    """The request has ended: no trace is current any more (in this thread or task)."""
    REQUEST_TRACE.set(None)


def current_trace() -> TraceContext | None:
    """The trace the code running now belongs to: OpenTelemetry's current span, else the request's."""
    if "opentelemetry.trace" in sys.modules:
        found = opentelemetry_trace()
        if found is not None:
            return found
    return REQUEST_TRACE.get() if traces_seen else None
