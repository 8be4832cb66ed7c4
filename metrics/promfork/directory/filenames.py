"""Every file name in the multiprocess directory: the one module that builds or parses them.

Writers, readers, compaction and the cold-start wipe ask here; no other module
spells a suffix. What lives in the directory:

* value files, prometheus-client's ``MmapedDict`` format (promfork.directory.fileformat):
  ``counter_<pid>.db``, ``histogram_<pid>.db``, ``summary_<pid>.db`` and
  ``gauge_<mode>_<pid>.db`` (mode: one of prometheus-client's gauge multiprocess
  modes). promfork adds two owners besides a pid: ``archive``
  (``counter_archive.db``), the folded values of dead processes, and
  ``<pid>-<inode>`` (``counter_812-4471.db``), a dead process's file that
  compaction has *retired*: renamed away from the name its process writes, so
  that no process can open it again. The stock ``MultiProcessCollector`` reads
  both as one more dead process.
* exemplar files (promfork.writer.exemplars): ``exemplars_<pid>.bin`` and
  ``exemplars_archive.bin``. Not ``*.db``, so stock readers never see them.
* ``<slot>.slot`` (a worker slot's pid, promfork.master.slots) and ``<pid>.exit``
  (a worker's exit reason, promfork.master.hooks).
* compaction's ``compaction.journal`` and scratch files (``*.new``, ``*.tmp``),
  and the ``quarantine/`` folder for damaged files.
* the locks (promfork.directory.locks): ``.masters.lock``, ``.files.lock``,
  ``.intent.lock``, and ``.promfork-private``, the marker of a directory
  promfork created itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ARCHIVE = "archive"
GAUGE_MODES = frozenset(
    {"all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent"}
)
_VALUE_NAME = re.compile(r"^(counter|histogram|summary|gauge_([a-z]+))_([0-9]+|[0-9]+-[0-9]+|archive)\.db$")
VALUE_SUFFIX = ".db"

EXEMPLAR_ARCHIVE = "exemplars_archive.bin"
_EXEMPLAR_NAME = re.compile(r"^exemplars_([0-9]+|archive)\.bin$")

JOURNAL = "compaction.journal"
JOURNAL_TMP = JOURNAL + ".tmp"
SCRATCH_SUFFIX = ".new"
QUARANTINE = "quarantine"

MASTERS_LOCK = ".masters.lock"
FILES_LOCK = ".files.lock"
INTENT_LOCK = ".intent.lock"
PRIVATE_MARKER = ".promfork-private"

_SLOT_SUFFIX = ".slot"
MASTER_SLOT = "master"  # the master's own slot; workers have 0, 1, ...
_EXIT_SUFFIX = ".exit"
# What a cold start deletes (with exemplar files): everything a run leaves but the locks and marker.
_STALE_SUFFIXES = (VALUE_SUFFIX, SCRATCH_SUFFIX, ".journal", ".journal.tmp", _EXIT_SUFFIX, _SLOT_SUFFIX)


@dataclass(frozen=True)
class DbFile:
    """One parsed value file name: which kind of values it holds and which process wrote it."""

    name: str
    kind: str  # counter, histogram, summary or gauge
    mode: str  # gauge multiprocess mode, "" for other kinds
    owner: str  # a pid, <pid>-<inode> for a retired file, or ARCHIVE

    @property
    def prefix(self) -> str:
        """The part before the owner: ``counter`` or ``gauge_<mode>``."""
        return f"gauge_{self.mode}" if self.kind == "gauge" else self.kind

    @property
    def pid(self) -> int | None:
        """The process that writes this file; None for archives and retired files, which nobody writes."""
        return int(self.owner) if self.owner.isdigit() else None

    @property
    def retired(self) -> bool:
        """True for a dead process's file that compaction renamed away and will fold."""
        return "-" in self.owner

    @property
    def is_live_gauge(self) -> bool:
        """True for gauges whose values die with their process."""
        return self.kind == "gauge" and self.mode.startswith("live")


def parse_name(name: str) -> DbFile | None:
    """Parse a value file name written by prometheus-client (or promfork); None if it is foreign."""
    match = _VALUE_NAME.match(name)
    if match is None:
        return None
    kind, mode, owner = match.group(1), match.group(2) or "", match.group(3)
    if kind.startswith("gauge_"):
        if mode not in GAUGE_MODES:
            return None
        kind = "gauge"
    return DbFile(name=name, kind=kind, mode=mode, owner=owner)


def is_value_file(name: str) -> bool:
    """True for a name ending like a value file (parsed or foreign: readers report the foreign ones)."""
    return name.endswith(VALUE_SUFFIX)


def value_file_name(prefix: str, pid: int) -> str:
    """The file process `pid` writes its `prefix` values to (``counter``, ``gauge_livesum``...)."""
    return f"{prefix}_{pid}{VALUE_SUFFIX}"


def archive_name(prefix: str) -> str:
    """The archive file that holds folded values for `prefix` (``counter``, ``gauge_max``...)."""
    return f"{prefix}_{ARCHIVE}{VALUE_SUFFIX}"


def retired_name(file: DbFile, inode: int) -> str:
    """The name a dead process's file takes when compaction retires it (unique while the file exists)."""
    return f"{file.prefix}_{file.owner}-{inode}{VALUE_SUFFIX}"


def exemplar_file_name(pid: int) -> str:
    """The exemplar file of process `pid`."""
    return f"exemplars_{pid}.bin"


def is_exemplar_file(name: str) -> bool:
    """True for a per-process exemplar file or the exemplar archive."""
    return _EXEMPLAR_NAME.match(name) is not None


def exemplar_file_pid(name: str) -> int | None:
    """The pid of a per-process exemplar file; None for the archive and anything else."""
    match = _EXEMPLAR_NAME.match(name)
    return int(match.group(1)) if match is not None and match.group(1).isdigit() else None


def scratch_name(final: str) -> str:
    """Where a file is written before it is renamed over `final`."""
    return final + SCRATCH_SUFFIX


def is_scratch(name: str) -> bool:
    """True for a half-written file an interrupted compaction left (deleted on recovery)."""
    return name.endswith(SCRATCH_SUFFIX) or name == JOURNAL_TMP


def slot_file_name(slot: str) -> str:
    """The file naming the pid that holds worker slot `slot` (``0``, ``1``..., ``master``)."""
    return slot + _SLOT_SUFFIX


def slot_of(name: str) -> str | None:
    """The slot a slot file is for; None for any other name."""
    return name[: -len(_SLOT_SUFFIX)] if name.endswith(_SLOT_SUFFIX) else None


def exit_note_name(pid: int) -> str:
    """The note in which worker `pid` leaves its exit reason for the master."""
    return f"{pid}{_EXIT_SUFFIX}"


def is_stale(name: str, keep_pid: int | None = None) -> bool:
    """True for a file a cold start deletes: every metric, exemplar, journal, scratch, exit and slot file.

    The files of `keep_pid` (the master, with ``--preload``, created them already) stay.
    """
    if name.startswith("."):
        return False
    if keep_pid is not None and _owned_by(name, keep_pid):
        return False
    return name.endswith(_STALE_SUFFIXES) or is_exemplar_file(name)


def _owned_by(name: str, pid: int) -> bool:
    parsed = parse_name(name)
    return (parsed is not None and parsed.pid == pid) or exemplar_file_pid(name) == pid
