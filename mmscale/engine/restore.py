"""From a run folder or a checkpoint tag back to a ready task, in one process, without a launcher.

    loaded = load_task("runs/demo")                       # the run's newest usable tag
    loaded = load_task("runs/demo/checkpoints/step00000400", overrides=["data.shards=/moved/shards"])
    ranking = loaded.task.ranking(loaded.catalogue_content())

Which tag (checkpoint.resolve_source), which config (the run's config.json, else the one saved in the tag,
with `--set` overrides), which weights (every rank's ZeRO partitions merged into fp32: a bf16 run gives its fp32
master weights), and the task rebuilt in the state the trainer had it at that step (its content cache, if it
had one). Nothing in the checkpoint is unpickled (checkpoint.verify_tag, checkpoint.safe_loading).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Config, ConfigError, config_from_values
from ..data.format import SPLITS, ShardFormatError
from ..data.shard_set import ShardSet
from ..eval.evaluate import NonFiniteModelError, encode_catalogue, evaluate, single_process
from ..models import build_preprocess
from ..models.pretrained import MissingWeightsError
from ..tasks import Task, build_task
from . import checkpoint
from .checkpoint import CheckpointError, CheckpointRef
from .distributed import deepspeed  # noqa: F401  (chooses DeepSpeed's CPU accelerator without CUDA before deepspeed loads)

REPO = Path(__file__).resolve().parents[2]
Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def checkpoint_info(ref: CheckpointRef) -> dict:
    """What rank 0 recorded with the tag: step, ZeRO stage, ranks, DeepSpeed version, the config. Every file of
    the tag is verified first: nothing in it is unpickled."""
    checkpoint.verify_tag(ref.path)
    with checkpoint.safe_loading():
        states = torch.load(checkpoint.model_states_file(ref.path), map_location="cpu", weights_only=True, mmap=True)
    ds_config = states.get("ds_config") or {}
    step = states.get("step", states.get("global_steps"))
    return {
        "step": int(step) if step is not None else int(checkpoint.TAG.match(ref.tag).group(1)),
        "zero_stage": int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        "world_size": states.get("dp_world_size"),
        "precision": "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32",
        "deepspeed_version": str(states.get("ds_version")),
        "samples_seen": states.get("samples_seen"),
        "config": states.get("config"),
    }


def _existing(path: str) -> str:
    """A relative path that does not exist from here is taken from the repository root, if it exists there
    (where training is normally launched)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (REPO / p).exists():
        return path
    return str(REPO / p)


def run_config(ref: CheckpointRef, overrides: list[str] = (), info: dict | None = None) -> Config:
    """The run's config.json (else the checkpoint's saved config) <- `--set` overrides, validated; the
    checkpoint's weights replace any initial ones (encoder.pretrained is dropped)."""
    path = ref.run_dir / "config.json"
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    else:
        values = (info or checkpoint_info(ref)).get("config")
        if not values:
            raise CheckpointError(f"{path} is missing and {ref.path} carries no saved config")
    config = config_from_values(values, overrides)
    config.data.shards = _existing(config.data.shards)
    if Path(config.encoder.model).suffix == ".json":
        config.encoder.model = _existing(config.encoder.model)
    config.encoder.pretrained = None
    return config


def consolidated_state_dict(ref: CheckpointRef, info: dict | None = None) -> dict[str, torch.Tensor]:
    """The task's full fp32 state dict, merged from every rank's ZeRO partitions (stages 0-3); a tensor with NaN or
    inf is refused (the run diverged)."""
    info = info or checkpoint_info(ref)
    if info["zero_stage"] == 0:  # no ZeRO: the model states hold the whole module
        with checkpoint.safe_loading():
            state = checkpoint.stage0_weights(torch.load(checkpoint.model_states_file(ref.path), map_location="cpu", weights_only=True))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed prints progress (stdout stays for results); its loads are weights-only here
        with contextlib.redirect_stdout(sys.stderr), checkpoint.safe_loading():
            try:
                state = get_fp32_state_dict_from_zero_checkpoint(str(ref.checkpoint_dir), tag=ref.tag)
            except ValueError as e:  # e.g. fewer optimizer shards than ranks
                raise CheckpointError(f"{ref.path}: {e}") from e
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise NonFiniteModelError(f"{ref.path}: {len(broken)} tensor(s) hold NaN or inf (e.g. {', '.join(broken[:3])}): the run "
                                  f"diverged; no metrics or exports from a broken model")
    return state


def task_with_weights(config: Config, shards: ShardSet, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> Task:
    """The task of `config` on `shards` holding `state_dict` (strict), in eval mode on the CPU."""
    task = build_task(config, shards)
    try:
        task.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit the task built from its config and shards {shards.path} "
                              f"({shards.num_users} users, {shards.num_items} items): {e}") from e
    return task.eval()


@dataclass
class LoadedCheckpoint:
    ref: CheckpointRef
    info: dict
    config: Config
    shards: ShardSet
    task: Task
    state_dict: dict[str, torch.Tensor]
    device: torch.device
    num_workers: int
    _content: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def step(self) -> int:
        return self.info["step"]

    def catalogue_content(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, text, has_image) of every item through the encoder, computed once."""
        if self._content is None:
            self._content = encode_catalogue(self.task, self.shards.store, self.task.encoder.preprocess(), single_process(),
                                             self.device, self.config.eval.batch_size, self.num_workers)
        return self._content


def load_task(source: str | Path, overrides: list[str] = (), device: str | torch.device = "cpu",
              num_workers: int | None = None, log: Log = log_to_stderr) -> LoadedCheckpoint:
    """Run folder or tag -> the task rebuilt from the run's config with the checkpoint's fp32 weights, on `device`,
    in the state the trainer had it at that step (its content cache restored from the tag, or encoded as the
    trainer did for a tag saved without one)."""
    ref = checkpoint.resolve_source(source, log)
    log(f"checkpoint: {ref.path}")
    info = checkpoint_info(ref)
    config = run_config(ref, overrides, info)
    log(f"consolidating ZeRO-{info['zero_stage']} partitions of {info['world_size']} rank(s) at step {info['step']}")
    state = consolidated_state_dict(ref, info)
    log(f"rebuilding the task ({config.encoder.kind} {config.encoder.model}) on shards {config.data.shards}")
    shards = ShardSet.open(config.data.shards)
    task = task_with_weights(config, shards, state, str(ref.path))
    device = torch.device(device)
    workers = config.data.num_workers if num_workers is None else num_workers
    loaded = LoadedCheckpoint(ref, info, config, shards, task.to(device), state, device, workers)
    if task.content_cache_due(loaded.step, resumed=True):
        saved = checkpoint.load_content_cache(ref.path, device)
        log(f"step {loaded.step}: the trainer had cached every item's content by then; "
            f"{'loading its cache from the checkpoint' if saved else 'encoding it as the trainer did'}")
        task.set_content_cache(*(saved or loaded.catalogue_content()))
    return loaded


def evaluate_checkpoint(source: str | Path, splits: list[str] | None = None, exclude_seen: bool | None = None,
                        overrides: list[str] = (), device: str | None = None, num_workers: int | None = None,
                        log: Log = log_to_stderr) -> dict:
    """Rebuilds the task of `source` and evaluates it in this process: {"checkpoint", "tag", "step", "exclude_seen",
    "device", "eval": {split: {metric: value}}}, the numbers the trainer logged (fp32: exactly)."""
    overrides = list(overrides)
    if splits is not None:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise ConfigError(f"--splits: unknown split(s) {unknown} (known: {list(SPLITS)})")
        overrides.append(f"eval.splits={json.dumps(splits)}")
    if exclude_seen is not None:
        overrides.append(f"eval.exclude_seen={'true' if exclude_seen else 'false'}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_task(source, overrides, device, num_workers, log)
    config, task = loaded.config, loaded.task
    log(f"evaluating splits {list(config.eval.splits)} on {device} (exclude_seen={config.eval.exclude_seen})")
    results = evaluate(task, loaded.shards, config.eval, build_preprocess(config.encoder), single_process(), device, loaded.num_workers)
    missing = [s for s in config.eval.splits if s not in results]
    if missing:
        log(f"note: no samples for split(s) {missing} in {loaded.shards.path}")
    return {
        "checkpoint": str(loaded.ref.path), "tag": loaded.ref.tag, "step": loaded.step,
        "exclude_seen": config.eval.exclude_seen, "device": str(device), "eval": results,
    }


# Errors the command-line tools report as one line and exit status 2.
USER_ERRORS = (CheckpointError, ConfigError, ShardFormatError, FileNotFoundError, NonFiniteModelError, MissingWeightsError)
