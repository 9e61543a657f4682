"""For tests that build a Trainer in the pytest process: the process-wide state it sets, put back afterwards."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def process_state_restored():
    """Afterwards the launcher variables, torch threads and deterministic-algorithm settings a Trainer sets are as
    before (later tests' subprocesses would inherit the rendezvous variables)."""
    env_before, threads = dict(os.environ), torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.utils.deterministic.fill_uninitialized_memory)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[2]
