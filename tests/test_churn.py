"""Hundreds of worker lifetimes (--max-requests 1): totals stay exact and the directory stays small."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from promfork.directory import filenames
from tests.support.client import chat, scrape, value
from tests.support.servers import wait_until

pytestmark = pytest.mark.integration

LIFETIMES = 300


def test_every_worker_lifetime_is_counted_and_files_stay_bounded(gunicorn_factory):
    server = gunicorn_factory("--max-requests", "1", workers=4)
    statuses: Counter[int] = Counter()
    completion_tokens = 0

    def one(i: int):
        body = {"model": "mock-small", "messages": [{"role": "user", "content": f"request {i}"}], "stream": i % 3 == 0}
        return chat(server.port, body)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for status, body, events in pool.map(one, range(LIFETIMES)):
            statuses[status] += 1
            usage = body["usage"] if body else events[-2]["usage"]
            completion_tokens += usage["completion_tokens"]
    assert statuses == {200: LIFETIMES}
    boots = server.log().count("Booting worker")
    assert boots >= LIFETIMES * 0.8, f"only {boots} workers booted: churn did not happen"

    def settled():
        fams = scrape(server.port)
        owners = {f.owner for f in map(filenames.parse_name, (p.name for p in server.multiproc_dir.glob("*.db"))) if f}
        live = {str(server.proc.pid), *map(str, server.worker_pids())}
        done = value(fams, "http_requests_total", route="/v1/chat/completions", status="200") == LIFETIMES
        return (fams, owners, live) if done and owners <= live | {filenames.ARCHIVE} else None

    result = wait_until(settled, timeout=20, interval=0.2)
    assert result is not None, "dead workers' files were not compacted (or totals never matched)"
    fams, _, live = result
    assert value(fams, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == completion_tokens
    assert value(fams, "metrics_compactions_total") >= boots - 8
    archives = [p for p in server.multiproc_dir.glob(f"*_{filenames.ARCHIVE}.db")]
    assert 1 <= len(archives) <= 8
    per_pid_files = len(list(server.multiproc_dir.glob("*.db"))) - len(archives)
    assert per_pid_files <= len(live) * 6, f"{per_pid_files} files for {len(live)} live processes"
