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

Byte layout (little-endian on the usual hosts; native order, as ``struct`` packs):
offset 0 an int32 "bytes used" (entries end there), 4 bytes of padding; then per
entry an int32 key length, the UTF-8 key padded with spaces so that the value
starts 8-byte aligned, and two doubles (value, timestamp). A new entry is written
before the "used" header grows over it, so a concurrent reader never sees half of
one. Files start at 64 KiB and double when full.

Archive reading and writing go through prometheus-client's own ``MmapedDict``.
``ValueFile`` is the write path of the workers' hot loop: the same layout,
written byte for byte as ``MmapedDict`` writes it, with each value's position
handed to its owner so that an update is one aligned 8-byte store.
``tests/test_dbfiles.py`` pins both against the installed prometheus-client.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass

from prometheus_client.mmap_dict import MmapedDict

ARCHIVE = "archive"
_HEADER = struct.Struct("i")  # bytes used, native int, as MmapedDict writes it
_FIRST_ENTRY = 8  # the header int and 4 bytes of padding
_INITIAL_SIZE = 1 << 16  # as MmapedDict; the file doubles when full
VALUE_SIZE = 16  # value and timestamp, two doubles
pack_value = struct.Struct("dd").pack

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


class ValueFile:
    """One process's file of one metric kind, open for writing values in place.

    ``slot(key)`` is where the key's value lives, as an index into ``doubles`` (a
    view of the file as native doubles; its timestamp is at ``slot + 1``). A new
    key gets a zeroed entry first. Values start 8-byte aligned, so
    ``doubles[slot] = value`` is one aligned 8-byte store: a reader in another
    process sees the old or the new value, never a mix. ``set`` writes value and
    timestamp together in one slice assignment (``struct.pack_into`` would zero
    the bytes first). ``doubles`` is replaced when the file grows: read it anew
    for every write. Not thread-safe: callers serialise access.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a+b")  # noqa: SIM115 - lives as long as the mapping
        self._mmap: mmap.mmap | None = None
        self.doubles: memoryview | None = None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size == 0:
                self._file.truncate(_INITIAL_SIZE)
                size = _INITIAL_SIZE
            self._map(size)
            self._slots: dict[str, int] = {}
            self._used = _HEADER.unpack_from(self._mmap, 0)[0]
            if self._used == 0:
                self._used = _FIRST_ENTRY
                self._mmap[0:4] = _HEADER.pack(self._used)
            else:
                self._index()
        except BaseException:
            self.close()
            raise

    def _map(self, size: int) -> None:
        self._unmap()
        self._size = size
        self._mmap = mmap.mmap(self._file.fileno(), size)
        self.doubles = memoryview(self._mmap).cast("d")

    def _unmap(self) -> None:
        if self.doubles is not None:
            self.doubles.release()  # an exported view would keep the mapping from closing
            self.doubles = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def _index(self) -> None:
        if not _FIRST_ENTRY <= self._used <= self._size:
            raise CorruptFile(f"{os.path.basename(self.path)}: bad header (used={self._used}, size={self._size})")
        pos = _FIRST_ENTRY
        while pos < self._used:
            length = _HEADER.unpack_from(self._mmap, pos)[0]
            end = pos + 4 + length + (8 - (length + 4) % 8)
            if length <= 0 or end + VALUE_SIZE > self._used:
                raise CorruptFile(f"{os.path.basename(self.path)}: entry at byte {pos} runs past the end")
            self._slots[self._mmap[pos + 4 : pos + 4 + length].decode("utf-8")] = end // 8
            pos = end + VALUE_SIZE

    def slot(self, key: str) -> int:
        """Index in ``doubles`` of `key`'s value; a new key gets a zeroed entry first."""
        found = self._slots.get(key)
        if found is not None:
            return found
        encoded = key.encode("utf-8")
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        entry = _HEADER.pack(len(encoded)) + padded + pack_value(0.0, 0.0)
        if self._used + len(entry) > self._size:
            size = self._size
            while self._used + len(entry) > size:
                size *= 2
            self._file.truncate(size)
            self._map(size)
        self._mmap[self._used : self._used + len(entry)] = entry
        self._used += len(entry)
        self._mmap[0:4] = _HEADER.pack(self._used)  # only now can a reader see the entry
        self._slots[key] = found = (self._used - VALUE_SIZE) // 8
        return found

    def set(self, slot: int, value: float, timestamp: float) -> None:
        """Write value and timestamp together (the mostrecent gauge modes compare timestamps)."""
        pos = slot * 8
        self._mmap[pos : pos + VALUE_SIZE] = pack_value(value, timestamp)

    def close(self) -> None:
        """Unmap and close; the data stays in the file."""
        self._unmap()
        self._file.close()
