"""What a process's store does while it cannot store: count, log at most once a minute, retry once a second.

The value store (promfork.writer.values) and the exemplar store
(promfork.writer.exemplars) each keep one ``Outage`` per process (a forked
child makes its own with its store). A fault costs metrics, visibly, never the
caller: the store counts what it could not write in ``metrics_write_errors_total``
(through the value store, ``values.count_write_errors``), and this logs it at
most once a minute per process and store, says when storing works again, and
spaces retries a second apart.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

RETRY_INTERVAL = 1.0  # seconds between attempts to store again
LOG_INTERVAL = 60.0  # seconds between two "cannot store" lines of one process and store


class Outage:
    """One store's state of failure in one process. Not thread-safe: the store's lock is held."""

    def __init__(self, what: str, outcome: str, pid: int | None = None) -> None:
        self.what = what  # "metric values", "exemplars"
        self.outcome = outcome  # what happens to an update meanwhile: "held in memory", "dropped"
        self.pid = os.getpid() if pid is None else pid
        self.retry_at = 0.0
        self.logged_at: float | None = None
        self.missed = 0  # updates not stored since the last log line

    def failed(self, count: int, error: BaseException | None = None) -> None:
        """Note `count` updates that could not be stored; log them unless a line went out under a minute ago."""
        self.missed += count
        now = time.monotonic()
        if self.logged_at is None or now - self.logged_at >= LOG_INTERVAL:
            reason = f": {error}" if error is not None else ""
            log.error(
                "promfork: cannot store %s in %s (pid %d)%s; %d updates %s, counted in "
                "metrics_write_errors_total; retrying every %.0fs",
                self.what,
                os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                self.pid,
                reason,
                self.missed,
                self.outcome,
                RETRY_INTERVAL,
            )
            self.logged_at = now
            self.missed = 0

    def retry_due(self) -> bool:
        """True (and the next retry a second away) unless the last attempt was under a second ago."""
        now = time.monotonic()
        if now < self.retry_at:
            return False
        self.retry_at = now + RETRY_INTERVAL
        return True

    def recovered(self) -> None:
        """Storing works again: say so once, if the failure was logged."""
        if self.logged_at is not None:
            log.warning(
                "promfork: %s stored again in %s (pid %d)",
                self.what,
                os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                self.pid,
            )
            self.logged_at = None
            self.missed = 0
