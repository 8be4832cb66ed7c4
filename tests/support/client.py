"""What a test's client does over HTTP: requests, chat completions and their SSE, scraping and reading /metrics."""

from __future__ import annotations

import http.client
import json

from prometheus_client.parser import text_string_to_metric_families


def request(
    method: str, port: int, path: str, body: bytes | dict | None = None, headers: dict | None = None, timeout=30
) -> tuple[int, dict, bytes]:
    """One HTTP request to 127.0.0.1:port; returns (status, headers, body)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def scrape(port: int, headers: dict | None = None) -> dict:
    """GET /metrics and parse it with prometheus_client.parser into {family name: family}."""
    status, _, body = request("GET", port, "/metrics", headers=headers)
    assert status == 200, body[:500]
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(families: dict, sample_name: str) -> dict[tuple, float]:
    """Every sample called `sample_name`, keyed by its sorted label items."""
    out = {}
    for family in families.values():
        for s in family.samples:
            if s.name == sample_name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(families: dict, sample_name: str, **labels: str) -> float:
    """The sum of the samples called `sample_name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for key, v in samples(families, sample_name).items():
        if all(item in key for item in labels.items()):
            total += v
    return total


def counter_samples(families: dict) -> dict[tuple, float]:
    """Every aggregated monotonic sample (counters, histograms of non-negative data).

    Per-process counters (process_cpu_seconds_total by worker slot) are left out: they
    restart with their process, which Prometheus treats as a reset by design.
    """
    out = {}
    for family in families.values():
        if family.type not in ("counter", "histogram") or family.name.startswith("process_"):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def chat(port: int, body: dict, timeout: float = 30) -> tuple[int, dict | None, list[dict]]:
    """POST a chat completion; returns (status, JSON body or None, SSE chunks for streams)."""
    status, headers, raw = request("POST", port, "/v1/chat/completions", body, timeout=timeout)
    if headers.get("content-type", "").startswith("text/event-stream"):
        return status, None, parse_sse(raw)
    return status, json.loads(raw) if raw else None, []


def parse_sse(raw: bytes) -> list:
    """The data payloads of a Server-Sent Events body, JSON-decoded ('[DONE]' kept as a string)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
