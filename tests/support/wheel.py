"""A clean virtualenv with promfork installed from a wheel built from this checkout (not editable).

What the examples' tests run a user's project with: outside the repository, with only what
``pip install promfork-*.whl`` and the examples' own needs bring.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Self

from tests.support.servers import ROOT

EXAMPLE_NEEDS = ["fastapi>=0.110", "uvicorn>=0.29", "uvicorn-worker>=0.2", "gunicorn[gevent]", "django>=4.2"]


class WheelEnv:
    """The virtualenv under ``root/venv``: its ``.python`` and ``.gunicorn``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = str(root / "venv" / "bin" / "python")
        self.gunicorn = str(root / "venv" / "bin" / "gunicorn")

    @classmethod
    def build(cls, root: Path) -> Self:
        """Build the wheel into `root`, make the venv there, install the wheel and the examples' needs."""
        env = cls(root)
        run = dict(capture_output=True, text=True, timeout=600)
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(root), str(ROOT)], **run)
        assert built.returncode == 0, built.stderr
        (wheel,) = root.glob("promfork-*.whl")
        made = subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], **run)
        assert made.returncode == 0, made.stderr
        installed = subprocess.run([env.python, "-m", "pip", "install", "-q", str(wheel), *EXAMPLE_NEEDS], **run)
        assert installed.returncode == 0, installed.stderr
        return env

    def project(self, example: str, dest: Path) -> Path:
        """Copy examples/<example> to `dest`, outside the repository, beside a `metrics.py` of the user's own."""
        shutil.copytree(ROOT / "examples" / example, dest)
        (dest / "metrics.py").write_text('"""The user\'s own module called metrics; promfork must not mind."""\n')
        return dest
