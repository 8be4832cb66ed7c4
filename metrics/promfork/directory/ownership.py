"""Who owns the directory's files: every file promfork creates is made here, mode 0600, for the workers' user.

Gunicorn can run its master as root and its workers as another user
(``--user``/``--group``). Workers then write their own files, and read and lock
the ones the master made (archives, locks, its own values, slot files), so
from ``hand_to`` on (the ``on_starting`` hook) every file the master creates is
given to the workers' user and group, as Gunicorn does with its own worker
temporary files; what the directory already holds is given to them at once. A
directory the user named that the workers' user cannot use stops the start
(``check_usable_by``), naming the variable, its owner and mode, and that user.
Files stay 0600 (directories 0700): metric values are nobody else's business.
"""

from __future__ import annotations

import contextlib
import os
import stat

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_owner: tuple[int, int] | None = None  # (uid, gid) new files are given to, in a root master only


def create(path: str, flags: int) -> int:
    """Open `path` with `flags` plus ``O_CREAT`` (mode 0600); a file made here goes to the workers' user."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    if _owner is not None:
        try:
            os.fchown(fd, *_owner)
        except OSError:
            os.close(fd)
            raise
    return fd


def write_new(path: str, data: bytes) -> None:
    """Write `data` to a new file at `path` (replacing any) and fsync it; OSError (ENOSPC...) leaves no file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = create(path, os.O_WRONLY | os.O_EXCL)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def make_directory(path: str) -> None:
    """Create a folder inside the directory (mode 0700), for the workers' user too."""
    os.makedirs(path, mode=DIRECTORY_MODE, exist_ok=True)
    if _owner is not None:
        os.chown(path, *_owner)


def hand_to(directory: str, uid: int, gid: int, including_directory: bool) -> None:
    """From now on, files this (root) process creates belong to uid:gid; so does all `directory` holds now.

    The directory itself too when promfork created it; one the user named keeps its owner.
    """
    global _owner
    if os.geteuid() != 0 or (uid, gid) == (os.geteuid(), os.getegid()):
        return
    _owner = (uid, gid)
    if including_directory:
        os.chown(directory, uid, gid)
    for root, folders, files in os.walk(directory):
        for name in folders + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def check_usable_by(directory: str, uid: int, gid: int, where: str) -> None:
    """Raise PermissionError when the user uid:gid cannot create, read and lock files in `directory`."""
    if uid == 0:
        return
    info = os.stat(directory)
    if info.st_uid == uid:
        usable = (info.st_mode & 0o700) == 0o700
    elif info.st_gid == gid:
        usable = (info.st_mode & 0o070) == 0o070
    else:
        usable = (info.st_mode & 0o007) == 0o007
    if not usable:
        raise PermissionError(
            f"{where} (owner uid {info.st_uid}, group gid {info.st_gid}, mode {stat.filemode(info.st_mode)}) "
            f"cannot be used by the workers' user (uid {uid}, gid {gid}): give it to that user "
            f"(chown {uid}:{gid}) or leave PROMETHEUS_MULTIPROC_DIR unset for a private directory"
        )
