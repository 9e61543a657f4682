"""What a process does before a DataLoader forks its workers."""

from __future__ import annotations

import ctypes
import signal


def release_free_heap() -> None:
    """Gives the free pages of this process's heap back to the OS (glibc's malloc_trim); nothing elsewhere.

    A forked worker shares its parent's pages until the parent writes them. The trainer writes its freed heap again
    every step (activations), so a worker forked over a large free heap ends up with a private copy of all of it: MP4SR
    joint with every item each step on ml100k-mm had a 9.1 GB loader worker beside its 10 GB trainer."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def leave_sigterm_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker_init_fn: the worker ignores SIGTERM. A scheduler's preemption notice reaches every process of
    the job; a worker it ended would stop its trainer mid-step ("DataLoader worker ... is killed by signal") before the
    trainer saves at the next step boundary. The worker still ends with its trainer (the loader's shutdown, or its
    watchdog on the parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
