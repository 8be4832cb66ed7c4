"""Beyond one host, run for real: Alertmanager routing and inhibiting the project's alerts from a
real Prometheus watching a real app, federation of two app instances through a site Prometheus
to a global one, and the retention and Alertmanager wiring of every deployment in deploy/."""

from __future__ import annotations

import collections
import math
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.client import chat
from tests.support.fleet import (
    ALERTMANAGER_CONFIG,
    DEPLOY,
    PROM,
    Alertmanager,
    Prometheus,
    Server,
    WebhookReceiver,
    alertmanager_config_for_test,
    binary,
    short_durations,
)
from tests.support.servers import free_port, wait_until

WORKER_ALERTS = {
    "PromforkNoWorkersAlive",
    "PromforkWorkerRestartStorm",
    "PromforkHigh5xxRatio",
    "PromforkLatencyP95OverSLO",
}
CHAT = "/v1/chat/completions"


def amtool_check(path) -> str:
    proc = subprocess.run([binary("amtool"), "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_alertmanager_config_passes_amtool():
    assert "SUCCESS" in amtool_check(ALERTMANAGER_CONFIG)


def test_alertmanager_commented_receiver_examples_are_valid_when_uncommented(tmp_path):
    # What an operator does: uncomment the e-mail, PagerDuty and Slack lines and point the *_file
    # settings at their secrets.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    lines = []
    for line in ALERTMANAGER_CONFIG.read_text().splitlines():
        match = re.match(r"^(\s+)# ((?:- )?[a-z_]+:.*)$", line)
        lines.append(match.group(1) + match.group(2) if match else line)
    text = "\n".join(lines).replace("/etc/alertmanager/secrets", str(secrets))
    for name in re.findall(re.escape(str(secrets)) + r"/([\w-]+)", text):
        (secrets / name).write_text("https://hooks.example.com/secret\n")
    config = yaml.safe_load(text)
    receivers = {r["name"]: r for r in config["receivers"]}
    assert {"email_configs", "pagerduty_configs"} <= receivers["promfork-page"].keys()
    assert "slack_configs" in receivers["promfork-ticket"]
    (tmp_path / "uncommented.yml").write_text(text)
    assert "SUCCESS" in amtool_check(tmp_path / "uncommented.yml")


def test_alertmanager_inhibits_every_worker_level_alert_while_the_target_is_down():
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    shipped = {r["alert"] for g in yaml.safe_load((PROM / "rules" / "promfork-alerts.yml").read_text())["groups"]
               for r in g["rules"] if "alert" in r}  # fmt: skip
    assert WORKER_ALERTS | {"PromforkTargetDown"} <= shipped
    (rule,) = config["inhibit_rules"]
    assert rule["source_matchers"] == ['alertname="PromforkTargetDown"']
    (target,) = rule["target_matchers"]
    inhibited = set(re.fullmatch(r'alertname=~"(.*)"', target).group(1).split("|"))
    assert inhibited == WORKER_ALERTS
    assert "instance" in rule["equal"]


@pytest.mark.parametrize(
    "config", ["prometheus.yml", "prometheus-global.yml", "compose.yml", "prometheus-kubernetes.yml"]
)
def test_every_prometheus_config_sends_alerts_to_an_alertmanager(config):
    parsed = yaml.safe_load((PROM / config).read_text())
    (manager,) = parsed["alerting"]["alertmanagers"]
    (targets,) = manager["static_configs"]
    assert all(t.endswith(":9093") for t in targets["targets"]), targets


@pytest.mark.integration
@pytest.mark.deploy
def test_target_down_alert_reaches_the_webhook_and_inhibits_the_worker_alerts(gunicorn_factory, tmp_path):
    """A real restart storm (workers SIGKILLed) pages; stopping the app pages TargetDown, and from then
    on the storm alert of the same instance is held back by Alertmanager's inhibition."""
    receiver = WebhookReceiver()
    servers = []
    try:
        alertmanager = Alertmanager(tmp_path, alertmanager_config_for_test(receiver.url))
        servers.append(alertmanager)
        app = gunicorn_factory(workers=3)
        instance = f"127.0.0.1:{app.port}"
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "alerts.yml").write_text(yaml.safe_dump(short_durations(PROM / "rules" / "promfork-alerts.yml")))
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        config["rule_files"] = [str(rules / "alerts.yml"), str(PROM / "rules" / "promfork-recording.yml")]
        config["scrape_configs"][0]["static_configs"][0]["targets"] = [instance]
        config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{alertmanager.port}"]
        prometheus = Prometheus(tmp_path, "prometheus", config)
        servers.append(prometheus)
        exits = f'gunicorn_worker_exits_total{{reason="signal",instance="{instance}"}}'
        assert wait_until(lambda: prometheus.values(exits, "reason") == {"signal": 0.0}, timeout=30, interval=0.5), (
            "Prometheus never scraped the app's (zero) exit counter"
        )

        # The restart storm: 7 workers killed, each replaced before the next kill (> 5 in 10 minutes).
        kills = 7
        for _ in range(kills):
            victim = app.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda v=victim: v not in (pids := app.worker_pids()) and len(pids) == 3, timeout=30), (
                app.log()
            )
        assert wait_until(lambda: prometheus.values(exits, "reason") == {"signal": float(kills)}, timeout=30), (
            prometheus.values(exits, "reason")
        )
        storm = wait_until(lambda: receiver.alerts("PromforkWorkerRestartStorm"), timeout=60, interval=0.5)
        assert storm, f"no restart-storm notification; Alertmanager holds {alertmanager.alerts()}"
        path, alert = storm[0]
        assert path == "/alerts/page"
        assert alert["labels"]["instance"] == instance and alert["labels"]["severity"] == "page"
        assert alert["labels"]["cluster"] == "example"  # Prometheus' external label travels with the alert

        # The host goes away.
        app.stop()
        down = wait_until(lambda: receiver.alerts("PromforkTargetDown"), timeout=60, interval=0.5)
        assert down, f"no target-down notification; Alertmanager holds {alertmanager.alerts()}"
        path, alert = down[0]
        assert path == "/alerts/page"
        expected = {"alertname": "PromforkTargetDown", "job": "promfork", "instance": instance,
                    "severity": "page", "service": "llm-gateway", "cluster": "example"}  # fmt: skip
        assert alert["labels"] == expected
        assert alert["annotations"]["summary"] == f"Prometheus cannot scrape {instance}"

        def storm_inhibited():
            held = [a for a in alertmanager.alerts() if a["labels"]["alertname"] == "PromforkWorkerRestartStorm"]
            return held and held[0]["status"]["state"] == "suppressed" and held[0]

        held = wait_until(storm_inhibited, timeout=30, interval=0.5)
        assert held, alertmanager.alerts()
        inhibitor = next(a for a in alertmanager.alerts() if a["labels"]["alertname"] == "PromforkTargetDown")
        assert held["status"]["inhibitedBy"] == [inhibitor["fingerprint"]]
        # Prometheus still holds the storm as firing: Alertmanager, not the rule, keeps it quiet.
        firing = prometheus.query('ALERTS{alertstate="firing"}')
        assert {"PromforkWorkerRestartStorm", "PromforkTargetDown"} <= {a["metric"]["alertname"] for a in firing}
    finally:
        for server in reversed(servers):
            server.stop()
        receiver.stop()


def site_config(targets: list[str]) -> dict:
    """deploy/prometheus/prometheus.yml scraping `targets`, with the recording rules, no Alertmanager."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["rule_files"] = [str(PROM / "rules" / "promfork-recording.yml")]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = targets
    del config["alerting"]
    return config


def global_config(site: str) -> dict:
    """deploy/prometheus/prometheus-global.yml federating from the one site at `site`."""
    config = yaml.safe_load((PROM / "prometheus-global.yml").read_text())
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [site]
    del config["alerting"]
    return config


def recorded_series() -> list[str]:
    """The names deploy/prometheus/rules/promfork-recording.yml records."""
    groups = yaml.safe_load((PROM / "rules" / "promfork-recording.yml").read_text())["groups"]
    return [rule["record"] for group in groups for rule in group["rules"] if "record" in rule]


def extrapolation_bound(samples: int) -> float:
    """The most rate() can exceed the true increase over the range, as a factor.

    Prometheus extrapolates the increase between the first and last sample in the range by at most
    1.1 average sample intervals at each end, so with `samples` samples (samples - 1 intervals)
    the factor is at most 1 + 2.2 / (samples - 1); it never shrinks the increase."""
    return 1 + 2.2 / (samples - 1)


@pytest.mark.integration
@pytest.mark.deploy
def test_global_prometheus_federates_the_fleet_request_count_and_rate(gunicorn_factory, tmp_path):
    """Two hosts, one site Prometheus with the recording rules, the global one running
    prometheus-global.yml: the global view matches what the client sent to each host."""
    hosts = {}
    for name in ("a", "b"):
        mp = tmp_path / f"mp-{name}"
        mp.mkdir(mode=0o700)
        hosts[name] = gunicorn_factory(env={"PROMETHEUS_MULTIPROC_DIR": str(mp)}, workers=2)
    instance = {name: f"127.0.0.1:{server.port}" for name, server in hosts.items()}
    servers = []
    try:
        site = Prometheus(tmp_path, "site", site_config(list(instance.values())))
        servers.append(site)
        fleet = Prometheus(tmp_path, "global", global_config(f"127.0.0.1:{site.port}"))
        servers.append(fleet)
        sent: collections.Counter = collections.Counter()

        def send(name: str, i: int) -> None:
            model = "mock-small" if i % 2 else "mock-large"
            body = {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}], "stream": i % 3 == 0}
            status, _, _ = chat(hosts[name].port, body)
            sent[(instance[name], str(status))] += 1

        # One request each, and wait until the site has scraped it: the rate's first sample then
        # precedes all of the counted load.
        for name in hosts:
            send(name, 0)
        chat_series = f'http_requests_total{{route="{CHAT}"}}'
        assert wait_until(lambda: len(site.values(chat_series, "instance")) == 2, timeout=30, interval=0.5)
        warmup = sum(sent.values())

        for i in range(1, 38):
            send("a", i)
        for i in range(1, 24):
            send("b", i)
        load = sum(sent.values()) - warmup
        assert set(sent) == {(i, "200") for i in instance.values()}, f"the app answered errors: {sent}"

        # Exact: the federated raw counters equal what the client got answers for, per host and status.
        federated = f'sum by (instance, status) (http_requests_total{{route="{CHAT}",job="promfork"}})'

        def global_counts() -> dict:
            return {
                (s["metric"]["instance"], s["metric"]["status"]): float(s["value"][1]) for s in fleet.query(federated)
            }

        expected = {key: float(n) for key, n in sent.items()}
        wait_until(lambda: global_counts() == expected, timeout=60, interval=0.5)
        assert global_counts() == expected
        (total,) = fleet.query(f'sum(http_requests_total{{route="{CHAT}"}})')
        assert float(total["value"][1]) == sum(sent.values())
        assert fleet.values("gunicorn_workers", "instance") == {i: 2.0 for i in instance.values()}

        # The federated recording rules answer, with the site's external label kept.
        for rule in ("route:http_requests:rate5m", "route:http_request_errors:ratio_rate5m",
                     "route:http_request_duration_seconds:p95"):  # fmt: skip
            series = wait_until(lambda r=rule: fleet.query(f'{r}{{route="{CHAT}"}}'), timeout=30, interval=0.5)
            assert series and series[0]["metric"]["cluster"] == "example", (rule, series)
        # Every recording rule the site has data for reaches the global Prometheus.
        at_site = {name for name in recorded_series() if site.query(name)}
        assert at_site, "the site evaluated none of the recording rules"
        assert wait_until(
            lambda: {name for name in at_site if fleet.query(name)} == at_site, timeout=30, interval=0.5
        ), at_site - {name for name in at_site if fleet.query(name)}

        # 0/0 (NaN) until the site's evaluation sees two scrapes of the load; then a number.
        def error_ratio() -> float | None:
            found = fleet.query(f'route:http_request_errors:ratio_rate5m{{route="{CHAT}"}}')
            value = float(found[0]["value"][1]) if found else math.nan
            return None if math.isnan(value) else value

        assert wait_until(lambda: error_ratio() is not None, timeout=30, interval=0.5), "the error ratio stayed NaN"
        assert error_ratio() == 0.0  # every answer the client got was a 200

        # The fleet request rate: the site's rule evaluated after its scrapes saw the whole load
        # (federated samples keep the site's evaluation timestamps). rate()*300 is at least the
        # counted load and at most the warm-up plus load, times Prometheus' extrapolation bound;
        # an evaluation 10 s (10 scrapes) later keeps that bound under 1.2.
        raw = site.query(f"{chat_series}[5m]")
        full_at = max(
            next(float(ts) for ts, v in series["values"] if float(v) == sent[(series["metric"]["instance"], "200")])
            for series in raw
        )

        def evaluation_after_load():
            (series,) = fleet.query(f'route:http_requests:rate5m{{route="{CHAT}"}}[5m]') or [None]
            late = [(float(ts), float(v)) for ts, v in (series or {}).get("values", []) if float(ts) >= full_at + 10]
            return late and late[0]

        evaluated = wait_until(evaluation_after_load, timeout=60, interval=0.5)
        assert evaluated, "the global Prometheus never got a rate evaluated after the load"
        at, rate = evaluated
        fewest = min(
            sum(1 for ts, _ in s["values"] if at - 300 < float(ts) <= at) for s in site.query(f"{chat_series}[5m]")
        )
        assert load / 300 <= rate <= (load + warmup) / 300 * extrapolation_bound(fewest), (rate, load, fewest)
    finally:
        for server in reversed(servers):
            server.stop()


RETENTION = "--storage.tsdb.retention.time=15d"
SIZING = "bytes ~= series x (retention / scrape interval)"


def exec_start(unit: str) -> list[str]:
    """The ExecStart command line of deploy/systemd/<unit>, continuation lines joined."""
    text = (DEPLOY / "systemd" / unit).read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()


def k8s_documents(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())}


def test_every_prometheus_deployment_keeps_15_days_and_says_how_to_size_its_disk():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    (container,) = k8s_documents("prometheus.yaml")["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    for where, argv in [("systemd", exec_start("prometheus.service")),
                        ("compose", compose["services"]["prometheus"]["command"]),
                        ("k8s", container["args"])]:  # fmt: skip
        assert RETENTION in argv, where
    for path in ("systemd/prometheus.service", "docker-compose.yml", "k8s/prometheus.yaml"):
        text = " ".join((DEPLOY / path).read_text().split())
        assert "series" in text and "15 days" in text, path
    assert SIZING in (DEPLOY / "systemd" / "prometheus.service").read_text()
    assert SIZING in (DEPLOY / "k8s" / "prometheus.yaml").read_text()


def test_compose_and_kubernetes_wire_prometheus_to_their_alertmanager():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    (target,) = yaml.safe_load((PROM / "compose.yml").read_text())["alerting"]["alertmanagers"][0]["static_configs"]
    host, port = target["targets"][0].split(":")
    assert host in services and "alertmanager" in services["prometheus"]["depends_on"]
    assert any(v.startswith("./alertmanager/alertmanager.yml:") for v in services[host]["volumes"])
    assert f"127.0.0.1:{port}:{port}" in services[host]["ports"]

    k8s = yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())
    host, port = k8s["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0].split(":")
    service = k8s_documents("alertmanager.yaml")["Service"]
    assert service["metadata"]["name"] == host and service["spec"]["ports"][0]["port"] == int(port)


def test_kubernetes_prometheus_mounts_every_rule_file_where_the_config_looks():
    prometheus = k8s_documents("prometheus.yaml")
    pod = prometheus["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert f"--config.file={config_dir}/prometheus.yml" in container["args"]
    sources = next(v for v in pod["volumes"] if v["name"] == "config")["projected"]["sources"]
    paths = {item["path"]: (s["configMap"]["name"], item["key"]) for s in sources for item in s["configMap"]["items"]}
    rules = sorted((PROM / "rules").glob("*.yml"))
    assert paths == {"prometheus.yml": ("prometheus-config", "prometheus.yml"),
                     **{f"rules/{r.name}": ("prometheus-rules", r.name) for r in rules}}  # fmt: skip
    assert yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())["rule_files"] == ["rules/*.yml"]
    # Pod discovery needs to list and watch pods, with the account the pod runs as.
    (rule,) = prometheus["ClusterRole"]["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])
    assert prometheus["ClusterRoleBinding"]["subjects"][0]["name"] == pod["serviceAccountName"]
    claims = {c["metadata"]["name"] for c in prometheus["StatefulSet"]["spec"]["volumeClaimTemplates"]}
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/prometheus")
    assert data["name"] in claims  # the TSDB on a persistent volume, not the container's disk


@pytest.mark.parametrize("unit", ["prometheus.service", "alertmanager.service"])
def test_monitoring_systemd_units_verify(unit):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    proc = subprocess.run(
        [analyze, "verify", str(DEPLOY / "systemd" / unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


@pytest.mark.deploy
def test_systemd_units_command_lines_start_the_real_servers(tmp_path):
    """The units' exact flags, with paths moved to a temp dir and ports to loopback, start the
    packaged Prometheus and Alertmanager; Prometheus reports the 15-day retention it runs with."""
    prom_config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    prom_config["rule_files"] = [str(p) for p in sorted((PROM / "rules").glob("*.yml"))]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
    moved = {
        "/etc/prometheus/prometheus.yml": str(tmp_path / "prometheus.yml"),
        "/etc/prometheus/alertmanager.yml": str(ALERTMANAGER_CONFIG),
        "/var/lib/prometheus/metrics2": str(tmp_path / "tsdb"),
        "/var/lib/alertmanager": str(tmp_path / "alertmanager"),
    }
    started = []
    try:
        for unit in ("prometheus.service", "alertmanager.service"):
            argv = exec_start(unit)
            assert argv[0] == binary(Path(argv[0]).name)
            port = free_port()
            for i, arg in enumerate(argv):
                flag, _, value = arg.partition("=")
                if flag == "--web.listen-address":
                    argv[i] = f"{flag}=127.0.0.1:{port}"
                elif value in moved:
                    argv[i] = f"{flag}={moved[value]}"
            started.append(Server(argv, port, tmp_path / f"{unit}.log", "/-/ready"))
        flags = started[0].get_json("/api/v1/status/flags")["data"]
        assert flags["storage.tsdb.retention.time"] == "15d"
        assert started[1].get_json("/api/v2/status")["cluster"]["status"] == "disabled"
    finally:
        for server in started:
            server.stop()
