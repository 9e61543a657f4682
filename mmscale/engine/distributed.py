"""Process-group setup and the collectives the rest of mmscale is handed as plain functions.

Without CUDA, DeepSpeed's CPU accelerator and gloo are chosen here, before deepspeed is
first imported, so `python launch/train.py` and `deepspeed --num_gpus 2 ...` both work on a laptop.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (after the accelerator choice)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Joins (or, for a plain `python` run, creates) the process group; sets threads per rank."""
    if "RANK" not in os.environ:  # one process, no launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:
        # Oversubscribed torch threads make CPU ranks several times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    cuda = torch.cuda.is_available()
    backend, timeout = ("nccl" if cuda else "gloo"), timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if not dist.is_initialized() and attempt not in (None, "0"):
        # A torchrun restart reuses its agent's store, where the dead round's process groups left their
        # peers' addresses under the same names; a prefix per attempt keeps the new groups from meeting them.
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend, store=dist.PrefixStore(f"mmscale/attempt{attempt}", store), rank=rank,
                                world_size=world_size, timeout=timeout)
    if not deepspeed.comm.is_initialized():  # wraps a process group made above, or makes one
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    global _host_group
    # Host-side flags (stop requested, save failed) travel over gloo: no device synchronisation per step.
    _host_group = dist.new_group(backend="gloo") if cuda and dist.get_world_size() > 1 else None
    global _ranks
    _ranks = [None] * dist.get_world_size()
    dist.all_gather_object(_ranks, (socket.gethostname(), os.getpid()))
    _unlink_shared_memory_name(dist.get_rank())  # every rank has attached: it has reached this gather
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, device)


def use_deterministic_algorithms(enabled: bool) -> None:
    """Process-wide: torch's deterministic kernels where it has them, a warning naming any op that has none. On CUDA,
    cuBLAS needs a fixed workspace for that (read when its first handle is made, so before any matmul).

    Torch would also fill every new tensor's memory, which no kernel here reads unwritten: on ml100k (MP4SR
    joint, tiny CLIP, 2 CPU threads) that fill cost 5% of the step (about 347 against 380 samples/s)."""
    if enabled and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def shutdown_distributed() -> None:
    """Destroys the process group, if one was made. A process that exits with gloo's worker threads still running
    may abort in interpreter shutdown ("terminate called without an active exception", SIGABRT): seen here on
    error exits, which then lost their exit status."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _unlink_shared_memory_name(rank: int) -> None:
    """DeepSpeed's CPU all-reduce creates a /dev/shm buffer per rank when all ranks share a host (named in its
    csrc/cpu/comm/shm.cpp by user, MASTER_ADDR, MASTER_PORT and rank) and never unlinks it: 66 MB of RAM per rank stay
    after every run, clean exits included, until a reboot. Once every rank has mapped it, its name can go; the memory
    lives while a rank does."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    with contextlib.suppress(FileNotFoundError):
        (Path("/dev/shm") / name).unlink()


_host_group = None
_ranks: list[tuple[str, int]] = []  # (host, pid) of every rank, learnt at start: who is gone when a collective fails


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped by its launcher
    except psutil.NoSuchProcess:
        return True


EXIT_GRACE_S = 5.0  # a killed process's sockets close before it is a zombie: its peers' reads fail while it exits


def lost_ranks(grace_s: float = EXIT_GRACE_S) -> str | None:
    """After a collective failed: names the ranks of this host that have exited, waiting up to `grace_s` for one
    to finish exiting (a rank on another node is named by that node's launcher). None when all of them still run:
    the error is then not ours to name."""
    host = socket.gethostname()
    deadline = time.monotonic() + grace_s
    while True:
        gone = [f"rank {rank} (pid {pid} on {host})" for rank, (rank_host, pid) in enumerate(_ranks) if rank_host == host and _exited(pid)]
        if gone or time.monotonic() >= deadline:
            return f"lost {', '.join(gone)}: it exited while the others waited for it" if gone else None
        time.sleep(0.1)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (a CPU all-reduce; cheap enough for every step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(value.item())


def gather(x: torch.Tensor, uneven: bool = False) -> torch.Tensor:
    """All-gather along dim 0, with gradient when x needs one (backward sums across ranks).

    uneven=True: ranks may hold different numbers of rows (a batch's distinct items). The sizes travel over the
    host group (a shape is host-side: no device sync), rows are padded to the largest, gathered and unpadded.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if uneven:
        sizes = torch.zeros(dist.get_world_size(), dtype=torch.int64)
        sizes[dist.get_rank()] = len(x)
        dist.all_reduce(sizes, group=_host_group)
        longest = int(sizes.max())
        padded = torch.cat([x, x.new_zeros((longest - len(x), *x.shape[1:]))]) if len(x) < longest else x
        rows = gather(padded)
        return torch.cat([rows[r * longest : r * longest + int(n)] for r, n in enumerate(sizes)])
    if x.requires_grad:
        return torch.cat(dist_fn.all_gather(x), dim=0)
    if x.dtype == torch.bool:  # gloo has no bool collectives
        return gather(x.to(torch.uint8)).bool()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_to_all(x: torch.Tensor, send_sizes: list[int], receive_sizes: list[int]) -> torch.Tensor:
    """All-to-all along dim 0: rows [sum(send_sizes[:r]), +send_sizes[r]) of x go to rank r; what each rank sends this
    one (receive_sizes[r] rows from rank r) comes back laid end to end in rank order. No gradient."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if x.dtype == torch.bool:  # gloo has no bool collectives
        return all_to_all(x.to(torch.uint8), send_sizes, receive_sizes).bool()
    out = x.new_empty((sum(receive_sizes), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive_sizes, input_split_sizes=send_sizes)
    return out


def average_gradients_in_backward(module: torch.nn.Module) -> None:
    """Averages `module`'s gradients over the ranks during the backward, bucket by bucket as each bucket's gradients
    are complete, with torch DDP's reducer (`replicate`: no wrapper module, so parameter names and state-dict keys
    stay). The process group runs each all-reduce in its own threads beside the rest of the backward, where
    DeepSpeed's stage 0 all-reduces once the backward is over. Parameters a step does not use (the encoder once
    fine_tuned has frozen it, a modality expert with no input) are found in every forward. Gradients are views of
    the reducer's buckets, so the buckets are not a second copy of them. Nothing is broadcast: DeepSpeed's
    initialisation has sent rank 0's weights, and buffers stay per rank as under DeepSpeed."""
    from torch.distributed._composable import replicate

    replicate(module, find_unused_parameters=True, gradient_as_bucket_view=True, forward_sync_buffers=False, init_sync=False)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """A CPU tensor travels over the host group: NCCL, the default group on GPUs, refuses CPU tensors."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, group=_host_group if x.device.type == "cpu" else None)
    return x


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
