"""examples/django-app as a user runs it: promfork from a wheel in a clean venv, outside the repository,
`"promfork.django.PrometheusMiddleware"` first in MIDDLEWARE; exact under churn and kill -9 in every worker model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.checks import assert_config_wires_every_hook
from tests.support.churn import churn_and_kill
from tests.support.client import request, samples, scrape, value
from tests.support.exactness import CUT, Tally, http_rows, mismatches, scrape_when_compacted
from tests.support.servers import ROOT, ExampleServer

DJANGO_APP = ROOT / "examples" / "django-app"
ROWS = [("GET", "/hello", "200"), ("GET", "/items/<int:item_id>", "200"), ("GET", "unmatched", "404")]
CLIENTS = 8


def test_django_example_config_is_short_and_wires_every_hook():
    assert_config_wires_every_hook(DJANGO_APP / "gunicorn.conf.py")


ROUTES = """
import django, json, sys
from django.conf import settings
from django.urls import include, path, re_path
from django.http import HttpResponse

def view(request, **kwargs):
    return HttpResponse("ok")

orders = [path("orders/<int:order_id>/", view), re_path(r"^legacy/(?P<year>[0-9]{4})/$", view)]
settings.configure(ROOT_URLCONF=sys.modules[__name__], ALLOWED_HOSTS=["*"])
urlpatterns = [path("api/", include([path("v1/", include(orders))])), path("hello", view)]
django.setup()
from django.test import RequestFactory
from promfork.django import route_template
from django.urls import resolve
out = {}
for raw in ["/api/v1/orders/17/", "/api/v1/legacy/2024/", "/hello"]:
    request = RequestFactory().get(raw)
    request.resolver_match = resolve(raw)
    out[raw] = route_template(request)
print(json.dumps(out))
"""


def test_route_is_the_matched_pattern_with_nested_includes_joined():
    done = subprocess.run([sys.executable, "-c", ROUTES], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {
        "/api/v1/orders/17/": "/api/v1/orders/<int:order_id>/",
        "/api/v1/legacy/2024/": "/api/v1/legacy/(?P<year>[0-9]{4})/$",
        "/hello": "/hello",
    }


def send(server: ExampleServer):
    def one(tally: Tally, i: int) -> None:
        kind = i % 5
        if kind < 2:
            path, row, items = "/hello", ROWS[0], 0
        elif kind < 4:
            path, row, items = f"/items/{i}", ROWS[1], 1
        else:
            path, row, items = f"/no/such/page/{i}", ROWS[2], 0
        try:
            status, _, body = request("GET", server.port, path, timeout=30)
        except CUT:
            tally.cut(row, items=items)
        else:
            if status == 200 and items and json.loads(body) != {"item_id": i}:
                tally.problem(f"{path} answered {body[:100]!r}")
            tally.answered(("GET", row[1], str(status)), items=items if status == 200 else 0)

    return one


@pytest.mark.integration
@pytest.mark.parametrize("worker", ["sync", "gthread", "gevent"])
def test_django_example_is_exact_under_churn_and_kill_9(wheel_env, tmp_path: Path, worker: str):
    project = wheel_env.project("django-app", tmp_path / "app")
    args = ["--worker-class", worker, "--max-requests", "40", "--max-requests-jitter", "10"]
    if worker == "gthread":
        args += ["--threads", "4"]
    server = ExampleServer(project, tmp_path, *args, gunicorn=wheel_env.gunicorn, workers=3)
    with server:
        run = churn_and_kill(server, send(server), requests=900, clients=CLIENTS)
        tally = run.tally
        assert set(tally.received) == set(ROWS), tally.received
        assert sum(tally.in_doubt.values()) <= CLIENTS, tally.in_doubt
        after = scrape_when_compacted(server)
        items = value(after, "example_items_viewed_total") - value(run.before, "example_items_viewed_total")
        assert mismatches(tally, run.before, after, {"items": items}) == []
        assert {route for _, route, _ in http_rows(after)} <= {"/hello", "/items/<int:item_id>", "unmatched"}
        assert value(after, "http_requests_in_flight") == 0
        exits = {dict(k)["reason"]: v for k, v in samples(after, "gunicorn_worker_exits_total").items()}
        assert exits["signal"] == 1, exits
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.mark.integration
def test_djangos_asgi_application_labels_routes_the_same_way(wheel_env, tmp_path: Path):
    project = wheel_env.project("django-app", tmp_path / "app")
    server = ExampleServer(
        project,
        tmp_path,
        "--worker-class",
        "uvicorn_worker.UvicornWorker",
        "project.asgi:application",
        gunicorn=wheel_env.gunicorn,
        workers=2,
    )
    with server:
        before = scrape(server.port)
        for i in range(30):
            assert request("GET", server.port, "/hello")[0] == 200
            assert request("GET", server.port, f"/items/{i}")[0] == 200
            assert request("GET", server.port, f"/missing/{i}")[0] == 404
        after = scrape(server.port)
    for route, status in [("/hello", "200"), ("/items/<int:item_id>", "200"), ("unmatched", "404")]:
        count = value(after, "http_requests_total", route=route, status=status)
        assert count - value(before, "http_requests_total", route=route, status=status) == 30, route
    assert value(after, "example_items_viewed_total") - value(before, "example_items_viewed_total") == 30


STREAMING = """
import json, os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from promfork.writer import values
assert values.install()
import django
from django.conf import settings
from django.http import StreamingHttpResponse
from django.urls import path

def chunks(request, early):
    yield b"one "
    yield b"two "
    done = request.META.get("promfork.response_complete")
    if early and done is not None:
        done()  # counted here: right before the final chunk
    yield b"end"

def stream(request, n):
    return StreamingHttpResponse(chunks(request, early=False))

def stream_early(request):
    return StreamingHttpResponse(chunks(request, early=True))

settings.configure(ROOT_URLCONF=sys.modules[__name__], ALLOWED_HOSTS=["*"], DEBUG=False,
                   MIDDLEWARE=["promfork.django.PrometheusMiddleware"])
urlpatterns = [path("stream/<int:n>", stream), path("early", stream_early)]
django.setup()
from django.core.handlers.wsgi import WSGIHandler
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

def counted(route):
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=sys.argv[1])
    labels = {"method": "GET", "route": route, "status": "200"}
    return registry.get_sample_value("http_requests_total", labels) or 0, registry.get_sample_value(
        "http_response_size_bytes_sum", {"method": "GET", "route": route}) or 0

app = WSGIHandler()
seen = {}
for route, url in [("/stream/<int:n>", "/stream/7"), ("/early", "/early")]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": url, "SERVER_NAME": "x", "SERVER_PORT": "80",
               "wsgi.input": __import__("io").BytesIO(), "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1"}
    body = app(environ, lambda status, headers, exc_info=None: None)
    steps = [counted(route)]
    for _ in body:
        steps.append(counted(route))
    steps.append(counted(route))
    body.close()
    steps.append(counted(route))
    seen[route] = steps
print(json.dumps(seen))
"""


def test_a_streaming_response_is_counted_at_its_last_byte_or_at_response_complete(tmp_path: Path):
    done = subprocess.run([sys.executable, "-c", STREAMING, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    # (count, response bytes) before the body, after each chunk the server took, once exhausted, after close()
    assert seen["/stream/<int:n>"] == [[0, 0], [0, 0], [0, 0], [0, 0], [1, 11], [1, 11]]
    assert seen["/early"] == [[0, 0], [0, 0], [0, 0], [1, 8], [1, 8], [1, 8]]
