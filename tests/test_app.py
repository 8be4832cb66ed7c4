"""The gateway's HTTP behaviour, in process (Flask test client, in-memory metrics)."""

from __future__ import annotations

import json

import pytest
from flask import Flask, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import EnvironBuilder

from promfork.config import Settings
from promfork.flask import HttpMetrics
from webapp.app import create_app
from webapp.settings import GatewaySettings

USER = [{"role": "user", "content": "hello there gateway"}]


@pytest.fixture
def app():
    return create_app(GatewaySettings(), Settings())


@pytest.fixture
def client(app):
    return app.test_client()


def metric(app, name: str, **labels) -> float:
    return app.extensions["promfork"].registry.get_sample_value(name, labels) or 0.0


def genai(model: str) -> dict[str, str]:
    """The GenAI labels of a successful call to the mock for `model`."""
    return {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "mock",
        "gen_ai_request_model": model,
        "gen_ai_response_model": f"{model}-2025-06-01",
    }


def post(client, body, **kwargs):
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return client.post("/v1/chat/completions", data=data, content_type="application/json", **kwargs)


def sse_events(response) -> list:
    return [
        b[6:] if b[6:] == "[DONE]" else json.loads(b[6:])
        for b in response.get_data(as_text=True).split("\n\n")
        if b.startswith("data: ")
    ]


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"", "invalid_json", "empty"),
        (b"[1, 2]", "invalid_json", "JSON object"),
        ({"model": "mock-small", "messages": USER, "frobnicate": 1}, "unknown_parameter", "frobnicate"),
        ({"messages": USER}, "missing_required_parameter", "model"),
        ({"model": "mock-small"}, "invalid_value", "messages"),
        ({"model": "mock-small", "messages": [{"role": "wizard", "content": "x"}]}, "invalid_value", "role"),
        ({"model": "mock-small", "messages": USER, "temperature": 7}, "invalid_value", "temperature"),
        ({"model": "mock-small", "messages": USER, "stream": "yes"}, "invalid_value", "stream"),
        ({"model": "mock-small", "messages": USER, "max_tokens": 0}, "invalid_value", "max_tokens"),
        ({"model": "mock-small", "messages": USER, "tools": [{"type": "function"}]}, "invalid_value", "tools[0]"),
    ],
)
def test_malformed_requests_get_a_400_naming_the_problem(client, body, code, mentions):
    response = post(client, body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == code
    assert mentions in error["message"]
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_a_404_in_openai_shape_counted_as_other(app, client):
    response = post(client, {"model": "gpt-secret-9", "messages": USER})
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "model_not_found"
    served = "gen_ai_server_request_duration_seconds_count"
    labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "mock", "gen_ai_response_model": ""}
    assert metric(app, served, **labels, gen_ai_request_model="other", error_type="model_not_found") == 1
    assert metric(app, served, **labels, gen_ai_request_model="gpt-secret-9", error_type="model_not_found") == 0


def test_every_openai_parameter_is_accepted(client):
    body = {
        "model": "mock-large",
        "messages": [
            {"role": "system", "content": "brief"},
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
        ],
        "temperature": 0.2, "top_p": 0.9, "n": 1, "stop": ["\n"], "max_tokens": 50, "presence_penalty": 0,
        "frequency_penalty": 0, "logit_bias": {}, "logprobs": False, "user": "u1", "seed": 7,
        "response_format": {"type": "text"}, "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
        "store": False, "metadata": {"k": "v"}, "service_tier": "auto", "stream_options": {"include_usage": True},
        "max_completion_tokens": 40, "reasoning_effort": "low", "modalities": ["text"],
    }  # fmt: skip
    response = post(client, body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["usage"]["completion_tokens"] <= 40


def test_mock_is_deterministic_and_streams_the_same_answer(client):
    body = {"model": "mock-small", "messages": USER}
    first, second = post(client, body).get_json(), post(client, body).get_json()
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]
    events = sse_events(post(client, {**body, "stream": True}))
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == first["usage"] and events[-2]["choices"] == []
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e["choices"])
    assert streamed == first["choices"][0]["message"]["content"]


def test_token_counter_equals_reported_usage(app, client):
    sent = [post(client, {"model": m, "messages": [{"role": "user", "content": "word " * k}]}) for m, k in
            [("mock-small", 3), ("mock-large", 40), ("mock-small", 9)]]  # fmt: skip
    prompt = sum(r.get_json()["usage"]["prompt_tokens"] for r in sent)
    completion = sum(r.get_json()["usage"]["completion_tokens"] for r in sent)
    total_prompt = sum(
        metric(app, "gen_ai_client_token_usage_sum", **genai(m), gen_ai_token_type="input")
        for m in ("mock-small", "mock-large")
    )
    total_completion = sum(
        metric(app, "gen_ai_client_token_usage_sum", **genai(m), gen_ai_token_type="output")
        for m in ("mock-small", "mock-large")
    )
    assert (total_prompt, total_completion) == (prompt, completion)


def test_server_side_calculator_tool_runs_and_is_counted(app, client):
    tools = [{"type": "function", "function": {"name": "calculator"}}]
    ok = post(client, {"model": "mock-small", "messages": [{"role": "user", "content": "6 * 7"}], "tools": tools})
    assert ok.get_json()["choices"][0]["message"]["content"] == "The result is 42."
    bad = post(client, {"model": "mock-small", "messages": [{"role": "user", "content": "1 / 0"}], "tools": tools})
    assert "division by zero" in bad.get_json()["choices"][0]["message"]["content"]
    assert metric(app, "llm_tool_executions_total", tool="calculator", status="ok") == 1
    assert metric(app, "llm_tool_executions_total", tool="calculator", status="error") == 1


def test_routes_are_labelled_by_template_and_unknown_input_by_shared_values(app, client):
    # Closing the response is when a WSGI server reports the request done.
    client.get("/v1/models/mock-small").close()
    client.get("/v1/models/not-a-model").close()
    client.get("/random/path/123").close()
    client.open("/healthz", method="BREW").close()
    assert metric(app, "http_requests_total", method="GET", route="/v1/models/<model>", status="200") == 1
    assert metric(app, "http_requests_total", method="GET", route="/v1/models/<model>", status="404") == 1
    assert metric(app, "http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert metric(app, "http_requests_total", method="other", route="unmatched", status="405") == 1


def test_stream_gauge_returns_to_zero_when_client_disconnects(app, client):
    response = post(client, {"model": "mock-large", "messages": USER, "stream": True}, buffered=False)
    chunks = iter(response.response)
    next(chunks)  # role chunk
    next(chunks)  # first content token: the provider stream is open
    assert metric(app, "llm_streams_active", provider="mock") == 1
    assert metric(app, "http_requests_in_flight") == 1
    response.close()  # the client goes away mid-stream
    assert metric(app, "llm_streams_active", provider="mock") == 0
    assert metric(app, "http_requests_in_flight") == 0
    call = {**genai("mock-large"), "gen_ai_response_model": "", "error_type": "cancelled"}
    assert metric(app, "gen_ai_client_operation_duration_seconds_count", **call) == 1
    assert metric(app, "gen_ai_server_request_duration_seconds_count", **call) == 1
    aborted = {k: v for k, v in call.items() if k not in ("gen_ai_response_model", "error_type")}
    assert metric(app, "gen_ai_server_streams_aborted_total", **aborted) == 1
    assert metric(app, "gen_ai_client_token_usage_count", **genai("mock-large"), gen_ai_token_type="output") == 0


@pytest.mark.parametrize("tools", [None, [{"type": "function", "function": {"name": "calculator"}}]])
def test_a_stream_is_counted_before_its_final_chunk_is_handed_to_the_server(app, tools):
    # Act as the WSGI server: pull the body chunk by chunk and read the counter as each
    # chunk is handed over, before it could be sent and before close().
    body = {"model": "mock-small", "messages": [{"role": "user", "content": "6 * 7"}], "stream": True}
    if tools:
        body["tools"] = tools
    environ = EnvironBuilder(method="POST", path="/v1/chat/completions", json=body).get_environ()
    started = []
    response = app(environ, lambda status, headers, exc_info=None: started.append(status))
    complete = environ["promfork.response_complete"]

    def counted() -> tuple[float, float]:
        labels = {"method": "POST", "route": "/v1/chat/completions", "status": "200"}
        return metric(app, "http_requests_total", **labels), metric(app, "http_requests_in_flight")

    handed = []
    try:
        for chunk in response:
            handed.append((chunk, counted()))
    finally:
        response.close()
    assert started == ["200 OK"]
    final, at_final = handed[-1]
    assert final == b"data: [DONE]\n\n"
    assert at_final == (1, 0)  # counted, and no longer in flight, before [DONE] left
    assert all(at == (0, 1) for _, at in handed[:-1])
    complete()  # a second call, like close() before it, counts nothing more
    assert counted() == (1, 0)
    sent = sum(len(chunk) for chunk, _ in handed[:-1])
    assert metric(app, "http_response_size_bytes_sum", method="POST", route="/v1/chat/completions") == sent


def test_oversized_body_is_a_413_json_error():
    app = create_app(GatewaySettings(max_body_bytes=2048), Settings())
    response = post(app.test_client(), {"model": "mock-small", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert response.status_code == 413
    assert "error" in response.get_json()


def test_metrics_disabled_still_serves_the_app():
    app = create_app(GatewaySettings(), Settings(enabled=False))
    client = app.test_client()
    assert post(client, {"model": "mock-small", "messages": USER}).status_code == 200
    assert sse_events(post(client, {"model": "mock-small", "messages": USER, "stream": True}))[-1] == "[DONE]"
    response = client.get("/metrics")
    assert response.status_code == 404 and "METRICS_ENABLED" in response.get_json()["error"]["message"]


def test_metrics_token_is_required_when_set():
    app = create_app(GatewaySettings(), Settings(auth_token="s3cret"))
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and b"http_requests_total" in ok.data


def test_health_endpoints(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


STATUSES = ("200", "500")


def _small_app(**config) -> Flask:
    """A Flask app of its own under HttpMetrics (private registry), for route-capture edge cases."""
    small = Flask("small")
    small.config.update(config)

    @small.get("/boom/<int:n>")
    def boom(n: int):
        raise RuntimeError("boom")

    @small.get("/early/<name>")
    def early(name: str):
        request.environ["promfork.response_complete"]()  # counted before the response starts
        return "ok"

    inner = Flask("inner")
    inner.add_url_rule("/x/<int:n>", "x", lambda n: "inner")
    small.wsgi_app = DispatcherMiddleware(small.wsgi_app, {"/mounted": inner})
    HttpMetrics(small)
    return small


def test_routes_survive_propagated_errors_early_counts_and_skip_mounted_apps() -> None:
    small = _small_app(PROPAGATE_EXCEPTIONS=True)
    client = small.test_client()
    with pytest.raises(RuntimeError):
        client.get("/boom/1")
    client.get("/early/a").close()
    client.get("/mounted/x/1").close()  # another app's rule: not a route of this one
    assert metric(small, "http_requests_total", method="GET", route="/boom/<int:n>", status="500") == 1
    early = [metric(small, "http_requests_total", method="GET", route="/early/<name>", status=s) for s in STATUSES]
    assert sum(early) == 1
    assert metric(small, "http_requests_total", method="GET", route="unmatched", status="200") == 1
    assert metric(small, "http_requests_total", method="GET", route="/x/<int:n>", status="200") == 0
