"""A full filesystem, a damaged file and a reused pid, injected for real at the level of files and processes.

The full disk is a small tmpfs (needs root and mount; skipped where not allowed)
filled to the last page; the reused pid is a real process holding a file named
for a dead pid. The integration tests in test_faults.py do the same to a running
Gunicorn.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import mmap_key
from test_compaction import compact_all, promfork_view, run_dead_workers, stock_view, without_live_and_all

from promfork.config import load_settings
from promfork.directory import fileformat, filenames, locks
from promfork.directory.locks import DirectoryLock
from promfork.master import compaction

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str):
    where.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                           capture_output=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(mountpoint: Path) -> Path:
    """Write a filler file until the filesystem is full; delete it to free the space."""
    filler = mountpoint / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def tmpfs(tmp_path: Path):
    with mounted_tmpfs(tmp_path / "tmpfs", "2m") as mountpoint:
        directory = mountpoint / "mp"
        directory.mkdir(mode=0o700)
        yield mountpoint, directory


def test_value_file_on_a_full_disk_raises_enospc_instead_of_sigbus(tmpfs):
    mountpoint, directory = tmpfs
    grown = fileformat.ValueFile(str(directory / "counter_1.db"))
    fill(mountpoint)
    try:
        with pytest.raises(OSError) as created:
            fileformat.ValueFile(str(directory / "counter_2.db"))
        assert created.value.errno == errno.ENOSPC
        keys = [mmap_key("c_total", "c_total", ["n"], [str(n)], "C.") for n in range(2000)]
        slots = []
        with pytest.raises(OSError) as growth:
            for key in keys:  # 2,000 entries need more than the first 64 KiB
                slots.append(grown.slot(key))
                grown.doubles[slots[-1]] = 1.0
        assert growth.value.errno == errno.ENOSPC
        grown.doubles[slots[0]] = 5.0  # slots handed out before stay writable
    finally:
        grown.close()
    entries = fileformat.read_entries(str(directory / "counter_1.db"))
    assert len(entries) == len(slots) and entries[keys[0]] == (5.0, 0.0)


def test_archive_write_on_a_full_disk_fails_cleanly(tmpfs):
    mountpoint, directory = tmpfs
    fill(mountpoint)
    with pytest.raises(OSError):
        fileformat.write_entries(str(directory / "counter_archive.db.new"), {"k": (1.0, 0.0)})
    assert not (directory / "counter_archive.db.new").exists()


VALUE_STORE_UNDER_FULL_DISK = """
import json, os, sys, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
filler = sys.argv[2]
from promfork.writer import values
assert values.install()
from prometheus_client import Counter, Gauge, Histogram
from promfork.writer.values import Samples
errors = Counter("metrics_write_errors_total", "Errors.")
values.report_write_errors_to(errors)
requests = Counter("requests_total", "Requests.", ["route"])
latency = Histogram("latency_seconds", "Latency.", ["route"], buckets=(0.1, 1.0))
live = Gauge("in_flight", "In flight.", multiprocess_mode="livesum")
requests.labels("/a").inc()
Samples(requests.labels("/b"), latency.labels("/b")).update(1, 0.05)

def fill():
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512):
            try:
                while True:
                    os.write(fd, b"0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)

fill()
# Existing series keep being stored; 1,500 new ones need the file to grow, which fails.
for n in range(1500):
    requests.labels(f"/new/{n}").inc(2)
    Samples(requests.labels("/b"), latency.labels("/b")).update(1, 0.5)
child = os.fork()
if child == 0:  # a new process cannot even create its files
    requests.labels("/a").inc(7)
    live.inc()
    os._exit(0 if requests.labels("/a")._value.get() == 7 else 3)
_, status = os.waitpid(child, 0)
print(json.dumps({"child_status": status, "errors_held": errors._value.get()}), flush=True)
os.unlink(filler)
time.sleep(values.RETRY_INTERVAL + 0.1)
requests.labels("/a").inc()  # any update retries; everything held in memory is written
print(json.dumps({"errors": errors._value.get(), "stored": not values._current.process.unstored}), flush=True)
"""


def test_value_store_keeps_the_process_alive_and_loses_nothing_when_the_disk_fills(tmpfs, tmp_path):
    mountpoint, directory = tmpfs
    proc = subprocess.run(
        [sys.executable, "-c", VALUE_STORE_UNDER_FULL_DISK, str(directory), str(mountpoint / "filler")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr  # a stock value store dies here with SIGBUS (-7)
    during, after = (json.loads(line) for line in proc.stdout.splitlines())
    assert during["child_status"] == 0  # the forked process neither crashed nor saw wrong values
    assert during["errors_held"] > 0
    assert after["stored"]
    # Visible: logged once, not per update; and recovery is logged too.
    assert proc.stderr.count("cannot store metric values") <= 2, proc.stderr[-2000:]
    assert "stored again" in proc.stderr
    # Independent truth: what stock prometheus-client reads from the files afterwards.
    view = stock_view(directory)
    assert view[("requests_total", ("route", "/a"))] == 2  # the child's files never existed: its 7 died with it
    assert view[("requests_total", ("route", "/b"))] == 1501
    assert view[("latency_seconds_count", ("route", "/b"))] == 1501
    assert view[("latency_seconds_bucket", ("le", "0.1"), ("route", "/b"))] == 1
    assert all(view[("requests_total", ("route", f"/new/{n}"))] == 2 for n in range(1500))
    assert view[("metrics_write_errors_total",)] == after["errors"] >= during["errors_held"]


def test_compaction_on_a_full_disk_keeps_totals_and_catches_up(tmpfs):
    mountpoint, directory = tmpfs
    run_dead_workers(directory, 6)
    before = promfork_view(directory)
    filler = fill(mountpoint)
    with DirectoryLock(str(directory)).try_exclusive() as locked, pytest.raises(OSError):
        assert locked
        compaction.compact_dead_workers(str(directory), compaction.pids_with_files(str(directory)))
    # Nothing lost or doubled (live and "all" gauges die with their process): the retired files
    # are read as they are, scratch files are gone.
    assert without_live_and_all(promfork_view(directory)) == without_live_and_all(before)
    assert not [p for p in directory.iterdir() if p.name.endswith((".new", ".journal", ".tmp"))]
    filler.unlink()
    compact_all(directory)
    assert without_live_and_all(promfork_view(directory)) == without_live_and_all(before)
    assert all(filenames.parse_name(p.name).owner == filenames.ARCHIVE for p in directory.glob("*.db"))


def test_compactor_thread_retries_until_the_disk_has_room(tmpfs):
    mountpoint, directory = tmpfs
    run_dead_workers(directory, 3)
    expected = without_live_and_all(promfork_view(directory))
    filler = fill(mountpoint)
    failures = []
    compactor = compaction.Compactor(str(directory), protected=set, on_write_error=failures.append, max_backoff=0.2)
    for pid in compaction.pids_with_files(str(directory)):
        compactor.worker_died(pid)
    compactor.start()
    try:
        deadline = time.monotonic() + 10
        while len(failures) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(failures) >= 3 and all(f.errno == errno.ENOSPC for f in failures)
        assert {k: v for k, v in promfork_view(directory).items() if k in expected} == expected
        filler.unlink()
        deadline = time.monotonic() + 10
        while compaction.pids_with_files(str(directory)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        compactor.stop()
    assert compaction.pids_with_files(str(directory)) == set()
    assert not compaction.has_retired_files(str(directory))
    assert {k: v for k, v in promfork_view(directory).items() if k in expected} == expected


HOLD_FILE = """
import sys, time
from promfork.directory import fileformat
store = fileformat.ValueFile(sys.argv[1])
store.doubles[store.slot(sys.argv[2])] += 5.0
print("open", flush=True)
sys.stdin.readline()
store.doubles[store.slot(sys.argv[2])] += 1.0
store.close()
"""


def test_a_file_a_live_process_holds_is_never_folded_whatever_its_pid_says(mpdir: Path):
    directory = mpdir
    wrote = run_dead_workers(directory, 2)
    reused = wrote[0]["pid"]
    key = mmap_key("jobs", "jobs_total", ["kind"], ["a"], "Jobs.")
    before = stock_view(directory)[("jobs_total", ("kind", "a"))]
    # A new process that owns the dead pid's name continues its counter file, as prometheus-client does.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FILE, str(directory / f"counter_{reused}.db"), key],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        # Told that both pids are dead (a stale report), compaction still leaves the held file alone.
        result = compact_all(directory)
        assert f"counter_{reused}.db" in result.busy
        assert (directory / f"counter_{reused}.db").exists()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0
    finally:
        holder.kill()
    compact_all(directory)
    assert not (directory / f"counter_{reused}.db").exists()
    assert stock_view(directory)[("jobs_total", ("kind", "a"))] == before + 6


def test_a_writer_that_opens_a_file_during_its_compaction_gets_a_new_file(mpdir: Path):
    directory = mpdir
    wrote = run_dead_workers(directory, 1)
    path = str(directory / f"counter_{wrote[0]['pid']}.db")
    claimed = locks.claim(path)
    assert claimed is not None
    opened = {}

    def open_it():
        store = fileformat.ValueFile(path, lock_wait=10)
        opened["entries"] = dict(store._slots)
        store.close()

    writer = threading.Thread(target=open_it)
    writer.start()
    time.sleep(0.2)  # the writer waits for the claim to go
    assert writer.is_alive()
    os.rename(path, path + ".retired")  # what compaction does while it holds the claim
    os.close(claimed)
    writer.join(10)
    assert opened["entries"] == {}  # a fresh file, not the retired one


def test_crash_after_retiring_loses_and_doubles_nothing(mpdir: Path):
    directory = mpdir
    run_dead_workers(directory, 4)
    expected = promfork_view(directory)
    crash = (
        "import os\nfrom promfork.master import compaction\n"
        "compaction._step = lambda name: os._exit(17) if name == 'retired' else None\n"
        f"compaction.compact_dead_workers({str(directory)!r}, compaction.pids_with_files({str(directory)!r}))\n"
    )
    assert subprocess.run([sys.executable, "-c", crash], cwd=ROOT, timeout=60).returncode == 17
    assert compaction.has_retired_files(str(directory))
    # Retired files read like any dead worker's (live and "all" gauges died with their process).
    assert without_live_and_all(promfork_view(directory)) == without_live_and_all(expected)
    compaction_pids = compaction.pids_with_files(str(directory))
    with DirectoryLock(str(directory)).try_exclusive() as locked:
        assert locked
        compaction.compact_dead_workers(str(directory), compaction_pids)
    assert not compaction.has_retired_files(str(directory))
    assert without_live_and_all(promfork_view(directory)) == without_live_and_all(expected)


def test_dropping_all_mode_gauges_is_logged_once_per_gauge(mpdir: Path, caplog):
    directory = mpdir
    compactor = compaction.Compactor(str(directory), protected=set)
    dead = []
    for batch in range(2):
        for w in run_dead_workers(directory, 2, first=batch * 2):
            compactor.worker_died(w["pid"])
            dead.append(w["pid"])
        with caplog.at_level(logging.WARNING, logger="promfork.master.compaction"):
            compactor.run_once()
    warnings = [r.getMessage() for r in caplog.records if "multiprocess_mode='all'" in r.getMessage()]
    assert len(warnings) == 1 and "temp_all" in warnings[0] and "livesum" in warnings[0]
    assert not [pid for pid in dead if (directory / f"gauge_all_{pid}.db").exists()]


def test_an_all_zero_file_reads_as_empty_as_in_prometheus_client(mpdir: Path):
    directory = mpdir
    run_dead_workers(directory, 1)
    (directory / "counter_4000001.db").write_bytes(bytes(65536))  # created, never written; owner gone
    expected = stock_view(directory)
    assert fileformat.read_entries(str(directory / "counter_4000001.db")) == {}
    assert promfork_view(directory) == expected
    result = compact_all(directory)
    assert result.quarantined == [] and not (directory / "quarantine").exists()


def test_a_file_of_odd_size_is_damage_not_a_type_error(tmp_path: Path):
    path = tmp_path / "counter_7.db"
    path.write_bytes(b"\x08" + bytes(65536))
    with pytest.raises(fileformat.CorruptFile, match="multiple of 8"):
        fileformat.ValueFile(str(path))


def test_the_lowercase_variable_is_honoured_with_a_deprecation_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="promfork.config"):
        settings = load_settings({"prometheus_multiproc_dir": "/srv/metrics"})
    assert settings.multiproc_dir == "/srv/metrics"
    assert "deprecated in favor of the upper case naming PROMETHEUS_MULTIPROC_DIR" in caplog.text
    assert load_settings({"prometheus_multiproc_dir": "/a", "PROMETHEUS_MULTIPROC_DIR": "/b"}).multiproc_dir == "/b"


HELD_ON_TOP_OF_A_CONTINUED_FILE = """
import os, sys, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client.mmap_dict import mmap_key
from promfork.directory import fileformat, locks
from promfork.writer import values
assert values.install()
path = os.path.join(sys.argv[1], f"counter_{os.getpid()}.db")
earlier = fileformat.ValueFile(path)  # a dead process with this pid counted 5
earlier.doubles[earlier.slot(mmap_key("jobs", "jobs_total", [], [], "Jobs."))] = 5.0
earlier.close()
claimed = locks.claim(path)  # compaction holds it while this process starts
from prometheus_client import Counter
jobs = Counter("jobs", "Jobs.")  # cannot open its file for a second: held in memory
jobs.inc(2)
locks.release(claimed)  # compaction left it (it saw a live pid)
time.sleep(values.RETRY_INTERVAL + 0.1)
jobs.inc(1)
print(jobs._value.get())
"""


def test_values_held_before_a_continued_file_opens_add_to_what_it_holds(mpdir: Path):
    proc = subprocess.run(
        [sys.executable, "-c", HELD_ON_TOP_OF_A_CONTINUED_FILE, str(mpdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == 8.0
    assert stock_view(mpdir)[("jobs_total",)] == 8.0
