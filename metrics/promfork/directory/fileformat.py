"""Names and contents of prometheus-client's multiprocess ``*.db`` files.

The only module that knows the on-disk format. prometheus-client writes one file
per metric kind per process:

* ``counter_<pid>.db``, ``histogram_<pid>.db``, ``summary_<pid>.db``
* ``gauge_<mode>_<pid>.db`` where mode is one of prometheus-client's gauge
  multiprocess modes (all, liveall, min, livemin, max, livemax, sum, livesum,
  mostrecent, livemostrecent)

promfork adds two owners besides a pid: ``archive`` (``counter_archive.db``),
the folded values of dead processes, and ``<pid>-<inode>`` (``counter_812-4471.db``),
a dead process's file that compaction has *retired*: renamed away from the name
its process writes, so that no process can open it again (see
promfork.master.compaction). The stock ``MultiProcessCollector`` reads both as one more
dead process. In archive entries of summed kinds (counter, histogram, summary,
``sum`` gauges) the timestamp double, which prometheus-client ignores for those
kinds, holds the rounding remainder of the folded total (value + remainder is
the exact sum to about 106 bits), so folding never perturbs a total by an ulp.

Each file is an ``MmapedDict``. Byte layout (native order, as ``struct`` packs;
little-endian on the usual hosts): offset 0 an int32 "bytes used" (entries end
there), 4 bytes of padding; then per entry an int32 key length, the UTF-8 JSON
key (metric name, sample name, labels, help) padded with spaces so that the
value starts 8-byte aligned, and two doubles (value, timestamp). A new entry is
written before the "used" header grows over it, so a concurrent reader never
sees half of one. Files start at 64 KiB and double when full; their size is
always a multiple of 8. A header of 0 is a file created but not yet written:
it reads as empty, as in prometheus-client.

Writers and space: a page of a memory-mapped file that the filesystem cannot
back (disk or tmpfs full) kills the writing process with SIGBUS on first touch.
So every file promfork writes through a mapping is allocated with
``posix_fallocate`` when created and when grown, which turns a full disk into
an ``OSError`` before any page is touched; archives are written with plain
``write()`` calls, which report ENOSPC the same way.

Writers and locks: ``ValueFile`` holds a shared ``flock`` on its file for as
long as it is open, and only writes a file that is still linked under its name.
Compaction folds a file only after taking that lock exclusively (see
``claim``), so it never folds a file a live process may write, whatever the
timing (a reused pid, a fork right after a check).

Archive reading goes through prometheus-client's own reader; the long-lived
scrape reader (promfork.reader.incremental) reads snapshots of a file's used bytes
(``read_snapshot``) and indexes entries from a given offset on
(``index_entries``), so that it parses only what was appended. ``ValueFile`` is
the write path of the workers' hot loop: the same layout, written byte for byte
as ``MmapedDict`` writes it, with each value's position handed to its owner so
that an update is one aligned 8-byte store. ``tests/test_fileformat.py`` pins both
against the installed prometheus-client.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import NamedTuple

from prometheus_client.mmap_dict import MmapedDict

from promfork.directory import ownership
from promfork.directory.mapped import MappedFile

_HEADER = struct.Struct("i")  # bytes used, native int, as MmapedDict writes it
FIRST_ENTRY = _FIRST_ENTRY = 8  # the header int and 4 bytes of padding
_INITIAL_SIZE = 1 << 16  # as MmapedDict; the file doubles when full
VALUE_SIZE = 16  # value and timestamp, two doubles
pack_value = struct.Struct("dd").pack


class CorruptFile(ValueError):
    """A metric file cannot be parsed."""


Entries = dict[str, tuple[float, float]]


def read_entries(path: str) -> Entries:
    """Read every (key -> (value, timestamp)) of a file; raise CorruptFile if it is damaged."""
    with open(path, "rb") as src:
        header = src.read(8)
        size = os.fstat(src.fileno()).st_size
    # prometheus-client trusts the used-bytes header; a garbage header would read as "empty".
    used = _HEADER.unpack_from(header)[0] if len(header) == 8 else -1
    if used == 0:
        return {}  # created, never written: prometheus-client reads it as empty too
    if not 8 <= used <= size:
        raise CorruptFile(f"{os.path.basename(path)}: bad header (used={used}, size={size})")
    try:
        entries = {key: (value, ts) for key, value, ts, _ in MmapedDict.read_all_values_from_file(path)}
    except FileNotFoundError:
        raise
    except Exception as exc:  # struct.error, RuntimeError, UnicodeDecodeError ...
        raise CorruptFile(f"{os.path.basename(path)}: {exc}") from None
    return entries


class Snapshot(NamedTuple):
    """A file's identity and its bytes up to its "used" header, as read at one instant."""

    inode: int
    device: int
    data: bytes  # b"" for a file created but never written


def read_snapshot(path: str) -> Snapshot:
    """Read a file's bytes up to "used" in two ``pread`` calls; raise CorruptFile if the header is bad.

    The header is read first: every entry before the "used" it names was
    complete before the header grew over it, so the bytes read next hold whole
    entries only. The same checks as ``read_entries``; no mapping and no
    descriptor outlives the call.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = os.pread(fd, 8, 0)
        # The size after the header: a writer grows the file before the header
        # grows into the new space, so a size taken first could be too small.
        stat = os.fstat(fd)
        used = _HEADER.unpack_from(header)[0] if len(header) == 8 else -1
        if used == 0:
            return Snapshot(stat.st_ino, stat.st_dev, b"")
        if not 8 <= used <= stat.st_size:
            raise CorruptFile(f"{os.path.basename(path)}: bad header (used={used}, size={stat.st_size})")
        data = os.pread(fd, used, 0)
    finally:
        os.close(fd)
    if len(data) < used:
        raise CorruptFile(f"{os.path.basename(path)}: shorter than its header says ({len(data)} < {used})")
    return Snapshot(stat.st_ino, stat.st_dev, data)


def index_entries(data: bytes, start: int = FIRST_ENTRY) -> tuple[list[bytes], list[int]]:
    """The raw UTF-8 keys and the value offsets of a snapshot's entries from byte `start` on.

    `start` must be where an entry begins: ``FIRST_ENTRY`` or the length of an
    earlier snapshot of the same file (entries are only ever appended). Entry
    ``i`` spans from the end of entry ``i - 1`` (or ``FIRST_ENTRY``) to its
    value offset + ``VALUE_SIZE``; the value and timestamp are the two doubles
    at its value offset (see ``unpack_value``). Raises CorruptFile where
    prometheus-client's reader fails (a key running past the end) and where it
    would not advance (a key length of 0 or less) or would read past the end.
    Keys are returned undecoded: the caller decodes (and so checks) each
    distinct key once.
    """
    keys: list[bytes] = []
    offsets: list[int] = []
    used = len(data)
    unpack = _HEADER.unpack_from
    pos = start
    while pos < used:
        length = unpack(data, pos)[0] if pos + 4 <= used else -1
        value_at = pos + 4 + length + (8 - (length + 4) % 8)
        if length <= 0 or value_at + VALUE_SIZE > used:
            raise CorruptFile(f"entry at byte {pos} runs past the end ({used} bytes used)")
        keys.append(data[pos + 4 : pos + 4 + length])
        offsets.append(value_at)
        pos = value_at + VALUE_SIZE
    return keys, offsets


unpack_value = struct.Struct("dd").unpack_from  # (value, timestamp) at a value offset


def add_exact(total: tuple[float, float], value: float) -> tuple[float, float]:
    """Add `value` to a (value, remainder) pair, keeping the rounding error in the remainder.

    Non-finite values add as IEEE addition does (inf + -inf is nan), as
    prometheus-client's plain ``+`` would; a finite total that overflows
    becomes inf. Either way the remainder is 0.
    """
    parts = (total[0], total[1], value)
    try:
        rounded = math.fsum(parts)
    except (ValueError, OverflowError):  # inf + -inf, or finite overflow
        return total[0] + total[1] + value, 0.0
    if not math.isfinite(rounded):
        return rounded, 0.0
    return rounded, math.fsum((*parts, -rounded))


def encode_entries(entries: Entries) -> bytes:
    """The bytes of a file holding `entries`, exactly as ``MmapedDict`` would write them."""
    body = bytearray(_FIRST_ENTRY)
    for key, (value, timestamp) in entries.items():
        body += _encode_entry(key, value, timestamp)
    _HEADER.pack_into(body, 0, len(body))
    size = _INITIAL_SIZE
    while size < len(body):
        size *= 2
    return bytes(body) + bytes(size - len(body))


def _encode_entry(key: str, value: float, timestamp: float) -> bytes:
    encoded = key.encode("utf-8")
    return _HEADER.pack(len(encoded)) + encoded + b" " * (8 - (len(encoded) + 4) % 8) + pack_value(value, timestamp)


def write_entries(path: str, entries: Entries) -> None:
    """Write `entries` to a new file at `path` and fsync it; OSError (ENOSPC...) leaves no file behind."""
    ownership.write_new(path, encode_entries(entries))


class ValueFile(MappedFile):
    """One process's file of one metric kind, open for writing values in place.

    ``slot(key)`` is where the key's value lives, as an index into ``doubles`` (a
    view of the file as native doubles; its timestamp is at ``slot + 1``). A new
    key gets a zeroed entry first. Values start 8-byte aligned, so
    ``doubles[slot] = value`` is one aligned 8-byte store: a reader in another
    process sees the old or the new value, never a mix. ``set`` writes value and
    timestamp together in one slice assignment (``struct.pack_into`` would zero
    the bytes first). ``doubles`` is replaced when the file grows: read it anew
    for every write. Not thread-safe: callers serialise access.

    Opening and ``slot`` raise OSError when the file cannot be created or grown
    (a full disk), CorruptFile when an existing file is damaged; the file and
    every slot handed out before stay usable.
    """

    INITIAL_SIZE = _INITIAL_SIZE
    Damaged = CorruptFile

    def opened(self, mapping: mmap.mmap) -> None:
        """Index the entries of a continued file, or write the header of a new one."""
        self._slots: dict[str, int] = {}
        self._used = _HEADER.unpack_from(mapping, 0)[0]
        if self._used == 0:
            self._used = _FIRST_ENTRY
            mapping[0:4] = _HEADER.pack(self._used)
        else:
            self._index()

    def _map(self, size: int) -> None:
        super()._map(size)
        self.doubles = self.view

    def _unmap(self) -> None:
        self.doubles = None
        super()._unmap()

    def _index(self) -> None:
        if not _FIRST_ENTRY <= self._used <= self.size:
            raise CorruptFile(f"{os.path.basename(self.path)}: bad header (used={self._used}, size={self.size})")
        pos = _FIRST_ENTRY
        while pos < self._used:
            length = _HEADER.unpack_from(self._mmap, pos)[0]
            end = pos + 4 + length + (8 - (length + 4) % 8)
            if length <= 0 or end + VALUE_SIZE > self._used:
                raise CorruptFile(f"{os.path.basename(self.path)}: entry at byte {pos} runs past the end")
            try:
                key = self._mmap[pos + 4 : pos + 4 + length].decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptFile(f"{os.path.basename(self.path)}: key at byte {pos} is not UTF-8") from None
            self._slots[key] = end // 8
            pos = end + VALUE_SIZE

    def slot(self, key: str) -> int:
        """Index in ``doubles`` of `key`'s value; a new key gets a zeroed entry first."""
        found = self._slots.get(key)
        if found is not None:
            return found
        entry = _encode_entry(key, 0.0, 0.0)
        self.grow_to(self._used + len(entry))
        self._mmap[self._used : self._used + len(entry)] = entry
        self._used += len(entry)
        self._mmap[0:4] = _HEADER.pack(self._used)  # only now can a reader see the entry
        self._slots[key] = found = (self._used - VALUE_SIZE) // 8
        return found

    def set(self, slot: int, value: float, timestamp: float) -> None:
        """Write value and timestamp together (the mostrecent gauge modes compare timestamps)."""
        pos = slot * 8
        self._mmap[pos : pos + VALUE_SIZE] = pack_value(value, timestamp)
