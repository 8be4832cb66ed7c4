"""Worker slots: the master gives each new worker the lowest free slot; each process records its pid in its slot's file.

Labelling per-process metrics by pid would add a series for every worker that
ever lived; slots (0 … workers-1, and ``master``) stay put as workers are
replaced. promfork.reader.process reads the slot files at scrape time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from promfork.directory import filenames, ownership

MASTER = filenames.MASTER_SLOT


def record_slot(directory: str, slot: str, pid: int) -> None:
    """Write `<slot>.slot` naming `pid` (atomic replace)."""
    path = os.path.join(directory, filenames.slot_file_name(slot))
    tmp = f"{path}.{pid}.tmp"
    fd = ownership.create(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, str(pid).encode())
    except OSError:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def free_slot(taken: Iterable[int]) -> int:
    """The lowest slot number not in `taken`."""
    used = set(taken)
    slot = 0
    while slot in used:
        slot += 1
    return slot
