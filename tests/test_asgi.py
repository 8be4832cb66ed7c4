"""promfork.asgi: the ASGI middleware in-process, and the FastAPI example under every ASGI worker model.

The in-process tests drive the middleware with hand-built ASGI scopes (no HTTP
client library): prometheus_client is in its in-memory mode here, so each
middleware has a private registry to read. The integration tests run the
FastAPI example from a wheel, outside the repository, under Gunicorn's native
`asgi` worker and `uvicorn_worker.UvicornWorker`, with churn and a kill -9.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from promfork.asgi import RESPONSE_COMPLETE_KEY, PrometheusMiddleware
from promfork.config import Settings
from tests.support.checks import assert_config_wires_every_hook, assert_never_decreases
from tests.support.churn import churn_and_kill
from tests.support.client import counter_samples, request, samples, scrape, value
from tests.support.exactness import CUT, Tally, http_rows, mismatches, scrape_when_compacted
from tests.support.servers import ROOT, ExampleServer

# ---------------------------------------------------------------- driving an ASGI app by hand


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    messages: list[dict] = field(default_factory=list)


def call(
    app,
    method: str = "GET",
    path: str = "/",
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    root_path: str = "",
    disconnect_after_chunks: int | None = None,
    on_send: Callable[[dict], None] | None = None,
) -> Reply:
    """One HTTP request through `app`, as an ASGI server would make it; the reply it sent."""
    return asyncio.run(_call(app, method, path, headers or [], body, root_path, disconnect_after_chunks, on_send))


async def _call(app, method, path, headers, body, root_path, disconnect_after_chunks, on_send) -> Reply:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    reply = Reply()
    gone = asyncio.Event()
    request_sent = False

    async def receive() -> dict:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if on_send is not None:
            on_send(message)
        reply.messages.append(message)
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")
            chunks = sum(1 for m in reply.messages if m["type"] == "http.response.body")
            if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
                gone.set()

    await app(scope, receive, send)
    return reply


def count(middleware: PrometheusMiddleware, method: str, route: str, status: str) -> float:
    found = middleware.registry.get_sample_value(
        "http_requests_total", {"method": method, "route": route, "status": status}
    )
    return found or 0.0


def in_flight(middleware: PrometheusMiddleware) -> float:
    return middleware.registry.get_sample_value("http_requests_in_flight")


def exposition(middleware: PrometheusMiddleware) -> dict:
    reply = call(middleware, "GET", "/metrics")
    assert reply.status == 200, reply.body
    return {f.name: f for f in text_string_to_metric_families(reply.body.decode())}


# ---------------------------------------------------------------- apps under test


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict:
        return {"message": "hello"}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"item_id": item_id}

    @app.get("/fail")
    async def fail() -> dict:
        raise RuntimeError("the endpoint failed")

    @app.get("/stream/{chunks}")
    async def stream(chunks: int) -> StreamingResponse:
        async def body():
            for _ in range(chunks):
                await asyncio.sleep(0.02)
                yield b"x" * 10

        return StreamingResponse(body())

    @app.get("/events")
    async def events(request: Request) -> StreamingResponse:
        async def body():
            yield b"data: 1\n\n"
            complete = request.scope.get(RESPONSE_COMPLETE_KEY)
            complete()
            complete()  # twice: still counted once
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/forever")
    async def forever() -> StreamingResponse:
        async def body():
            while True:
                yield b"tick\n"
                await asyncio.sleep(0.01)

        return StreamingResponse(body())

    api = APIRouter(prefix="/api")
    versioned = APIRouter(prefix="/v{version}")

    @versioned.get("/users/{user_id}")
    async def user(version: int, user_id: str) -> dict:
        return {"user_id": user_id}

    api.include_router(versioned)
    app.include_router(api)

    async def thing(request):
        return PlainTextResponse(request.path_params["thing_id"])

    app.mount("/sub", Starlette(routes=[Route("/things/{thing_id}", thing)]))

    async def files(scope, receive, send):
        await PlainTextResponse("a file")(scope, receive, send)

    app.router.routes.append(Mount("/static", app=files))
    return app


@pytest.fixture
def metered() -> PrometheusMiddleware:
    return PrometheusMiddleware(fastapi_app(), settings=Settings())


# ---------------------------------------------------------------- route labels


def test_route_labels_are_templates_of_routes_included_routers_and_mounts(metered):
    for path in ("/items/1", "/items/2", "/api/v2/users/ann", "/sub/things/7", "/static/css/site.css", "/hello"):
        assert call(metered, "GET", path).status == 200, path
    assert count(metered, "GET", "/items/{item_id}", "200") == 2
    assert count(metered, "GET", "/api/v{version}/users/{user_id}", "200") == 1
    assert count(metered, "GET", "/sub/things/{thing_id}", "200") == 1
    assert count(metered, "GET", "/static/{path}", "200") == 1
    assert count(metered, "GET", "/hello", "200") == 1
    routes = {dict(labels)["route"] for labels in samples(exposition(metered), "http_requests_total")}
    templates = {"/items/{item_id}", "/api/v{version}/users/{user_id}", "/sub/things/{thing_id}", "/static/{path}"}
    assert routes == templates | {"/hello"}


def test_unknown_paths_wrong_methods_and_unknown_methods_share_bounded_labels(metered):
    assert call(metered, "GET", "/nope/1").status == 404
    assert call(metered, "GET", "/nope/2").status == 404
    assert call(metered, "GET", "/sub/nothing/here").status == 404
    assert call(metered, "POST", "/hello").status == 405
    call(metered, "BREW", "/hello")
    assert count(metered, "GET", "unmatched", "404") == 3
    assert count(metered, "POST", "unmatched", "405") == 1
    routes = {dict(labels)["route"] for labels in samples(exposition(metered), "http_requests_total")}
    methods = {dict(labels)["method"] for labels in samples(exposition(metered), "http_requests_total")}
    assert routes == {"unmatched"}
    assert methods == {"GET", "POST", "other"}


def test_route_is_found_below_the_root_path(metered):
    assert call(metered, "GET", "/items/5", root_path="/gateway").status == 200
    assert count(metered, "GET", "/items/{item_id}", "200") == 1


def test_added_with_add_middleware_it_finds_the_routes_of_the_app_it_was_added_to():
    app = fastapi_app()
    app.add_middleware(PrometheusMiddleware, settings=Settings())
    assert call(app, "GET", "/items/3").status == 200
    assert call(app, "GET", "/api/v1/users/bo").status == 200
    families = {f.name: f for f in text_string_to_metric_families(call(app, "GET", "/metrics").body.decode())}
    assert value(families, "http_requests_total", route="/items/{item_id}", status="200") == 1
    assert value(families, "http_requests_total", route="/api/v{version}/users/{user_id}", status="200") == 1
    assert value(families, "http_requests_total") == 2  # /metrics itself is not counted


def test_routes_are_found_through_other_middleware_and_when_added_later():
    app = fastapi_app()
    metered = PrometheusMiddleware(CORSMiddleware(app, allow_origins=["*"]), settings=Settings())

    @app.get("/late/{n}")
    async def late(n: int) -> dict:
        return {"n": n}

    assert call(metered, "GET", "/items/1").status == 200
    assert call(metered, "GET", "/late/1").status == 200
    assert count(metered, "GET", "/items/{item_id}", "200") == 1
    assert count(metered, "GET", "/late/{n}", "200") == 1


def test_an_app_without_starlette_routes_is_labelled_unmatched():
    async def plain(scope, receive, send):
        await PlainTextResponse("hi")(scope, receive, send)

    metered = PrometheusMiddleware(plain, settings=Settings())
    assert call(metered, "GET", "/anything/42").body == b"hi"
    assert count(metered, "GET", "unmatched", "200") == 1


# ---------------------------------------------------------------- what one request records


def test_one_request_records_count_duration_sizes_and_leaves_no_request_in_flight(metered):
    reply = call(metered, "GET", "/items/9", headers=[("Content-Length", "0"), ("X-Any", "1")])
    labels = {"method": "GET", "route": "/items/{item_id}"}
    registry = metered.registry
    assert count(metered, "GET", "/items/{item_id}", "200") == 1
    assert registry.get_sample_value("http_request_duration_seconds_count", labels) == 1
    assert registry.get_sample_value("http_response_size_bytes_sum", labels) == len(reply.body)
    assert registry.get_sample_value("http_request_size_bytes_count", labels) == 1
    assert in_flight(metered) == 0


def test_request_size_is_the_declared_content_length():
    async def echo(scope, receive, send):
        message = await receive()
        await PlainTextResponse(message["body"])(scope, receive, send)

    metered = PrometheusMiddleware(echo, settings=Settings())
    call(metered, "POST", "/", headers=[("Content-Length", "5")], body=b"hello")
    labels = {"method": "POST", "route": "unmatched"}
    assert metered.registry.get_sample_value("http_request_size_bytes_sum", labels) == 5
    assert metered.registry.get_sample_value("http_response_size_bytes_sum", labels) == 5


def test_a_request_is_counted_before_the_message_ending_its_body_reaches_the_server(metered):
    seen_at_end = []

    def on_send(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            seen_at_end.append((count(metered, "GET", "/items/{item_id}", "200"), in_flight(metered)))

    call(metered, "GET", "/items/1", on_send=on_send)
    assert seen_at_end == [(1, 0)]


def test_a_stream_is_timed_to_its_last_byte_and_counted_once_with_every_byte(metered):
    in_flight_while_streaming = []

    def on_send(message):
        if message.get("more_body"):
            in_flight_while_streaming.append(in_flight(metered))

    reply = call(metered, "GET", "/stream/5", on_send=on_send)
    assert reply.body == b"x" * 50
    assert in_flight_while_streaming and set(in_flight_while_streaming) == {1}
    labels = {"method": "GET", "route": "/stream/{chunks}"}
    registry = metered.registry
    assert count(metered, "GET", "/stream/{chunks}", "200") == 1
    assert registry.get_sample_value("http_request_duration_seconds_sum", labels) >= 5 * 0.02
    assert registry.get_sample_value("http_response_size_bytes_sum", labels) == 50
    assert in_flight(metered) == 0


def test_response_complete_counts_a_stream_before_its_final_chunk_and_only_once(metered):
    counted_when_final_chunk_sent = []

    def on_send(message):
        if message.get("body") == b"data: [DONE]\n\n":
            counted_when_final_chunk_sent.append(count(metered, "GET", "/events", "200"))

    reply = call(metered, "GET", "/events", on_send=on_send)
    assert reply.body == b"data: 1\n\ndata: [DONE]\n\n"
    assert counted_when_final_chunk_sent == [1]
    assert count(metered, "GET", "/events", "200") == 1
    labels = {"method": "GET", "route": "/events"}
    # Counted at the call: the bytes sent until then.
    assert metered.registry.get_sample_value("http_response_size_bytes_sum", labels) == len(b"data: 1\n\n")
    assert in_flight(metered) == 0


def test_response_complete_called_from_a_thread_of_a_sync_generator_counts_once():
    app = FastAPI()

    @app.get("/sync-events")
    def events(request: Request) -> StreamingResponse:
        def body():
            yield b"data: 1\n\n"
            request.scope[RESPONSE_COMPLETE_KEY]()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body())

    metered = PrometheusMiddleware(app, settings=Settings())
    for _ in range(3):
        call(metered, "GET", "/sync-events")
    assert count(metered, "GET", "/sync-events", "200") == 3
    assert in_flight(metered) == 0


def test_a_client_that_disconnects_mid_stream_is_counted_once(metered):
    reply = call(metered, "GET", "/forever", disconnect_after_chunks=3)
    assert reply.status == 200
    assert count(metered, "GET", "/forever", "200") == 1
    assert in_flight(metered) == 0


def test_an_app_that_raises_before_responding_is_counted_once_as_500():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    metered = PrometheusMiddleware(broken, settings=Settings())
    with pytest.raises(RuntimeError, match="boom"):
        call(metered, "GET", "/x")
    assert count(metered, "GET", "unmatched", "500") == 1
    assert in_flight(metered) == 0


def test_an_app_that_raises_mid_body_is_counted_once_with_the_status_it_sent():
    async def truncated(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("boom")

    metered = PrometheusMiddleware(truncated, settings=Settings())
    with pytest.raises(RuntimeError):
        call(metered, "GET", "/x")
    assert count(metered, "GET", "unmatched", "200") == 1
    assert in_flight(metered) == 0


def test_a_fastapi_endpoint_that_raises_is_counted_once_as_500_wrapped_or_added(metered):
    with pytest.raises(RuntimeError):
        call(metered, "GET", "/fail")  # wrapped: Starlette's error middleware answers 500 through us
    assert count(metered, "GET", "/fail", "500") == 1
    app = fastapi_app()
    app.add_middleware(PrometheusMiddleware, settings=Settings())
    with pytest.raises(RuntimeError):
        call(app, "GET", "/fail")  # added: the error passes through us before any response started
    families = {f.name: f for f in text_string_to_metric_families(call(app, "GET", "/metrics").body.decode())}
    assert value(families, "http_requests_total", route="/fail", status="500") == 1
    assert value(families, "http_requests_in_flight") == 0


def test_a_cancelled_request_is_counted_once_as_500():
    started = asyncio.Event()

    async def hangs(scope, receive, send):
        started.set()
        await asyncio.sleep(3600)

    metered = PrometheusMiddleware(hangs, settings=Settings())

    async def cancel_midway():
        task = asyncio.create_task(_call(metered, "GET", "/slow", [], b"", "", None, None))
        await started.wait()
        assert in_flight(metered) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert count(metered, "GET", "unmatched", "500") == 1
    assert in_flight(metered) == 0


# ---------------------------------------------------------------- /metrics


def test_metrics_is_served_in_both_formats_and_is_never_counted(metered):
    call(metered, "GET", "/hello")
    text = call(metered, "GET", "/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(text.headers["content-length"]) == len(text.body)
    openmetrics = call(metered, "GET", "/metrics", headers=[("Accept", "application/openmetrics-text")])
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.body.endswith(b"# EOF\n")
    assert value(exposition(metered), "http_requests_total") == 1


def test_metrics_head_options_and_wrong_methods_behave_like_the_wsgi_endpoint(metered):
    head = call(metered, "HEAD", "/metrics")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 0
    options = call(metered, "OPTIONS", "/metrics")
    assert options.status == 200 and "GET" in options.headers["allow"]
    post = call(metered, "POST", "/metrics")
    assert post.status == 405
    assert value(exposition(metered), "http_requests_total") == 0


def test_metrics_requires_the_bearer_token_when_one_is_set():
    metered = PrometheusMiddleware(fastapi_app(), settings=Settings(auth_token="s3cret"))
    denied = call(metered, "GET", "/metrics")
    assert denied.status == 401 and b"bearer token" in denied.body
    assert call(metered, "GET", "/metrics", headers=[("Authorization", "Bearer wrong")]).status == 401
    allowed = call(metered, "GET", "/metrics", headers=[("Authorization", "Bearer s3cret")])
    assert allowed.status == 200 and b"http_requests_total" in allowed.body


def test_metrics_path_is_configurable_and_the_old_path_reaches_the_app():
    metered = PrometheusMiddleware(fastapi_app(), settings=Settings(), metrics_path="/internal/metrics")
    assert call(metered, "GET", "/internal/metrics").status == 200
    assert call(metered, "GET", "/metrics").status == 404
    assert count(metered, "GET", "unmatched", "404") == 1


def test_metrics_disabled_leaves_the_app_alone_and_metrics_answers_404():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)
        await PlainTextResponse("ok")(scope, receive, send)

    metered = PrometheusMiddleware(app, settings=Settings(enabled=False))
    assert call(metered, "GET", "/hello").body == b"ok"
    assert RESPONSE_COMPLETE_KEY not in seen[0]
    disabled = call(metered, "GET", "/metrics")
    assert disabled.status == 404 and b"METRICS_ENABLED=false" in disabled.body
    assert metered.recorder is None


def test_lifespan_and_websocket_scopes_pass_through_untouched():
    passed = []

    async def app(scope, receive, send):
        passed.append((scope, receive, send))

    metered = PrometheusMiddleware(app, settings=Settings())

    async def receive():
        return {}

    async def send(message):
        pass

    for kind in ("lifespan", "websocket"):
        scope = {"type": kind, "path": "/metrics", "headers": []}
        asyncio.run(metered(scope, receive, send))
        assert passed[-1] == (scope, receive, send) and passed[-1][0] is scope
        assert scope == {"type": kind, "path": "/metrics", "headers": []}
    assert value(exposition(metered), "http_requests_total") == 0


# ---------------------------------------------------------------- the FastAPI example under Gunicorn

FASTAPI_APP = ROOT / "examples" / "fastapi-app"
WORKER_CLASSES = [pytest.param("asgi", id="asgi"), pytest.param("uvicorn_worker.UvicornWorker", id="uvicorn-worker")]
# uvicorn resets connections it accepted but had not read yet when --max-requests retires it (with
# metrics disabled too; gunicorn issue #2567): under it, churn also puts requests in doubt.
DROPS_CONNECTIONS_WHEN_RETIRING = {"uvicorn_worker.UvicornWorker"}
LOAD_SECONDS = 6.0  # Gunicorn's asgi worker looks at --max-requests once a second: churn needs time
CLIENTS = 6
ROWS = [("GET", "/hello", "200"), ("GET", "/items/{item_id}", "200"), ("GET", "unmatched", "404")]


class NeverSent(Exception):
    """The connection was refused: the server never saw the request, so it must not be counted."""


def get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` on a new connection: (status, body) received whole; raises CUT if cut, NeverSent if refused."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError as exc:
            raise NeverSent(path) from exc
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_fastapi_example_config_is_short_and_wires_every_hook():
    assert_config_wires_every_hook(FASTAPI_APP / "gunicorn.conf.py")


@pytest.mark.integration
@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_fastapi_example_is_exact_under_churn_and_kill_9(worker_class, wheel_env, tmp_path: Path):
    project = wheel_env.project("fastapi-app", tmp_path / "app")
    server = ExampleServer(
        project,
        tmp_path,
        *("-k", worker_class, "--max-requests", "20", "--max-requests-jitter", "5"),
        gunicorn=wheel_env.gunicorn,
        workers=3,
    )
    never_sent = []

    def one(tally: Tally, i: int) -> None:
        path, row, items = [
            ("/hello", ROWS[0], 0),
            (f"/items/{i}", ROWS[1], 1),
            (f"/no/such/page/{i}", ROWS[2], 0),
        ][i % 3]
        try:
            status, body = get(server.port, path)
        except NeverSent:
            never_sent.append(path)
        except CUT:
            tally.cut(row, items=items)
        else:
            if row is ROWS[1] and status == 200 and json.loads(body) != {"item_id": i}:
                tally.problem(f"{path} answered {body[:100]!r}")
            tally.answered((row[0], row[1], str(status)), items=items if status == 200 else 0)
        time.sleep(0.002)

    with server:
        run = churn_and_kill(server, one, seconds=LOAD_SECONDS, clients=CLIENTS)
        tally = run.tally
        assert not never_sent, never_sent[:5]
        assert set(tally.received) == set(ROWS), tally.received
        doubt = sum(tally.in_doubt.values())
        if worker_class in DROPS_CONNECTIONS_WHEN_RETIRING:
            assert doubt <= sum(tally.received.values()) // 50, f"too many requests failed: {tally.in_doubt}"
        else:  # only the kill can cut a request: at most one per client
            assert doubt <= CLIENTS, f"more requests failed than a kill explains: {tally.in_doubt}"
        assert server.log().count("Booting worker") >= 3 + 5, "workers were not recycled during the load"

        after = scrape_when_compacted(server, timeout=30, until=lambda f: value(f, "http_requests_in_flight") == 0)
        assert not list(server.multiproc_dir.glob(f"*_{run.victim}.db")), "the killed worker's files are still there"
        assert_never_decreases([*run.snapshots, counter_samples(after)])
        items = value(after, "example_items_viewed_total") - value(run.before, "example_items_viewed_total")
        assert mismatches(tally, run.before, after, {"items": items}) == []
        routes = {route for _, route, _ in http_rows(after)}
        assert routes <= {"/hello", "/items/{item_id}", "unmatched"}, routes
    log = server.log()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.integration
@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_fastapi_example_serves_metrics_with_auth_and_head(worker_class, wheel_env, tmp_path: Path):
    project = wheel_env.project("fastapi-app", tmp_path / "app")
    server = ExampleServer(
        project, tmp_path, "-k", worker_class, gunicorn=wheel_env.gunicorn, workers=2, env={"METRICS_AUTH_TOKEN": "t0k"}
    )
    auth = {"Authorization": "Bearer t0k"}
    with server:
        assert request("GET", server.port, "/metrics")[0] == 401
        status, headers, body = request("HEAD", server.port, "/metrics", headers=auth)
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        assert get(server.port, "/items/7") == (200, b'{"item_id":7}')
        families = scrape(server.port, headers=auth)
        assert value(families, "http_requests_total", route="/items/{item_id}", status="200") == 1
        assert value(families, "http_requests_total") == 1  # neither /metrics nor the readiness probes
        assert value(families, "example_items_viewed_total") == 1
    assert "Traceback" not in server.log()
