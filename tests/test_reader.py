"""The long-lived reader (promfork.reader.incremental) answers what stock prometheus-client reads from the same files.

Truth is stock ``MultiProcessCollector.merge`` over the same files in the same
(sorted) order, and a new reader over the same directory: a reader kept across
scrapes must give, byte for byte, what a new one gives, whatever changed in
between (values, new keys, new files, files vanishing or rewritten under the
same name, damage). Files are written byte for byte in prometheus-client's
format: in place through promfork's writer (``fileformat.ValueFile``, as a live
worker writes) or whole (``fileformat.write_entries``, as compaction writes
archives). Values are small dyadic numbers, so every order of addition gives
the same float and stock's plain ``+`` is the truth; inf and nan included.
"""

from __future__ import annotations

import fcntl
import gc
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import weakref
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Exemplar

from promfork.config import Settings
from promfork.directory import fileformat
from promfork.directory.locks import DirectoryLock
from promfork.master import compaction
from promfork.reader.collector import AggregatingCollector, ExpositionRegistry, LibraryMetrics
from promfork.reader.exposition import make_metrics_app
from promfork.reader.incremental import IncrementalReader

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
text_encoder = generate_latest
om_encoder = partial(om_exposition.generate_latest, version="1.0.0")
INF, NAN = math.inf, math.nan
VALUES = [0.0, 1.0, 2.0, 3.5, -1.25, 0.125, 7.0, INF, NAN]
BOUNDS = ["0.5", "1.0", "+Inf"]


def key(metric: str, sample: str, labels: dict[str, str], help_text: str = "help") -> str:
    """A file entry's key exactly as prometheus-client writes it."""
    return json.dumps((metric, sample, labels, help_text), sort_keys=True)


def counter_key(kind: str) -> str:
    return key("jobs", "jobs_total", {"kind": kind}, "Jobs done.")


def histogram_keys(route: str) -> list[str]:
    return [key("lat", "lat_sum", {"route": route}, "Latency.")] + [
        key("lat", "lat_bucket", {"route": route, "le": b}, "Latency.") for b in BOUNDS
    ]


def gauge_key(mode: str, case: str) -> str:
    return key(f"level_{mode}", f"level_{mode}", {"case": case}, f"Level ({mode}).")


def summary_keys(op: str) -> list[str]:
    return [key("size", "size_count", {"op": op}, "Size."), key("size", "size_sum", {"op": op}, "Size.")]


MODES = ["all", "liveall", "sum", "livesum", "max", "livemax", "min", "livemin", "mostrecent", "livemostrecent"]


def keys_for(prefix: str) -> list[str]:
    """Every key a file of this prefix may hold (in the order the tests add them)."""
    if prefix == "counter":
        return [counter_key(k) for k in "abc"]
    if prefix == "histogram":
        return [k for route in ("x", "y") for k in histogram_keys(route)]
    if prefix == "summary":
        return summary_keys("read") + summary_keys("write")
    mode = prefix.removeprefix("gauge_")
    return [gauge_key(mode, c) for c in ("p", "q")]


PREFIXES = ["counter", "histogram", "summary"] + [f"gauge_{m}" for m in MODES]


def set_value(directory: Path, name: str, entry: str, value: float, timestamp: float = 0.0) -> None:
    """Store one value in place, as a live worker does (the key is appended first if the file lacks it)."""
    written = fileformat.ValueFile(str(directory / name))
    try:
        written.set(written.slot(entry), value, timestamp)
    finally:
        written.close()


def stock_samples(directory: Path, skip: set[str] = frozenset()) -> set[tuple]:
    """prometheus-client's merge of the files (sorted, as promfork reads them), as comparable samples."""
    files = sorted(str(p) for p in directory.glob("*.db") if p.name not in skip)
    return {
        comparable(s.name, s.labels, s.value)
        for metric in MultiProcessCollector.merge(files, accumulate=True)
        for s in metric.samples
    }


def comparable(name: str, labels: dict, value: float) -> tuple:
    """nan never equals nan: spell values out so that set equality means equal samples."""
    return name, tuple(sorted(labels.items())), repr(float(value))


def parsed_samples(text: str, openmetrics: bool = False) -> set[tuple]:
    """Samples of an exposition as prometheus-client's parser reads them (OpenMetrics: validated on the way)."""
    families = parse_openmetrics(text + "# EOF\n") if openmetrics else parse_text(text)
    return {comparable(s.name, s.labels, s.value) for f in families for s in f.samples}


def parsed_text_samples(text: str) -> set[tuple]:
    """Text samples with counter names as stock's Metric objects spell them (the parser strips ``_total``)."""
    return {comparable(s.name, s.labels, s.value) for f in parse_text(text) for s in f.samples}


def render(reader: IncrementalReader, directory: Path, fmt: str = TEXT) -> str:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".db"))
    reader.update(names)
    return reader.render(text_encoder if fmt == TEXT else om_encoder, fmt)


def is_count(entry: str) -> bool:
    """Counters, buckets and summary counts: whole, non-negative numbers, as OpenMetrics requires."""
    name = json.loads(entry)[1]
    return name.endswith(("_total", "_bucket", "_count"))


def fitting(entry: str, value: float) -> float:
    """`value` made a valid value for `entry` (a count becomes a whole number of at least 0)."""
    if not is_count(entry):
        return value
    return float(int(abs(value) * 8)) if math.isfinite(value) else 3.0


def fill(directory: Path, owners: list[str], value_of) -> None:
    """Write every key of every prefix for every owner, value_of(owner, prefix, index) each (counts made whole)."""
    for owner in owners:
        for prefix in PREFIXES:
            for i, entry in enumerate(keys_for(prefix)):
                ts = 0.0 if "mostrecent" not in prefix else 100.0 + i + (owners.index(owner) * 0.5)
                set_value(directory, f"{prefix}_{owner}.db", entry, fitting(entry, value_of(owner, prefix, i)), ts)


def test_a_new_reader_agrees_with_stock_sample_for_sample_in_both_formats(mpdir: Path):
    fill(mpdir, ["101", "102", "103"], lambda owner, prefix, i: float(int(owner) % 7 + i) / 4)
    archive = {counter_key("a"): (40.0, 0.0), histogram_keys("x")[1]: (3.0, 0.0), histogram_keys("x")[0]: (2.5, 0.0)}
    fileformat.write_entries(str(mpdir / "counter_archive.db"), {counter_key("a"): (40.0, 0.0)})
    fileformat.write_entries(str(mpdir / "histogram_archive.db"), {k: v for k, v in archive.items() if "lat" in k})
    fileformat.write_entries(str(mpdir / "counter_90-777.db"), {counter_key("c"): (5.0, 0.0)})
    text = render(IncrementalReader(str(mpdir)), mpdir)
    assert parsed_text_samples(text) == stock_samples(mpdir)
    om = render(IncrementalReader(str(mpdir)), mpdir, OPENMETRICS)
    assert parsed_samples(om, openmetrics=True) == stock_samples(mpdir)
    # The old whole-directory merge is what promfork served before: same bytes.
    registry = CollectorRegistry()
    registry.register(_WholeMerge(mpdir))
    assert text == generate_latest(registry).decode()


class _WholeMerge:
    """promfork.reader.merge.merge_files over the directory: the exposition promfork served before the reader."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self):
        from promfork.reader.merge import merge_files

        return merge_files(sorted(str(p) for p in self.directory.glob("*.db")))[0]


OPS = st.one_of(
    st.tuples(
        st.just("set"),
        st.sampled_from(["101", "102", "103", "archive"]),
        st.sampled_from(PREFIXES),
        st.integers(0, 9),
        st.sampled_from(VALUES),
    ),
    st.tuples(st.just("drop"), st.sampled_from(["101", "102", "103", "archive"]), st.sampled_from(PREFIXES)),
    st.tuples(st.just("rewrite"), st.sampled_from(["101", "archive"]), st.sampled_from(PREFIXES)),
    st.tuples(st.just("damage"), st.sampled_from(["102", "103"]), st.sampled_from(PREFIXES)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=25))
def test_a_kept_reader_answers_as_a_new_one_and_as_stock_after_any_changes(tmp_path_factory, ops):
    directory = tmp_path_factory.mktemp("mp")
    fill(directory, ["101", "102"], lambda owner, prefix, i: float(i + 1))
    kept = IncrementalReader(str(directory), {"service": "gw"})
    kept_om = IncrementalReader(str(directory))
    render(kept, directory)
    render(kept_om, directory, OPENMETRICS)
    damaged: set[str] = set()
    for step, op in enumerate(ops):
        apply(directory, op, step, damaged)
        names = sorted(n for n in os.listdir(directory) if n.endswith(".db"))
        assert set(kept.update(names)) == damaged
        warm = kept.render(text_encoder, TEXT)
        cold_reader = IncrementalReader(str(directory), {"service": "gw"})
        cold_reader.update(names)
        assert warm == cold_reader.render(text_encoder, TEXT)  # same samples, same order, same bytes
        stock = {(n, (*labels, ("service", "gw")), v) for n, labels, v in stock_samples(directory, damaged)}
        assert parsed_text_samples(warm) == {(n, tuple(sorted(ls)), v) for n, ls, v in stock}
        kept_om.update(names)
        warm_om = kept_om.render(om_encoder, OPENMETRICS)
        fresh_om = IncrementalReader(str(directory))
        fresh_om.update(names)
        assert warm_om == fresh_om.render(om_encoder, OPENMETRICS)
        parse_openmetrics(warm_om + "# EOF\n")  # valid OpenMetrics (each label set contiguous)
        assert set(kept.files()) == set(names) - damaged


def apply(directory: Path, op: tuple, step: int, damaged: set[str]) -> None:
    """One change to the directory, as workers, compaction or a fault would make it."""
    action, owner, prefix = op[:3]
    name = f"{prefix}_{owner}.db"
    path = directory / name
    if name in damaged:
        return
    entries = keys_for(prefix)
    if action == "set":
        entry = entries[op[3] % len(entries)]
        if owner == "archive":
            old = fileformat.read_entries(str(path)) if path.exists() else {}
            old[entry] = (fitting(entry, op[4]), 0.0)
            fileformat.write_entries(str(path), old)  # compaction writes archives whole, under a new inode
        else:
            set_value(directory, name, entry, fitting(entry, op[4]), 200.0 + step)
    elif action == "drop":
        path.unlink(missing_ok=True)
    elif action == "rewrite" and path.exists():
        old = fileformat.read_entries(str(path))
        rewritten = {k: (v + 1.0, ts) for k, (v, ts) in reversed(list(old.items()))}  # other offsets, same name
        fileformat.write_entries(str(path), rewritten)
    elif action == "damage" and path.exists():
        with open(path, "r+b") as f:
            f.write(b"\xff\xff\xff\x7f")  # "used" far past the end
        damaged.add(name)


def test_values_changing_in_place_re_render_only_their_label_sets(mpdir: Path):
    fill(mpdir, ["101", "102"], lambda owner, prefix, i: 1.0)
    reader = IncrementalReader(str(mpdir))
    before = render(reader, mpdir)
    lines = {g.key: g.lines[TEXT] for f in reader._families.values() for g in f.groups.values()}
    set_value(mpdir, "counter_102.db", counter_key("b"), 5.0)
    after = render(reader, mpdir)
    assert before != after
    assert ("jobs_total", (("kind", "b"),), repr(8.0 + 5.0)) in parsed_text_samples(after)  # 1.0 filled as 8 counts
    assert parsed_text_samples(after) == stock_samples(mpdir)
    unchanged = [g for f in reader._families.values() for g in f.groups.values() if g.lines[TEXT] is lines[g.key]]
    assert len(unchanged) == len(lines) - 1  # every other label set kept its very lines


def test_nonfinite_values_in_every_kind_and_mode_agree_with_stock_when_kept(mpdir: Path):
    fill(mpdir, ["101", "102"], lambda owner, prefix, i: 1.0)
    reader = IncrementalReader(str(mpdir))
    render(reader, mpdir)
    for n, value in enumerate([INF, -INF, NAN]):
        for prefix in PREFIXES:
            for i, entry in enumerate(keys_for(prefix)):
                owner = "101" if (i + n) % 2 else "102"
                set_value(mpdir, f"{prefix}_{owner}.db", entry, value if not is_count(entry) else 2.0, 300.0 + n)
        assert parsed_text_samples(render(reader, mpdir)) == stock_samples(mpdir)


def test_a_reader_drops_what_it_held_for_files_that_go(mpdir: Path):
    fill(mpdir, ["101", "102"], lambda owner, prefix, i: 2.0)
    reader = IncrementalReader(str(mpdir))
    render(reader, mpdir)
    assert len(reader.files()) == 2 * len(PREFIXES)
    for path in mpdir.glob("*_102.db"):
        path.unlink()
    assert parsed_text_samples(render(reader, mpdir)) == stock_samples(mpdir)
    assert sorted(reader.files()) == sorted(p.name for p in mpdir.glob("*.db"))
    pids = {
        g.key[-1][1] for f in reader._families.values() for g in f.groups.values() if g.key and g.key[-1][0] == "pid"
    }
    assert pids == {"101"}  # the all gauges' label sets of 102 are gone with its files
    for path in mpdir.glob("*.db"):
        path.unlink()
    assert render(reader, mpdir) == ""
    assert reader.files() == [] and reader._families == {}


def test_nothing_keeps_the_cache_of_a_file_that_went(mpdir: Path):
    fill(mpdir, ["101", "102"], lambda owner, prefix, i: 2.0)
    reader = IncrementalReader(str(mpdir))
    render(reader, mpdir)
    set_value(mpdir, "histogram_101.db", histogram_keys("x")[0], 5.0)  # label sets learn their inputs
    set_value(mpdir, "counter_102.db", counter_key("a"), 5.0)
    render(reader, mpdir)
    gone = [weakref.ref(reader._files[p.name]) for p in mpdir.glob("*_102.db")]
    for path in mpdir.glob("*_102.db"):
        path.unlink()
    render(reader, mpdir)
    gc.collect()
    assert [ref() for ref in gone] == [None] * len(gone)


def library() -> LibraryMetrics:
    return LibraryMetrics(Settings(), registry=CollectorRegistry())


def test_a_damaged_file_is_skipped_counted_and_set_aside_by_a_kept_collector(mpdir: Path):
    fill(mpdir, ["101", "102"], lambda owner, prefix, i: 3.0)
    counted = library()
    collector = AggregatingCollector(str(mpdir), counted)
    collector.render(text_encoder, TEXT)
    with open(mpdir / "counter_102.db", "r+b") as f:
        f.write(b"\xff\xff\xff\x7f")
    text = collector.render(text_encoder, TEXT)
    assert not (mpdir / "counter_102.db").exists()
    assert (mpdir / "quarantine").is_dir()
    assert parsed_text_samples(text) == stock_samples(mpdir)
    assert counted.scrape_errors._value.get() == 1
    assert "counter_102.db" not in collector.reader.files()


def test_exemplars_are_appended_to_their_bucket_lines_in_openmetrics_only(mpdir: Path, monkeypatch):
    fill(mpdir, ["101"], lambda owner, prefix, i: 1.0)
    exemplar = Exemplar({"trace_id": "abc", "span_id": "def"}, 0.25, 1700000000.5)
    lookup = {("lat_bucket", (("le", "0.5"), ("route", "x"))): exemplar}
    calls = []

    def read_exemplars(directory):
        calls.append(directory)
        return lookup

    monkeypatch.setattr("promfork.writer.exemplars.read_exemplars", read_exemplars)
    registry = ExpositionRegistry(AggregatingCollector(str(mpdir), library(), {"service": "gw"}))
    body, _content_type = registry.exposition("application/openmetrics-text")
    assert calls == [str(mpdir)]
    om = body.decode()
    families = {f.name: f for f in parse_openmetrics(om)}
    with_exemplar = [s for s in families["lat"].samples if s.exemplar is not None]
    assert [(s.name, s.labels) for s in with_exemplar] == [("lat_bucket", {"le": "0.5", "route": "x", "service": "gw"})]
    got = with_exemplar[0].exemplar
    assert (got.labels, got.value, float(got.timestamp)) == (exemplar.labels, exemplar.value, exemplar.timestamp)
    # exactly as prometheus-client formats a bucket sample carrying this exemplar
    expected = next(s for s in registry.aggregating.collect() if s.name == "lat")
    expected.samples = [
        s._replace(exemplar=exemplar) if s.labels.get("le") == "0.5" and s.labels["route"] == "x" else s
        for s in expected.samples
    ]
    one = CollectorRegistry()
    one.register(_Fixed([expected]))
    stock_lines = [line for line in om_encoder(one).decode().splitlines() if line.startswith("lat_bucket")]
    assert stock_lines == [line for line in om.splitlines() if line.startswith("lat_bucket")]
    text, _ = registry.exposition(None)
    assert "trace_id" not in text.decode()  # the text format has no exemplars
    assert calls == [str(mpdir)]  # read once per OpenMetrics scrape, not for text
    again, _ = registry.exposition("application/openmetrics-text")
    assert again == body  # the cached base lines take the suffix again


class _Fixed:
    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        return self.metrics


def test_the_served_exposition_is_what_prometheus_client_makes_of_the_same_metrics(mpdir: Path):
    fill(mpdir, ["101", "102"], lambda owner, prefix, i: float(i))
    registry = ExpositionRegistry(AggregatingCollector(str(mpdir), library(), {"env": "prod"}))
    for accept in (None, "application/openmetrics-text; version=1.0.0", "text/plain"):
        for names in (None, ["jobs_total", "lat_bucket", "level_max"]):
            body, content_type = registry.exposition(accept, names)
            encoder, expected_type = choose_encoder(accept)
            stock_registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
            stock_registry.register(registry.aggregating)
            source = stock_registry if names is None else stock_registry.restricted_registry(names)
            assert (body, content_type) == (encoder(source), expected_type)
    set_value(mpdir, "histogram_101.db", histogram_keys("y")[2], 9.0)
    body, _ = registry.exposition("application/openmetrics-text; version=1.0.0")
    stock_registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
    stock_registry.register(AggregatingCollector(str(mpdir), library(), {"env": "prod"}))
    assert body == om_encoder(stock_registry)


def test_the_wsgi_app_serves_gzip_filters_and_head_from_the_cache(mpdir: Path):
    fill(mpdir, ["101"], lambda owner, prefix, i: 1.0)
    registry = ExpositionRegistry(AggregatingCollector(str(mpdir), library()))
    app = make_metrics_app(registry)
    answers = []

    def start_response(status, headers, exc_info=None):
        answers.append((status, dict(headers)))

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": "name[]=jobs_total"}
    body = b"".join(app({**environ, "HTTP_ACCEPT_ENCODING": "gzip"}, start_response))
    status, headers = answers[-1]
    assert status == "200 OK" and headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(body).decode()
    assert {f.name for f in parse_text(text)} == {"jobs"}
    assert int(headers["Content-Length"]) == len(body)
    head = b"".join(app({**environ, "REQUEST_METHOD": "HEAD"}, start_response))
    assert head == b"" and int(answers[-1][1]["Content-Length"]) == len(text.encode())


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_a_kept_readers_exposition_after_changes(mpdir: Path):
    fill(mpdir, ["101", "102"], lambda owner, prefix, i: float(i) / 8)
    registry = ExpositionRegistry(AggregatingCollector(str(mpdir), library()))
    registry.exposition(None)
    set_value(mpdir, "counter_103.db", counter_key("z"), 1.0)  # a new worker, a new series
    set_value(mpdir, "histogram_101.db", histogram_keys("x")[3], 4.0)
    body, _ = registry.exposition(None)
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    # exit 1: the exposition does not parse; 3: it parses, with lint remarks (this test's names: level_sum)
    assert check.returncode in (0, 3), check.stderr


def test_archive_remainders_count_in_a_kept_reader_as_in_a_new_one(mpdir: Path):
    # 1 + 2**-53 + 2**-53 is 1 + 2**-52 exactly; stock ignores the remainder and rounds 1 + 2**-53 down to 1.
    tiny = 2.0**-53
    fileformat.write_entries(str(mpdir / "counter_archive.db"), {counter_key("a"): (1.0, tiny)})
    set_value(mpdir, "counter_101.db", counter_key("a"), 0.0)
    kept = IncrementalReader(str(mpdir))
    render(kept, mpdir)
    set_value(mpdir, "counter_101.db", counter_key("a"), tiny)  # a value change: the kept reader re-adds this set
    warm = render(kept, mpdir)
    assert warm == render(IncrementalReader(str(mpdir)), mpdir)
    assert ("jobs_total", (("kind", "a"),), repr(1.0 + 2 * tiny)) in parsed_text_samples(warm)


def test_a_kept_reader_follows_compaction_as_stock_reads_the_compacted_files(mpdir: Path):
    dead = ["3999901", "3999902"]  # pids that are not running: compaction folds their files
    fill(mpdir, [*dead, "3999903"], lambda owner, prefix, i: float(i + int(owner[-1])))
    kept = IncrementalReader(str(mpdir))
    before = parsed_text_samples(render(kept, mpdir))
    with DirectoryLock(str(mpdir)).try_exclusive() as locked:
        assert locked
        compaction.compact_dead_workers(str(mpdir), [int(p) for p in dead])
    assert not list(mpdir.glob("*_3999901.db"))
    after = render(kept, mpdir)
    assert after == render(IncrementalReader(str(mpdir)), mpdir)
    assert parsed_text_samples(after) == stock_samples(mpdir)
    jobs = {s for s in before if s[0] == "jobs_total"}
    assert jobs == {s for s in parsed_text_samples(after) if s[0] == "jobs_total"}  # totals neither drop nor double


def test_a_file_growing_under_a_live_writer_never_reads_as_damaged(tmp_path):
    # A writer grows its file (64 KiB -> 128 KiB -> ...) and then lets the "used"
    # header grow into the new space. A reader that took the file's size before
    # reading the header saw used > size and called a healthy file damaged,
    # and the scrape set a live worker's file aside.
    path = tmp_path / "histogram_1.db"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from promfork.directory.fileformat import ValueFile\n"
            "f = ValueFile(sys.argv[1])\n"
            "for i in range(40000):\n"
            '    f.set(f.slot(\'["h", "h_bucket", {"le": "%d"}, "help"]\' % i), 1.0, 0.0)\n',
            str(path),
        ]
    )
    reads = 0
    try:
        while writer.poll() is None:
            if path.exists() and path.stat().st_size > 0:  # past creation (the collector allows for that instant)
                fileformat.read_snapshot(str(path))  # raises CorruptFile on a false alarm
                reads += 1
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0 and reads > 100
    assert len(fileformat.index_entries(fileformat.read_snapshot(str(path)).data)[0]) == 40000


def test_a_damaged_file_a_live_process_holds_open_is_never_moved_away(mpdir: Path):
    # Moved, the file would keep its writer (who holds it open) writing where no reader looks.
    fill(mpdir, ["101", "102"], lambda owner, prefix, i: 3.0)
    collector = AggregatingCollector(str(mpdir), library())
    path = mpdir / "counter_102.db"
    with open(path, "r+b") as f:
        f.write(b"\xff\xff\xff\x7f")
    holder = os.open(path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)  # what every promfork writer holds on its files
    try:
        collector.render(text_encoder, TEXT)
        assert path.exists(), "a file still open for writing was set aside"
    finally:
        os.close(holder)
    collector.render(text_encoder, TEXT)
    assert not path.exists() and (mpdir / "quarantine" / "counter_102.db").exists()


def test_a_scrape_that_fails_part_way_leaves_no_stale_cache(mpdir: Path):
    fill(mpdir, ["101"], lambda owner, prefix, i: 3.0)
    collector = AggregatingCollector(str(mpdir), library())
    collector.render(text_encoder, TEXT)
    set_value(mpdir, "counter_101.db", counter_key("a"), 6.0)
    set_value(mpdir, "counter_101.db", key("jobs", "jobs_total", {"kind": "new"}, "Jobs done."), 1.0)
    (mpdir / "counter_999.db").mkdir()  # read after counter_101.db, and not as a file: the scrape fails
    with pytest.raises(OSError):
        collector.render(text_encoder, TEXT)
    (mpdir / "counter_999.db").rmdir()
    assert parsed_text_samples(collector.render(text_encoder, TEXT)) == stock_samples(mpdir)


def test_any_number_of_accept_headers_caches_a_bounded_number_of_formats(mpdir: Path):
    fill(mpdir, ["101"], lambda owner, prefix, i: 2.0)
    registry = ExpositionRegistry(AggregatingCollector(str(mpdir), library()))
    for n in range(40):
        body, _ = registry.exposition(f"application/openmetrics-text; version=1.0.{n}")
        assert parsed_samples(body.decode().removesuffix("# EOF\n"), openmetrics=True) == {
            s for s in parsed_samples(render(IncrementalReader(str(mpdir)), mpdir, OPENMETRICS), openmetrics=True)
        }
    for escaping in ("underscores", "dots", "values", "allow-utf-8"):
        for kind in ("text/plain; version=1.0.0", "application/openmetrics-text; version=1.0.0"):
            registry.exposition(f"{kind}; escaping={escaping}")
    assert len(registry.aggregating._formats) <= 8
    body, _ = registry.exposition("text/plain")
    assert parsed_text_samples(body.decode()) == stock_samples(mpdir)
