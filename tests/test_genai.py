"""GenAI metrics (OpenTelemetry GenAI conventions and the extras) against what clients received, on real Gunicorn.

The truth is the client's: the usage, usage details, finish reasons, response model
and content chunks each answer carried (tests/support/genai_truth.py), the prices the test
configured, the models GET /v1/models lists, and what stock prometheus-client reads
from the same metric files. Several workers, recycled during the load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from promfork.config import ConfigError
from tests.support.client import chat, request, samples, scrape, value
from tests.support.genai_truth import ClientTruth, received_from
from tests.support.servers import gunicorn_fails_to_start, wait_until
from webapp.settings import load_gateway_settings

# Prices the test configures (USD per 1M tokens), unlike the built-in ones, so a cost from
# the built-in table (or from none) cannot pass.
PRICES = {
    "mock-small": {"input": 1.1, "cached_input": 0.3, "output": 4.7},
    "mock-large": {"input": 3.3, "cached_input": 1.7, "output": 13.0},
}
MODELS = ("mock-small", "mock-large")
USAGE = "gen_ai_client_token_usage"
LOOKUP = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def chat_body(i: int) -> dict:
    """Request i of the load: plain and streamed answers, cut by max_tokens, and client tool calls."""
    words = " ".join(("alpha", "beta", "gamma", "delta", "omega")[(i * k) % 5] for k in range(1, 2 + i % 37))
    body = {"model": MODELS[i % 2], "messages": [{"role": "user", "content": f"request {i}: {words}"}]}
    variant = i % 6
    if variant in (1, 3, 5) or (variant == 4 and i % 12 == 4):
        body["stream"] = True
    if variant == 2:
        body["max_tokens"] = 3  # finish_reason length
    if variant == 3:
        body["max_tokens"] = 1  # a stream of one token: a TTFT, no time per output token
    if variant == 4:
        body["tools"], body["tool_choice"] = LOOKUP, "required"  # finish_reason tool_calls, no content
    return body


def send(port: int, truth: ClientTruth, i: int, headers: dict | None = None, tenant: str = "default") -> None:
    body = chat_body(i)
    status, resp_headers, raw = request("POST", port, "/v1/chat/completions", body, headers=headers)
    assert status == 200, raw[:300]
    if resp_headers["content-type"].startswith("text/event-stream"):
        events = [b[6:] for b in raw.decode().split("\n\n") if b.startswith("data: ")]
        events = [e if e == "[DONE]" else json.loads(e) for e in events]
        truth.add(received_from(body["model"], tenant, None, events))
    else:
        truth.add(received_from(body["model"], tenant, json.loads(raw), []))


def model_labels(model: str) -> dict[str, str]:
    return {"gen_ai_request_model": model}


@pytest.mark.integration
def test_genai_totals_equal_what_clients_received_across_recycled_workers(gunicorn_factory):
    server = gunicorn_factory(
        "--max-requests", "40", "--max-requests-jitter", "10", env={"LLM_PRICES": json.dumps(PRICES)}, workers=3
    )
    truth = ClientTruth()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: send(server.port, truth, i), range(360)))
    assert server.log().count("Booting worker") > 3 + 3, "workers were not recycled during the load"
    # The load is varied enough for every check to be able to fail.
    assert truth.total("cached") > 0 and truth.total("reasoning") > 0
    assert {"stop", "length", "tool_calls"} <= set(truth.finish_reasons())
    one_token = [a for a in truth.answers if a.content_chunks == 1]
    assert one_token, "no stream of a single token"

    def settled():
        fams = scrape(server.port)
        done = value(fams, f"{USAGE}_sum", gen_ai_token_type="input") == truth.total("prompt")
        return fams if done else None

    fams = wait_until(settled, timeout=15)
    assert fams is not None, "token usage never matched what the clients received"
    for model in MODELS:
        labels = model_labels(model)
        assert value(fams, f"{USAGE}_sum", **labels, gen_ai_token_type="input") == truth.total("prompt", model=model)
        assert value(fams, f"{USAGE}_sum", **labels, gen_ai_token_type="output") == truth.total(
            "completion", model=model
        )
        calls = sum(1 for a in truth.answers if a.model == model)
        assert value(fams, f"{USAGE}_count", **labels, gen_ai_token_type="input") == calls
        assert value(fams, "gen_ai_client_cached_input_tokens_total", **labels) == truth.total("cached", model=model)
        assert value(fams, "gen_ai_client_reasoning_tokens_total", **labels) == truth.total("reasoning", model=model)
        cost = truth.cost(PRICES, model=model)
        assert cost > 0
        assert value(fams, "gen_ai_client_cost_usd_total", **labels) == pytest.approx(cost, rel=1e-9)
        assert value(fams, "gen_ai_client_unpriced_tokens_total", **labels) == 0
        # One provider call and one served request per answer (no server-side tools in this load).
        assert value(fams, "gen_ai_client_operation_duration_seconds_count", **labels, error_type="") == calls
        assert value(fams, "gen_ai_server_request_duration_seconds_count", **labels, error_type="") == calls

    received = truth.finish_reasons()
    for reason in ("stop", "length", "tool_calls", "content_filter", "function_call"):
        assert value(fams, "gen_ai_client_finish_reasons_total", finish_reason=reason) == received[reason], reason
    # The response model label is the model each answer said answered it.
    served = {dict(k)["gen_ai_response_model"] for k, v in samples(fams, f"{USAGE}_count").items() if v}
    assert served == {a.response_model for a in truth.answers}
    # Streams: a first token for every stream with content; a time per output token for those of 2 or more.
    ttft = value(fams, "gen_ai_server_time_to_first_token_seconds_count")
    tpot = value(fams, "gen_ai_server_time_per_output_token_seconds_count")
    assert ttft == sum(1 for a in truth.answers if a.content_chunks >= 1)
    assert tpot == sum(1 for a in truth.answers if a.content_chunks >= 2)
    assert value(fams, "llm_streams_active") == 0

    # Stock prometheus-client reads the same totals from the same files once the server is gone.
    server.stop()
    stock = subprocess.run(
        [sys.executable, "-c", STOCK_READER, str(server.multiproc_dir)], capture_output=True, text=True, timeout=60
    )
    assert stock.returncode == 0, stock.stderr
    totals = json.loads(stock.stdout)
    assert totals["input"] == truth.total("prompt") and totals["output"] == truth.total("completion")
    assert totals["cost"] == pytest.approx(truth.cost(PRICES), rel=1e-9)


STOCK_READER = """
import json, sys
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
registry = CollectorRegistry()
MultiProcessCollector(registry, path=sys.argv[1])
totals = {"input": 0.0, "output": 0.0, "cost": 0.0}
for family in registry.collect():
    for s in family.samples:
        if s.name == "gen_ai_client_token_usage_sum":
            totals[s.labels["gen_ai_token_type"]] += s.value
        elif s.name == "gen_ai_client_cost_usd_total":
            totals["cost"] += s.value
print(json.dumps(totals))
"""


@pytest.mark.integration
def test_the_official_openai_client_gets_usage_details_and_the_metrics_match(gunicorn_factory):
    openai = pytest.importorskip("openai")
    server = gunicorn_factory(workers=2)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    prompt = cached = reasoning = completion = 0
    for i in range(12):
        messages = [{"role": "user", "content": f"question number {i} about gunicorn workers"}]
        if i % 2:
            response = client.chat.completions.create(model="mock-large", messages=messages)
            usage = response.usage
            assert response.model == "mock-large-2025-06-01"
        else:
            stream = client.chat.completions.create(
                model="mock-large", messages=messages, stream=True, stream_options={"include_usage": True}
            )
            usage = [chunk for chunk in stream][-1].usage
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
        cached += usage.prompt_tokens_details.cached_tokens
        reasoning += usage.completion_tokens_details.reasoning_tokens
    assert cached > 0 and reasoning > 0, "the mock reports cached and reasoning tokens for some requests"

    def settled():
        fams = scrape(server.port)
        return fams if value(fams, f"{USAGE}_count", gen_ai_token_type="input") == 12 else None

    fams = wait_until(settled)
    assert fams is not None
    assert value(fams, f"{USAGE}_sum", gen_ai_token_type="input") == prompt
    assert value(fams, f"{USAGE}_sum", gen_ai_token_type="output") == completion
    assert value(fams, "gen_ai_client_cached_input_tokens_total") == cached
    assert value(fams, "gen_ai_client_reasoning_tokens_total") == reasoning


@pytest.mark.integration
def test_tenant_label_follows_named_api_keys_with_a_cap(gunicorn_factory):
    keys = {"team-a": "sk-aaa", "team-b": "sk-bbb", "team-c": "sk-ccc"}
    env = {
        "API_KEYS": ",".join(f"{name}:{key}" for name, key in keys.items()) + ",sk-plain",
        "METRICS_TENANT_LABEL": "true",
        "METRICS_MAX_TENANTS": "2",
        "LLM_PRICES": json.dumps(PRICES),
    }
    server = gunicorn_factory(env=env, workers=2)
    truth = ClientTruth()
    # team-c is the third name: over the cap of 2, it is "other"; a plain key is "default".
    callers = [("sk-aaa", "team-a"), ("sk-bbb", "team-b"), ("sk-ccc", "other"), ("sk-plain", "default")]
    for i in range(40):
        key, tenant = callers[i % 4]
        send(server.port, truth, i, headers={"Authorization": f"Bearer {key}"}, tenant=tenant)
    status, _, _ = chat(server.port, {"model": "mock-small", "messages": [{"role": "user", "content": "x"}]})
    assert status == 401

    def settled():
        fams = scrape(server.port)
        return fams if value(fams, f"{USAGE}_count", gen_ai_token_type="input") == 40 else None

    fams = wait_until(settled)
    assert fams is not None
    tenants = {dict(k).get("tenant") for k in samples(fams, "gen_ai_client_cost_usd_total")}
    assert tenants == {"team-a", "team-b", "other", "default"}
    for _, tenant in callers:
        assert value(fams, f"{USAGE}_sum", tenant=tenant, gen_ai_token_type="input") == truth.total(
            "prompt", tenant=tenant
        )
        assert value(fams, f"{USAGE}_sum", tenant=tenant, gen_ai_token_type="output") == truth.total(
            "completion", tenant=tenant
        )
        assert value(fams, "gen_ai_client_cost_usd_total", tenant=tenant) == pytest.approx(
            truth.cost(PRICES, tenant=tenant), rel=1e-9
        )


@pytest.mark.integration
def test_series_known_in_advance_start_at_zero_in_a_fresh_server(gunicorn_factory):
    server = gunicorn_factory(env={"RATE_LIMIT_RPM": "1000"}, workers=2)
    status, _, raw = request("GET", server.port, "/v1/models")
    served = [m["id"] for m in json.loads(raw)["data"]]
    assert status == 200 and served
    fams = scrape(server.port)  # before any chat completion

    def present(name: str, **labels: str) -> bool:
        found = [v for k, v in samples(fams, name).items() if set(labels.items()) <= set(k)]
        return bool(found) and all(v == 0 for v in found)

    for model in served:
        for token_type in ("input", "output"):
            assert present(f"{USAGE}_count", gen_ai_request_model=model, gen_ai_token_type=token_type), model
        for reason in ("stop", "length", "tool_calls", "content_filter"):
            assert present("gen_ai_client_finish_reasons_total", gen_ai_request_model=model, finish_reason=reason)
        for name in ("gen_ai_client_cost_usd_total", "gen_ai_client_cached_input_tokens_total",
                     "gen_ai_client_reasoning_tokens_total", "gen_ai_server_streams_aborted_total",
                     "gen_ai_server_time_to_first_token_seconds_count",
                     "gen_ai_server_time_per_output_token_seconds_count"):  # fmt: skip
            assert present(name, gen_ai_request_model=model), (name, model)
    for status in ("ok", "error"):
        assert present("llm_tool_executions_total", tool="calculator", status=status)
        assert present("llm_tool_duration_seconds_count", tool="calculator", status=status)
    assert present("ratelimit_rejected_total", reason="rpm")
    assert present("gen_ai_server_request_duration_seconds_count", error_type="model_not_found")


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        ("{not json", "not valid JSON"),
        ('{"m": {"input": 1}}', "'output'"),
        ('{"m": {"input": -1, "output": 1}}', "'input'"),
        ('{"m": {"input": 1, "output": 1, "cache": 1}}', "unknown field"),
        ('["m"]', "JSON object"),
        ("/no/such/prices.json", "cannot be read"),
    ],
)
def test_a_bad_price_table_is_refused_at_start_naming_the_variable(raw, mentions):
    with pytest.raises(ConfigError, match="LLM_PRICES") as error:
        load_gateway_settings({"LLM_PRICES": raw})
    assert mentions in str(error.value)


@pytest.mark.integration
def test_gunicorn_refuses_to_start_with_a_bad_price_table():
    output = gunicorn_fails_to_start({"LLM_PRICES": '{"gpt-4o": {"input": "cheap"}}'})
    assert "LLM_PRICES" in output and "gpt-4o" in output


def test_settings_accept_named_and_plain_api_keys_and_a_price_file(tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 0.15, "output": 0.6}}))
    settings = load_gateway_settings(
        {"API_KEYS": "team-a:sk-1, sk-2 ,team-b:sk-3", "LLM_PRICES": str(prices), "METRICS_MAX_TENANTS": "1"}
    )
    assert settings.api_keys == {"sk-1": "team-a", "sk-2": "default", "sk-3": "other"}
    price = settings.prices["gpt-4o-mini"]
    assert (price.input, price.cached_input, price.output) == (0.15, 0.15, 0.6)
    assert "mock-small" in settings.prices  # built-in prices stay
    with pytest.raises(ConfigError, match="METRICS_TENANT_LABEL"):
        load_gateway_settings({"METRICS_TENANT_LABEL": "maybe"})
