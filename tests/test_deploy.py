"""deploy/ proven: promtool checks, rule unit tests, and every dashboard query against a real
Prometheus that scraped the app under load; manifests parsed and checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.client import chat, request
from tests.support.servers import ROOT, free_port, terminate, wait_until
from webapp.catalogue import gateway_catalogue

DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} missing: apt-get install prometheus (make test does it when run as root)"
    return path


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-global.yml", "compose.yml"])
def test_prometheus_configs_pass_promtool(config):
    run(tool("promtool"), "check", "config", str(PROM / config))


def test_kubernetes_scrape_config_discovers_annotated_pods():
    config = yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = job["relabel_configs"][0]
    assert keep["action"] == "keep" and "prometheus_io_scrape" in keep["source_labels"][0]
    assert config["rule_files"] == ["rules/*.yml"]


def test_rules_pass_promtool_and_their_unit_tests():
    run(tool("promtool"), "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))
    out = run(tool("promtool"), "test", "rules", str(PROM / "tests" / "alerts_test.yml"))
    assert "SUCCESS" in out
    alerts = {r["alert"] for g in yaml.safe_load((PROM / "rules" / "promfork-alerts.yml").read_text())["groups"]
              for r in g["rules"]}  # fmt: skip
    tested = (PROM / "tests" / "alerts_test.yml").read_text()
    for alert in alerts:
        assert f"alertname: {alert}" in tested, f"{alert} has no promtool unit test"


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "promfork-dashboard.json").read_text())


def test_dashboard_has_what_a_grafana_import_expects():
    dash = dashboard()
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        assert key in dash, key
    assert dash["templating"]["list"][0]["type"] == "datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert {"type", "title", "gridPos", "datasource", "targets"} <= panel.keys(), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["refId"] and target["expr"]


class Prometheus:
    """A real Prometheus (Debian package) on loopback with a temp data dir."""

    def __init__(self, tmp: Path, target: str) -> None:
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config.pop("alerting", None)  # an Alertmanager on this machine's default port must not get test alerts
        config["rule_files"] = [str(p) for p in sorted((PROM / "rules").glob("*.yml"))]
        config["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert wait_until(lambda: self._ready(), timeout=30), "prometheus did not become ready"

    def _ready(self) -> bool:
        try:
            return request("GET", self.port, "/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def query(self, expr: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()


@pytest.mark.integration
@pytest.mark.deploy
def test_every_dashboard_query_returns_data_from_a_real_prometheus(gunicorn_factory, tmp_path):
    mport = free_port()
    server = gunicorn_factory(
        "--max-requests", "40", env={"METRICS_PORT": str(mport), "MOCK_LATENCY_MS": "5"}, workers=2
    )
    stop = threading.Event()
    tools = [{"type": "function", "function": {"name": "calculator"}}]

    def load():
        i = 0
        while not stop.is_set():
            i += 1
            content = f"{i} * 3" if i % 5 == 0 else f"hello {i}"
            body = {"model": "mock-small", "messages": [{"role": "user", "content": content}], "stream": i % 3 == 0}
            if i % 5 == 0:
                body["tools"] = tools
            chat(server.port, body)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{mport}")
    try:
        exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]

        def all_answer():
            return all(prometheus.query(e) for e in exprs)

        wait_until(all_answer, timeout=40, interval=1)
        empty = [e for e in exprs if not prometheus.query(e)]
        assert not empty, f"dashboard queries without data: {empty}"
        up = prometheus.query('up{job="promfork"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        stop.set()
        for t in threads:
            t.join()
        prometheus.stop()


def test_systemd_unit_verifies():
    unit = DEPLOY / "systemd" / "promfork.service"
    text = unit.read_text()
    assert "RuntimeDirectory=promfork/metrics" in text and "PROMETHEUS_MULTIPROC_DIR=/run/promfork/metrics" in text
    assert "ExecReload=/bin/kill -s HUP $MAINPID" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed; the unit was checked by parsing only")
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # The venv path does not exist on a test machine; anything else is a real problem.
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line and "is not executable" not in line]
    assert not problems, problems


def test_kubernetes_manifests_keep_metrics_in_memory_and_probe_health():
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "k8s" / "service.yaml").read_text())
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["PROMETHEUS_MULTIPROC_DIR"])
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == env["METRICS_PORT"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_compose_file_runs_the_app_and_prometheus_with_the_repo_rules():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"app", "prometheus"} <= compose["services"].keys()
    named = set(compose.get("volumes") or {})  # named volumes live in Docker, not in the repo
    for volume in compose["services"]["prometheus"]["volumes"]:
        source = volume.split(":")[0]
        assert source in named or (DEPLOY / source).exists(), source
    assert (ROOT / "Dockerfile").exists()


def test_metric_catalogue_is_up_to_date():
    committed = (ROOT / "docs" / "metrics.md").read_text()
    assert committed == gateway_catalogue(), "docs/metrics.md is stale: python -m webapp.catalogue > docs/metrics.md"
