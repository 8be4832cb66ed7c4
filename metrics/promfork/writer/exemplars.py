"""Exemplars across worker processes: each process's most recent trace per histogram bucket, in a file of its own.

What is stored. For every histogram bucket an observation fell in while a
sampled trace was current (promfork.trace), the last such observation of each
process: trace id, span id, the observed value and the wall-clock time it was
observed. ``read_exemplars`` merges every process's file and the archive and
keeps, per bucket, the most recent exemplar; the reader (promfork.reader.collector)
appends each to its bucket line in the OpenMetrics exposition (the Prometheus
text format has no exemplars). Exemplars exist in multiprocess mode only.

Keys. An ``ExemplarKey`` is (bucket sample name, labels): the sample name as
exposed (``http_request_duration_seconds_bucket``, METRICS_NAMESPACE prefix
included) and the series' labels as its value files store them, as (name,
value) pairs sorted by name, ``le`` included and spelled as
``prometheus_client.utils.floatToGoString`` spells it. Constant labels
(METRICS_CONST_LABELS) are not part of the key: the reader adds those to every
sample after merging.

Files. ``exemplars_<pid>.bin`` per process and ``exemplars_archive.bin`` (the
exemplars of dead processes), in PROMETHEUS_MULTIPROC_DIR. Not ``*.db``: the
value readers (stock ``MultiProcessCollector`` and promfork's) glob ``*.db``
and would read these as damaged metric files. Native byte order (the files never
leave the host)::

    0   4 bytes  magic b"PFEX"
    4   uint32   format version (1)
    8   uint64   bytes used: entries end there
    16  entries, each starting 8-byte aligned:
          uint32  key length N, then N bytes of UTF-8 JSON [sample name, [[label, value], ...]],
          zero padding up to the next multiple of 8, then a 48-byte record:
          uint64 sequence, 16 bytes trace id, 8 bytes span id, float64 value, float64 timestamp

A new entry is written (record zeroed, sequence 0 = "never written") before
"bytes used" grows over it, in one aligned 8-byte store, so a reader never sees
half an entry. Records are rewritten in place under a sequence lock: the writer
makes the sequence odd, writes the 40 bytes after it, then makes it even again,
each sequence store one aligned 8-byte store. A reader reads the sequence, the
record, the sequence again, and keeps the record only if both reads are the
same even, non-zero number; otherwise it retries a few times and then skips
that bucket for this scrape. So a reader never shows a torn exemplar (say, one
request's trace id with another's span id). A writer killed mid-record leaves an
odd sequence: skipped until the next write of that bucket. This relies on
another process seeing the three stores in the order they were made, as x86-64
guarantees; Python has no memory fences to ask for it on weakly ordered CPUs.

Writes never fail or block a request. Each process's file is created on its
first exemplar, sized with ``posix_fallocate`` (and again when it doubles), so
a full disk is an OSError, never SIGBUS. An exemplar that cannot be stored is
dropped and counted in ``metrics_write_errors_total`` (promfork.writer.values); a line
is logged at most once a minute; opening the file is retried at most once a
second. A writer holds a shared ``flock`` on its file as the value store does
(``locks.open_for_writing``), so compaction never takes a file a live process
(pid reuse included) may write. A forked child never writes its parent's file:
it drops the inherited mapping and opens its own on its first exemplar.

Dead processes. When compaction folds a dead worker (promfork.master.compaction,
under the exclusive files lock), ``fold_dead_workers`` claims its exemplar file
like a value file, merges it into ``exemplars_archive.bin`` (the most recent
exemplar per bucket wins, as in ``read_exemplars``), replaces the archive by
rename and deletes the file. Exemplars are samples, not totals: a crash between
the rename and the delete folds the same file again on the next run, which
changes nothing. So a dead worker's last exemplars stay visible (until a newer
one of the same bucket replaces them) and its file does not pile up. A
cold start deletes every exemplar file with the other files of the earlier run.

This module does not import prometheus_client when it is imported (the
multiprocess directory module uses its file names before that is allowed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from promfork import client, forks
from promfork.directory import filenames, locks, ownership
from promfork.directory.mapped import MappedFile
from promfork.trace import TraceContext, current_trace
from promfork.writer import values
from promfork.writer.outage import Outage

if TYPE_CHECKING:
    from prometheus_client import Histogram
    from prometheus_client.samples import Exemplar

log = logging.getLogger("promfork.writer.exemplars")

# (bucket sample name, e.g. "http_request_duration_seconds_bucket",
#  labels as a tuple of (name, value) pairs sorted by name, "le" included and
#  formatted as prometheus_client.utils.floatToGoString formats it)
ExemplarKey = tuple[str, tuple[tuple[str, str], ...]]

MAGIC = b"PFEX"
VERSION = 1
_HEADER = struct.Struct("=4sIQ")  # magic, version, bytes used
_KEY_LENGTH = struct.Struct("=I")
_PAYLOAD = struct.Struct("=16s8sdd")  # trace id, span id, value, timestamp (after the sequence)
RECORD_SIZE = 8 + _PAYLOAD.size  # 48
_INITIAL_SIZE = 1 << 14
_MAX_KEY = 1 << 16
_READ_ATTEMPTS = 4


class CorruptExemplarFile(ValueError):
    """An exemplar file cannot be parsed."""


def _record_offset(entry: int, key_length: int) -> int:
    return (entry + 4 + key_length + 7) & ~7


def _encode_key(key: ExemplarKey) -> bytes:
    return json.dumps([key[0], [list(pair) for pair in key[1]]], separators=(",", ":")).encode("utf-8")


def _decode_key(raw: bytes) -> ExemplarKey:
    name, labels = json.loads(raw.decode("utf-8"))
    return str(name), tuple((str(label), str(value)) for label, value in labels)


# ---------------------------------------------------------------- writing


class _ExemplarFile(MappedFile):
    """This process's exemplar file, mapped for writing records in place. Not thread-safe (the store's lock is)."""

    INITIAL_SIZE = _INITIAL_SIZE
    VIEW_FORMAT = "Q"
    Damaged = CorruptExemplarFile

    def opened(self, mapping: mmap.mmap) -> None:
        """Index the records of a continued file, or write the header of a new one."""
        self.offsets: dict[ExemplarKey, int] = {}
        magic, version, used = _HEADER.unpack_from(mapping, 0)
        if magic == b"\0\0\0\0" and used == 0:  # new (or created but never written)
            self._used = _HEADER.size
            mapping[0 : _HEADER.size] = _HEADER.pack(MAGIC, VERSION, self._used)
        elif magic != MAGIC or version != VERSION:
            raise CorruptExemplarFile(f"{os.path.basename(self.path)}: not an exemplar file of version {VERSION}")
        else:  # a file continued from an earlier process with this pid
            self._used = used
            for key, offset in _entries(mapping, used, self.path):
                self.offsets[key] = offset

    def add(self, key: ExemplarKey) -> int:
        """Append an unwritten entry for `key`; return its record's offset. OSError when the file cannot grow."""
        encoded = _encode_key(key)
        if len(encoded) > _MAX_KEY:  # readers refuse longer keys: one dropped exemplar, not a lost file
            raise ValueError(f"exemplar key of {len(encoded)} bytes (at most {_MAX_KEY})")
        entry = self._used
        record = _record_offset(entry, len(encoded))
        end = record + RECORD_SIZE
        self.grow_to(end)
        mapping = self._mmap
        mapping[entry : entry + 4] = _KEY_LENGTH.pack(len(encoded))
        mapping[entry + 4 : entry + 4 + len(encoded)] = encoded
        mapping[entry + 4 + len(encoded) : end] = bytes(end - entry - 4 - len(encoded))
        self._used = end
        self.view[1] = end  # one aligned 8-byte store: only now can a reader see the entry
        self.offsets[key] = record
        return record

    def write(self, record: int, trace: TraceContext, value: float, timestamp: float) -> None:
        """Rewrite one record under its sequence lock (see the module docstring)."""
        # Packed before the record turns odd: a bad trace raises with the old record intact.
        payload = _PAYLOAD.pack(bytes.fromhex(trace.trace_id), bytes.fromhex(trace.span_id), value, timestamp)
        words = self.view
        index = record >> 3
        odd = (words[index] + 1) | 1  # odd even if a killed writer left it odd
        words[index] = odd
        self._mmap[record + 8 : record + RECORD_SIZE] = payload
        words[index] = odd + 1


class _Store:
    """The exemplar file of one process (the current one; a forked child makes its own)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.file: _ExemplarFile | None = None
        self.outage = Outage("exemplars", "dropped", self.pid)

    def store(self, key: ExemplarKey, trace: TraceContext, value: float) -> None:
        """Store one exemplar, or drop and count it. Never raises. Lock held."""
        try:
            file = self.file
            if file is None:
                file = self._open()
                if file is None:
                    return
            record = file.offsets.get(key)
            if record is None:
                record = file.add(key)
            file.write(record, trace, value, time.time())
        except Exception as exc:  # OSError mostly (a full disk while growing); never fail the request
            self._dropped(exc)

    def _open(self) -> _ExemplarFile | None:
        if not self.outage.retry_due():
            self._dropped(None)
            return None
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return None  # in-memory mode: no exemplars
        path = os.path.join(directory, filenames.exemplar_file_name(self.pid))
        try:
            try:
                self.file = _ExemplarFile(path)
            except CorruptExemplarFile as exc:
                # Left by an earlier process with this pid; exemplars are samples: start afresh.
                log.error("promfork: replacing damaged exemplar file %s: %s", path, exc)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self.file = _ExemplarFile(path)
        except Exception as exc:
            self._dropped(exc)
            return None
        self.outage.recovered()
        return self.file

    def _dropped(self, error: BaseException | None) -> None:
        values.count_write_errors(1)
        self.outage.failed(1, error)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.close()
            self.file = None


_store = _Store()


def _forked() -> None:
    # The child starts with its own store and lock; its copy of the parent's mapping
    # is closed so that it never holds the parent's file lock after the parent dies.
    global _store
    inherited = _store
    _store = _Store()
    inherited.close()


forks.after_fork_in_child(forks.EXEMPLAR_STORE, _forked)

# upper bounds, and the key of each bucket
_Buckets = tuple[tuple[float, ...], tuple[ExemplarKey, ...]]
_bucket_keys: dict[tuple[object, tuple[str, ...]], _Buckets] = {}  # by (histogram, label values)


def _buckets_of(histogram: Histogram, labelvalues: tuple[str, ...]) -> _Buckets:
    # Tests pin the keys against the bucket samples the installed version exposes.
    from prometheus_client.utils import floatToGoString

    found = _bucket_keys.get((histogram, labelvalues))
    if found is None:
        name, labelnames, bounds = client.histogram_identity(histogram)
        labels = tuple(zip(labelnames, labelvalues, strict=True))
        keys = tuple((name + "_bucket", tuple(sorted((*labels, ("le", floatToGoString(b)))))) for b in bounds)
        found = _bucket_keys[(histogram, labelvalues)] = (bounds, keys)
    return found


def record_trace(histogram: Histogram, labelvalues: Sequence[str], value: float, trace: TraceContext) -> None:
    """Leave `trace` as this process's exemplar of the bucket of `histogram{labelvalues}` that `value` falls in.

    Call it after observing `value` (the exemplar points at an observation the
    bucket counts). `histogram` may also be a labelled child
    (``histogram.labels(...)``) with empty `labelvalues`. NaN falls in no bucket
    and leaves nothing. Never raises.
    """
    try:
        labelvalues = labelvalues or client.label_values(histogram)  # a child knows its own
        bounds, keys = _buckets_of(histogram, tuple(str(v) for v in labelvalues))
        index = bisect_left(bounds, value)
        if index == len(bounds) or not value <= bounds[index]:  # NaN
            return
        store = _store
        with store.lock:
            store.store(keys[index], trace, float(value))
    except Exception:  # a histogram without these labels, or not a Histogram: metrics never fail a request
        log.debug("promfork: exemplar not recorded", exc_info=True)


def record(histogram: Histogram, labelvalues: Sequence[str], value: float) -> None:
    """Leave the current trace (if any) as the exemplar of the bucket `value` fell in; call right after observing.

    For an app's own histograms::

        duration.labels(*labelvalues).observe(seconds)
        promfork.writer.exemplars.record(duration, labelvalues, seconds)

    The current trace is OpenTelemetry's sampled span, else the sampled
    ``traceparent`` of the request being served (bound by promfork.flask or
    promfork.asgi). Without one this costs a context variable lookup.
    """
    trace = current_trace()
    if trace is not None:
        record_trace(histogram, labelvalues, value, trace)


def record_child(child: Histogram, value: float) -> None:
    """``record`` for a labelled child bound once (``child = histogram.labels(...)``); call right after observing."""
    trace = current_trace()
    if trace is not None:
        record_trace(child, (), value, trace)


# ---------------------------------------------------------------- reading


def _entries(mapping: mmap.mmap, used: int, path: str) -> Iterable[tuple[ExemplarKey, int]]:
    """Every (key, record offset) of a mapped file, up to `used` bytes; CorruptExemplarFile if they do not parse.

    A file that grew after it was mapped (`used` beyond the mapping) yields the entries that fit.
    """
    if used > len(mapping) >= _HEADER.size and mapping[:4] == MAGIC:
        used, grown = len(mapping), True
    else:
        grown = False
    if not _HEADER.size <= used <= len(mapping):
        raise CorruptExemplarFile(f"{os.path.basename(path)}: bad header (used={used}, size={len(mapping)})")
    entry = _HEADER.size
    while entry < used:
        length = _KEY_LENGTH.unpack_from(mapping, entry)[0]
        record = _record_offset(entry, length)
        if grown and (entry + 4 > used or record + RECORD_SIZE > used):
            return
        if not 0 < length <= _MAX_KEY or record + RECORD_SIZE > used:
            raise CorruptExemplarFile(f"{os.path.basename(path)}: entry at byte {entry} runs past the end")
        try:
            key = _decode_key(mapping[entry + 4 : entry + 4 + length])
        except (ValueError, TypeError) as exc:
            raise CorruptExemplarFile(f"{os.path.basename(path)}: key at byte {entry}: {exc}") from None
        yield key, record
        entry = record + RECORD_SIZE


# (trace id, span id, value, timestamp) per key
_Records = dict[ExemplarKey, tuple[str, str, float, float]]


def read_file(path: str) -> _Records:
    """The exemplars of one file, read without locking it (see the sequence lock in the module docstring).

    Raises FileNotFoundError if it is gone, CorruptExemplarFile if it is damaged.
    A file created but not yet written reads as empty.
    """
    with open(path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        if size < _HEADER.size:
            return {}
        if size % 8:
            raise CorruptExemplarFile(f"{os.path.basename(path)}: size {size} is not a multiple of 8")
        mapping = mmap.mmap(src.fileno(), size, access=mmap.ACCESS_READ)
    words = memoryview(mapping).cast("Q")
    try:
        magic, version, used = _HEADER.unpack_from(mapping, 0)
        if magic == b"\0\0\0\0" and used == 0:
            return {}
        if magic != MAGIC or version != VERSION:
            raise CorruptExemplarFile(f"{os.path.basename(path)}: not an exemplar file of version {VERSION}")
        # A writer may have grown the file since we mapped it: read what fits.
        found: _Records = {}
        for key, record in _entries(mapping, used, path):
            index = record >> 3
            for _ in range(_READ_ATTEMPTS):
                before = words[index]
                if before == 0:  # never written
                    break
                if before & 1:  # being written right now
                    continue
                trace_id, span_id, value, timestamp = _PAYLOAD.unpack_from(mapping, record + 8)
                if words[index] == before:
                    found[key] = (trace_id.hex(), span_id.hex(), value, timestamp)
                    break
        return found
    finally:
        words.release()
        mapping.close()


def _merge_newest(into: _Records, records: _Records) -> None:
    for key, record in records.items():
        current = into.get(key)
        if current is None or record[3] > current[3]:
            into[key] = record


def _read_all(directory: str) -> _Records:
    merged: _Records = {}
    for name in sorted(os.listdir(directory)):
        if not filenames.is_exemplar_file(name):
            continue
        try:
            records = read_file(os.path.join(directory, name))
        except FileNotFoundError:  # folded by compaction meanwhile (a reader without the lock)
            continue
        except (CorruptExemplarFile, OSError, ValueError) as exc:
            log.error("promfork: skipping unreadable exemplar file %s: %s", name, exc)
            continue
        _merge_newest(merged, records)
    return merged


def read_exemplars(directory: str) -> dict[ExemplarKey, Exemplar]:
    """The most recent exemplar of every bucket over every process's exemplar file in `directory`.

    Called by the reader once per OpenMetrics scrape (under the shared files
    lock, like the value files). Unreadable files are skipped and logged:
    exemplars are an aid, never a reason to fail a scrape.
    """
    from prometheus_client.samples import Exemplar

    return {
        key: Exemplar({"trace_id": trace_id, "span_id": span_id}, value, timestamp)
        for key, (trace_id, span_id, value, timestamp) in _read_all(directory).items()
    }


# ---------------------------------------------------------------- dead processes


def encode_file(records: _Records) -> bytes:
    """The bytes of a file holding `records` (every record complete, sequence 2)."""
    body = bytearray(_HEADER.size)
    for key, (trace_id, span_id, value, timestamp) in records.items():
        encoded = _encode_key(key)
        entry = len(body)
        record = _record_offset(entry, len(encoded))
        body += _KEY_LENGTH.pack(len(encoded)) + encoded + bytes(record - entry - 4 - len(encoded))
        body += struct.pack("=Q", 2) + _PAYLOAD.pack(bytes.fromhex(trace_id), bytes.fromhex(span_id), value, timestamp)
    _HEADER.pack_into(body, 0, MAGIC, VERSION, len(body))
    return bytes(body)


def _write_archive(directory: str, records: _Records) -> None:
    final = os.path.join(directory, filenames.EXEMPLAR_ARCHIVE)
    new = filenames.scratch_name(final)  # compaction's recovery deletes a stray one
    ownership.write_new(new, encode_file(records))
    os.rename(new, final)


def fold_dead_workers(directory: str, pids: Iterable[int]) -> int:
    """Fold the exemplar files of the dead processes `pids` into the archive and delete them; return how many.

    Caller holds the files lock exclusively (promfork.master.compaction). A file a live
    process holds (pid reuse) is left alone. A damaged file is deleted (its
    exemplars are lost, logged). Raises OSError when the archive cannot be
    written (disk full): every file is then left as it was, for the next run.
    """
    claimed: list[tuple[str, int]] = []
    try:
        for pid in sorted(set(pids)):
            path = os.path.join(directory, filenames.exemplar_file_name(pid))
            fd = locks.claim(path)
            if fd is not None:
                claimed.append((path, fd))
        if not claimed:
            return 0
        try:
            archive = read_file(os.path.join(directory, filenames.EXEMPLAR_ARCHIVE))
        except FileNotFoundError:
            archive = {}
        except CorruptExemplarFile as exc:
            log.error("promfork: replacing damaged exemplar archive: %s", exc)
            archive = {}
        for path, _ in claimed:
            try:
                _merge_newest(archive, read_file(path))
            except CorruptExemplarFile as exc:
                log.error("promfork: dropping damaged exemplar file of a dead process: %s", exc)
        _write_archive(directory, archive)
        for path, _ in claimed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # still claimed: nobody reopened it
        return len(claimed)
    finally:
        for _, fd in claimed:
            locks.release(fd)
