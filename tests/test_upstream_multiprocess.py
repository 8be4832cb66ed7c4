"""prometheus-client's own multiprocess tests pass against promfork's value store, reader and compaction.

The upstream test file is not part of this project: it is downloaded once per
session from the source distribution of the installed prometheus-client and
run through tests/support/upstream.py, one test here per upstream case. The
cases that cannot apply (upstream.NOT_APPLICABLE) are expected to fail,
strictly: one that starts passing fails the suite, so the list stays true.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import traceback
from pathlib import Path

import pytest
from prometheus_client import values as stock_values

from promfork.writer import values
from tests.support import upstream
from tests.support.upstream import NOT_APPLICABLE

UPSTREAM_FILE = "tests/test_multiprocess.py"


class UpstreamUnavailable(RuntimeError):
    """The upstream test file could not be downloaded or found."""


def fetch_upstream_tests(dest: Path) -> Path:
    """Download the installed prometheus-client's sdist into `dest`; return its tests/test_multiprocess.py there."""
    requirement = f"prometheus-client=={importlib.metadata.version('prometheus-client')}"
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    command += ["--disable-pip-version-check", "--dest", str(dest), requirement]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise UpstreamUnavailable(f"`{' '.join(command)}` did not finish within 300s") from None
    sdists = sorted(dest.glob("*.tar.gz"))
    if out.returncode != 0 or not sdists:
        raise UpstreamUnavailable(
            f"cannot download the source distribution of {requirement} from PyPI, which holds the upstream tests "
            f"run here (`{' '.join(command)}` exited {out.returncode}):\n{out.stderr.strip()[-2000:]}"
        )
    with tarfile.open(sdists[0]) as sdist:
        member = next((m for m in sdist.getmembers() if m.name.partition("/")[2] == UPSTREAM_FILE), None)
        if member is None or not member.isfile():
            raise UpstreamUnavailable(f"{sdists[0].name} has no {UPSTREAM_FILE}")
        target = dest / "test_multiprocess.py"
        target.write_bytes(sdist.extractfile(member).read())
    return target


@functools.cache
def _upstream(config: pytest.Config) -> dict | str:
    """The upstream cases by id (see upstream.upstream_cases), or why there are none; once per session."""
    dest = Path(tempfile.mkdtemp(prefix="promfork-upstream-"))
    config.add_cleanup(functools.partial(shutil.rmtree, dest, ignore_errors=True))
    try:
        return upstream.upstream_cases(upstream.load_upstream(fetch_upstream_tests(dest)))
    except UpstreamUnavailable as exc:
        return str(exc)
    except Exception:  # a failing test, not a collection error that would stop every other test
        return f"cannot load the upstream tests:\n{traceback.format_exc()}"


def _cases(config: pytest.Config) -> dict:
    found = _upstream(config)
    if isinstance(found, str):
        pytest.fail(found, pytrace=False)
    return found


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case_id" not in metafunc.fixturenames:
        return
    found = _upstream(metafunc.config)
    if isinstance(found, str):
        metafunc.parametrize("case_id", [pytest.param(None, id="upstream-unavailable")])
        return
    metafunc.parametrize(
        "case_id",
        [
            pytest.param(
                case_id,
                id=case_id,
                marks=[pytest.mark.xfail(strict=True, reason=NOT_APPLICABLE[case_id])]
                if case_id in NOT_APPLICABLE
                else [],
            )
            for case_id in found
        ],
    )


def test_upstream_case(case_id: str | None, request: pytest.FixtureRequest) -> None:
    case = _cases(request.config)[case_id]
    result = upstream.run_case(case)
    if result.skipped:
        pytest.skip(f"skipped upstream: {result.skipped[0][1]}")
    if not result.wasSuccessful():
        tracebacks = "\n".join(text for _, text in result.errors + result.failures)
        pytest.fail(f"upstream {case_id} fails against promfork:\n{tracebacks}", pytrace=False)


def test_every_case_listed_as_not_applicable_exists_upstream(request: pytest.FixtureRequest) -> None:
    assert sorted(set(NOT_APPLICABLE) - set(_cases(request.config))) == []


def test_upstream_cases_leave_value_class_process_and_environment_as_they_were(request: pytest.FixtureRequest) -> None:
    before = (stock_values.ValueClass, values._current.process, os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    result = upstream.run_case(_cases(request.config)["TestMultiProcess.test_counter_across_forks"])
    assert result.wasSuccessful()
    assert (stock_values.ValueClass, values._current.process, os.environ.get("PROMETHEUS_MULTIPROC_DIR")) == before
