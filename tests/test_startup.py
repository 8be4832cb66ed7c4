"""Start-up checks: bad settings and unusable directories stop the server with a clear message."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from promfork.config import ConfigError, load_settings
from promfork.directory.locks import MasterLease
from promfork.directory.setup import MultiprocDirError, ensure_directory, wipe_stale_files
from promfork.loadtest.gunicorn_process import GunicornProcess
from tests.support.client import request, value
from tests.support.servers import GUNICORN, ROOT, clean_env, free_port, gunicorn_fails_to_start


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"METRICS_ENABLED": "maybe"}, "METRICS_ENABLED"),
        ({"METRICS_PORT": "99999"}, "METRICS_PORT"),
        ({"METRICS_PORT": "http"}, "METRICS_PORT"),
        ({"METRICS_NAMESPACE": "9lives"}, "METRICS_NAMESPACE"),
        ({"METRICS_CONST_LABELS": "service"}, "METRICS_CONST_LABELS"),
        ({"METRICS_CONST_LABELS": "a=1,a=2"}, "METRICS_CONST_LABELS"),
        ({"METRICS_LATENCY_BUCKETS": "1,0.5"}, "METRICS_LATENCY_BUCKETS"),
        ({"METRICS_LATENCY_BUCKETS": "fast"}, "METRICS_LATENCY_BUCKETS"),
    ],
)
def test_bad_settings_name_the_variable(env, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(env)


def test_settings_parse_documented_forms():
    s = load_settings(
        {
            "METRICS_ENABLED": "off",
            "METRICS_NAMESPACE": "gw",
            "METRICS_CONST_LABELS": "service=gw, env=prod",
            "METRICS_LATENCY_BUCKETS": "0.1,1,10",
            "METRICS_PORT": "9100",
        }
    )
    assert (s.enabled, s.namespace, dict(s.const_labels)) == (False, "gw", {"service": "gw", "env": "prod"})
    assert s.latency_buckets == (0.1, 1.0, 10.0) and s.metrics_port == 9100
    assert s.metric_name("http_requests_total") == "gw_http_requests_total"


def test_private_directory_is_created_with_mode_0700():
    path = ensure_directory(None)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o700
    finally:
        subprocess.run(["rm", "-rf", path], check=True)


def test_configured_directory_is_checked(tmp_path: Path):
    created = ensure_directory(str(tmp_path / "new" / "dir"))
    assert os.stat(created).st_mode & 0o777 == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(MultiprocDirError, match="world-writable"):
        ensure_directory(str(open_dir))
    link = tmp_path / "link"
    link.symlink_to(created)
    with pytest.raises(MultiprocDirError, match="symlink"):
        ensure_directory(str(link))
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(MultiprocDirError, match="not a directory"):
        ensure_directory(str(afile))


def test_unwritable_directory_is_refused(tmp_path: Path):
    if os.geteuid() == 0:
        # root ignores permission bits; sysfs refuses new files even to root
        target = "/sys/kernel"
        with pytest.raises(MultiprocDirError, match="not writable"):
            ensure_directory(target)
        return
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(MultiprocDirError, match="not writable"):
        ensure_directory(str(locked))


def test_cold_start_wipes_only_when_no_other_master_holds_the_directory(tmp_path: Path):
    (tmp_path / "counter_123.db").write_bytes(b"old")
    first = MasterLease(str(tmp_path))
    assert first.acquire() is True  # alone: a cold start
    first.keep()
    second = MasterLease(str(tmp_path))
    assert second.acquire() is False  # another master lives: keep its files
    second.keep()
    assert second.release_if_last() is False
    assert first.release_if_last() is True
    assert wipe_stale_files(str(tmp_path)) == 1
    assert not (tmp_path / "counter_123.db").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"METRICS_LATENCY_BUCKETS": "abc"}, "METRICS_LATENCY_BUCKETS"),
        ({"METRICS_ENABLED": "perhaps"}, "METRICS_ENABLED"),
        ({"LLM_PROVIDER": "skynet"}, "LLM_PROVIDER"),
        ({"MOCK_LATENCY_MS": "-5"}, "MOCK_LATENCY_MS"),
        ({"PROMETHEUS_MULTIPROC_DIR": "/proc/self/nope"}, "PROMETHEUS_MULTIPROC_DIR"),
    ],
)
def test_gunicorn_refuses_to_start_with_bad_settings(env, named):
    before = _private_dirs()
    output = gunicorn_fails_to_start(env)
    assert named in output
    assert "Traceback" not in output
    assert _private_dirs() == before, "a failed start left its private metrics directory behind"


def _private_dirs() -> set[str]:
    return set(glob.glob("/dev/shm/promfork-*") + glob.glob(os.path.join(tempfile.gettempdir(), "promfork-*")))


@pytest.mark.integration
def test_private_directory_is_removed_when_the_master_exits(tmp_path: Path):
    before = _private_dirs()
    port = free_port()
    argv = [GUNICORN, "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}", "--workers", "2", "--no-control-socket"]
    server = GunicornProcess(
        argv,  # no PROMETHEUS_MULTIPROC_DIR: gunicorn.conf.py makes a private directory
        env=clean_env(RATE_LIMIT_RPM="60"),
        cwd=ROOT,
        log_path=tmp_path / "gunicorn.log",
        ready_url=f"http://127.0.0.1:{port}/healthz",
    )
    try:
        server.start(timeout=20)
        created = _private_dirs() - before
        assert len(created) == 1 and os.path.exists(os.path.join(created.pop(), "ratelimit.state"))
    finally:
        server.stop(timeout=30)
    assert _private_dirs() == before
    # With a private directory the variable is exported by gunicorn.conf.py itself: the fast
    # value store must still be in place before anything imports prometheus_client.
    assert "metric values stored by promfork.writer.values.MmapValue" in server.log()


@pytest.mark.integration
def test_prometheus_client_imported_too_early_stops_the_server(tmp_path: Path):
    conf = tmp_path / "early.conf.py"
    # The classic mistake: prometheus_client imported before the directory variable exists.
    conf.write_text(
        "import prometheus_client  # noqa\n"
        f"exec(compile(open({str(ROOT / 'gunicorn.conf.py')!r}).read(), 'gunicorn.conf.py', 'exec'))\n"
    )
    output = gunicorn_fails_to_start({}, str(conf))
    assert "imported before PROMETHEUS_MULTIPROC_DIR was set" in output


@pytest.mark.integration
def test_workers_write_through_promfork_value_store(gunicorn_factory):
    server = gunicorn_factory(workers=2)
    for _ in range(20):
        assert request("GET", server.port, "/v1/models")[0] == 200
    assert "metric values stored by promfork.writer.values.MmapValue" in server.log()
    assert value(server.scrape(), "http_requests_total", method="GET", route="/v1/models", status="200") == 20


@pytest.mark.integration
def test_metrics_made_before_prepare_environment_keep_the_stock_store_and_stay_exact(gunicorn_factory, tmp_path):
    conf = tmp_path / "early_metric.conf.py"
    # The directory variable is set (the fixture exports it), but a metric exists before
    # prepare_environment(): its file must not get a second writer.
    conf.write_text(
        "import os\n"
        "os.makedirs(os.environ['PROMETHEUS_MULTIPROC_DIR'], mode=0o700, exist_ok=True)\n"
        "from prometheus_client import Counter\n"
        "Counter('made_early_total', 'Created before prepare_environment().').inc()\n"
        f"exec(compile(open({str(ROOT / 'gunicorn.conf.py')!r}).read(), 'gunicorn.conf.py', 'exec'))\n"
    )
    server = gunicorn_factory("-c", str(conf), workers=2)
    for _ in range(20):
        assert request("GET", server.port, "/v1/models")[0] == 200
    assert "its own, slower value store stays in use" in server.log()
    assert "stored by promfork.writer.values.MmapValue" not in server.log()
    assert value(server.scrape(), "http_requests_total", method="GET", route="/v1/models", status="200") == 20


def test_import_order_check_in_a_plain_process(tmp_path: Path):
    code = (
        "import os, prometheus_client\n"
        f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n"
        "from promfork.client import ensure_multiprocess_mode\n"
        "ensure_multiprocess_mode()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "ImportOrderError" in proc.stderr


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs filled to the brim (needs root and mount; skipped where not allowed)."""
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mountpoint)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        fd = os.open(mountpoint / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.mark.integration
def test_full_disk_is_a_clear_start_up_error(full_disk: Path):
    with pytest.raises(MultiprocDirError, match="disk is full"):
        ensure_directory(str(full_disk))
    output = gunicorn_fails_to_start({"PROMETHEUS_MULTIPROC_DIR": str(full_disk)})
    assert "PROMETHEUS_MULTIPROC_DIR" in output and "disk is full" in output
    assert "Traceback" not in output


@pytest.mark.integration
def test_metrics_port_in_use_is_a_clear_start_up_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = _private_dirs()
        output = gunicorn_fails_to_start({"METRICS_PORT": str(port)})
    assert "METRICS_PORT" in output and str(port) in output
    assert _private_dirs() == before
    assert "Traceback" not in output
