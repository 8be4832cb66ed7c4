"""The Flask app factory: chat completions, models, health, and /metrics via the metrics extension."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from promfork.config import Settings
from promfork.flask import HttpMetrics
from webapp.gateway import Gateway
from webapp.providers import make_provider
from webapp.ratelimit import SharedRateLimiter
from webapp.schema import ApiError, parse_chat_request
from webapp.settings import DEFAULT_TENANT, GatewaySettings, load_gateway_settings
from webapp.telemetry import LLMTelemetry
from webapp.tools import SERVER_TOOLS

log = logging.getLogger("webapp")

http_metrics = HttpMetrics()
api = Blueprint("api", __name__)


def _gateway() -> Gateway:
    return current_app.extensions["gateway"]


@api.post("/v1/chat/completions")
def chat_completions():
    """OpenAI-compatible chat completions, JSON or Server-Sent Events."""
    started = time.perf_counter()
    chat = parse_chat_request(request.get_data(cache=False))
    gateway = _gateway()
    gateway.check_model(chat, started)
    tenant = g.get("tenant", DEFAULT_TENANT)
    if chat.stream:
        # promfork counts the stream when the gateway says its final chunk is next
        # (the key is absent without promfork or with metrics disabled).
        return Response(
            gateway.stream(chat, started, request.environ.get("promfork.response_complete"), tenant),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return jsonify(gateway.complete(chat, started, tenant))


@api.get("/v1/models")
def list_models():
    """The models the configured provider serves."""
    provider = _gateway().provider
    data = [{"id": m, "object": "model", "owned_by": provider.name} for m in sorted(provider.models)]
    return jsonify({"object": "list", "data": data})


@api.get("/v1/models/<model>")
def get_model(model: str):
    """One model, or a 404 in OpenAI's shape."""
    provider = _gateway().provider
    if model not in provider.models:
        raise ApiError(404, f"The model '{model[:100]}' does not exist", "model_not_found", "model")
    return jsonify({"id": model, "object": "model", "owned_by": provider.name})


@api.get("/healthz")
def healthz():
    """Liveness: the worker answers."""
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz():
    """Readiness: the metrics directory (when metrics are on) still accepts writes."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and not os.access(directory, os.W_OK):
        return jsonify({"status": "unready", "reason": f"metrics directory {directory} is not writable"}), 503
    return jsonify({"status": "ready", "provider": _gateway().provider.name})


def _guard_api() -> None:
    """API keys and the shared rate limit, for /v1/* only (never /metrics or health)."""
    if not request.path.startswith("/v1/"):
        return
    settings = current_app.extensions["gateway_settings"]
    client = request.remote_addr or "unknown"
    if settings.api_keys:
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        tenant = None
        for key, name in settings.api_keys.items():  # every key compared: no early exit to time
            if hmac.compare_digest(given.encode(), key.encode()):
                tenant = name
        if tenant is None:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
        g.tenant = tenant
        client = "key:" + hashlib.sha256(given.encode()).hexdigest()[:16]
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is not None:
        decision = limiter.check(client)
        if not decision.allowed:
            _gateway().telemetry.rate_limited("rpm")
            raise RateLimited(decision.retry_after_s, settings.rate_limit_rpm)


class RateLimited(ApiError):
    """429 in OpenAI's shape, with Retry-After."""

    def __init__(self, retry_after_s: int, rpm: int) -> None:
        super().__init__(429, f"Rate limit reached: {rpm} requests per minute", "rate_limit_exceeded", kind="requests")
        self.retry_after_s = retry_after_s


def _api_error(exc: ApiError):
    if isinstance(exc, RateLimited):
        return jsonify(exc.body()), exc.status, {"Retry-After": str(exc.retry_after_s)}
    return jsonify(exc.body()), exc.status


def _http_error(exc: HTTPException):
    code = (exc.name or "error").lower().replace(" ", "_")
    error = ApiError(exc.code or 500, exc.description or exc.name, code)
    response = jsonify(error.body())
    response.status_code = error.status
    for name, value in exc.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def _unexpected_error(exc: Exception):
    log.exception("unhandled error")
    return jsonify(ApiError(500, "internal error", "internal_error").body()), 500


def create_app(gateway_settings: GatewaySettings | None = None, metrics_settings: Settings | None = None) -> Flask:
    """Build the gateway app: provider from LLM_PROVIDER, metrics from METRICS_* (see README)."""
    gateway_settings = gateway_settings or load_gateway_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = gateway_settings.max_body_bytes
    app.json.sort_keys = False
    http_metrics.init_app(app, metrics_settings)
    telemetry = LLMTelemetry()
    telemetry.init_app(app, gateway_settings.prices, gateway_settings.tenant_label)
    provider = make_provider(gateway_settings)
    tenants = tuple(dict.fromkeys([DEFAULT_TENANT, *gateway_settings.api_keys.values()]))
    response_models = getattr(provider, "response_models", {})
    telemetry.initialise(
        provider.name, {m: response_models.get(m, m) for m in sorted(provider.models)}, tuple(SERVER_TOOLS), tenants
    )
    app.extensions["gateway"] = Gateway(provider, telemetry)
    app.extensions["gateway_settings"] = gateway_settings
    if gateway_settings.rate_limit_rpm:
        state = gateway_settings.rate_limit_state or os.path.join(
            "/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp", f"promfork-ratelimit-{os.getppid()}"
        )
        app.extensions["rate_limiter"] = SharedRateLimiter(state, gateway_settings.rate_limit_rpm)
    app.before_request(_guard_api)
    app.register_blueprint(api)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app
