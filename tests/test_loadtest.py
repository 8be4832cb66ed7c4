"""promfork-load against real gunicorn: agreement under churn and kills, disagreement caught,
any worker model; and its verdict's in-doubt rule, row by row."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from promfork.loadtest.mix import CHAT, DEFAULT_MIX, UNMATCHED, CustomRequest, RequestMix, parse_mix, parse_request
from promfork.loadtest.tally import Outcome, Tally
from promfork.loadtest.verdict import AMOUNTS, compare
from tests.support.exactness import http_rows
from tests.support.servers import ROOT, clean_env, wait_until

LOAD = str(Path(sys.executable).with_name("promfork-load"))
LOCUST = str(Path(sys.executable).with_name("locust"))
LOCUSTFILE = ROOT / "metrics" / "promfork" / "loadtest" / "locustfile.py"
# The rows each kind of request can land in (method and route are the mix's; statuses as answered).
ROWS_OF_KIND = {"plain": {(CHAT, 200)}, "stream": {(CHAT, 200)}, "tool": {(CHAT, 200)},
                "client_error": {(CHAT, 400), (CHAT, 404)}, "unmatched": {(UNMATCHED, 404)}}  # fmt: skip


def run_load(*args: str, timeout: int = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOAD, "--no-progress", *args], cwd=ROOT, env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def request_rows(data: dict) -> dict[tuple[str, int], dict]:
    """The http_requests_total rows of a JSON report, by (route, status)."""
    rows = {}
    for check in data["checks"]:
        if check["what"].startswith("http_requests_total{"):
            labels = dict(item.split("=", 1) for item in check["what"][20:-1].split(","))
            rows[(labels["route"], int(labels["status"]))] = check
    return rows


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
    # GenAI totals from the usage the client received (cached and reasoning details, cost at the mock's prices)
    genai = (INPUT_ROW, OUTPUT_ROW, "gen_ai_client_cached_input_tokens_total", "gen_ai_client_reasoning_tokens_total",
             "gen_ai_client_cost_usd_total")  # fmt: skip
    for row in genai:
        assert checks[row]["ok"] and checks[row]["client"] > 0, checks[row]
    assert data["worker_class"] == "sync" and "worker class sync" in proc.stdout
    assert data["server_log"] is None  # removed: the run agreed
    # In doubt: exactly the requests the client did not receive whole, never a complete one.
    assert data["in_doubt"] == data["failed"] == sum(data["in_doubt_by_kind"].values())
    assert data["in_doubt_by_kind"] == {
        k.split()[0]: n for k, n in data["by_kind_status"].items() if k.endswith("None")
    }
    # Each row is widened only by the requests cut that could have landed in it.
    for (route, status), row in request_rows(data).items():
        cut = sum(n for kind, n in data["in_doubt_by_kind"].items() if (route, status) in ROWS_OF_KIND[kind])
        assert row["tolerance"] == row["in_doubt"] <= cut, row
    assert request_rows(data)[(UNMATCHED, 404)]["tolerance"] == data["in_doubt_by_kind"].get("unmatched", 0)


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
    # The tool started nothing, so it kept nothing.
    assert "server log kept" not in proc.stdout + proc.stderr


@pytest.mark.integration
def test_a_started_server_that_disagrees_keeps_its_log(gunicorn_factory, tmp_path: Path):
    other = gunicorn_factory(workers=2)
    report = tmp_path / "report.json"
    proc = run_load("--workers", "2", "--metrics-url", f"http://127.0.0.1:{other.port}/metrics",
                    "--requests", "200", "--concurrency", "8", "--json", str(report))  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    log = Path(data["server_log"])
    try:
        assert f"server log kept: {log}" in proc.stdout and str(log) in proc.stderr
        assert "Using worker: sync" in log.read_text()
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)


@pytest.mark.integration
def test_a_server_that_cannot_start_is_exit_2_with_its_log_kept():
    proc = run_load("--gunicorn-args", "--worker-class no.such.Worker", "--requests", "10", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    log = Path(proc.stderr.split("see ")[-1].strip())
    try:
        assert log.name == "gunicorn.log" and "no.such" in log.read_text()
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--worker-class", "gthread"), {}),
        (("--gunicorn-args", "--threads 2 --timeout 60"), {}),
        ((), {"GUNICORN_CMD_ARGS": "--threads 2"}),  # the caller's deployment settings are passed through
    ],
    ids=["worker-class", "gunicorn-args", "GUNICORN_CMD_ARGS"],
)
def test_gunicorn_settings_reach_the_server_and_the_report(tmp_path: Path, args, env):
    report = tmp_path / "report.json"
    proc = run_load("--workers", "2", "--requests", "150", "--concurrency", "8", "--json", str(report), *args, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # gunicorn runs a sync worker with more than one thread as gthread, and says so in its log.
    assert json.loads(report.read_text())["worker_class"] == "gthread"
    assert "worker class gthread" in proc.stdout


def test_bad_arguments_are_usage_errors():
    proc = run_load("--mix", "plain=10,teleport=5")
    assert proc.returncode == 2 and "teleport" in proc.stderr
    proc = run_load("--url", "http://127.0.0.1:1", "--kill-workers-every", "1")
    assert proc.returncode == 2 and "--kill-workers-every" in proc.stderr
    proc = run_load("--url", "http://127.0.0.1:1", "--worker-class", "gthread")
    assert proc.returncode == 2 and "--worker-class" in proc.stderr
    proc = run_load("--gunicorn-args", "--threads 2 --bind 0.0.0.0:80")
    assert proc.returncode == 2 and "--bind" in proc.stderr
    proc = run_load("--gunicorn-args", "--threads 'unbalanced")
    assert proc.returncode == 2 and "--gunicorn-args" in proc.stderr


# ---------------------------------------------------------------- the verdict's rule, on made-up runs


def outcome(kind: str, status: int | None, complete: bool, tokens: tuple[int, int] = (0, 0), expected: int = 200):
    method, route = ("GET", UNMATCHED) if kind == "unmatched" else ("POST", CHAT)
    return Outcome(kind, method, route, expected, 0.0, 0.0, status, complete, *tokens)


def exposition(requests: dict[tuple[str, str, int], float], prompt: float = 0, completion: float = 0) -> dict:
    samples = {("http_requests_total", (("method", m), ("route", r), ("status", str(s)))): v
               for (m, r, s), v in requests.items()}  # fmt: skip
    labels = (("gen_ai_provider_name", "mock"), ("gen_ai_request_model", "mock-small"))
    samples[(USAGE, (*labels, ("gen_ai_token_type", "input")))] = prompt
    samples[(USAGE, (*labels, ("gen_ai_token_type", "output")))] = completion
    return samples


def verdict(tally: Tally, after: dict) -> dict[str, tuple[bool, float]]:
    return {r.what: (r.ok, r.tolerance) for r in compare(tally, {}, after)}


OK_ROW = f"http_requests_total{{route={CHAT},status=200}}"
USAGE = "gen_ai_client_token_usage_sum"
INPUT_ROW = f"{USAGE}{{gen_ai_token_type=input}}"
OUTPUT_ROW = f"{USAGE}{{gen_ai_token_type=output}}"
BAD_ROW = f"http_requests_total{{route={CHAT},status=400}}"


def test_a_cut_request_widens_only_the_rows_it_could_have_landed_in():
    sure = [outcome("plain", 200, True, (10, 5))] * 3 + [outcome("client_error", 404, True, expected=404)]
    tally = Tally([*sure, outcome("client_error", None, False, expected=400)])
    # The cut client error may have been counted as the 400 it asked for, or not at all ...
    rows = verdict(tally, exposition({("POST", CHAT, 200): 3, ("POST", CHAT, 404): 1, ("POST", CHAT, 400): 1}, 30, 15))
    assert rows[OK_ROW] == (True, 0) and rows[BAD_ROW] == (True, 1)
    assert all(
        ok for ok, _ in verdict(tally, exposition({("POST", CHAT, 200): 3, ("POST", CHAT, 404): 1}, 30, 15)).values()
    )
    # ... but never as a 200, nor as the 404 that other client errors got: those rows stay exact.
    rows = verdict(tally, exposition({("POST", CHAT, 200): 4, ("POST", CHAT, 404): 1}, 30, 15))
    assert rows[OK_ROW] == (False, 0)
    rows = verdict(tally, exposition({("POST", CHAT, 200): 3, ("POST", CHAT, 404): 2}, 30, 15))
    assert rows[BAD_ROW.replace("400", "404")] == (False, 0)
    # It reaches no provider (no client error did), so token totals stay exact.
    assert rows[INPUT_ROW] == (True, 0)


def test_a_complete_response_is_never_in_doubt_even_among_kills():
    tally = Tally([outcome("stream", 200, True, (10, 5)), outcome("plain", 200, True, (10, 5))], kills=[0.0, 0.0])
    rows = verdict(tally, exposition({("POST", CHAT, 200): 1}, 10, 5))
    assert rows[OK_ROW] == (False, 0), "a stream the client received whole must be counted"


def test_a_request_cut_before_its_headers_may_count_as_a_status_its_kind_got_or_as_an_abort():
    tally = Tally([outcome("plain", 200, True, (10, 5)), outcome("plain", 429, True), outcome("plain", None, False)])
    for status in (429, 500):
        rows = verdict(tally, exposition({("POST", CHAT, 200): 1, ("POST", CHAT, status): 1 + (status == 429)}, 10, 5))
        assert rows[f"http_requests_total{{route={CHAT},status={status}}}"] == (True, 1)
    # a status no request of its kind got is not one it could have produced
    rows = verdict(tally, exposition({("POST", CHAT, 200): 1, ("POST", CHAT, 429): 1, ("POST", CHAT, 503): 1}, 10, 5))
    assert rows[f"http_requests_total{{route={CHAT},status=503}}"] == (False, 0)


def test_tokens_of_requests_in_doubt_are_bounded_by_the_largest_completed_request_of_their_kind():
    tally = Tally([outcome("plain", 200, True, (10, 5)), outcome("plain", 200, True, (40, 20)),
                   outcome("stream", 200, True, (7, 3)), outcome("plain", None, False)])  # fmt: skip
    within = verdict(tally, exposition({("POST", CHAT, 200): 4}, 57 + 40, 28 + 20))
    assert within[INPUT_ROW] == (True, 40)
    assert within[OUTPUT_ROW] == (True, 20)
    beyond = verdict(tally, exposition({("POST", CHAT, 200): 4}, 57 + 41, 28))
    assert beyond[INPUT_ROW] == (False, 40)


def test_mix_is_deterministic_and_weighted():
    mix_a, mix_b = RequestMix(seed=5), RequestMix(seed=5)
    assert [mix_a.next() for _ in range(50)] == [mix_b.next() for _ in range(50)]
    mix = RequestMix(parse_mix("plain=1,unmatched=3"), seed=2)
    unmatched = sum(mix.next().kind == "unmatched" for _ in range(2000))
    assert 1350 < unmatched < 1650  # 3 in 4
    mix = RequestMix(parse_mix("stream=1"), seed=3)
    assert {mix.next().kind for _ in range(20)} == {"stream"}
    assert set(DEFAULT_MIX) == {"plain", "stream", "tool", "client_error", "unmatched"}


@pytest.mark.integration
def test_a_locust_run_of_the_locustfile_agrees_with_the_scraped_totals(gunicorn_factory, tmp_path: Path):
    # A short headless run of the shipped locustfile against real gunicorn. Users finish the request
    # they have in flight when the time is up (--stop-timeout), so nothing is in doubt: every total is exact.
    server = gunicorn_factory(workers=2)
    before = http_rows(server.scrape())
    proc = subprocess.run([LOCUST, "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "5s",
                           "--stop-timeout", "10", "--host", f"http://127.0.0.1:{server.port}", "--json"],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # stdout: the locustfile's own check of tokens and cost, then Locust's final stats as JSON
    json_start = re.search(r"^\[$", proc.stdout, re.MULTILINE)
    assert json_start, proc.stdout[-3000:]
    report, stats = proc.stdout[: json_start.start()], json.loads(proc.stdout[json_start.start() :])
    assert " 0 abandoned in flight" in report, report
    # every token amount and the cost: the change in /metrics equals what the users' answers reported
    checked = [line for line in report.splitlines() if " client " in line and " metrics " in line]
    assert len(checked) == len(AMOUNTS) + 1 and all(line.endswith(" ok") for line in checked), report

    assert all(entry["num_failures"] == 0 for entry in stats), stats  # every answer whole, with the expected status
    sent: Counter[str] = Counter()
    for entry in stats:
        sent[entry["name"]] += entry["num_requests"]
    assert set(sent) == set(DEFAULT_MIX) and sum(sent.values()) >= 100, sent

    def served() -> dict[tuple[str, str, str], float]:
        after = http_rows(server.scrape())
        return {row: n - before.get(row, 0) for row, n in after.items() if n != before.get(row, 0)}

    ok, bad, not_found = ("POST", CHAT, "200"), ("POST", CHAT, "400"), ("POST", CHAT, "404")
    unmatched = ("GET", UNMATCHED, "404")

    def agrees(rows: dict) -> bool:
        # Locust counts by kind; a client error was answered with the 400 or 404 its kind expected.
        return (
            set(rows) <= {ok, bad, not_found, unmatched}
            and rows.get(ok, 0) == sent["plain"] + sent["stream"] + sent["tool"]
            and rows.get(bad, 0) + rows.get(not_found, 0) == sent["client_error"]
            and rows.get(unmatched, 0) == sent["unmatched"]
        )

    assert wait_until(lambda: agrees(served())), (served(), sent)


@pytest.mark.integration
def test_gthread_workers_agree_under_churn_and_kills(tmp_path: Path):
    # Threads share one process's files: a kill -9 takes every in-flight request of the worker with it.
    report = tmp_path / "report.json"
    proc = run_load("--worker-class", "gthread", "--gunicorn-args=--threads 4", "--workers", "2",
                    "--max-requests", "80", "--kill-workers-every", "0.8", "--duration", "4", "--concurrency", "16",
                    "--mock-latency-ms", "5", "--json", str(report))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["agree"] is True and data["kills"] >= 2 and data["worker_class"] == "gthread"


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("GET:/hello", CustomRequest("GET", "/hello", "/hello", 1)),
        ("GET:/items/{n}=/items/<item_id>*3", CustomRequest("GET", "/items/{n}", "/items/<item_id>", 3)),
        ("post:/search?q=a", CustomRequest("POST", "/search?q=a", "/search", 1)),
        ("GET:/x/{n}=unmatched", CustomRequest("GET", "/x/{n}", "unmatched", 1)),
    ],
)
def test_a_request_of_your_own_is_method_path_route_and_weight(text, wanted):
    assert parse_request(text) == wanted


@pytest.mark.parametrize("text", ["/hello", "GET /hello", "GET:/items/{n}", "GET:/hello*0", "GET:hello"])
def test_a_request_that_cannot_be_judged_is_a_usage_error(text):
    with pytest.raises(ValueError, match=re.escape(text)):
        parse_request(text)
    proc = run_load("--request", text, "--requests", "1")
    assert proc.returncode == 2 and "--request" in proc.stderr


# Each example's routes, as its framework names them.
EXAMPLE_ROUTES = {
    "flask-app": "/items/<item_id>",
    "fastapi-app": "/items/{item_id}",
    "django-app": "/items/<int:item_id>",
}


@pytest.mark.integration
@pytest.mark.parametrize("example", sorted(EXAMPLE_ROUTES))
def test_promfork_load_proves_your_own_app_exact_under_churn_and_kills(example: str, tmp_path: Path):
    project = tmp_path / example
    shutil.copytree(ROOT / "examples" / example, project)
    report = tmp_path / "report.json"
    requests = ["--request", "GET:/hello", "--request", f"GET:/items/{{n}}={EXAMPLE_ROUTES[example]}*2",
                "--request", "GET:/no/such/{n}=unmatched"]  # fmt: skip
    proc = subprocess.run(
        [LOAD, "--no-progress", *requests, "--config", "gunicorn.conf.py", "--workers", "3",
         "--max-requests", "40", "--kill-workers-every", "0.7", "--duration", "3", "--concurrency", "12",
         "--json", str(report)],
        cwd=project, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["agree"] is True and data["kills"] >= 2, data
    rows = request_rows(data)
    assert {route for route, _ in rows} == {"/hello", EXAMPLE_ROUTES[example], "unmatched"}
    assert rows[(EXAMPLE_ROUTES[example], 200)]["client"] > rows[("/hello", 200)]["client"] > 0
    assert not any("gen_ai" in check["what"] for check in data["checks"])
