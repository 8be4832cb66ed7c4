"""examples/flask-app as a user runs it: copied out of the repository beside a metrics.py of their own,
promfork installed from a wheel, exact under --max-requests churn and a kill -9."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from tests.support.checks import assert_config_wires_every_hook
from tests.support.churn import churn_and_kill
from tests.support.client import request, samples, value
from tests.support.exactness import CUT, Tally, http_rows, mismatches, scrape_when_compacted
from tests.support.servers import ROOT, ExampleServer, clean_env

FLASK_APP = ROOT / "examples" / "flask-app"
REQUESTS = 1500
CLIENTS = 12
ROWS = [("GET", "/hello", "200"), ("GET", "/items/<item_id>", "200"), ("GET", "unmatched", "404")]


def test_flask_example_config_is_short_and_wires_every_hook():
    assert_config_wires_every_hook(FLASK_APP / "gunicorn.conf.py")


def test_users_own_metrics_module_imports_beside_promfork(wheel_env, tmp_path: Path):
    project = wheel_env.project("flask-app", tmp_path / "app")
    probe = (
        "import json, metrics, promfork, promfork.gunicorn, app\n"
        "print(json.dumps([metrics.__file__, promfork.__file__, type(app.create_app()).__name__]))"
    )
    env = clean_env()
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [wheel_env.python, "-c", probe], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    users_metrics, promfork_init, app_type = json.loads(done.stdout)
    assert Path(users_metrics) == project / "metrics.py"
    assert Path(promfork_init).is_relative_to(wheel_env.root / "venv"), "promfork must come from the wheel"
    assert app_type == "Flask"


def _item(i: int) -> str:
    return str(random.Random(i).randint(1, 10**6))


@pytest.mark.integration
def test_flask_example_is_exact_under_churn_and_kill_9(wheel_env, tmp_path: Path):
    project = wheel_env.project("flask-app", tmp_path / "app")
    server = ExampleServer(
        project,
        tmp_path,
        "--max-requests",
        "60",
        "--max-requests-jitter",
        "20",
        gunicorn=wheel_env.gunicorn,
        workers=3,
    )

    def one(tally: Tally, i: int) -> None:
        kind = i % 5
        if kind < 2:
            path, row, items = "/hello", ROWS[0], 0
        elif kind < 4:
            path, row, items = f"/items/{_item(i)}", ROWS[1], 1
        else:
            path, row, items = f"/no/such/page/{i}", ROWS[2], 0
        try:
            status, _, body = request("GET", server.port, path, timeout=30)
        except CUT:
            tally.cut(row, items=items)
        else:
            if (status, row[2]) == (200, "200") and items and json.loads(body) != {"item_id": path.split("/")[-1]}:
                tally.problem(f"{path} answered {body[:100]!r}")
            tally.answered(("GET", row[1], str(status)), items=items if status == 200 else 0)

    with server:
        run = churn_and_kill(server, one, requests=REQUESTS, clients=CLIENTS)
        tally = run.tally
        assert set(tally.received) == set(ROWS), tally.received
        assert sum(tally.in_doubt.values()) <= CLIENTS, f"more requests failed than a kill explains: {tally.in_doubt}"
        assert server.log().count("Booting worker") >= 3 + 10, "workers were not recycled during the load"

        after = scrape_when_compacted(server)
        assert not list(server.multiproc_dir.glob(f"*_{run.victim}.db")), "the killed worker's files are still there"
        items = value(after, "example_items_viewed_total") - value(run.before, "example_items_viewed_total")
        assert mismatches(tally, run.before, after, {"items": items}) == []
        routes = {route for _, route, _ in http_rows(after)}
        assert routes <= {"/hello", "/items/<item_id>", "unmatched"}, routes
        assert value(after, "http_requests_in_flight") == 0
        exits = {dict(k)["reason"]: v for k, v in samples(after, "gunicorn_worker_exits_total").items()}
        assert exits["signal"] == 1, exits
        assert sum(exits.values()) == value(after, "gunicorn_worker_boots_total") - 3
        assert value(after, "metrics_compactions_total") >= 10
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
