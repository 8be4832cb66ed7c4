"""Helpers for the exemplar tests: W3C trace headers, traced requests, a real Prometheus with exemplar storage."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

import yaml

from tests.support.client import request
from tests.support.servers import free_port, terminate, wait_until

CHAT = "/v1/chat/completions"


class SentTrace(NamedTuple):
    """A trace a test sent in a ``traceparent`` header."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @property
    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def new_trace(sampled: bool = True) -> SentTrace:
    """Random ids, as a tracer would make them."""
    return SentTrace(secrets.token_hex(16), secrets.token_hex(8), sampled)


def chat_body(text: str = "hello") -> dict:
    return {"model": "mock-small", "messages": [{"role": "user", "content": text}]}


def traced_chat(port: int, trace: SentTrace | None, text: str = "hello") -> int:
    """POST one chat completion, with `trace` in its ``traceparent`` header when given; return the status."""
    headers = {"traceparent": trace.header} if trace is not None else {}
    status, _, _ = request("POST", port, CHAT, chat_body(text), headers=headers)
    return status


class ExemplarPrometheus:
    """A real Prometheus (Debian package) with exemplar storage, scraping one target every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing: apt-get install prometheus"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "promfork", "static_configs": [{"targets": [target]}]}],
        }
        (tmp / "prometheus-exemplars.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log_path = tmp / "prometheus-exemplars.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus-exemplars.yml'}", f"--storage.tsdb.path={tmp / 'prom-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not wait_until(self._ready, timeout=30):
            self.stop()
            raise RuntimeError(f"prometheus did not become ready:\n{self.log()}")

    def _ready(self) -> bool:
        try:
            return request("GET", self.port, "/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _api(self, path: str, **params: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self._api("query", query=expr)["result"]

    def exemplars(self, expr: str, since: float) -> list[dict]:
        """Every exemplar /api/v1/query_exemplars returns for `expr` from `since` until now, flattened."""
        found = []
        for series in self._api("query_exemplars", query=expr, start=f"{since:.3f}", end=f"{time.time() + 5:.3f}"):
            for exemplar in series["exemplars"]:
                found.append({"series": series["seriesLabels"], **exemplar})
        return found

    def stop(self) -> None:
        terminate(self.proc)
        self._log.close()
