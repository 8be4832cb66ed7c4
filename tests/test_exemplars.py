"""Exemplars: which trace a request belongs to, how each worker stores it, what compaction keeps, what Prometheus sees.

Truth here is what the client sent (trace ids in ``traceparent`` headers, the
order and time it sent them), what stock prometheus-client reads from the same
directory, OpenTelemetry's own W3C parser, and a real Prometheus with exemplar
storage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from promfork.directory import filenames
from promfork.directory.setup import wipe_stale_files
from promfork.trace import bind, current_trace, parse_traceparent, request_trace, unbind
from promfork.writer import exemplars
from tests.support.client import request, scrape
from tests.support.exemplars import CHAT, ExemplarPrometheus, SentTrace, new_trace, traced_chat
from tests.support.servers import ROOT, ExampleServer, clean_env, wait_until

CHAT_BUCKET = (
    "http_request_duration_seconds_bucket",
    (("le", "100.0"), ("method", "POST"), ("route", CHAT)),
)

# --------------------------------------------------------------- which trace


HEADERS = [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # the W3C specification's example
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",  # not sampled
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",  # sampled, random trace id flag
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # no trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # no span id
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # version 00 has 4 fields
    "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",  # short trace id
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
    "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
    " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\t",  # optional whitespace around the value
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01,00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "",
]


@pytest.mark.parametrize("header", HEADERS)
def test_traceparent_is_read_as_opentelemetrys_w3c_propagator_reads_it(header):
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header}))
    span = context.get_span_context()
    expected = None
    if span.is_valid and span.trace_flags.sampled:
        expected = (format(span.trace_id, "032x"), format(span.span_id, "016x"))
    found = parse_traceparent(header)
    assert (tuple(found) if found else None) == expected


def test_future_versions_are_ignored_not_guessed_at():
    assert parse_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") is None


def test_an_active_opentelemetry_span_wins_over_the_header():
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    sent = new_trace()
    header = parse_traceparent(sent.header)
    bind(header)
    try:
        assert current_trace() == header
        otel = SpanContext(0x1234567890ABCDEF1234567890ABCDEF, 0x1122334455667788, False, TraceFlags(1))
        with trace.use_span(NonRecordingSpan(otel)):
            expected = ("1234567890abcdef1234567890abcdef", "1122334455667788")
            assert tuple(current_trace()) == expected
            assert tuple(request_trace(sent.header)) == expected
        unsampled = SpanContext(0x1234567890ABCDEF1234567890ABCDEF, 0x1122334455667788, False, TraceFlags(0))
        with trace.use_span(NonRecordingSpan(unsampled)):
            assert current_trace() == header
    finally:
        unbind()
    assert current_trace() is None


# --------------------------------------------------------------- storage


def _run(code: str, directory: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose prometheus-client stores values in `directory`."""
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory), PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_a_reader_never_sees_a_torn_exemplar(mpdir):
    # The writer alternates between traces whose span id and value are derived from
    # the trace id; a record mixing two writes breaks that link. It also adds keys
    # all along, so the file grows (and is remapped) while it is being read.
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from promfork.writer import values
            values.install()
            from prometheus_client import Histogram
            from promfork.writer.exemplars import record_trace
            from promfork.trace import TraceContext
            h = Histogram("torn_seconds", "d", ["k"], buckets=(1.0,))
            traces = [TraceContext(f"{i:08x}" * 4, f"{i:08x}" * 2) for i in range(1, 65)]
            deadline = time.monotonic() + 3
            print("ready", flush=True)
            added = 0
            while time.monotonic() < deadline:
                for i, t in enumerate(traces, 1):
                    record_trace(h, ("a",), i / 100, t)
                if added < 1000:
                    record_trace(h, (f"grow-{added}",), 1 / 100, traces[0])
                    added += 1
        """)],
        env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(mpdir), PYTHONPATH=str(ROOT)),
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "ready"
        path = mpdir / filenames.exemplar_file_name(writer.pid)
        assert wait_until(path.exists, timeout=10)
        reads = 0
        while writer.poll() is None:
            for trace_id, span_id, value, _ in exemplars.read_file(str(path)).values():
                number = int(trace_id[:8], 16)
                assert trace_id == f"{number:08x}" * 4 and span_id == f"{number:08x}" * 2
                assert value == number / 100
                reads += 1
        assert reads > 100
        assert path.stat().st_size > 1 << 14, "the file never grew past its first size"
    finally:
        writer.kill()
        writer.wait()


def test_an_exemplar_that_cannot_be_stored_is_counted_and_never_fails_the_caller(mpdir):
    # The file's name is taken by a directory: opening it fails as a full disk would.
    code = """
        import os
        from promfork.writer import values
        values.install()
        from prometheus_client import Histogram
        from promfork.reader.collector import library_metrics
        from promfork.config import load_settings
        from promfork.directory.filenames import exemplar_file_name as file_name
        from promfork.writer.exemplars import record_trace
        from promfork.trace import TraceContext
        library_metrics(load_settings())
        os.mkdir(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], file_name(os.getpid())))
        h = Histogram("blocked_seconds", "d", buckets=(1.0,))
        for _ in range(3):
            h.observe(0.5)
            record_trace(h, (), 0.5, TraceContext("ab" * 16, "cd" * 8))
        print(os.getpid())
    """
    _run(code, mpdir)
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(mpdir))
    assert registry.get_sample_value("metrics_write_errors_total") == 3
    assert registry.get_sample_value("blocked_seconds_count") == 3


def test_an_exemplar_that_cannot_be_written_costs_only_itself(mpdir):
    # A key too long for readers, and a trace that cannot be packed: each is one
    # dropped exemplar, while the file and the bucket's earlier exemplar stay readable.
    code = """
        import os
        from promfork.writer import values
        values.install()
        from prometheus_client import Histogram
        from promfork.reader.collector import library_metrics
        from promfork.config import load_settings
        from promfork.writer.exemplars import record_trace
        from promfork.trace import TraceContext
        library_metrics(load_settings())
        h = Histogram("kept_seconds", "d", ["path"], buckets=(1.0,))
        h.labels("/a").observe(0.5)
        record_trace(h, ("/a",), 0.5, TraceContext("ab" * 16, "cd" * 8))
        h.labels("x" * 70000).observe(0.5)
        record_trace(h, ("x" * 70000,), 0.5, TraceContext("ef" * 16, "cd" * 8))
        record_trace(h, ("/a",), 0.5, TraceContext("not hex" * 4, "cd" * 8))
        print(os.getpid())
    """
    pid = int(_run(code, mpdir).stdout.split()[-1])
    held = exemplars.read_file(str(mpdir / filenames.exemplar_file_name(pid)))
    assert [trace_id for trace_id, _, _, _ in held.values()] == ["ab" * 16]
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(mpdir))
    assert registry.get_sample_value("metrics_write_errors_total") == 2


def test_exemplar_keys_name_the_bucket_lines_stock_prometheus_client_reads(mpdir):
    # An app's own histogram, recorded both ways the gateway can call it, on buckets
    # whose "le" spelling is not obvious (1e3 -> "1000.0", 2.5e-05).
    code = """
        from promfork.writer import values
        values.install()
        from prometheus_client import Histogram
        from promfork.writer import exemplars
        from promfork.trace import bind, parse_traceparent
        h = Histogram("gw_op_seconds", "d", ["provider", "model"], buckets=(2.5e-05, 0.1, 1, 1e3))
        bind(parse_traceparent("00-%s-%s-01"))
        for value in (0.00001, 0.5, 7.0):
            h.labels("mock", "m1").observe(value)
            exemplars.record(h, ("mock", "m1"), value)
        child = h.labels("mock", "m2")
        child.observe(1e9)  # +Inf
        exemplars.record_child(child, 1e9)
        h.labels("mock", "m3").observe(0.05)  # observed, never recorded: no exemplar
    """
    sent = new_trace()
    _run(code % (sent.trace_id, sent.span_id), mpdir)
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(mpdir))
    stock = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "gw_op_seconds_bucket"
    }
    found = exemplars.read_exemplars(str(mpdir))
    assert {key: e.value for key, e in found.items()} == {
        ("gw_op_seconds_bucket", (("le", "2.5e-05"), ("model", "m1"), ("provider", "mock"))): 0.00001,
        ("gw_op_seconds_bucket", (("le", "1.0"), ("model", "m1"), ("provider", "mock"))): 0.5,
        ("gw_op_seconds_bucket", (("le", "1000.0"), ("model", "m1"), ("provider", "mock"))): 7.0,
        ("gw_op_seconds_bucket", (("le", "+Inf"), ("model", "m2"), ("provider", "mock"))): 1e9,
    }
    assert set(found) <= set(stock), "every key names a bucket line stock prometheus-client reads"
    assert {e.labels["trace_id"] for e in found.values()} == {sent.trace_id}


def test_the_request_trace_is_current_inside_a_flask_view_and_its_stream_and_never_leaks():
    from flask import Flask, Response

    from promfork.config import Settings
    from promfork.flask import HttpMetrics

    app = Flask(__name__)

    @app.get("/seen")
    def seen():
        found = current_trace()
        return {"trace": list(found) if found else None}

    @app.get("/stream")
    def stream():
        def body():
            found = current_trace()
            yield found.trace_id if found else "none"

        return Response(body())

    HttpMetrics().init_app(app, Settings())
    client = app.test_client()
    sent = new_trace()
    assert client.get("/seen", headers={"traceparent": sent.header}).json == {"trace": [sent.trace_id, sent.span_id]}
    assert client.get("/stream", headers={"traceparent": sent.header}).data.decode() == sent.trace_id
    assert client.get("/seen").json == {"trace": None}
    assert client.get("/seen", headers={"traceparent": new_trace(sampled=False).header}).json == {"trace": None}
    assert current_trace() is None


def test_the_request_trace_is_current_inside_an_asgi_endpoint_sync_or_async():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from promfork.asgi import PrometheusMiddleware
    from promfork.config import Settings

    def answer(request):
        found = current_trace()
        return JSONResponse({"trace": list(found) if found else None})

    async def answer_async(request):
        return answer(request)

    app = Starlette(routes=[Route("/sync", answer), Route("/async", answer_async)])
    client = TestClient(PrometheusMiddleware(app, settings=Settings()))
    sent = new_trace()
    for path in ("/sync", "/async"):
        assert client.get(path, headers={"traceparent": sent.header}).json() == {"trace": [sent.trace_id, sent.span_id]}
        assert client.get(path).json() == {"trace": None}


def test_a_cold_start_wipes_exemplar_files_but_keeps_the_masters_own(tmp_path):
    names = ["exemplars_11.bin", "exemplars_archive.bin", "exemplars_22.bin", "counter_11.db", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    wipe_stale_files(str(tmp_path), keep_pid=22)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exemplars_22.bin", "notes.txt"]


def test_compaction_never_takes_the_exemplar_file_of_a_live_process(mpdir):
    # A live process with the pid compaction was told is dead (pid reuse) holds its file open.
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from promfork.writer import values
            values.install()
            from prometheus_client import Histogram
            from promfork.writer.exemplars import record_trace
            from promfork.trace import TraceContext
            h = Histogram("alive_seconds", "d", buckets=(1.0,))
            h.observe(0.5)
            record_trace(h, (), 0.5, TraceContext("ab" * 16, "cd" * 8))
            print("ready", flush=True)
            sys.stdin.read()
        """)],
        env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(mpdir), PYTHONPATH=str(ROOT)),
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "ready"
        path = mpdir / filenames.exemplar_file_name(writer.pid)
        before = path.read_bytes()
        assert exemplars.fold_dead_workers(str(mpdir), [writer.pid]) == 0
        assert path.read_bytes() == before
        assert not (mpdir / filenames.EXEMPLAR_ARCHIVE).exists()
    finally:
        writer.stdin.close()
        writer.wait(10)
    # Once it has exited, the same call folds it.
    assert exemplars.fold_dead_workers(str(mpdir), [writer.pid]) == 1
    assert not path.exists()
    archived = exemplars.read_file(str(mpdir / filenames.EXEMPLAR_ARCHIVE))
    assert [(t, s, v) for t, s, v, _ in archived.values()] == [("ab" * 16, "cd" * 8, 0.5)]


# --------------------------------------------------------------- a real multi-worker gunicorn


def _chat_round(port: int, traces: list[SentTrace | None]) -> None:
    """Send one chat completion per entry at once (None: without a traceparent); all must succeed."""
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda t=t: statuses.append(traced_chat(port, t))) for t in traces]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * len(traces)


@pytest.mark.integration
def test_every_worker_keeps_the_traces_clients_sent_and_the_most_recent_wins_across_workers(gunicorn_factory):
    # One latency bucket (le=100): every chat request lands in it, so the aggregated
    # exemplar must be the trace of the last request the client sent.
    workers = 4
    server = gunicorn_factory(env={"METRICS_LATENCY_BUCKETS": "100", "MOCK_LATENCY_MS": "300"}, workers=workers)
    sampled: dict[str, SentTrace] = {}
    unsampled: set[str] = set()
    chats = 1  # the last one, below
    for _ in range(3):
        # Four requests of 300 ms at once keep four sync workers busy: each serves one.
        batch = [new_trace() for _ in range(workers)]
        sampled.update((t.trace_id, t) for t in batch)
        _chat_round(server.port, batch)
        quiet = [new_trace(sampled=False), None, new_trace(sampled=False), None]
        unsampled.update(t.trace_id for t in quiet if t is not None)
        _chat_round(server.port, quiet)
        chats += len(batch) + len(quiet)
        assert request("GET", server.port, "/healthz")[0] == 200
    last = new_trace()
    sampled[last.trace_id] = last
    sent_at = time.time()
    started = time.perf_counter()
    assert traced_chat(server.port, last) == 200
    elapsed = time.perf_counter() - started
    received_at = time.time()

    directory = str(server.multiproc_dir)
    for pid in server.worker_pids():
        held = exemplars.read_file(os.path.join(directory, filenames.exemplar_file_name(pid)))
        assert held, f"worker {pid} served traced requests but kept no exemplar"
        for trace_id, span_id, _, _ in held.values():
            assert trace_id in sampled and sampled[trace_id].span_id == span_id

    found = exemplars.read_exemplars(directory)
    for exemplar in found.values():
        assert set(exemplar.labels) == {"trace_id", "span_id"}
        assert exemplar.labels["trace_id"] in sampled, "an exemplar no client sent"
        assert exemplar.labels["trace_id"] not in unsampled
        assert sampled[exemplar.labels["trace_id"]].span_id == exemplar.labels["span_id"]
    http_keys = {key for key in found if key[0] == "http_request_duration_seconds_bucket"}
    assert http_keys == {CHAT_BUCKET}, "only the traced route's bucket has an exemplar (not /healthz)"
    newest = found[CHAT_BUCKET]
    assert newest.labels == {"trace_id": last.trace_id, "span_id": last.span_id}
    assert 0 < newest.value <= elapsed
    assert sent_at <= newest.timestamp <= received_at
    # The gateway's GenAI durations: the provider call's and the request's, each of the last trace.
    for name in ("gen_ai_client_operation_duration_seconds_bucket", "gen_ai_server_request_duration_seconds_bucket"):
        keys = [key for key in found if key[0] == name]
        assert keys, f"no exemplar on {name}"
        newest_here = max((found[key] for key in keys), key=lambda e: e.timestamp)
        assert newest_here.labels == {"trace_id": last.trace_id, "span_id": last.span_id}
        assert 0 < newest_here.value <= elapsed

    # The key is the bucket line stock prometheus-client parses from the exposition.
    buckets = {
        tuple(sorted(s.labels.items())): s.value
        for s in scrape(server.port)["http_request_duration_seconds"].samples
        if s.name == CHAT_BUCKET[0]
    }
    assert buckets[CHAT_BUCKET[1]] == chats


@pytest.mark.integration
def test_a_dead_workers_exemplars_are_folded_into_the_archive_and_its_file_removed(gunicorn_factory):
    server = gunicorn_factory(env={"METRICS_LATENCY_BUCKETS": "100", "MOCK_LATENCY_MS": "300"}, workers=2)
    sent = [new_trace(), new_trace()]
    _chat_round(server.port, sent)
    last = new_trace()
    assert traced_chat(server.port, last) == 200
    directory = Path(server.multiproc_dir)
    victim = server.worker_pids()[0]
    held = exemplars.read_file(str(directory / filenames.exemplar_file_name(victim)))
    assert held
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: not (directory / filenames.exemplar_file_name(victim)).exists(), timeout=20), (
        "the dead worker's exemplar file was never compacted"
    )
    archive = exemplars.read_file(str(directory / filenames.EXEMPLAR_ARCHIVE))
    assert archive == held
    found = exemplars.read_exemplars(str(directory))
    assert found[CHAT_BUCKET].labels["trace_id"] == last.trace_id
    assert {e.labels["trace_id"] for e in found.values()} <= {t.trace_id for t in [*sent, last]}


@pytest.mark.integration
def test_the_asgi_middleware_leaves_the_traces_clients_sent(tmp_path):
    # The FastAPI example under Gunicorn's native ASGI worker; default latency buckets.
    sent: dict[str, tuple[SentTrace, str]] = {}
    unsampled = set()
    with ExampleServer(ROOT / "examples" / "fastapi-app", tmp_path, workers=2) as server:
        for i in range(12):
            trace = new_trace(sampled=i % 3 != 2)
            route, path = ("/items/{item_id}", f"/items/{i}") if i % 2 else ("/hello", "/hello")
            assert request("GET", server.port, path, headers={"traceparent": trace.header})[0] == 200
            assert request("GET", server.port, path)[0] == 200
            if trace.sampled:
                sent[trace.trace_id] = (trace, route)
                last = trace
            else:
                unsampled.add(trace.trace_id)
        found = exemplars.read_exemplars(str(server.multiproc_dir))
    assert found
    for (name, labels), exemplar in found.items():
        trace_id = exemplar.labels["trace_id"]
        assert trace_id in sent and trace_id not in unsampled, "an exemplar no client sent"
        trace, route = sent[trace_id]
        assert exemplar.labels["span_id"] == trace.span_id
        assert name == "http_request_duration_seconds_bucket"
        assert dict(labels)["route"] == route and dict(labels)["method"] == "GET"
    # Nothing newer can have replaced the last trace in its bucket.
    assert last.trace_id in {e.labels["trace_id"] for e in found.values()}


# --------------------------------------------------------------- a real Prometheus


@pytest.mark.integration
@pytest.mark.deploy
def test_prometheus_stores_exactly_the_trace_ids_clients_sent(gunicorn_factory, tmp_path):
    server = gunicorn_factory(env={"MOCK_LATENCY_MS": "20"}, workers=3)
    since = time.time() - 60
    prometheus = ExemplarPrometheus(tmp_path, f"127.0.0.1:{server.port}")
    try:
        sampled: set[str] = set()
        unsampled: set[str] = set()
        returned: set[str] = set()

        def stored() -> set[str]:
            found = prometheus.exemplars("http_request_duration_seconds_bucket", since)
            return {e["labels"]["trace_id"] for e in found}

        for _ in range(15):
            batch = [new_trace(), new_trace(), new_trace(sampled=False), None]
            sampled.update(t.trace_id for t in batch if t is not None and t.sampled)
            unsampled.update(t.trace_id for t in batch if t is not None and not t.sampled)
            _chat_round(server.port, batch)
            returned = stored()
            time.sleep(0.3)
        returned = wait_until(stored, timeout=15, interval=1)
        assert returned, f"Prometheus stored no exemplar:\n{prometheus.log()[-2000:]}"
        assert returned <= sampled, f"exemplars no client sent: {returned - sampled}"
        assert not returned & unsampled
        series = prometheus.exemplars("http_request_duration_seconds_bucket", since)
        assert {e["series"]["route"] for e in series} == {CHAT}
        provider_calls = prometheus.exemplars("gen_ai_client_operation_duration_seconds_bucket", since)
        assert provider_calls, "no exemplar on the provider call durations"
        assert {e["labels"]["trace_id"] for e in provider_calls} <= sampled
    finally:
        prometheus.stop()
