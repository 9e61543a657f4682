"""open_clip_train.main as tools/bench_train.py runs it: in open_clip_train's own environment, with
one fix for CPU ranks.

    PEER_PYTHON tools/_bench_common.py OPEN_CLIP_TRAIN_ARGS...
    PEER_PYTHON -m torch.distributed.run --nproc_per_node N tools/_bench_common.py OPEN_CLIP_TRAIN_ARGS...

open_clip_train wraps the model as DistributedDataParallel(model, device_ids=[device]), which torch
refuses for a module on the CPU (device_ids must be None there), so it cannot train on several CPU
ranks as released. Here device_ids is dropped for CPU modules; nothing else changes. Imports only
torch and open_clip_train (this file runs under the peer environment's interpreter).
"""

import runpy

import torch


class CpuFriendlyDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, *args, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        super().__init__(module, None if on_cpu else device_ids, *args, **kwargs)


if __name__ == "__main__":
    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP  # looked up by open_clip_train.main at call time
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
