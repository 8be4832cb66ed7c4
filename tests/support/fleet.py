"""Real monitoring servers for the fleet tests: Prometheus and Alertmanager (Debian packages) on
loopback ports with temporary storage, a webhook receiver that records what Alertmanager sends,
and the rewrites that turn deploy/'s configs into loopback test configs without editing them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.support.client import request
from tests.support.servers import ROOT, free_port, terminate, wait_until

DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def binary(name: str) -> str:
    """The path of a system tool the fleet tests run.

    Missing, the test is skipped with how to install it, except in CI (`CI` set, as .ci/run
    does), where the tools are installed first and a missing one is a failure."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} not installed: apt-get install prometheus prometheus-alertmanager (make system-deps as root)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def short_durations(rules_file: Path, for_duration: str = "1s") -> dict:
    """The rule groups of `rules_file` with every `for:` cut to `for_duration` (the file is not touched)."""
    rules = yaml.safe_load(rules_file.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = for_duration
    return rules


class Server:
    """A child process listening on a loopback port, its output in a log file; stopped by stop()."""

    def __init__(self, argv: list[str], port: int, log_path: Path, ready_path: str) -> None:
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        if not wait_until(lambda: self._answers(ready_path), timeout=30, interval=0.2):
            self.stop()
            raise RuntimeError(f"{argv[0]} did not become ready:\n{self.log()}")

    def _answers(self, path: str) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.proc.args[0]} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return request("GET", self.port, path, timeout=1)[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get_json(self, path: str, **params: str) -> dict | list:
        """GET an API path of this server and decode its JSON answer."""
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)

    def stop(self) -> None:
        terminate(self.proc)
        self._log.close()


class Prometheus(Server):
    """A real Prometheus running `config` (a parsed prometheus.yml) with 1 s scrapes and evaluations."""

    def __init__(self, tmp: Path, name: str, config: dict) -> None:
        directory = tmp / name
        directory.mkdir()
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        for job in config["scrape_configs"]:
            job["scrape_interval"] = "1s"
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        argv = [
            binary("prometheus"),
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            # Re-send firing alerts every second (default 1m) so Alertmanager sees state changes promptly.
            "--rules.alert.resend-delay=1s",
        ]
        super().__init__(argv, port, directory / "prometheus.log", "/-/ready")

    def query(self, expr: str) -> list:
        """The result of an instant query (a vector's or a range selector's series)."""
        body = self.get_json("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        """An instant vector as {value of label `by`: sample value}."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}


class Alertmanager(Server):
    """A real Alertmanager, clustering off, running `config` (a parsed alertmanager.yml)."""

    def __init__(self, tmp: Path, config: dict) -> None:
        directory = tmp / "alertmanager"
        directory.mkdir()
        (directory / "alertmanager.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        argv = [
            binary("prometheus-alertmanager"),
            f"--config.file={directory / 'alertmanager.yml'}",
            f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ]
        super().__init__(argv, port, directory / "alertmanager.log", "/-/ready")

    def alerts(self) -> list[dict]:
        """Every alert Alertmanager holds, with its status (active, suppressed) and inhibitors."""
        return self.get_json("/api/v2/alerts")


def alertmanager_config_for_test(receiver_url: str) -> dict:
    """deploy/alertmanager/alertmanager.yml with webhooks sent to `receiver_url` (same paths) and
    grouping waits cut to a second; routes, grouping keys and inhibitions stay as shipped."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())

    def shorten(route: dict) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    config["route"].update(group_wait="1s", group_interval="1s")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = receiver_url + urllib.parse.urlsplit(hook["url"]).path
    return config


class WebhookReceiver:
    """An HTTP server on loopback that records every Alertmanager webhook notification it gets."""

    def __init__(self) -> None:
        self.notifications: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with received._lock:
                    received.notifications.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self, alertname: str, status: str = "firing") -> list[tuple[str, dict]]:
        """(path, alert) for every notified alert called `alertname` in state `status`."""
        with self._lock:
            return [
                (path, alert)
                for path, body in self.notifications
                for alert in body["alerts"]
                if alert["labels"].get("alertname") == alertname and alert["status"] == status
            ]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
