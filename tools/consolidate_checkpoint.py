#!/usr/bin/env python
"""Consolidate a DeepSpeed ZeRO checkpoint (any stage, any number of ranks) into plain files.

    python tools/consolidate_checkpoint.py RUN_DIR_OR_CHECKPOINT --out DIR [--set key=value ...]

RUN_DIR_OR_CHECKPOINT is a run folder (its newest complete tag is taken), its checkpoints/
folder, or one tag folder (run/checkpoints/stepNNNNNNNN, which must carry the COMPLETE marker).
Runs in one process on the CPU; no process group, no launcher.

DIR receives:
    model.safetensors              the whole task's fp32 state dict (the task's load_state_dict)
    encoder_open_clip.safetensors  the CLIP encoder in open_clip's own layout (0-d logit_scale restored):
                                   open_clip.create_model(NAME, pretrained=PATH) or load_state_dict(strict=True)
    <arch>.json                    the open_clip architecture, when the run named one by a JSON file
                                   (register it with open_clip.add_model_config(PATH): NAME is its stem)
    item_embeddings.safetensors    {"item_embeddings": [num_items, embed_dim] float32}, L2-normalised item
                                   tower outputs; row i is item index i
    item_ids.json                  index -> raw item id (a copy of the shard folder's item_ids.json)
    consolidated.json              what each file is, shapes, source (run, tag, step), ZeRO stage,
                                   model name, number of items and each file's sha256; written last

The config is the run's config.json (or, if it is missing, the one saved in the checkpoint);
`--set` overrides keys as in launch/train.py, e.g. --set data.shards=/moved/shards. Relative
paths in the config that do not exist from the current folder are looked up from the repository
root (where training is normally launched).

This module is also the library behind tools/evaluate.py: `resolve_checkpoint`, `load_config_for`,
`consolidated_state_dict` and `load_task` turn a run folder or a tag into a ready task.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tools/...` from a checkout without an installed mmscale
    sys.path.append(str(REPO))

import mmscale.engine.distributed  # noqa: E402,F401  (chooses DeepSpeed's CPU accelerator without CUDA, then imports deepspeed)
import torch  # noqa: E402

from mmscale.config import Config, ConfigError, _build, _merge, parse_override, validate  # noqa: E402
from mmscale.data.format import ShardFormatError, load_manifest  # noqa: E402
from mmscale.data.item_store import ItemStore  # noqa: E402
from mmscale.engine import checkpoint as ckpt  # noqa: E402
from mmscale.eval.evaluate import Collectives, NonFiniteModelError, encode_catalogue  # noqa: E402
from mmscale.tasks import build_task as build_task_for_config  # noqa: E402

Log = Callable[[str], None]


CheckpointError = ckpt.CheckpointError  # the source is not a usable checkpoint (the tools exit with 2)

# Errors the command-line tools report as one line and exit status 2.
USER_ERRORS = (CheckpointError, ConfigError, ShardFormatError, FileNotFoundError, NonFiniteModelError)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- which checkpoint ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointRef:
    run_dir: Path  # the run folder (holds config.json); may lack one for a copied tag folder
    checkpoint_dir: Path  # run_dir/checkpoints
    tag: str  # stepNNNNNNNN

    @property
    def path(self) -> Path:
        return self.checkpoint_dir / self.tag


def resolve_checkpoint(source: str | Path) -> CheckpointRef:
    """A run folder, its checkpoints/ folder or a tag folder -> the complete tag to read."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint tag folder)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (expected a run folder or a checkpoint tag folder)")
    if ckpt.TAG.match(path.name) or any(path.glob("*_model_states.pt")):
        if not (path / ckpt.COMPLETE).is_file():
            raise CheckpointError(
                f"{path}: incomplete checkpoint (no {ckpt.COMPLETE} marker: its save did not finish on every rank); "
                f"complete tags here: {ckpt.complete_tags(path.parent) or 'none'}"
            )
        return CheckpointRef(path.parent.parent, path.parent, path.name)
    if (path / "checkpoints").is_dir():
        run_dir, checkpoint_dir = path, path / "checkpoints"
    elif path.name == "checkpoints" or any(ckpt.TAG.match(p.name) for p in path.iterdir()):
        run_dir, checkpoint_dir = path.parent, path
    else:
        raise CheckpointError(f"{path}: not a run folder (no checkpoints/ folder) nor a checkpoint tag folder")
    tag = ckpt.latest_complete(checkpoint_dir)
    if tag is None:
        incomplete = sorted(p.name for p in checkpoint_dir.iterdir() if ckpt.TAG.match(p.name))
        detail = f" (incomplete tags without {ckpt.COMPLETE}: {', '.join(incomplete)})" if incomplete else ""
        raise CheckpointError(f"{checkpoint_dir}: no complete checkpoint{detail}")
    return CheckpointRef(run_dir, checkpoint_dir, tag)


def _model_states_file(tag_dir: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file (*_model_states.pt)")


def checkpoint_info(ref: CheckpointRef) -> dict:
    """What rank 0 recorded with the tag: step, ZeRO stage, ranks, DeepSpeed version, the config. Every file of
    the tag is verified first: nothing in it is unpickled."""
    ckpt.verify_tag(ref.path)
    with ckpt.safe_loading():
        states = torch.load(_model_states_file(ref.path), map_location="cpu", weights_only=True, mmap=True)
    ds_config = states.get("ds_config") or {}
    step = states.get("step", states.get("global_steps"))
    return {
        "step": int(step) if step is not None else int(ckpt.TAG.match(ref.tag).group(1)),
        "zero_stage": int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        "world_size": states.get("dp_world_size"),
        "precision": "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32",
        "deepspeed_version": str(states.get("ds_version")),
        "samples_seen": states.get("samples_seen"),
        "config": states.get("config"),
    }


# -- which config ----------------------------------------------------------------------------------
def _existing(path: str) -> str:
    """A relative path that does not exist from here is taken from the repository root, if it exists there."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (REPO / p).exists():
        return path
    return str(REPO / p)


def load_config_for(ref: CheckpointRef, overrides: list[str] = (), info: dict | None = None) -> Config:
    """The run's config.json (else the checkpoint's saved config) <- `--set` overrides, validated."""
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
    for text in overrides:
        values = _merge(values, parse_override(text))
    config = _build(Config, values)
    validate(config)
    config.data.shards = _existing(config.data.shards)
    if Path(config.encoder.model).suffix == ".json":
        config.encoder.model = _existing(config.encoder.model)
    config.encoder.pretrained = None  # the checkpoint's weights replace any initial ones
    return config


# -- which weights ---------------------------------------------------------------------------------
def consolidated_state_dict(ref: CheckpointRef, info: dict | None = None) -> dict[str, torch.Tensor]:
    """The task's full fp32 state dict, merged from every rank's ZeRO partitions (stages 1-3).

    ZeRO's fp32 master weights are used, so a bf16 run gives its fp32 weights, not the bf16 copies.
    """
    info = info or checkpoint_info(ref)
    if info["zero_stage"] == 0:  # no ZeRO: the model states hold the whole module
        with ckpt.safe_loading():
            states = torch.load(_model_states_file(ref.path), map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed prints progress (stdout stays for results); its loads are weights-only here
    with contextlib.redirect_stdout(sys.stderr), ckpt.safe_loading():
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ref.checkpoint_dir), tag=ref.tag)
        except ValueError as e:  # e.g. fewer optimizer shards than ranks
            raise CheckpointError(f"{ref.path}: {e}") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# One process holds every rank's share: the collectives of mmscale.eval are identities.
SINGLE_PROCESS = Collectives(0, 1, lambda x: x, lambda x: x)


@dataclass
class LoadedCheckpoint:
    ref: CheckpointRef
    info: dict
    config: Config
    manifest: dict
    task: torch.nn.Module
    state_dict: dict[str, torch.Tensor]
    device: torch.device
    num_workers: int
    _content: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def step(self) -> int:
        return self.info["step"]

    @property
    def shard_dir(self) -> Path:
        return Path(self.config.data.shards)

    def catalogue_content(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, text, has_image) of every item through the encoder, computed once."""
        if self._content is None:
            store = ItemStore(self.shard_dir, self.manifest)
            self._content = encode_catalogue(self.task, store, self.task.encoder.preprocess(), SINGLE_PROCESS, self.device,
                                             self.config.eval.batch_size, self.num_workers)
        return self._content


def build_task(config: Config, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[torch.nn.Module, dict]:
    """The task of `config` (sizes from its shard manifest) holding `state_dict`, in eval mode on the CPU."""
    manifest = load_manifest(config.data.shards)
    task = build_task_for_config(config, manifest, config.data.shards)
    try:
        task.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source} does not fit the task built from its config and shards {config.data.shards} "
            f"({manifest['num_users']} users, {manifest['num_items']} items): {e}"
        ) from e
    return task.eval(), manifest


def load_task(source: str | Path, overrides: list[str] = (), device: str | torch.device = "cpu",
              num_workers: int | None = None, log: Log = _stderr) -> LoadedCheckpoint:
    """Run folder or tag -> the task rebuilt from the run's config with the checkpoint's fp32 weights,
    on `device`, in the state the trainer had it at that step (encoder frozen and its content cached
    when the paradigm had frozen it by then)."""
    ref = resolve_checkpoint(source)
    log(f"checkpoint: {ref.path}")
    info = checkpoint_info(ref)
    config = load_config_for(ref, overrides, info)
    log(f"consolidating ZeRO-{info['zero_stage']} partitions of {info['world_size']} rank(s) at step {info['step']}")
    state = consolidated_state_dict(ref, info)
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise NonFiniteModelError(f"{ref.path}: {len(broken)} tensor(s) hold NaN or inf (e.g. {', '.join(broken[:3])}): the run "
                                  f"diverged; no metrics or exports from a broken model")
    log(f"rebuilding the task ({config.encoder.kind} {config.encoder.model}) on shards {config.data.shards}")
    task, manifest = build_task(config, state, str(ref.path))
    device = torch.device(device)
    workers = config.data.num_workers if num_workers is None else num_workers
    loaded = LoadedCheckpoint(ref, info, config, manifest, task.to(device), state, device, workers)
    if task.content_cache_due(loaded.step, resumed=True):
        saved = ckpt.load_content_cache(ref.path, device)
        log(f"step {loaded.step}: the trainer had cached every item's content by then; "
            f"{'loading its cache from the checkpoint' if saved else 'encoding it as the trainer did'}")
        task.set_content_cache(*(saved or loaded.catalogue_content()))
    return loaded


# -- exports ---------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Reproducible bytes: safetensors orders tensors by name; its metadata map has no fixed order, so
    it holds the one key loaders look for (descriptions live in consolidated.json)."""
    from safetensors.torch import save_file

    # safetensors refuses shared or strided storage: one contiguous copy per name
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(plain, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; exports are meant to be shared
    os.replace(tmp, path)


def open_clip_name(config: Config) -> str:
    """The name open_clip.create_model knows the encoder by (an architecture JSON registers as its stem)."""
    model = Path(config.encoder.model)
    return model.stem if model.suffix == ".json" else config.encoder.model


def open_clip_state_dict(task: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights in open_clip's layout: no `encoder.clip.` prefix, 0-d parameters restored."""
    return task.encoder.open_clip_state_dict()


@torch.no_grad()
def item_embeddings(loaded: LoadedCheckpoint) -> torch.Tensor:
    """[num_items, embed_dim] float32 item tower outputs of the whole catalogue, row = item index."""
    content = loaded.catalogue_content() if loaded.task.uses_catalogue_content else None
    return loaded.task.ranking(content).items.float().cpu()


def consolidate(source: str | Path, out_dir: str | Path, overrides: list[str] = (), device: str = "cpu",
                num_workers: int | None = None, log: Log = _stderr) -> dict:
    """Writes the exports of `source` (run folder or tag) into out_dir; returns consolidated.json's content."""
    out = Path(out_dir)
    loaded = load_task(source, overrides, device, num_workers, log)
    ref, info, config = loaded.ref, loaded.info, loaded.config
    out.mkdir(parents=True, exist_ok=True)
    (out / "consolidated.json").unlink(missing_ok=True)  # a half-rewritten folder has no index
    files: dict[str, dict] = {}

    def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in tensors.items()}

    log(f"writing model.safetensors ({len(loaded.state_dict)} tensors)")
    _save_safetensors(loaded.state_dict, out / "model.safetensors")
    files["model.safetensors"] = {
        "what": "the whole task's fp32 state dict (the task's load_state_dict, strict)",
        "tensors": len(loaded.state_dict),
        "parameters": sum(v.numel() for v in loaded.state_dict.values()),
        "shapes": shapes(loaded.state_dict),
    }

    open_clip_info = None
    if config.encoder.kind == "clip" and getattr(loaded.task, "encoder", None) is not None:
        name = open_clip_name(config)
        encoder_state = open_clip_state_dict(loaded.task)
        log(f"writing encoder_open_clip.safetensors (open_clip '{name}', {len(encoder_state)} tensors)")
        _save_safetensors(encoder_state, out / "encoder_open_clip.safetensors")
        files["encoder_open_clip.safetensors"] = {
            "what": f"the item encoder as an open_clip state dict: open_clip.create_model('{name}', pretrained=<this file>)",
            "tensors": len(encoder_state),
            "shapes": shapes(encoder_state),
        }
        open_clip_info = {"model_name": name}
        arch = Path(config.encoder.model)
        if arch.suffix == ".json":
            shutil.copyfile(arch, out / arch.name)
            files[arch.name] = {"what": f"the open_clip architecture: open_clip.add_model_config(<this file>) registers '{name}'"}
            open_clip_info["architecture_file"] = arch.name
    else:
        log("no CLIP encoder in this task: no open_clip export")

    log(f"encoding the catalogue ({loaded.manifest['num_items']} items) for item_embeddings.safetensors")
    table = item_embeddings(loaded)
    _save_safetensors({"item_embeddings": table}, out / "item_embeddings.safetensors")
    files["item_embeddings.safetensors"] = {
        "what": "item tower embeddings of the whole catalogue, L2-normalised; row i is item index i "
                "(raw id: item_ids.json[i]); score a user by user_embedding @ item_embeddings.T",
        "shapes": {"item_embeddings": list(table.shape)},
        "dtype": "float32",
    }
    ids_src = loaded.shard_dir / "item_ids.json"
    if ids_src.is_file():
        shutil.copyfile(ids_src, out / "item_ids.json")
        files["item_ids.json"] = {"what": f"item index -> raw item id (copy of {ids_src})"}

    for name, entry in files.items():
        entry["sha256"] = sha256(out / name)
        entry["bytes"] = (out / name).stat().st_size
    record = {
        "format": "mmscale-consolidated/1",
        "source": {
            "run_dir": str(ref.run_dir.resolve()), "checkpoint": str(ref.path.resolve()), "tag": ref.tag, "step": info["step"],
            "samples_seen": info["samples_seen"], "zero_stage": info["zero_stage"], "world_size": info["world_size"],
            "precision": info["precision"], "deepspeed_version": info["deepspeed_version"],
        },
        "zero_stage": info["zero_stage"],
        "model": {"task": config.task, "encoder_kind": config.encoder.kind, "encoder_model": config.encoder.model,
                  "open_clip": open_clip_info, "embed_dim": int(table.shape[1]),
                  "encoder_embed_dim": loaded.task.encoder.embed_dim if getattr(loaded.task, "encoder", None) is not None else None},
        "num_items": loaded.manifest["num_items"],
        "num_users": loaded.manifest["num_users"],
        "shards": str(loaded.shard_dir),
        "config": config.to_dict(),
        "files": files,
    }
    tmp = out / "consolidated.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / "consolidated.json")
    log(f"done: {out}")
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="run folder (newest complete tag) or a tag folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; our files in it are replaced)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's config, e.g. --set data.shards=PATH (repeatable)")
    p.add_argument("--device", default="cpu", help="device for encoding the catalogue (default: cpu)")
    p.add_argument("--num-workers", type=int, help="data workers for encoding the catalogue (default: data.num_workers)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = consolidate(args.source, args.out, args.overrides, args.device, args.num_workers)
    except USER_ERRORS as e:
        print(f"consolidate_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(Path(args.out)), "tag": record["source"]["tag"], "step": record["source"]["step"],
                      "files": {k: v["sha256"] for k, v in record["files"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
