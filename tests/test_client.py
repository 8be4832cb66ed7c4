"""promfork.client: the one user of prometheus-client's internals, within the version range it was tested with."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from promfork import client

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_declares_the_range_client_was_tested_with():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (declared,) = [d for d in dependencies if d.startswith("prometheus-client")]
    (low_major, low_minor), (high_major, high_minor) = client.TESTED
    assert declared == f"prometheus-client>={low_major}.{low_minor},<{high_major}.{high_minor}"


def test_the_installed_prometheus_client_is_in_the_tested_range():
    # An upgrade past the range fails here, before promfork writes files in a layout it never checked.
    assert client.supported(), f"prometheus-client {client.installed_version()} is outside {client.TESTED}"


def test_an_untested_version_keeps_prometheus_clients_own_value_class(tmp_path: Path):
    code = (
        "import os, sys\n"
        "os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]\n"
        "from promfork import client\n"
        "client.TESTED = ((0, 1), (0, 2))\n"
        "from promfork.writer import values\n"
        "from prometheus_client import Counter, values as stock\n"
        "print(values.install(), stock.ValueClass is values.MmapValue)\n"
        "Counter('jobs', 'Jobs.').inc()\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert "outside the tested range" in out.stderr
