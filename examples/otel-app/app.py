"""A Flask service whose metrics come through the OpenTelemetry API, stored by promfork.

OpenTelemetry's Flask instrumentation records ``http.server.request.duration``
and ``http.server.active_requests``; the OpenAI instrumentation records
``gen_ai.client.token.usage`` and ``gen_ai.client.operation.duration`` around the
official openai client. Both record through ``promfork.otel.MeterProvider``, so
/metrics (served by promfork's Flask extension) adds them up over every worker,
dead ones included. ``OPENAI_BASE_URL`` names the upstream (this repository's
gateway serves a mock one: ``make run``).
"""

import os

os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")  # the stable HTTP metric names

from flask import Flask, request
from openai import OpenAI
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor
from opentelemetry.metrics import set_meter_provider

from promfork.flask import HttpMetrics
from promfork.otel import MeterProvider


def create_app() -> Flask:
    provider = MeterProvider()
    set_meter_provider(provider)
    OpenAIInstrumentor().instrument(meter_provider=provider)
    upstream = OpenAI(max_retries=0)  # OPENAI_BASE_URL, OPENAI_API_KEY from the environment

    app = Flask(__name__)
    FlaskInstrumentor().instrument_app(app, meter_provider=provider)
    HttpMetrics().init_app(app)  # after: /metrics (every OTel instrument, promfork's own) is outside OTel's

    @app.get("/hello")
    def hello():
        return {"message": "hello"}

    @app.post("/ask")
    def ask():
        question = (request.get_json(silent=True) or {}).get("question", "hello")
        answer = upstream.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": question}])
        usage = answer.usage
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}

    return app
