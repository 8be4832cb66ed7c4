"""Benchmark (not a test): scrape cost and files on disk, stock collector vs promfork, by dead workers.

Each simulated worker is a forked process running the real gateway app (in
multiprocess mode) for a handful of requests: plain, streamed, tool call, 404
and a bad request, so its files hold the series a real worker writes. Then, in
one run, for 0, 100, 1000 and 2000 dead workers next to 4 live ones:

* stock: prometheus-client's MultiProcessCollector over the uncompacted directory
* promfork: the AggregatingCollector after the dead workers were compacted

and what compaction costs per dead worker (the work the master's thread does).

    python bench/scrape_cost.py [--max-dead 2000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORK = tempfile.mkdtemp(prefix="promfork-bench-")
SOURCE = os.path.join(WORK, "source")
os.makedirs(SOURCE, mode=0o700)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = SOURCE

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

from promfork import compaction, dbfiles  # noqa: E402
from promfork.collector import AggregatingCollector, LibraryMetrics  # noqa: E402
from promfork.config import Settings  # noqa: E402
from promfork.multiproc import DirectoryLock  # noqa: E402
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
        parsed = dbfiles.parse_name(name)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-dead", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
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
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
