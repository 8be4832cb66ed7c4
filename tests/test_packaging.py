"""The distribution: one import package, `promfork`, built without warnings; the checkout uses that name only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support.servers import ROOT, clean_env


def test_the_wheel_installs_one_top_level_package_promfork(tmp_path: Path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    assert "warning" not in (build.stdout + build.stderr).lower(), build.stdout + build.stderr
    (wheel,) = tmp_path.glob("promfork-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"promfork"}
    assert "promfork/gunicorn.py" in names and "promfork/loadtest/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "promfork-load = promfork.loadtest.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_gateway_never_imports_the_library_under_another_name():
    # Two import paths for one module would mean two value stores writing one file.
    code = (
        "import sys\n"
        "from promfork.config import Settings\n"
        "from webapp.app import create_app\n"
        "from webapp.settings import GatewaySettings\n"
        "create_app(GatewaySettings(), Settings())\n"
        "print(sorted(m for m in sys.modules if m == 'metrics' or m.startswith(('metrics.', 'loadtest'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
