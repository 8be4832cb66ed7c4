"""promfork.writer.values: promfork's value store must be indistinguishable from prometheus-client's, only faster.

Each scenario runs in a fresh interpreter (tests/value_workload.py), once with
prometheus-client's own multiprocess value class and once with MmapValue; the
stock class is the truth.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from promfork.writer import unrolled
from promfork.writer.values import Samples

HERE = Path(__file__).resolve().parent


def run(directory: Path, store: str, scenario: str) -> dict:
    directory.mkdir()
    out = subprocess.run(
        [sys.executable, str(HERE / "value_workload.py"), str(directory), store, scenario],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def exposed(directory: Path) -> dict[tuple, float]:
    """What the stock MultiProcessCollector reports, without pid labels (pids differ between runs)."""
    files = [str(p) for p in directory.glob("*.db")]
    found = {}
    for metric in MultiProcessCollector.merge(files, accumulate=True):
        for s in metric.samples:
            found[(s.name, *sorted((k, v) for k, v in s.labels.items() if k != "pid"))] = s.value
    return found


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def file_values(path: Path) -> dict[str, float]:
    return {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))}


def test_every_kind_and_gauge_mode_reads_the_same_as_with_the_stock_class(tmp_path: Path) -> None:
    stock = run(tmp_path / "stock", "stock", "mix")
    ours = run(tmp_path / "ours", "promfork", "mix")
    assert (stock["class"], ours["class"]) == ("MmapedValue", "MmapValue")
    assert ours["direct"] and not stock["direct"]
    want, got = exposed(tmp_path / "stock"), exposed(tmp_path / "ours")
    assert want.keys() == got.keys()
    assert [k for k in want if not same(want[k], got[k])] == []
    # Same writes in the same order: the files are byte for byte the same, apart from
    # mostrecent gauges, whose timestamps are the time of writing.
    for path in (tmp_path / "stock").glob("*.db"):
        if "mostrecent" not in path.name:
            twin = tmp_path / "ours" / path.name.replace(str(stock["pid"]), str(ours["pid"]))
            assert twin.read_bytes() == path.read_bytes(), path.name


def test_a_request_series_counts_exactly_what_was_recorded(tmp_path: Path) -> None:
    run(tmp_path / "ours", "promfork", "mix")
    got = exposed(tmp_path / "ours")
    # 2,000 rows of update(1, (i % 13) / 10, 1) and 2,000 of update(0, 0.05, -1).
    assert got[("requests_total", ("route", "/a"), ("status", "200"))] == 2000
    assert got[("latency_seconds_count", ("route", "/a"))] == 4000
    assert got[("latency_seconds_bucket", ("le", "0.1"), ("route", "/a"))] == 2000 + sum(
        1 for i in range(2000) if (i % 13) / 10 <= 0.1
    )
    assert got[("level_livesum", ("slot", "0"))] == 0
    assert got[("latency_seconds_count", ("route", "/c"))] == 0  # NaN: in the sum, in no bucket
    assert math.isnan(got[("latency_seconds_sum", ("route", "/c"))])


@pytest.mark.parametrize("store", ["stock", "promfork"])
def test_a_forked_child_writes_its_own_file_and_never_the_parents(tmp_path: Path, store: str) -> None:
    report = run(tmp_path / store, store, "fork")
    parent = file_values(tmp_path / store / f"counter_{report['pid']}.db")
    child = file_values(tmp_path / store / f"counter_{report['child']}.db")
    parent = {json.loads(k)[1]: v for k, v in parent.items()}
    child = {json.loads(k)[1]: v for k, v in child.items()}
    assert parent == {"jobs_total": 7.0}  # 5 + 1 before the fork, 1 after
    assert child == {"jobs_total": 5.0, "child_only_total": 4.0}  # 2 + 3: nothing inherited


@pytest.mark.parametrize("store", ["stock", "promfork"])
def test_threads_sharing_a_series_lose_no_update(tmp_path: Path, store: str) -> None:
    report = run(tmp_path / store, store, "threads")
    got = exposed(tmp_path / store)
    assert got[("hits_total", ("route", "/t"))] == report["expected_hits"]
    assert got[("took_seconds_count", ("route", "/t"))] == report["expected_observations"]
    assert got[("took_seconds_sum", ("route", "/t"))] == report["expected_observations"] * 0.5


def test_values_survive_the_file_growing_under_them(tmp_path: Path) -> None:
    report = run(tmp_path / "ours", "promfork", "growth")
    got = exposed(tmp_path / "ours")
    assert got[("wide_total", ("n", "first"))] == report["series"]
    assert all(got[("wide_total", ("n", str(n)))] == n for n in range(report["series"]))


def test_install_declines_once_the_stock_class_has_written(tmp_path: Path) -> None:
    report = run(tmp_path / "late", "promfork", "late-install")
    assert report == {"pid": report["pid"], "class": "MmapedValue", "installed": False}


def test_samples_use_the_public_api_when_values_live_in_memory() -> None:
    registry = CollectorRegistry()
    requests = Counter("requests_total", "R.", ["route"], registry=registry)
    latency = Histogram("latency_seconds", "L.", ["route"], buckets=(0.1, 1.0), registry=registry)
    busy = Gauge("busy", "B.", registry=registry)
    rows = Samples(requests.labels("/a"), latency.labels("/a"), busy)
    assert not rows.direct
    rows.update(1, 0.1, 1)
    rows.update(1, 5.0, -1)
    assert registry.get_sample_value("requests_total", {"route": "/a"}) == 2
    assert registry.get_sample_value("latency_seconds_bucket", {"route": "/a", "le": "0.1"}) == 1
    assert registry.get_sample_value("latency_seconds_bucket", {"route": "/a", "le": "+Inf"}) == 2
    assert registry.get_sample_value("busy") == 0


class _File:
    def __init__(self, size: int) -> None:
        self.doubles = [0.0] * size


class _Value:
    """What the unrolled code touches of an MmapValue: the value held in memory, its file and slot."""

    def __init__(self, file: _File, slot: int) -> None:
        self._value, self._file, self._slot = 0.0, file, slot


class _Stub:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.unstored: set = set()
        self.layout = object()


_BOUNDS = st.lists(  # integral bounds become int literals in the generated code: many of them here
    st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**6), 10**6).map(float)),
    min_size=0,
    max_size=40,
).map(lambda found: (*sorted(set(found)), math.inf))
_AMOUNTS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 0.0, -0.0, 1, 2.5]),
)


@settings(max_examples=300, deadline=None)
@given(bounds=_BOUNDS, data=st.data())
def test_unrolled_updates_count_what_prometheus_clients_observe_counts(bounds: tuple, data) -> None:
    """The generated update function against the rule of prometheus-client's Histogram.observe, bounds hit exactly.

    Stubs stand in for MmapValue (only the attributes the generated code reads),
    so any bound list and any amount can be tried in-process.
    """
    amounts = data.draw(st.lists(st.one_of(_AMOUNTS, st.sampled_from(bounds)), min_size=1, max_size=30))
    file = _File(2 + len(bounds))
    counter, total = _Value(file, 0), _Value(file, 1)
    buckets = tuple(_Value(file, 2 + i) for i in range(len(bounds)))
    process = _Stub()
    plan = ((counter, None, ()), (total, bounds, buckets))
    update = unrolled.compile_update(process, plan, SimpleNamespace(process=process), process.layout)
    want_buckets = [0] * len(bounds)
    want_sum = 0.0
    for amount in amounts:
        update(1, amount)
        want_sum += amount
        for i, bound in enumerate(bounds):  # prometheus_client.metrics.Histogram.observe
            if amount <= bound:
                want_buckets[i] += 1
                break
    assert file.doubles[0] == counter._value == len(amounts)
    assert same(file.doubles[1], want_sum) and same(total._value, want_sum)
    assert file.doubles[2:] == [float(n) for n in want_buckets]


def test_unrolled_updates_leave_new_layouts_and_held_values_to_the_reference_loop() -> None:
    process = _Stub()
    calls = []
    process._update_slow = lambda owner, amounts: calls.append(amounts)
    file = _File(1)
    update = unrolled.compile_update(
        process, ((_Value(file, 0), None, ()),), SimpleNamespace(process=process), process.layout
    )
    update(3)
    process.unstored.add("held")
    update(5)
    process.unstored.clear()
    process.layout = object()  # a file remapped, a value moved, or another process
    update(7)
    first_use = unrolled.compile_update(process, ((_Value(file, 0), None, ()),), SimpleNamespace(process=process), None)
    first_use(11)
    unrolled.compile_update(
        process, (), SimpleNamespace(process=process), None
    )()  # no values: the slow path, no amounts
    assert calls == [(5,), (7,), (11,), ()] and file.doubles == [3.0]
    assert not process.lock.locked()


def test_a_nan_bucket_bound_counts_as_with_the_stock_class(tmp_path: Path) -> None:
    """prometheus-client accepts a NaN bucket bound: updates through Samples must count as its observe() does."""
    run(tmp_path / "stock", "stock", "nan-bound")
    ours = run(tmp_path / "ours", "promfork", "nan-bound")
    assert not ours["direct"]  # through the public API, never the unrolled code or bisect
    want, got = exposed(tmp_path / "stock"), exposed(tmp_path / "ours")
    assert want == got and got[("odd_seconds_count",)] == 3


SHARED_SERIES = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from promfork.writer import values
assert values.install()
from prometheus_client import Counter, Histogram
jobs = [Counter("jobs", "Jobs.", ["kind"], registry=None) for _ in range(3)]
latency = [Histogram("latency", "Latency.", registry=None, buckets=(1.0,)) for _ in range(2)]
together = [values.Samples(j.labels("a"), h) for j, h in zip(jobs, latency)]
for i in range(100):
    jobs[i % 3].labels("a").inc(2)
    latency[i % 2].observe(0.5)
    together[i % 2].update(1, 2.0)
"""


def test_several_objects_of_one_series_count_every_update_once(tmp_path: Path):
    """Three counters and two histograms declared with one name: stock prometheus-client reads every update."""
    subprocess.run([sys.executable, "-c", SHARED_SERIES, str(tmp_path)], check=True, timeout=60)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert registry.get_sample_value("jobs_total", {"kind": "a"}) == 100 * 2 + 100
    assert registry.get_sample_value("latency_count") == 200
    assert registry.get_sample_value("latency_bucket", {"le": "1.0"}) == 100
    assert registry.get_sample_value("latency_sum") == 100 * 0.5 + 100 * 2.0
