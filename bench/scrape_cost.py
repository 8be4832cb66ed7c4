"""Benchmark (not a test): scrape cost and files on disk, stock collector vs promfork, by dead workers.

Each simulated worker is a forked process running the real gateway app (in
multiprocess mode) for a handful of requests: plain, streamed, tool call, 404
and a bad request, so its files hold the series a real worker writes. Then, in
one run, for 0, 100, 1000 and 2000 dead workers next to 4 live ones:

* stock: prometheus-client's MultiProcessCollector over the uncompacted directory
* promfork: the AggregatingCollector after the dead workers were compacted

and what compaction costs per dead worker (the work the master's thread does).

Then, with live workers (workers x series per worker, every worker holding the
same series, as workers of one app do), the cost of one scrape:

* stock: MultiProcessCollector + generate_latest in-process (it keeps nothing)
* before: promfork's previous reader (merge_files + generate_latest, nothing kept)
* promfork cold: a new reader (the first scrape of a process)
* promfork warm: a long-lived reader, after a few percent of the series of a
  few files changed (what every scrape of the master's METRICS_PORT sees)

the memory the reader's caches hold (tracemalloc) and what is left of it once
the files go; and the headline: a real Gunicorn with 16 workers of about 2000
series each (bench.master_port.series_app), a few requests changing values
between scrapes, an aggregated scrape through the master's METRICS_PORT
(measured by the client, HTTP included) against stock in-process over the same
directory, side by side in one run, with the samples checked identical.

    python bench/scrape_cost.py [--max-dead 2000] [--repeat 15] [--tables dead,live,master]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORK = tempfile.mkdtemp(prefix="promfork-bench-")
SOURCE = os.path.join(WORK, "source")
os.makedirs(SOURCE, mode=0o700)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = SOURCE

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.master_port import SERIES_BOUNDS, start_gunicorn  # noqa: E402
from promfork.config import Settings  # noqa: E402
from promfork.directory import fileformat, filenames, journal  # noqa: E402
from promfork.directory.locks import DirectoryLock  # noqa: E402
from promfork.master import compaction  # noqa: E402
from promfork.reader.collector import AggregatingCollector, ExpositionRegistry, LibraryMetrics  # noqa: E402
from promfork.reader.merge import merge_files  # noqa: E402
from webapp.app import create_app  # noqa: E402
from webapp.settings import GatewaySettings  # noqa: E402

REQUESTS = [
    {"model": "mock-small", "messages": [{"role": "user", "content": "hello"}]},
    {"model": "mock-large", "messages": [{"role": "user", "content": "stream please"}], "stream": True},
    {
        "model": "mock-small",
        "messages": [{"role": "user", "content": "6 * 7"}],
        "tools": [{"type": "function", "function": {"name": "calculator"}}],
    },
    {"model": "gpt-none", "messages": [{"role": "user", "content": "x"}]},
    {"model": "mock-small"},
]


def simulate_workers(count: int) -> list[int]:
    """Fork `count` workers that each serve REQUESTS through the real app, then exit; return their pids."""
    app = create_app(GatewaySettings(), Settings())
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            client = app.test_client()
            for body in REQUESTS:
                client.post("/v1/chat/completions", json=body).close()
            client.get("/v1/models/mock-small").close()
            client.get("/nope").close()
            os._exit(0)
        os.waitpid(pid, 0)
        pids.append(pid)
    return pids


def copy_files(pids: list[int], target: str) -> None:
    wanted = {str(p) for p in pids}
    os.makedirs(target, mode=0o700)
    for name in os.listdir(SOURCE):
        parsed = filenames.parse_name(name)
        if parsed and parsed.owner in wanted:
            shutil.copy(os.path.join(SOURCE, name), target)


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def stock_scrape(directory: str):
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return lambda: generate_latest(registry)


def promfork_scrape(directory: str):
    registry = CollectorRegistry()
    registry.register(AggregatingCollector(directory, LibraryMetrics(Settings(), registry=CollectorRegistry())))
    return lambda: generate_latest(registry)


def files_in(directory: str) -> int:
    return sum(1 for n in os.listdir(directory) if n.endswith(".db"))


def series_keys(series: int) -> tuple[list[str], list[str], list[str]]:
    """Keys of one worker's counter, histogram and gauge files, shaped as bench.master_port.series_app's."""
    counters, label_sets = series // 4, series * 2 // 3 // 13
    gauges = max(series - counters - label_sets * 13, 0)

    def key(metric: str, sample: str, labels: dict) -> str:
        return json.dumps((metric, sample, labels, "help"), sort_keys=True)

    counter = [key("req", "req_total", {"route": f"/r{i % 50}", "status": str(200 + i // 50)}) for i in range(counters)]
    histogram = []
    for i in range(label_sets):
        labels = {"route": f"/route/{i}"}
        histogram.append(key("lat", "lat_sum", labels))
        histogram += [key("lat", "lat_bucket", {**labels, "le": str(b)}) for b in SERIES_BOUNDS]
        histogram.append(key("lat", "lat_bucket", {**labels, "le": "+Inf"}))
    gauge = [key("depth", "depth", {"shard": str(i)}) for i in range(gauges)]
    return counter, histogram, gauge


class LiveWorkers:
    """Files of `workers` live workers with `series` series each, and a way to change a few percent of them."""

    def __init__(self, directory: str, workers: int, series: int) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700)
        counter, histogram, gauge = series_keys(series)
        self.paths = []
        for w in range(workers):
            pid = 100000 + w
            for prefix, keys in (("counter", counter), ("histogram", histogram), ("gauge_livesum", gauge)):
                path = os.path.join(directory, f"{prefix}_{pid}.db")
                fileformat.write_entries(path, {k: (float(random.randint(0, 9)), 0.0) for k in keys})
                self.paths.append(path)
        self.series = series
        self.label_sets = [histogram[i : i + 13] for i in range(0, len(histogram), 13)]
        self.counter_keys = counter

    def change(self, files: int = 4) -> None:
        """In `files` workers: 3% of their series change (observations touch _sum and the buckets above)."""
        for w in random.sample(range(len(self.paths) // 3), files):
            observations = max(1, self.series * 3 // 100 // 8)
            hist = fileformat.ValueFile(self.paths[3 * w + 1])
            for _ in range(observations):
                keys = random.choice(self.label_sets)
                value = random.randint(0, 80) / 8
                hist.doubles[hist.slot(keys[0])] += value
                for k, bound in zip(keys[1:], (*SERIES_BOUNDS, math.inf), strict=True):
                    if value <= bound:
                        hist.doubles[hist.slot(k)] += 1
            hist.close()
            counts = fileformat.ValueFile(self.paths[3 * w])
            for k in random.sample(self.counter_keys, observations):
                counts.doubles[counts.slot(k)] += 1
            counts.close()


class WholeMerge:
    """promfork before the long-lived reader: every file read, parsed and merged again on every scrape."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self):
        if journal.needs_recovery(self.directory):
            raise RuntimeError("not measured: a compaction needs recovery")
        with DirectoryLock(self.directory).hold(exclusive=False, timeout=5.0):
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".db"))
            return merge_files([os.path.join(self.directory, n) for n in names])[0]


def whole_merge_scrape(directory: str):
    registry = CollectorRegistry()
    registry.register(WholeMerge(directory))
    return lambda: generate_latest(registry)


def promfork_registry(directory: str) -> ExpositionRegistry:
    return ExpositionRegistry(AggregatingCollector(directory, LibraryMetrics(Settings(), registry=CollectorRegistry())))


def samples_of(text: str, skip_prefix: str | None = None) -> list[tuple]:
    """Every sample of a text exposition, sorted, as prometheus-client's parser reads it."""
    found = []
    for family in text_string_to_metric_families(text):
        if skip_prefix and family.name.startswith(skip_prefix):
            continue
        found += [(s.name, tuple(sorted(s.labels.items())), repr(s.value)) for s in family.samples]
    return sorted(found)


def live_table(repeat: int) -> None:
    print("scrape cost with live workers (in-process; warm: 3% of the series of 4 workers changed before each scrape)")
    header = (
        f"{'workers x series':>16} | {'samples':>7} | {'stock ms':>8} | {'before ms':>9} | {'cold ms':>7}"
        f" {'stock/cold':>10} | {'warm ms':>7} {'stock/warm':>10}"
    )
    print(header)
    print("-" * len(header))
    for workers, series in ((4, 500), (4, 2000), (16, 500), (16, 2000)):
        live = LiveWorkers(os.path.join(WORK, f"live-{workers}x{series}"), workers, series)
        stock = stock_scrape(live.directory)
        stock_ms = median_ms(stock, repeat)
        before_ms = median_ms(whole_merge_scrape(live.directory), repeat)
        cold_ms = median_ms(lambda live=live: promfork_registry(live.directory).exposition(None), repeat)
        warm = promfork_registry(live.directory)
        warm.exposition(None)
        times = []
        for _ in range(repeat * 2):
            live.change()
            start = time.perf_counter()
            body, _ = warm.exposition(None)
            times.append((time.perf_counter() - start) * 1000)
        warm_ms = statistics.median(times)
        expected = samples_of(stock().decode())
        assert samples_of(body.decode()) == expected, "promfork and stock disagree"
        print(
            f"{f'{workers} x {series}':>16} | {len(expected):>7} | {stock_ms:>8.2f} | {before_ms:>9.2f} |"
            f" {cold_ms:>7.2f} {stock_ms / cold_ms:>9.1f}x | {warm_ms:>7.2f} {stock_ms / warm_ms:>9.1f}x"
        )
    print("before: promfork's previous reader (every file re-read, re-merged and re-formatted each scrape)")
    print()


def memory_table() -> None:
    print("memory held by the reader's caches (tracemalloc), 16 workers x 2000 series")
    live = LiveWorkers(os.path.join(WORK, "memory"), 16, 2000)
    held = sum(os.path.getsize(p) for p in live.paths)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    registry = promfork_registry(live.directory)

    def held_now() -> float:
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - base) / 2**20

    registry.exposition(None)
    print(f"  after the first scrape:                 {held_now():6.1f} MiB  (files: {held / 2**20:.1f} MiB on disk)")
    for _ in range(20):
        live.change()
        registry.exposition(None)
    print(f"  after 20 scrapes with changes:          {held_now():6.1f} MiB")
    for path in live.paths[: len(live.paths) // 2]:
        os.unlink(path)
    registry.exposition(None)
    print(f"  after half the workers' files went:     {held_now():6.1f} MiB")
    for path in live.paths[len(live.paths) // 2 :]:
        os.unlink(path)
    registry.exposition(None)
    print(f"  after every file went:                  {held_now():6.1f} MiB")
    tracemalloc.stop()
    print()


def fetch(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body


def master_table(workers: int, series: int, repeat: int) -> None:
    tmp = tempfile.mkdtemp(prefix="promfork-bench-master-")
    server, port, mport = start_gunicorn(
        tmp, workers, {"SERIES_PER_WORKER": str(series)}, app="bench.master_port:series_app()"
    )
    try:
        directory = os.path.join(tmp, "mp")
        stock = stock_scrape(directory)
        via_master, in_process, checked = [], [], 0
        for i in range(repeat * 2):
            for _ in range(4):  # a few requests: a few percent of the series of a few workers change
                fetch(port, "/touch?n=6")
            if i % 2:  # alternate which goes first
                in_process.append(median_ms(stock, 1))
            start = time.perf_counter()
            body = fetch(mport, "/metrics")
            via_master.append((time.perf_counter() - start) * 1000)
            if not i % 2:
                in_process.append(median_ms(stock, 1))
            # nothing changes between the two reads: the same samples (the master adds process_* per worker)
            assert samples_of(body.decode(), "process_") == samples_of(stock().decode()), "master and stock disagree"
            checked += 1
        samples = len(samples_of(stock().decode()))
        files = sum(1 for n in os.listdir(directory) if n.endswith(".db"))
    finally:
        server.stop(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    master_ms, stock_ms = statistics.median(via_master), statistics.median(in_process)
    print(f"real gunicorn, {workers} workers x ~{series} series ({files} files, {samples} aggregated samples),")
    print("4 requests changing values between scrapes; samples identical in all", checked, "scrapes")
    print(f"  stock MultiProcessCollector in-process:   median {stock_ms:7.2f} ms")
    print(f"  promfork via the master's METRICS_PORT:   median {master_ms:7.2f} ms  (HTTP included)")
    print(f"  stock / promfork: {stock_ms / master_ms:.1f}x")
    print()


def dead_table(args) -> None:
    sizes = [n for n in (0, 100, 1000, 2000) if n <= args.max_dead]

    started = time.perf_counter()
    live = simulate_workers(4)
    dead = simulate_workers(max(sizes))
    print(f"simulated {len(live) + len(dead)} worker lifetimes in {time.perf_counter() - started:.1f}s")
    print()
    header = f"{'dead':>6} | {'stock ms':>9} {'files':>6} | {'promfork ms':>11} {'files':>6} | {'stock/promfork':>14}"
    header += f" | {'vs live-only':>12}"
    print(header)
    print("-" * len(header))
    baseline = None
    fold_costs = []
    for n in sizes:
        stock_dir = os.path.join(WORK, f"stock-{n}")
        copy_files(live + dead[:n], stock_dir)
        stock_ms = median_ms(stock_scrape(stock_dir), args.repeat)

        compacted_dir = os.path.join(WORK, f"promfork-{n}")
        copy_files(live + dead[:n], compacted_dir)
        lock = DirectoryLock(compacted_dir)
        for i in range(0, n, 50):  # the master folds deaths in small batches as they come
            batch = dead[i : i + 50]
            t0 = time.perf_counter()
            with lock.try_exclusive(wait=1.0):
                compaction.compact_dead_workers(compacted_dir, batch)
            fold_costs.append((time.perf_counter() - t0) * 1000 / len(batch))
        promfork_ms = median_ms(promfork_scrape(compacted_dir), args.repeat)
        baseline = baseline or promfork_ms
        print(
            f"{n:>6} | {stock_ms:>9.2f} {files_in(stock_dir):>6} | {promfork_ms:>11.2f} {files_in(compacted_dir):>6} |"
            f" {stock_ms / promfork_ms:>13.1f}x | {promfork_ms / baseline:>11.2f}x"
        )
    print()
    if fold_costs:
        print(
            "compaction cost per dead worker (off the master's main loop):"
            f" median {statistics.median(fold_costs):.2f} ms,"
            f" max {max(fold_costs):.2f} ms (batches of 50)"
        )
    single = os.path.join(WORK, "single")
    copy_files(live + dead[:200], single)
    lock = DirectoryLock(single)
    singles = []
    for pid in dead[:200]:
        t0 = time.perf_counter()
        with lock.try_exclusive(wait=1.0):
            compaction.compact_dead_workers(single, [pid])
        singles.append((time.perf_counter() - t0) * 1000)
    print(f"compaction of one death at a time: median {statistics.median(singles):.2f} ms (incl. 2 fsyncs)")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-dead", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--tables", default="dead,live,master", help="which tables: dead, live, master")
    parser.add_argument("--master-workers", type=int, default=16)
    parser.add_argument("--master-series", type=int, default=2000)
    args = parser.parse_args()
    tables = args.tables.split(",")
    try:
        if "dead" in tables:
            dead_table(args)
        if "live" in tables:
            live_table(args.repeat)
            memory_table()
        if "master" in tables:
            master_table(args.master_workers, args.master_series, args.repeat)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
