"""DeepSpeed config = engine settings from ds_configs/*.json + what the mmscale config decides.

The JSON holds ZeRO stage, buckets and offload only. Batch sizes, clipping and precision
come from the mmscale config and are injected; a JSON that says otherwise is an error.
The optimizer and scheduler are built by mmscale (separate learning rates per part).
On one rank, ZeRO-1 and ZeRO-2 without offload run as stage 0: there is nothing to partition (unless the run
resumes from a universal checkpoint, which only ZeRO stages load).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import Config, ConfigError


def build_deepspeed_config(config: Config, world_size: int, bf16: bool, load_universal: bool = False) -> dict:
    """`load_universal`: the run resumes from a universal checkpoint (another world size or stage): DeepSpeed loads it
    into the configured ZeRO stage, which then runs as configured on one rank too."""
    path = Path(config.train.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: {path} does not exist")
    # Under `accelerate launch` with a DeepSpeed accelerate config, both name a file: they must agree.
    launcher_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if launcher_file and launcher_file != "none" and Path(launcher_file).resolve() != path.resolve():
        raise ConfigError(f"train.deepspeed_config: {path} contradicts the accelerate config's deepspeed_config_file {launcher_file}")
    try:
        ds = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON ({e})") from e
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config: {path} is not a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds.get("zero_optimization", {}), dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{path}: '{section}' is set by the mmscale config (optim.*); remove it from the DeepSpeed config")
    injected = {
        "train_micro_batch_size_per_gpu": (config.data.batch_size, "data.batch_size"),
        "gradient_accumulation_steps": (config.optim.grad_accum, "optim.grad_accum"),
        "train_batch_size": (config.data.batch_size * config.optim.grad_accum * world_size, "data.batch_size x optim.grad_accum x ranks"),
        "gradient_clipping": (config.optim.grad_clip, "optim.grad_clip"),
    }
    for key, (value, source) in injected.items():
        if key in ds and ds[key] not in (value, "auto"):
            raise ConfigError(f"{path}: {key}={ds[key]} contradicts the mmscale config ({source} gives {value})")
        ds[key] = value
    for key, wanted in (("bf16", bf16), ("fp16", False)):
        enabled = ds.get(key, {}).get("enabled", wanted)
        if enabled not in (wanted, "auto"):
            raise ConfigError(f"{path}: {key}.enabled={enabled} contradicts train.precision ({'bf16' if bf16 else 'fp32'} here)")
        ds[key] = {**ds.get(key, {}), "enabled": wanted}
    if bf16:  # DeepSpeed casts the weights only: BatchNorm's statistics and the task's float buffers follow them
        ds["data_types"] = {"buffer_dtype": "bf16", **ds.get("data_types", {})}
    ds.setdefault("steps_per_print", 10**9)  # mmscale logs; DeepSpeed's own prints stay quiet
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    elif runs_as_stage(stage, world_size, offloads_optimizer(ds)) != stage:
        ds["zero_optimization"] = {"stage": 0}
    return ds


def runs_as_stage(stage: int, world_size: int, offload: bool = False) -> int:
    """The ZeRO stage the engine runs: one rank has nothing to partition, so stages 1 and 2 without offload would
    only copy every gradient into buckets and the updated weights out of a flat copy, each step (17% of a ViT-B-32
    step on 2 CPU cores, tools/bench_train.py), and run as stage 0. ZeRO-3 and offload still change what one rank
    holds, and are kept."""
    return 0 if world_size == 1 and stage in (1, 2) and not offload else stage


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
