"""promfork-load against real gunicorn: agreement under churn and kills, disagreement caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, clean_env

from promfork.loadtest.mix import DEFAULT_MIX, RequestMix, parse_mix

LOAD = str(Path(sys.executable).with_name("promfork-load"))


def run_load(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([LOAD, "--no-progress", *args], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.integration
def test_cli_reports_agreement_under_churn_and_kills(tmp_path: Path):
    report = tmp_path / "report.json"
    proc = run_load("--workers", "3", "--max-requests", "60", "--kill-workers-every", "0.7", "--duration", "5",
                    "--concurrency", "16", "--mock-latency-ms", "5", "--json", str(report))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["agree"] is True and data["kills"] >= 3 and data["requests"] > 200
    assert "verdict: all totals agree" in proc.stdout
    # the client measures itself: CPU used while driving, and its ceiling per CPU-second
    assert 0 < data["client_cpu_s"] < data["elapsed_s"] * 2
    assert data["client_rate_per_cpu_s"] == pytest.approx(data["requests"] / data["client_cpu_s"])
    assert "load generator:" in proc.stdout
    checks = {c["what"]: c for c in data["checks"]}
    assert checks["http_requests_total{route=unmatched,status=404}"]["client"] > 0


@pytest.mark.integration
def test_cli_reports_disagreement_and_fails(gunicorn_factory, tmp_path: Path):
    # Metrics that do not describe the traffic: the load goes to one app, the scrape to another
    # (as when a second app instance writes to another directory).
    served = gunicorn_factory(workers=2)
    (tmp_path / "other").mkdir()
    other = gunicorn_factory(env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "other" / "mp")}, workers=2)
    proc = run_load("--url", f"http://127.0.0.1:{served.port}", "--metrics-url",
                    f"http://127.0.0.1:{other.port}/metrics", "--requests", "300", "--concurrency", "8")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "MISMATCH" in proc.stdout and "METRICS DISAGREE" in proc.stdout


def test_bad_arguments_are_usage_errors():
    proc = run_load("--mix", "plain=10,teleport=5")
    assert proc.returncode == 2 and "teleport" in proc.stderr
    proc = run_load("--url", "http://127.0.0.1:1", "--kill-workers-every", "1")
    assert proc.returncode == 2 and "--kill-workers-every" in proc.stderr


def test_mix_is_deterministic_and_weighted():
    mix_a, mix_b = RequestMix(seed=5), RequestMix(seed=5)
    assert [mix_a.next() for _ in range(50)] == [mix_b.next() for _ in range(50)]
    mix = RequestMix(parse_mix("plain=1,unmatched=3"), seed=2)
    unmatched = sum(mix.next().kind == "unmatched" for _ in range(2000))
    assert 1350 < unmatched < 1650  # 3 in 4
    mix = RequestMix(parse_mix("stream=1"), seed=3)
    assert {mix.next().kind for _ in range(20)} == {"stream"}
    assert set(DEFAULT_MIX) == {"plain", "stream", "tool", "client_error", "unmatched"}


def test_locustfile_uses_the_shared_mix():
    source = (ROOT / "loadtest" / "locustfile.py").read_text()
    compile(source, "locustfile.py", "exec")
    assert "from promfork.loadtest.mix import" in source
