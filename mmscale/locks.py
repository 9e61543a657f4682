"""One writer per folder: an exclusive flock on a lock file, naming its holder for whoever finds it taken."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO


def try_lock(path: Path) -> tuple[IO | None, str | None]:
    """(the open lock file, None) when this process now holds the lock, kept while that file stays open;
    (None, who holds it) when another process does. The kernel drops the lock when its holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "holder unknown"
        lock.close()
        return None, holder
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock, None
