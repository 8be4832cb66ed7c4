"""Compaction's journal: how a crashed compaction is finished (or undone) by whoever comes next.

Compaction (promfork.master.compaction) commits a run by writing
``compaction.journal``: the renames and deletions still to do. Every step of a
replay is idempotent, and a replay only deletes retired files, which nobody can
have reopened, so the next compaction run, or the next scrape (a reader must not
read around a committed journal), finishes the run exactly once. Scratch files
(``*.new``) of an uncommitted run are deleted. Callers hold the files lock
exclusively (promfork.directory.locks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from promfork.directory import filenames, ownership

log = logging.getLogger(__name__)


def _step(name: str) -> None:
    """A named point between replay steps (tests inject crashes here)."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(directory: str, journal: dict) -> None:
    """Commit `journal` (the renames and deletions still to do): temp file, fsync, rename, fsync the directory."""
    tmp = os.path.join(directory, filenames.JOURNAL_TMP)
    with open(ownership.create(tmp, os.O_WRONLY | os.O_TRUNC), "w") as out:
        json.dump(journal, out)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, os.path.join(directory, filenames.JOURNAL))
    _fsync_dir(directory)


def recover(directory: str) -> bool:
    """Finish a committed compaction or discard an uncommitted one. Caller holds the lock exclusively.

    Returns True when a committed journal was replayed.
    """
    replayed = False
    path = os.path.join(directory, filenames.JOURNAL)
    try:
        with open(path) as src:
            journal = json.load(src)
    except FileNotFoundError:
        journal = None
    except ValueError:
        # Only written through an atomic rename, so this is disk damage: the files
        # it named are intact (either state), and deleting it errs on the side of
        # a later re-fold being skipped rather than double counted.
        log.error("promfork: %s is unreadable; discarding it", path)
        journal = None
        os.unlink(path)
    if journal is not None:
        for new, final in journal["renames"]:
            with contextlib.suppress(FileNotFoundError):
                os.rename(os.path.join(directory, new), os.path.join(directory, final))
            _step("replay_renamed")
        for name in journal["delete"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
            _step("replay_deleted")
        _fsync_dir(directory)
        os.unlink(path)
        replayed = True
    for entry in os.scandir(directory):
        if filenames.is_scratch(entry.name):
            os.unlink(entry.path)
    return replayed


def needs_recovery(directory: str) -> bool:
    """True when a crashed compaction left a journal that readers must not read around."""
    return os.path.exists(os.path.join(directory, filenames.JOURNAL))
