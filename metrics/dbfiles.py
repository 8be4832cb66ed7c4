"""Names and contents of prometheus-client's multiprocess ``*.db`` files.

The only module that knows the on-disk format. prometheus-client writes one file
per metric kind per process:

* ``counter_<pid>.db``, ``histogram_<pid>.db``, ``summary_<pid>.db``
* ``gauge_<mode>_<pid>.db`` where mode is one of prometheus-client's gauge
  multiprocess modes (all, liveall, min, livemin, max, livemax, sum, livesum,
  mostrecent, livemostrecent)

Each file is an ``MmapedDict``: a used-bytes header, then entries of
(length, JSON key, padding, value double, timestamp double). The JSON key holds
metric name, sample name, labels and help, so identical series in two files have
identical keys. promfork's archive files use the same format with ``archive`` in
place of the pid, so the stock ``MultiProcessCollector`` reads them as one more
(dead) process. In archive entries of summed kinds (counter, histogram, summary,
``sum`` gauges) the timestamp double, which prometheus-client ignores for those
kinds, holds the rounding remainder of the folded total (value + remainder is
the exact sum to about 106 bits), so folding never perturbs a total by an ulp.
Reading and writing go through prometheus-client's own ``MmapedDict``;
``tests/test_dbfiles.py`` pins the layout of the installed version.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass

from prometheus_client.mmap_dict import MmapedDict

ARCHIVE = "archive"
_HEADER = struct.Struct("i")  # bytes used, native int, as MmapedDict writes it

GAUGE_MODES = frozenset(
    {"all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent"}
)
_NAME = re.compile(r"^(counter|histogram|summary|gauge_([a-z]+))_([0-9]+|archive)\.db$")


class CorruptFile(ValueError):
    """A metric file cannot be parsed."""


@dataclass(frozen=True)
class DbFile:
    """One parsed file name: which kind of values it holds and which process wrote it."""

    name: str
    kind: str  # counter, histogram, summary or gauge
    mode: str  # gauge multiprocess mode, "" for other kinds
    owner: str  # a pid, or ARCHIVE

    @property
    def prefix(self) -> str:
        """The part before the owner: ``counter`` or ``gauge_<mode>``."""
        return f"gauge_{self.mode}" if self.kind == "gauge" else self.kind

    @property
    def pid(self) -> int | None:
        """The writing process, or None for an archive file."""
        return None if self.owner == ARCHIVE else int(self.owner)

    @property
    def is_live_gauge(self) -> bool:
        """True for gauges whose values die with their process."""
        return self.kind == "gauge" and self.mode.startswith("live")


def parse_name(name: str) -> DbFile | None:
    """Parse a file name written by prometheus-client (or promfork); None if it is foreign."""
    match = _NAME.match(name)
    if match is None:
        return None
    kind, mode, owner = match.group(1), match.group(2) or "", match.group(3)
    if kind.startswith("gauge_"):
        if mode not in GAUGE_MODES:
            return None
        kind = "gauge"
    return DbFile(name=name, kind=kind, mode=mode, owner=owner)


def archive_name(prefix: str) -> str:
    """The archive file that holds folded values for `prefix` (``counter``, ``gauge_max``...)."""
    return f"{prefix}_{ARCHIVE}.db"


Entries = dict[str, tuple[float, float]]


def read_entries(path: str) -> Entries:
    """Read every (key -> (value, timestamp)) of a file; raise CorruptFile if it is damaged."""
    with open(path, "rb") as src:
        header = src.read(8)
        size = os.fstat(src.fileno()).st_size
    # prometheus-client trusts the used-bytes header; a garbage header would read as "empty".
    used = _HEADER.unpack_from(header)[0] if len(header) == 8 else -1
    if not 8 <= used <= size:
        raise CorruptFile(f"{os.path.basename(path)}: bad header (used={used}, size={size})")
    try:
        entries = {key: (value, ts) for key, value, ts, _ in MmapedDict.read_all_values_from_file(path)}
    except FileNotFoundError:
        raise
    except Exception as exc:  # struct.error, RuntimeError, UnicodeDecodeError ...
        raise CorruptFile(f"{os.path.basename(path)}: {exc}") from None
    return entries


def add_exact(total: tuple[float, float], value: float) -> tuple[float, float]:
    """Add `value` to a (value, remainder) pair, keeping the rounding error in the remainder."""
    parts = (total[0], total[1], value)
    rounded = math.fsum(parts)
    return rounded, math.fsum((*parts, -rounded))


def write_entries(path: str, entries: Entries) -> None:
    """Write `entries` to a new file at `path` in the mmap format and fsync it."""
    if os.path.exists(path):
        os.unlink(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    store = MmapedDict(path)
    try:
        for key, (value, timestamp) in entries.items():
            store.write_value(key, value, timestamp)
    finally:
        store.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
