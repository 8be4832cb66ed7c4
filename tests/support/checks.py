"""Assertions several test modules make: counters never decrease across scrapes; a user's config is complete."""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path


def assert_never_decreases(snapshots: list[dict]) -> None:
    """No sample of one snapshot (``client.counter_samples`` of a scrape) is lower in, or missing from, the next."""
    for before, after in itertools.pairwise(snapshots):
        for key, old in before.items():
            new = after.get(key)
            assert new is not None, f"{key} disappeared between scrapes"
            assert new >= old, f"{key} went backwards: {old} -> {new}"


def assert_config_wires_every_hook(path: Path, max_code_lines: int = 8) -> None:
    """A user's gunicorn.conf.py, loaded as Gunicorn loads it: short, and running every promfork hook.

    The file is executed in a child process (``install`` exports PROMETHEUS_MULTIPROC_DIR
    there, not here) and each of its settings is set on a Gunicorn ``Config``, which
    checks every hook's arity; then no promfork hook may be missing.
    """
    tree = ast.parse(path.read_text())
    body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
    code_lines = {line for node in body for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)}
    assert len(code_lines) <= max_code_lines, f"{path} has {len(code_lines)} lines of code"
    probe = (
        "import json, runpy, sys\n"
        "from gunicorn.config import Config\n"
        "from promfork.master.hooks import missing_hooks\n"
        "cfg = Config()\n"
        "for name, value in runpy.run_path(sys.argv[1]).items():\n"
        "    if name in cfg.settings:\n"
        "        cfg.set(name, value)\n"
        "print(json.dumps(missing_hooks(cfg)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")}
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)], cwd=path.parent, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == [], done.stdout
