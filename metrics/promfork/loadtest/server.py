"""The gunicorn that promfork-load starts: its command line, private directory, workers and log.

`gunicorn -c <config>` runs from the current directory on a free loopback port,
with a metrics directory of its own and the master's METRICS_PORT listener. The
caller's environment reaches it whole, GUNICORN_CMD_ARGS included; gunicorn
lets its command line win over GUNICORN_CMD_ARGS and both over the config file,
so the order of precedence is: --gunicorn-args, then the tool's own flags
(--bind, --workers, --max-requests, --worker-class), then GUNICORN_CMD_ARGS,
then the config. The server log and metrics files live in a temporary
directory that is removed only when the caller says the run succeeded.
Starting, waiting for the master's /metrics and every worker, and stopping are GunicornProcess's
(promfork.loadtest.gunicorn_process).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from collections.abc import Sequence

from promfork.loadtest.gunicorn_process import GUNICORN, GunicornError, GunicornProcess, booted_workers, free_port

_WORKER_LINE = re.compile(rb"Using worker: (\S+)")  # logged by gunicorn's arbiter at start (level info)


class ServerError(Exception):
    """gunicorn could not be started or did not answer; the message names the kept log."""


def check_gunicorn_args(args: Sequence[str]) -> None:
    """Refuse extra gunicorn arguments that would take the server away from the tool.

    Raises ValueError naming the argument: the tool chooses the bind address (it
    drives and scrapes it) and the config (--config).
    """
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in ("--bind", "-b") or (arg.startswith("-b") and not arg.startswith("--")):
            raise ValueError(f"{arg!r}: promfork-load binds gunicorn to a free loopback port itself")
        if name in ("--config", "-c") or (arg.startswith("-c") and not arg.startswith("--")):
            raise ValueError(f"{arg!r}: choose the gunicorn config with promfork-load's --config")


class GunicornServer:
    """`gunicorn -c <config>` started by the tool, with its own private metrics directory and log."""

    def __init__(
        self,
        config: str = "gunicorn.conf.py",
        *,
        workers: int = 4,
        max_requests: int = 0,
        worker_class: str | None = None,
        gunicorn_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        if not os.path.exists(config):
            raise ServerError(f"{config} not found; run from the project root or pass --config")
        self.port, self.metrics_port = free_port(), free_port()
        self.tmp = tempfile.mkdtemp(prefix="promfork-load-")
        environ = dict(os.environ)  # GUNICORN_CMD_ARGS included: the caller's deployment settings
        environ.update(env or {})
        environ.update(PROMETHEUS_MULTIPROC_DIR=os.path.join(self.tmp, "metrics"), METRICS_PORT=str(self.metrics_port))
        environ.pop("METRICS_AUTH_TOKEN", None)
        argv = [GUNICORN, "-c", config, "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers)]
        if max_requests:
            argv += ["--max-requests", str(max_requests), "--max-requests-jitter", str(max(1, max_requests // 4))]
        if worker_class:
            argv += ["--worker-class", worker_class]
        argv += list(gunicorn_args)
        self.requested_worker_class = worker_class
        self.log_path = os.path.join(self.tmp, "gunicorn.log")
        # Ready when the master's listener answers and every worker has booted: no request goes to
        # the app before the run (a probe a slow worker answered late would be counted in the run).
        directory = environ["PROMETHEUS_MULTIPROC_DIR"]
        self.process = GunicornProcess(
            argv,
            env=environ,
            ready_url=self.metrics_url,
            ready=lambda: booted_workers(directory) >= workers,
            log_path=self.log_path,
        )

    def start(self, timeout: float = 30.0) -> GunicornServer:
        """Start gunicorn and wait until it is ready; ServerError (log kept) if it is not."""
        try:
            self.process.start(timeout)
        except GunicornError as exc:
            self.stop(keep_log=True)
            raise ServerError(str(exc)) from None
        return self

    @property
    def base_url(self) -> str:
        """Where the app answers."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """The master's /metrics (METRICS_PORT): it answers even while workers are being killed."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def worker_class(self) -> str | None:
        """The worker class gunicorn says it uses (from its log), else the one asked for."""
        try:
            with open(self.log_path, "rb") as log:
                found = _WORKER_LINE.findall(log.read())
        except OSError:
            found = []
        return found[-1].decode() if found else self.requested_worker_class

    def worker_pids(self) -> list[int]:
        """The master's current children (its workers)."""
        return self.process.worker_pids()

    def kill_worker(self, pid: int) -> None:
        """SIGKILL one worker, as the OOM killer would."""
        os.kill(pid, signal.SIGKILL)

    def reload(self) -> None:
        """HUP the master: new workers with the configuration reloaded."""
        self.process.proc.send_signal(signal.SIGHUP)

    def stop(self, *, keep_log: bool) -> str | None:
        """Stop gunicorn; keep its directory (return the log's path) or remove it."""
        self.process.stop(timeout=30)
        if keep_log:
            return self.log_path
        shutil.rmtree(self.tmp, ignore_errors=True)
        return None
