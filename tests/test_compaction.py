"""Compaction of dead workers' files: same totals as the stock collector, exactly once, crash-safe, bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from promfork.directory import filenames
from promfork.directory.locks import DirectoryLock
from promfork.master import compaction
from promfork.reader.collector import AggregatingCollector

HERE = Path(__file__).resolve().parent


def run_dead_workers(directory: Path, count: int, first: int = 0) -> list[dict]:
    """Fork `count` real prometheus_client writers that exit; return what each wrote."""
    out = subprocess.run(
        [sys.executable, str(HERE / "workload.py"), str(directory), str(count), str(first)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


def stock_view(directory: Path) -> dict[tuple, float]:
    """What prometheus-client's own MultiProcessCollector reports for the directory."""
    files = [str(p) for p in directory.glob("*.db")]
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for metric in MultiProcessCollector.merge(files, accumulate=True)
        for s in metric.samples
    }


class _NullCounter:
    def __init__(self):
        self.count = 0

    def inc(self, n=1):
        self.count += n


class _LibraryMetrics:
    scrape_errors_name = "metrics_scrape_errors"

    def __init__(self):
        self.scrape_errors = _NullCounter()
        self.compactions = _NullCounter()

    def count_scrape_errors(self, n):
        self.scrape_errors.inc(n)

    def count_compactions(self, n):
        self.compactions.inc(n)


def promfork_view(directory: Path) -> dict[tuple, float]:
    collector = AggregatingCollector(str(directory), _LibraryMetrics())
    return {(s.name, *sorted(s.labels.items())): s.value for m in collector.collect() for s in m.samples}


def dead_pids(directory: Path) -> set[int]:
    return compaction.pids_with_files(str(directory))


def compact_all(directory: Path) -> compaction.CompactionResult:
    with DirectoryLock(str(directory)).try_exclusive() as locked:
        assert locked
        return compaction.compact_dead_workers(str(directory), dead_pids(directory))


def assert_same_totals(after: dict, before: dict) -> None:
    """Same series; counts equal exactly, float sums equal up to the stock collector's summation order."""
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-12), key


def without_live_and_all(view: dict) -> dict:
    return {k: v for k, v in view.items() if not k[0].startswith(("busy_livesum", "temp_all"))}


def test_stock_collector_reports_same_totals_after_compaction(mpdir):
    wrote = run_dead_workers(mpdir, 12)
    before = stock_view(mpdir)
    result = compact_all(mpdir)
    after = stock_view(mpdir)
    assert {w["pid"] for w in wrote} <= set(result.pids)
    assert_same_totals(without_live_and_all(after), without_live_and_all(before))
    # Independent truth: what the workers wrote.
    assert after[("jobs_total", ("kind", "a"))] == sum(w["n"] + 1 for w in wrote)
    assert after[("jobs_total", ("kind", "b"))] == sum(2 * (w["n"] + 1) for w in wrote)
    assert after[("latency_seconds_count", ("route", "/x"))] == 2 * len(wrote)


def test_each_gauge_mode_folds_as_its_mode_means(mpdir):
    wrote = run_dead_workers(mpdir, 6, first=10)
    before = stock_view(mpdir)
    compact_all(mpdir)
    after = stock_view(mpdir)
    ns = [w["n"] for w in wrote]
    assert after[("queue_sum",)] == sum(ns)  # sum: added up
    assert after[("peak_max",)] == max(ns)  # max: the largest ever
    assert after[("floor_min",)] == min([100 - n for n in ns] + [0])  # min (the forking parent wrote 0)
    assert after[("recent",)] == before[("recent",)] == ns[-1]  # mostrecent: the newest write
    assert not any(k[0] == "busy_livesum" for k in after)  # livesum: dies with its process
    all_before = {k: v for k, v in before.items() if k[0] == "temp_all"}
    assert len(all_before) == len(ns) + 1  # all: one series per pid while its files exist...
    assert not any(k[0] == "temp_all" for k in after)  # ...dropped with the dead worker: no unbounded growth


def test_directory_holds_only_archives_after_many_lifetimes(mpdir):
    for batch in range(4):
        run_dead_workers(mpdir, 150, first=batch * 150)
        compact_all(mpdir)
    names = sorted(p.name for p in mpdir.glob("*.db") if not p.name.startswith("gauge_all_"))
    assert all(filenames.parse_name(n).owner == filenames.ARCHIVE for n in names), names
    assert len(names) <= 8
    totals = stock_view(mpdir)
    assert totals[("jobs_total", ("kind", "a"))] == sum(n + 1 for n in range(600))
    assert promfork_view(mpdir)[("latency_seconds_count", ("route", "/x"))] == 1200


def test_scrapes_during_compaction_see_every_value_exactly_once(mpdir):
    run_dead_workers(mpdir, 200)
    expected = without_live_and_all(promfork_view(mpdir))
    assert_same_totals(expected, without_live_and_all(stock_view(mpdir)))
    pids = sorted(dead_pids(mpdir))
    seen_wrong: list[str] = []
    stop = threading.Event()
    scrapes = [0]

    def scrape_loop():
        while not stop.is_set():
            view = without_live_and_all(promfork_view(mpdir))
            scrapes[0] += 1
            if view != expected:
                diff = {k: (expected.get(k), view.get(k)) for k in expected if view.get(k) != expected.get(k)}
                seen_wrong.append(repr(list(diff.items())[:3]))

    threads = [threading.Thread(target=scrape_loop) for _ in range(3)]
    for t in threads:
        t.start()
    lock = DirectoryLock(str(mpdir))
    pending = list(pids)
    while pending:  # compact a few pids at a time, only when the lock is free, like the master does
        batch, pending = pending[:5], pending[5:]
        while True:
            with lock.try_exclusive(wait=1.0) as locked:
                if locked:
                    compaction.compact_dead_workers(str(mpdir), batch)
                    break
    stop.set()
    for t in threads:
        t.join()
    assert scrapes[0] > 10
    assert not seen_wrong, seen_wrong[:3]
    assert dead_pids(mpdir) == set()


CRASH_STEPS = ["recovered", "archives_written", "journal_committed", "replay_renamed", "replay_deleted"]


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_crash_at_any_step_loses_and_doubles_nothing(mpdir, step):
    run_dead_workers(mpdir, 8)
    # An earlier archive exists, so a lost or doubled archive would show.
    first_pids = sorted(dead_pids(mpdir))[:3]
    with DirectoryLock(str(mpdir)).try_exclusive():
        compaction.compact_dead_workers(str(mpdir), first_pids)
    expected = without_live_and_all(promfork_view(mpdir))
    crash = f"""
import os, sys
from promfork.directory import journal
from promfork.master import compaction
def crash(name):
    if name == {step!r}:
        os._exit(17)
compaction._step = journal._step = crash
compaction.compact_dead_workers({str(mpdir)!r}, compaction.pids_with_files({str(mpdir)!r}))
sys.exit(0)
"""
    proc = subprocess.run([sys.executable, "-c", crash], cwd=HERE.parent, timeout=60)
    assert proc.returncode == 17, "the injected crash did not happen"
    # A scrape right after the crash sees exact totals (it replays a committed journal).
    assert without_live_and_all(promfork_view(mpdir)) == expected
    # The next compaction finishes the job, still exact, and leaves no dead files or scratch.
    compact_all(mpdir)
    assert without_live_and_all(promfork_view(mpdir)) == expected
    assert dead_pids(mpdir) == set()
    leftovers = [p.name for p in mpdir.iterdir() if p.name.endswith((".new", ".journal", ".tmp"))]
    assert leftovers == []


def test_corrupt_files_are_set_aside_and_the_rest_still_scraped(mpdir):
    run_dead_workers(mpdir, 3)
    expected = without_live_and_all(promfork_view(mpdir))
    (mpdir / "counter_999999.db").write_bytes(b"\xff" * 100)  # garbage
    (mpdir / "histogram_999998.db").write_bytes(b"")  # zero length, owner long gone
    (mpdir / "notes.db").write_bytes(b"hello")  # foreign name
    library = _LibraryMetrics()
    collector = AggregatingCollector(str(mpdir), library)
    view = {(s.name, *sorted(s.labels.items())): s.value for m in collector.collect() for s in m.samples}
    assert without_live_and_all(view) == expected
    assert library.scrape_errors.count == 3
    assert sorted(p.name for p in (mpdir / "quarantine").iterdir()) == [
        "counter_999999.db",
        "histogram_999998.db",
        "notes.db",
    ]
    # Set aside once: the next scrape is clean.
    collector.collect()
    assert library.scrape_errors.count == 3


def test_compactor_thread_folds_reported_and_orphaned_pids(mpdir):
    wrote = run_dead_workers(mpdir, 5)
    expected = without_live_and_all(promfork_view(mpdir))
    done = threading.Event()
    compactor = compaction.Compactor(str(mpdir), protected=lambda: {os.getpid()}, on_compacted=lambda r: done.set())
    compactor.worker_died(wrote[0]["pid"])
    compactor.start()
    try:
        assert done.wait(10)
        # The rest are found by the orphan scan (their deaths were never reported).
        for _ in range(100):
            if not dead_pids(mpdir):
                break
            threading.Event().wait(0.05)
    finally:
        compactor.stop()
    assert dead_pids(mpdir) == set()
    assert without_live_and_all(promfork_view(mpdir)) == expected


def test_compaction_waits_while_a_scrape_holds_the_lock(mpdir):
    run_dead_workers(mpdir, 2)
    compactor = compaction.Compactor(str(mpdir), protected=set)
    for pid in dead_pids(mpdir):
        compactor.worker_died(pid)
    with DirectoryLock(str(mpdir)).hold(exclusive=False, timeout=1):
        assert compactor.run_once() is None  # busy: gives up at once instead of blocking
    assert compactor.run_once().pids
    assert dead_pids(mpdir) == set()


def test_a_reused_pid_is_never_folded_while_its_new_owner_lives(mpdir):
    wrote = run_dead_workers(mpdir, 2)
    reused = wrote[0]["pid"]
    compactor = compaction.Compactor(str(mpdir), protected=lambda: {reused})
    for w in wrote:
        compactor.worker_died(w["pid"])
    result = compactor.run_once()
    assert reused not in result.pids and wrote[1]["pid"] in result.pids
    assert reused in dead_pids(mpdir)
