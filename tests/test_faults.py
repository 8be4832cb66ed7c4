"""Faults injected into a real `gunicorn -c gunicorn.conf.py`: the behaviour promfork must keep.

* a full metrics filesystem never takes the app down, is counted and logged, and
  everything held meanwhile is stored once space returns;
* ``--preload`` keeps the master's lifecycle metrics and exact totals;
* a worker pid reused by its replacement (for real, through ns_last_pid) loses
  and doubles nothing, also with ``--preload`` and requests in flight at the kill;
* the process umask is left as the user set it, and metric files are private anyway;
* the lowercase ``prometheus_multiproc_dir`` still works, with a deprecation notice.

Every total is checked against what the client itself received, never against
the code's own arithmetic.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.client
import json
import os
import signal
import stat
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.checks import assert_never_decreases
from tests.support.client import counter_samples, parse_sse, request, samples, scrape, value
from tests.support.servers import Gunicorn, wait_until

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
REUSE_ATTEMPTS = 10


# --- the client's truth --------------------------------------------------------------------------


class Client:
    """Sends requests and records every response it receives: the truth the metrics must equal.

    A response is recorded under the labels http_requests_total must give it:
    (method, route template, status). Connection errors are only counted as cut.
    """

    def __init__(self, port: int, baseline: dict[tuple[str, str, str], float]) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.received: Counter[tuple[str, str, str]] = Counter(baseline)
        self.cut = 0

    def _record(self, method: str, route: str, status: int) -> None:
        with self.lock:
            self.received[(method, route, str(status))] += 1

    def get(self, path: str, route: str) -> tuple[int, bytes]:
        status, _, body = request("GET", self.port, path, timeout=30)
        self._record("GET", route, status)
        return status, body

    def post_raw(self, raw: bytes) -> tuple[int, dict]:
        status, _, body = request("POST", self.port, CHAT, raw, timeout=30)
        self._record("POST", CHAT, status)
        return status, json.loads(body)

    def chat(self, model: str = "mock-small", stream: bool = False, text: str = "hello") -> tuple[int, object]:
        """One chat completion; returns (status, JSON body, or the SSE events of a stream)."""
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}
        status, headers, raw = request("POST", self.port, CHAT, body, timeout=30)
        self._record("POST", CHAT, status)
        if headers.get("content-type", "").startswith("text/event-stream"):
            return status, parse_sse(raw)
        return status, json.loads(raw)

    def expected(self) -> dict[tuple[str, str, str], float]:
        with self.lock:
            return {key: float(n) for key, n in self.received.items() if n}


def http_totals(families: dict) -> dict[tuple[str, str, str], float]:
    """Non-zero http_requests_total samples keyed (method, route, status)."""
    out: dict[tuple[str, str, str], float] = {}
    for key, v in samples(families, "http_requests_total").items():
        labels = dict(key)
        if v:
            out[(labels["method"], labels["route"], labels["status"])] = v
    return out


def settled_totals(port: int) -> dict[tuple[str, str, str], float]:
    """http_requests_total once two scrapes in a row agree (the start-up probes are all counted)."""
    last: list[dict] = []

    def stable():
        now = http_totals(scrape(port))
        agreed = bool(last) and last[-1] == now
        last.append(now)
        return agreed

    assert wait_until(stable, timeout=30, interval=0.3), "http_requests_total never settled after start"
    return last[-1]


def assert_totals_match(server: Gunicorn, client: Client, timeout: float = 30, nudge=None) -> dict:
    """Wait until http_requests_total equals what the client received; fail with the difference.

    `nudge`, if given, is called after each mismatch: a live process may store what
    it held only at its next update, so a small recorded request keeps it busy.
    """
    seen: list[dict] = []

    def matches():
        fams = scrape(server.port)
        seen.append(http_totals(fams))
        if seen[-1] == client.expected():
            return fams
        if nudge is not None:
            nudge()
        return None

    fams = wait_until(matches, timeout=timeout, interval=0.5)
    if fams is None:
        want, got = client.expected(), seen[-1]
        diff = {k: (want.get(k, 0.0), got.get(k, 0.0)) for k in want.keys() | got.keys() if want.get(k) != got.get(k)}
        pytest.fail(f"http_requests_total != responses the client received; (client, metrics): {diff}")
    return fams


class Scraper(threading.Thread):
    """Scrapes /metrics throughout a test, keeping every counter-type sample and every failed answer.

    ``take()`` adds a scrape at a point the test chooses; scrapes never overlap, so the
    snapshots are in the order the server answered them. Any answer other than 200 is a
    failure; so is a cut connection, unless the test kills workers (`kills_workers`).
    """

    def __init__(self, port: int, kills_workers: bool = False) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.kills_workers = kills_workers
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.snapshots: list[dict] = []
        self.failures: list[str] = []

    def take(self) -> dict | None:
        """One scrape, recorded; its families, or None if the connection was cut."""
        with self.lock:
            try:
                status, _, body = request("GET", self.port, "/metrics", timeout=30)
            except OSError as exc:
                if not self.kills_workers:
                    self.failures.append(f"/metrics failed: {exc!r}")
                return None
            if status != 200:
                self.failures.append(f"/metrics answered {status}: {body[:300]!r}")
                return None
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            self.snapshots.append(counter_samples(families))
            return families

    def run(self) -> None:
        while not self.stop.is_set():
            self.take()
            self.stop.wait(0.2)

    def finish(self) -> None:
        self.stop.set()
        self.join(60)

    def check(self) -> None:
        """Every scrape answered 200 and no counter ever went backwards."""
        assert not self.failures, self.failures[:5]
        assert len(self.snapshots) >= 3, f"only {len(self.snapshots)} scrapes were answered"
        assert_never_decreases(self.snapshots)


# --- processes and files -------------------------------------------------------------------------


def db_pids(directory: Path) -> set[int]:
    """Pids named by per-process metric files (``<kind>_<pid>.db``) in `directory`."""
    pids = set()
    for path in directory.glob("*.db"):
        owner = path.stem.rsplit("_", 1)[-1]
        if owner.isdigit():
            pids.add(int(owner))
    return pids


def has_files(directory: Path, pid: int, kinds: tuple[str, ...] = ("counter",)) -> bool:
    return all((directory / f"{kind}_{pid}.db").exists() for kind in kinds)


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def umask_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return line.split()[1]
    raise AssertionError(f"no Umask line in /proc/{pid}/status")


def assert_master_alive(server: Gunicorn) -> None:
    if server.proc.poll() is not None:
        pytest.fail(f"the gunicorn master died (exit {server.proc.returncode}):\n{server.log()[-4000:]}")


def workers_of(server: Gunicorn) -> list[int]:
    """The master's live workers (zombies not yet reaped left out)."""
    assert_master_alive(server)
    return [pid for pid in server.worker_pids() if start_time(pid) is not None]


def after_replacement(server: Gunicorn, victim: int, born: int | None) -> list[int] | None:
    """The master's workers once `victim` (started at `born`) has been replaced, else None.

    Replaced means: the full worker count again, and the victim's pid gone or held by a new process.
    """
    pids = workers_of(server)
    if len(pids) == server.workers and (victim not in pids or start_time(victim) != born):
        return pids
    return None


@contextlib.contextmanager
def only_served_by(server: Gunicorn, worker: int) -> Iterator[None]:
    """Stop every other worker (SIGSTOP), so `worker` alone accepts connections; resume them after."""
    others = [pid for pid in workers_of(server) if pid != worker]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _kill_leftovers(server: Gunicorn) -> None:
    """SIGKILL workers of `server` that outlived their master (a master that crashed orphans them)."""
    marker = str(server.tmp).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes() and b"gunicorn" in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def start_server(gunicorn_factory) -> Iterator:
    """gunicorn_factory, plus: workers orphaned by a crashed master are killed at the end."""
    started: list[Gunicorn] = []

    def start(*args: str, env: dict[str, str] | None = None, workers: int = 2) -> Gunicorn:
        server = gunicorn_factory(*args, env=env, workers=workers)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        _kill_leftovers(server)


# --- a small filesystem that can be filled ---------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (mode 0700) under tmp_path, unmounted at the end whatever happened."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mountpoint)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


def fill(mountpoint: Path) -> None:
    """Append zeros to ``filler`` until the filesystem has no page left (ENOSPC)."""
    fd = os.open(mountpoint / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 4096):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    assert os.statvfs(mountpoint).f_bavail == 0, "the filesystem is not full after filling it"


# --- 1. full disk --------------------------------------------------------------------------------


def _normal_chat(client: Client, model: str = "mock-small", stream: bool = False) -> None:
    status, answer = client.chat(model, stream=stream)
    assert status == 200, answer
    if stream:
        assert answer[-1] == "[DONE]" and answer[-2].get("usage"), answer[-3:]
    else:
        assert answer["choices"] and answer["usage"]["completion_tokens"] > 0, answer


def _normal_healthz(client: Client) -> None:
    status, body = client.get("/healthz", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def _requests_with_new_label_sets(client: Client, i: int) -> None:
    """Requests whose series did not exist before the disk filled up, with their normal answers."""
    status, _ = client.get(f"/no/such/path/{i}", "unmatched")
    assert status == 404
    status, answer = client.post_raw(b'{"model": "mock-small", "messages": [')
    assert status == 400 and answer["error"]["message"], answer
    status, answer = client.chat(f"gpt-unknown-{i}")
    assert status == 404 and answer["error"]["code"] == "model_not_found", answer
    status, _ = client.get("/v1/models", "/v1/models")
    assert status == 200
    status, _ = client.get("/v1/models/mock-large", "/v1/models/<model>")
    assert status == 200
    status, _ = client.get(f"/v1/models/none-{i}", "/v1/models/<model>")
    assert status == 404
    _normal_chat(client, "mock-large", stream=True)


def test_full_disk_never_kills_master_and_metrics_recover(tiny_tmpfs: Path, start_server):
    """A full metrics filesystem is a degradation: nothing dies, nothing answers differently,
    what cannot be stored is counted and logged (not flooded), and once space returns every
    process stores what it held and compaction catches up, without a restart."""
    directory = tiny_tmpfs / "multiproc"
    server = start_server(env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}, workers=2)
    client = Client(server.port, settled_totals(server.port))
    scraper = Scraper(server.port)
    scraper.start()
    try:
        # Before the fault, each worker serves every kind of request that it will serve while
        # the disk is full, so all its files and series exist: nothing of it is held in memory.
        for pid in workers_of(server):
            with only_served_by(server, pid):
                for _ in range(5):
                    _normal_healthz(client)
                    _normal_chat(client)
            assert has_files(directory, pid, ("counter", "histogram", "gauge_livesum")), os.listdir(directory)
        assert_totals_match(server, client)
        assert scraper.take() is not None

        fill(tiny_tmpfs)
        for _ in range(50):
            _normal_healthz(client)
            _normal_chat(client)
        assert_master_alive(server)

        # A worker leaves as --max-requests makes it leave; its replacement cannot create files.
        survivor, victim = workers_of(server)
        os.kill(victim, signal.SIGTERM)
        replaced = wait_until(functools.partial(after_replacement, server, victim, start_time(victim)), 60)
        assert replaced, f"no replacement worker booted while the disk was full:\n{server.log()[-3000:]}"
        replacement = next(pid for pid in replaced if pid != survivor)
        fill(tiny_tmpfs)  # the departed worker's live gauge file freed a little space
        with only_served_by(server, replacement):
            for _ in range(20):
                _normal_healthz(client)
                _normal_chat(client)

        for i in range(40):
            _requests_with_new_label_sets(client, i)
            _normal_healthz(client)
            _normal_chat(client)
        assert_master_alive(server)
        full = scraper.take()
        assert full is not None and value(full, "gunicorn_workers") == 2

        log = server.log()
        assert "cannot store" in log, "nothing was logged about metric updates that could not be stored"
        flood = [line for line in log.splitlines() if "cannot store" in line]
        assert len(flood) < 20, f"'cannot store' logged {len(flood)} times: not rate-limited"
        assert "Traceback" not in log, log[-4000:]

        # Space returns: no restart, everything held is stored and the dead worker is folded.
        (tiny_tmpfs / "filler").unlink()
        assert_totals_match(server, client, timeout=90, nudge=lambda: _normal_healthz(client))

        def only_live_processes_have_files():
            live = {server.proc.pid, *workers_of(server)}
            return db_pids(directory) <= live and victim not in db_pids(directory)

        if not wait_until(only_live_processes_have_files, timeout=60):
            live = [server.proc.pid, *workers_of(server)]
            pytest.fail(f"files of dead processes remain: {sorted(db_pids(directory))}, live processes: {live}")
        fams = scraper.take()
        assert fams is not None
        assert value(fams, "metrics_write_errors_total") > 0, "updates that could not be stored were not counted"
        assert wait_until(lambda: "stored again" in server.log(), timeout=60), "recovery was not logged"
        assert_master_alive(server)
        assert "Traceback" not in server.log(), server.log()[-4000:]
    finally:
        scraper.finish()
    scraper.check()


def test_reload_while_the_disk_is_full_keeps_the_master_and_counting_resumes(tiny_tmpfs: Path, start_server):
    """HUP re-reads gunicorn.conf.py, which validates the metrics settings: it must not refuse a
    directory that merely has no room, and the workers it starts count again once space returns."""
    directory = tiny_tmpfs / "multiproc"
    server = start_server(env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}, workers=2)
    client = Client(server.port, settled_totals(server.port))
    fill(tiny_tmpfs)
    before = set(workers_of(server))
    os.kill(server.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: len(set(workers_of(server)) - before) == 2, timeout=60), server.log()[-3000:]
    assert_master_alive(server)
    for _ in range(10):  # served by workers that cannot create their files: held in memory
        _normal_healthz(client)
        _normal_chat(client)
    (tiny_tmpfs / "filler").unlink()
    # No request needed: the workers store what they held by themselves, and count exactly again.
    assert_totals_match(server, client)
    for _ in range(10):
        _normal_healthz(client)
        _normal_chat(client)
    assert_totals_match(server, client)
    assert_master_alive(server)
    assert "configuration error" not in server.log() and "Traceback" not in server.log()


# --- 2. --preload ----------------------------------------------------------------------------------


def test_preload_keeps_lifecycle_metrics_and_exact_totals_after_kill_9(start_server):
    """With --preload the master imports the app (and so creates metric files) before
    on_starting: its lifecycle metrics must survive that, and a killed worker is counted,
    folded, and leaves the totals exact."""
    server = start_server("--preload", workers=3)
    client = Client(server.port, settled_totals(server.port))
    fams = scrape(server.port)
    assert value(fams, "gunicorn_workers") == 3, "gunicorn_workers is missing or wrong under --preload"
    assert value(fams, "gunicorn_worker_boots_total") == 3, "gunicorn_worker_boots_total is wrong under --preload"
    assert samples(fams, "gunicorn_master_reloads_total"), "gunicorn_master_reloads_total is missing"
    assert samples(fams, "metrics_compactions_total"), "metrics_compactions_total is missing"

    def every_worker_has_files():
        for _ in range(10):
            _normal_chat(client)
            _normal_healthz(client)
        return all(has_files(server.multiproc_dir, pid) for pid in workers_of(server))

    assert wait_until(every_worker_has_files, timeout=60), "a worker never created its metric files"
    assert_totals_match(server, client)

    victim = workers_of(server)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: value(scrape(server.port), "gunicorn_worker_exits_total", reason="signal") == 1, 30), (
        "the kill -9 was not counted as gunicorn_worker_exits_total{reason=signal}"
    )
    assert wait_until(lambda: len(workers_of(server)) == 3 and victim not in workers_of(server), 30)
    assert wait_until(lambda: victim not in db_pids(server.multiproc_dir), 30), "the dead worker was never compacted"
    for i in range(30):
        _normal_chat(client, stream=i % 2 == 0)
        _normal_healthz(client)

    fams = assert_totals_match(server, client)
    assert value(fams, "metrics_compactions_total") >= 1
    assert value(fams, "gunicorn_worker_boots_total") == 4
    assert value(fams, "gunicorn_workers") == 3
    assert "Traceback" not in server.log(), server.log()[-4000:]


# --- 3. pid reuse ----------------------------------------------------------------------------------


class Load:
    """Threads sending slow chat completions back to back; a cut connection is counted as cut."""

    def __init__(self, client: Client, threads: int = 3) -> None:
        self.client = client
        self.stop = threading.Event()
        self.done = 0
        self.unexpected: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                status, answer = self.client.chat(text="slow")
            except (OSError, ValueError, http.client.HTTPException):  # reset, refused, a body cut short
                with self.client.lock:
                    self.client.cut += 1
                continue
            with self.client.lock:
                self.done += 1
            if status != 200:
                self.unexpected.append(f"{status}: {answer}")

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def completed(self) -> int:
        with self.client.lock:
            return self.done

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@contextlib.contextmanager
def slow_reader(directory: Path) -> Iterator[None]:
    """Hold the files lock shared, as a slow scrape does: compaction has to wait meanwhile."""
    from promfork.directory.locks import DirectoryLock

    with DirectoryLock(str(directory)).hold(exclusive=False, timeout=30):
        yield


def _reuse_a_worker_pid(server: Gunicorn, client: Client, scraper: Scraper, load: Load | None) -> int:
    """Kill -9 a worker so that its replacement gets the same pid; return that pid.

    ns_last_pid set to victim - 1 makes the next pid the kernel hands out the victim's,
    which is the master's fork of the replacement unless another process forks first:
    then try again with another victim, a bounded number of times. A slow reader holds
    the files lock from the kill until the new process has served (so opened the dead
    one's files): compaction of the dead pid then runs while the pid is alive again.
    """
    tried = []
    for _ in range(REUSE_ATTEMPTS):
        # Each victim has written its files, so the replacement finds them on disk.
        if load is None:
            assert wait_until(lambda: _served_until_all_have_files(server, client), 60), (
                "a worker never created its metric files"
            )
            assert_totals_match(server, client)  # nothing counted late can be lost to the kill
        else:
            assert wait_until(lambda: all(has_files(server.multiproc_dir, p) for p in workers_of(server)), 60)
        scraper.take()
        victim = max(workers_of(server))
        born = start_time(victim)
        with scraper.lock, slow_reader(server.multiproc_dir):  # the slow reader is the only scrape now
            try:
                NS_LAST_PID.write_text(str(victim - 1))
            except OSError as exc:
                pytest.skip(f"cannot steer pid allocation through {NS_LAST_PID}: {exc}")
            os.kill(victim, signal.SIGKILL)
            replaced = wait_until(functools.partial(after_replacement, server, victim, born), 30, interval=0.005)
            assert replaced, f"no replacement for worker {victim}:\n{server.log()[-3000:]}"
            tried.append(victim)
            if victim in replaced:
                with only_served_by(server, victim):
                    _normal_healthz(client)
                return victim
    pytest.fail(f"the replacement worker never got its predecessor's pid in {REUSE_ATTEMPTS} kills ({tried})")


def _served_until_all_have_files(server: Gunicorn, client: Client) -> bool:
    for _ in range(5):
        _normal_chat(client)
        _normal_healthz(client)
    return all(has_files(server.multiproc_dir, pid) for pid in workers_of(server))


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "requests-in-flight"])
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_reused_worker_pid_loses_and_doubles_nothing(start_server, preload: bool, in_flight: bool):
    """The replacement of a killed worker gets its pid, while a slow reader delays the dead
    pid's compaction: a file a live process may write is never folded or deleted, so every
    response the client received is counted exactly once, cut requests not at all."""
    args = ("--preload",) if preload else ()
    env = {"MOCK_LATENCY_MS": "100"} if in_flight else None
    server = start_server(*args, env=env, workers=2)
    client = Client(server.port, settled_totals(server.port))
    scraper = Scraper(server.port, kills_workers=True)
    scraper.start()
    load = Load(client) if in_flight else None
    try:
        if load is not None:
            load.start()
            assert wait_until(lambda: load.completed() >= 6, 60), "the slow load never got answers"
        reused = _reuse_a_worker_pid(server, client, scraper, load)
        scraper.take()
        if load is not None:
            after = load.completed()
            assert wait_until(lambda: load.completed() >= after + 12, 60)
            load.finish()
            assert not load.unexpected, load.unexpected[:5]
            assert client.cut >= 1, "no request was in flight at any kill"
        # The worker with the reused pid serves (and so writes) on its own for a while.
        with only_served_by(server, reused):
            for i in range(20):
                _normal_chat(client, stream=i % 2 == 0)
                status, _ = client.chat(f"gpt-unknown-{i}")
                assert status == 404
                _normal_healthz(client)
        assert reused in workers_of(server), "the worker with the reused pid died"
        scraper.take()
        assert_totals_match(server, client)
        in_flight_now = wait_until(lambda: value(scrape(server.port), "http_requests_in_flight") == 0, 30)
        assert in_flight_now, f"http_requests_in_flight stays {value(scrape(server.port), 'http_requests_in_flight')}"
        assert_totals_match(server, client)  # and it stays so
        scraper.take()
    finally:
        if load is not None:
            load.finish()
        scraper.finish()
    scraper.check()


# --- 4. umask --------------------------------------------------------------------------------------


def test_process_umask_is_left_alone_and_metric_files_are_private(start_server):
    """The user's app keeps its own umask; promfork creates its files 0600 in a 0700 directory."""
    previous = os.umask(0o022)
    try:
        server = start_server(workers=2)
    finally:
        os.umask(previous)
    client = Client(server.port, {})
    assert wait_until(lambda: _served_until_all_have_files(server, client), 60)
    worker = workers_of(server)[0]
    assert (umask_of(server.proc.pid), umask_of(worker)) == ("0022", "0022"), "promfork changed the process umask"
    assert stat.S_IMODE(server.multiproc_dir.stat().st_mode) == 0o700
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in server.multiproc_dir.glob("*.db")}
    assert modes and set(modes.values()) == {"0o600"}, modes


# --- 5. the lowercase variable --------------------------------------------------------------------


class LowercaseDirGunicorn(Gunicorn):
    """A gunicorn given only the lowercase ``prometheus_multiproc_dir``, as older deployments do."""

    def __init__(self, tmp: Path, directory: Path, workers: int = 2) -> None:
        super().__init__(tmp, env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}, workers=workers)
        del self.env["PROMETHEUS_MULTIPROC_DIR"]
        self.env["prometheus_multiproc_dir"] = str(directory)

    def _all_workers_booted(self) -> bool:
        return True  # where the files go is what the test checks


def test_lowercase_multiproc_dir_is_honoured_with_a_deprecation_notice(tmp_path: Path):
    """Stock prometheus-client still honours prometheus_multiproc_dir (with a warning); so does promfork."""
    directory = tmp_path / "lowercase"
    directory.mkdir(mode=0o700)
    server = LowercaseDirGunicorn(tmp_path, directory)
    try:
        server.start()
        for _ in range(10):
            assert request("GET", server.port, "/v1/models")[0] == 200
        assert wait_until(lambda: list(directory.glob("counter_*.db")), 30), (
            f"no metric files in {directory}: the lowercase variable was ignored"
        )
        assert wait_until(
            lambda: value(scrape(server.port), "http_requests_total", route="/v1/models", status="200") == 10, 30
        )
        notices = [
            line
            for line in server.log().splitlines()
            if "prometheus_multiproc_dir" in line and "deprecated" in line and "PROMETHEUS_MULTIPROC_DIR" in line
        ]
        assert notices, "the log does not say prometheus_multiproc_dir is deprecated for PROMETHEUS_MULTIPROC_DIR"
    finally:
        server.stop()
        _kill_leftovers(server)
