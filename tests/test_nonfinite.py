"""inf, -inf and nan in every metric kind and gauge mode: promfork aggregates them as prometheus-client does.

math.fsum refuses +inf with -inf and overflowing partial sums; prometheus-client's
plain ``+`` gives nan and inf. Two real prometheus-client writers (subprocesses:
the multiprocess mode is chosen at import, and this process runs without it)
write the values of tests/nonfinite_workload.py; the truth is stock
``MultiProcessCollector`` reading the same files in the same order.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from prometheus_client.multiprocess import MultiProcessCollector
from test_compaction import compact_all, promfork_view

HERE = Path(__file__).resolve().parent
INF = math.inf


def write_nonfinite(directory: Path) -> list[int]:
    """Run the two writers; return their pids."""
    out = subprocess.run(
        [sys.executable, str(HERE / "nonfinite_workload.py"), str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [int(line) for line in out.stdout.split()]


def stock_view(directory: Path) -> dict[tuple, float]:
    """prometheus-client's reading of the files, in the order promfork reads them (by name)."""
    files = sorted(str(p) for p in directory.glob("*.db"))
    return {
        (s.name, *sorted(s.labels.items())): s.value
        for metric in MultiProcessCollector.merge(files, accumulate=True)
        for s in metric.samples
    }


def comparable(view: dict[tuple, float]) -> dict[tuple, float | str]:
    """nan never equals nan: spell it out so that dict equality means the same values."""
    return {key: "nan" if math.isnan(value) else value for key, value in view.items()}


def order_dependent(key: tuple) -> bool:
    """A min/max gauge where one process holds nan and the other a number: the first one read wins (see merge)."""
    name, *labels = key
    mode = name.removeprefix("level_").removeprefix("live")
    mixed = ("case", "nan_first") in labels or ("case", "nan_second") in labels
    return mixed and mode in ("min", "max")


def test_nonfinite_values_aggregate_as_stock_does(mpdir):
    pids = write_nonfinite(mpdir)
    assert len(pids) == 2
    stock = stock_view(mpdir)
    # The files hold what was written: stock's plain + gives these.
    assert stock[("events_total", ("case", "inf"))] == INF
    assert stock[("events_total", ("case", "overflow"))] == INF
    assert math.isnan(stock[("events_total", ("case", "inf_nan"))])
    assert math.isnan(stock[("latency_seconds_sum", ("case", "inf_and_minus_inf"))])
    assert math.isnan(stock[("size_bytes_sum", ("case", "inf_and_minus_inf"))])
    assert math.isnan(stock[("level_sum", ("case", "inf_and_minus_inf"))])
    assert stock[("level_max", ("case", "inf_and_minus_inf"))] == INF
    assert stock[("level_livemin", ("case", "inf_and_minus_inf"))] == -INF
    assert stock[("latency_seconds_count", ("case", "nan_both"))] == 0  # nan falls in no bucket
    assert comparable(promfork_view(mpdir)) == comparable(stock)


def test_compaction_folds_nonfinite_values_to_the_same_aggregate(mpdir):
    write_nonfinite(mpdir)
    before = comparable(promfork_view(mpdir))
    compact_all(mpdir)
    after = comparable(promfork_view(mpdir))
    assert after == comparable(stock_view(mpdir))
    # Folded values only: live gauges die with their processes, "all" gauges are one series per
    # process (not an aggregate), and min/max of nan and a number depend on the reading order.
    folded = {k: v for k, v in before.items() if not k[0].startswith(("level_live", "level_all"))}
    kept = {k: v for k, v in folded.items() if not order_dependent(k)}
    assert {k: v for k, v in after.items() if k in kept} == kept
