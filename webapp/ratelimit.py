"""A per-client request rate limit that holds across all Gunicorn workers together.

A per-worker limit would let a client through `workers` times too often, so the
buckets live in one small shared file (RATE_LIMIT_STATE, RAM-backed by
default) that every worker maps. Each client hashes to a slot of 32 bytes:
(client hash, tokens, last update). A POSIX byte-range lock on just that slot
makes the read-modify-write atomic across processes; a thread lock does the
same between threads of one process (gthread), since POSIX locks belong to the
process. Token bucket: capacity RATE_LIMIT_RPM, refilled at RATE_LIMIT_RPM per
minute. Four probes per hash; if all four slots are busy with other recent
clients, they share a bucket (rare; errs on the strict side).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import struct
import threading
import time
from dataclasses import dataclass

SLOTS = 4096
_SLOT = struct.Struct("<Qdd8x")  # client hash, tokens, updated (unix seconds), padding to 32 bytes
_PROBES = 4


@dataclass(frozen=True)
class Decision:
    """Whether a request may go ahead, and if not, how long to wait."""

    allowed: bool
    retry_after_s: int = 0


class SharedRateLimiter:
    """Token buckets per client in a file shared by every worker of a master."""

    def __init__(self, path: str, requests_per_minute: int) -> None:
        self.capacity = float(requests_per_minute)
        self.refill_per_s = requests_per_minute / 60.0
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < SLOTS * _SLOT.size:
            os.ftruncate(fd, SLOTS * _SLOT.size)
        self._fd = fd
        self._thread_lock = threading.Lock()

    def _slot_key(self, client: str) -> tuple[int, int]:
        digest = hashlib.blake2b(client.encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "little") or 1
        return key, key % SLOTS

    def check(self, client: str, now: float | None = None) -> Decision:
        """Take one token from `client`'s bucket if there is one."""
        now = time.time() if now is None else now
        key, first = self._slot_key(client)
        with self._thread_lock:
            for probe in range(_PROBES):
                index = (first + probe) % SLOTS
                offset = index * _SLOT.size
                fcntl.lockf(self._fd, fcntl.LOCK_EX, _SLOT.size, offset)
                try:
                    owner, tokens, updated = _SLOT.unpack(os.pread(self._fd, _SLOT.size, offset))
                    idle = now - updated
                    stale = owner == 0 or idle * self.refill_per_s >= self.capacity
                    if owner != key and not stale and probe < _PROBES - 1:
                        continue  # another recent client: look further
                    if owner != key and stale:
                        tokens, updated = self.capacity, now
                    tokens = min(self.capacity, tokens + max(0.0, now - updated) * self.refill_per_s)
                    allowed = tokens >= 1.0
                    if allowed:
                        tokens -= 1.0
                    os.pwrite(self._fd, _SLOT.pack(key, tokens, now), offset)
                finally:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, _SLOT.size, offset)
                if allowed:
                    return Decision(True)
                return Decision(False, max(1, math.ceil((1.0 - tokens) / self.refill_per_s)))
        raise AssertionError("unreachable: the last probe always decides")
