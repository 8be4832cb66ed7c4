"""Chaos run (bounded): worker churn, SIGKILLs, HUP reloads and client errors at once, for 20 s;
every invariant is checked at the end by promfork-load against what the client saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import ROOT, clean_env

LOAD = str(Path(sys.executable).with_name("promfork-load"))

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_chaos_churn_kills_reloads_and_bad_input_leave_every_invariant_intact(tmp_path: Path):
    report = tmp_path / "chaos.json"
    proc = subprocess.run(
        [LOAD, "--no-progress", "--workers", "4", "--max-requests", "50", "--kill-workers-every", "0.8",
         "--hup-every", "5", "--duration", "20", "--concurrency", "24", "--mock-latency-ms", "5",
         "--mix", "plain=35,stream=30,tool=10,client_error=15,unmatched=10", "--json", str(report)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    data = json.loads(report.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["agree"], [c for c in data["checks"] if not c["ok"]]
    assert data["kills"] >= 15 and data["reloads"] >= 3 and data["requests"] > 1000
    assert data["went_backwards"] == []
