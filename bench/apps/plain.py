"""The gateway's chat handler in a bare Flask app: no metrics code at all (the floor)."""

import time

from flask import Flask, Response, jsonify, request

from webapp.gateway import Gateway
from webapp.providers.mock import MockProvider
from webapp.schema import ApiError, parse_chat_request
from webapp.telemetry import LLMTelemetry


def create_app() -> Flask:
    app = Flask(__name__)
    gateway = Gateway(MockProvider(), LLMTelemetry())  # telemetry never initialised: disabled

    @app.post("/v1/chat/completions")
    def chat():
        started = time.perf_counter()
        body = parse_chat_request(request.get_data(cache=False))
        gateway.check_model(body, started)
        if body.stream:
            return Response(gateway.stream(body, started), mimetype="text/event-stream")
        return jsonify(gateway.complete(body, started))

    app.register_error_handler(ApiError, lambda e: (jsonify(e.body()), e.status))
    return app
