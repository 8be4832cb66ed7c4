"""The mapped-file base of value files and exemplar files: a file one process writes in place.

Both kinds are written through a shared memory mapping, one aligned 8-byte store
at a time, so a reader in another process sees whole words. What they share is
here: open under the writer lock (promfork.directory.locks, so compaction never
takes a file a live process writes), every page allocated with
``posix_fallocate`` when the file is created and when it grows (a full disk is
then an ``OSError`` at that call, never SIGBUS on a later store), a new mapping
made before the old one is released (a failure keeps the old one usable), and
``close`` that unmaps, drops the lock and keeps the data. What each holds and how
it is laid out is the subclass's: promfork.directory.fileformat.ValueFile,
promfork.writer.exemplars' exemplar file.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from promfork.directory import locks


class MappedFile:
    """One file mapped for writing in place; ``view`` is the mapping as ``VIEW_FORMAT`` words. Not thread-safe."""

    INITIAL_SIZE = 1 << 16
    VIEW_FORMAT = "d"
    Damaged: type[Exception] = ValueError  # what a subclass raises for a damaged file

    def __init__(self, path: str, lock_wait: float = 0.0) -> None:
        self.path = path
        self._fd = locks.open_for_writing(path, lock_wait)
        self._mmap: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.size = 0
        found = -1
        try:
            found = os.fstat(self._fd).st_size
            if found % 8:
                raise self.Damaged(f"{os.path.basename(path)}: size {found} is not a multiple of 8")
            # Allocate every page now (a file continued from an earlier process may be sparse).
            size = max(found, self.INITIAL_SIZE)
            os.posix_fallocate(self._fd, 0, size)
            self._map(size)
            self.opened(self._mmap)
        except BaseException:
            if found == 0:  # created here, never sized: an empty file would read as damage
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self.close()
            raise

    def opened(self, mapping: mmap.mmap) -> None:
        """Read (or initialise) the file's header and index; raise ``Damaged`` if it cannot be parsed."""

    def grow_to(self, needed: int) -> None:
        """Make the file at least `needed` bytes (doubling); OSError (ENOSPC) leaves it as it was."""
        if needed <= self.size:
            return
        size = self.size
        while needed > size:
            size *= 2
        os.posix_fallocate(self._fd, 0, size)  # ENOSPC here, not SIGBUS on the first store
        self._map(size)

    def _map(self, size: int) -> None:
        mapping = mmap.mmap(self._fd, size)  # before unmapping: a failure keeps the old mapping
        self._unmap()
        self.size = size
        self._mmap = mapping
        self.view = memoryview(mapping).cast(self.VIEW_FORMAT)

    def _unmap(self) -> None:
        if self.view is not None:
            self.view.release()  # an exported view would keep the mapping from closing
            self.view = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def close(self) -> None:
        """Unmap, release the lock and close; the data stays in the file."""
        self._unmap()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
