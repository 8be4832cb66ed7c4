"""LLM_PROVIDER=openai against a small fake OpenAI-compatible upstream on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.client import chat, scrape, value
from tests.support.servers import wait_until

pytestmark = pytest.mark.integration
SERVED = "up-1-2025-01-31"  # the dated model the upstream says answered


class FakeUpstream(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions like OpenAI, with fixed usage; model 'broken' fails with 500."""

    seen: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeUpstream.seen.append({"auth": self.headers.get("Authorization"), "body": body})
        if body["model"] == "broken":
            self._send(500, {"error": {"message": "upstream exploded"}})
            return
        usage = {
            "prompt_tokens": 11,
            "completion_tokens": 5,
            "total_tokens": 16,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": "hello from upstream"}
            choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
            self._send(200, {"model": SERVED, "choices": choices, "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for word in ("hello", " from", " upstream"):
            self._event({"model": SERVED, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
        self._event({"model": SERVED, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        self._event({"model": SERVED, "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload):
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeUpstream.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_upstream_plain_stream_and_failure_are_measured(gunicorn_factory, upstream):
    env = {
        "LLM_PROVIDER": "openai",
        "OPENAI_BASE_URL": upstream,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_MODELS": "up-1,broken",
    }
    server = gunicorn_factory(env=env, workers=2)
    messages = [{"role": "user", "content": "hi"}]
    status, body, _ = chat(server.port, {"model": "up-1", "messages": messages, "temperature": 0.5})
    assert status == 200 and body["choices"][0]["message"]["content"] == "hello from upstream"
    assert body["usage"]["prompt_tokens"] == 11 and body["model"] == SERVED
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 3
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2
    status, _, events = chat(server.port, {"model": "up-1", "messages": messages, "stream": True})
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e["choices"])
        == "hello from upstream"
    )
    status, body, _ = chat(server.port, {"model": "broken", "messages": messages})
    assert status == 502 and "upstream exploded" in body["error"]["message"]
    status, body, _ = chat(server.port, {"model": "gpt-unlisted", "messages": messages})
    assert status == 404

    assert FakeUpstream.seen[0]["auth"] == "Bearer sk-test"
    assert FakeUpstream.seen[0]["body"]["temperature"] == 0.5  # parameters pass through
    assert FakeUpstream.seen[1]["body"]["stream_options"] == {"include_usage": True}

    def settled():
        fams = scrape(server.port)
        return fams if value(fams, "gen_ai_server_request_duration_seconds_count", **openai) == 4 else None

    openai = {"gen_ai_provider_name": "openai"}
    calls = "gen_ai_client_operation_duration_seconds_count"
    fams = wait_until(settled)
    assert fams is not None
    assert value(fams, calls, **openai, gen_ai_request_model="up-1", error_type="") == 2
    assert value(fams, calls, **openai, gen_ai_request_model="broken", error_type="502") == 1
    not_found = {"gen_ai_request_model": "other", "error_type": "model_not_found"}
    assert value(fams, "gen_ai_server_request_duration_seconds_count", **openai, **not_found) == 1
    usage = "gen_ai_client_token_usage_sum"
    assert value(fams, usage, **openai, gen_ai_token_type="input") == 22
    assert value(fams, usage, **openai, gen_ai_token_type="output") == 10
    assert value(fams, "gen_ai_server_time_to_first_token_seconds_count", **openai) == 1
    # What the upstream reported passes through: response model, cached and reasoning tokens, finish reasons.
    served = {**openai, "gen_ai_request_model": "up-1", "gen_ai_response_model": SERVED}
    assert value(fams, "gen_ai_client_cached_input_tokens_total", **served) == 6
    assert value(fams, "gen_ai_client_reasoning_tokens_total", **served) == 4
    assert value(fams, "gen_ai_client_finish_reasons_total", **served, finish_reason="stop") == 1
    assert value(fams, "gen_ai_client_finish_reasons_total", **served, finish_reason="length") == 1
    # up-1 has no price: its tokens are counted as unpriced, no cost is made up.
    assert value(fams, "gen_ai_client_unpriced_tokens_total", **served, gen_ai_token_type="input") == 22
    assert value(fams, "gen_ai_client_unpriced_tokens_total", **served, gen_ai_token_type="output") == 10
    assert value(fams, "gen_ai_client_cost_usd_total", **openai) == 0
    assert value(fams, "llm_streams_active") == 0
