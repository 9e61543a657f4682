"""A checkpoint (any ZeRO stage, any number of ranks) turned into plain files other tools load.

OUT receives:
    model.safetensors              the whole task's fp32 state dict (the task's load_state_dict, strict)
    <the encoder's own export>     e.g. encoder_open_clip.safetensors for CLIP (open_clip.create_model(NAME,
                                   pretrained=PATH)) with its architecture JSON beside it, or
                                   encoder_vlmo_release.safetensors for VLMo (the public release's names)
    item_embeddings.safetensors    {"item_embeddings": [num_items, embed_dim] float32}: the ranking's item table,
                                   L2-normalised; row i is item index i
    item_ids.json                  index -> raw item id (a copy of the shard folder's item_ids.json)
    consolidated.json              what each file is, shapes, source (run, tag, step), ZeRO stage, model, number of
                                   items and each file's sha256; written last
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..data.format import file_sha256
from .restore import Log, LoadedCheckpoint, load_task, log_to_stderr


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
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


@torch.no_grad()
def item_embeddings(loaded: LoadedCheckpoint) -> torch.Tensor:
    """[num_items, embed_dim] float32: the task's ranking table of the whole catalogue, row = item index."""
    content = loaded.catalogue_content() if loaded.task.uses_catalogue_content else None
    return loaded.task.ranking(content).items.float().cpu()


def consolidate(source: str | Path, out_dir: str | Path, overrides: list[str] = (), device: str = "cpu",
                num_workers: int | None = None, log: Log = log_to_stderr) -> dict:
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
    save_safetensors(loaded.state_dict, out / "model.safetensors")
    files["model.safetensors"] = {
        "what": "the whole task's fp32 state dict (the task's load_state_dict, strict)",
        "tensors": len(loaded.state_dict),
        "parameters": sum(v.numel() for v in loaded.state_dict.values()),
        "shapes": shapes(loaded.state_dict),
    }

    encoder_info = None
    if loaded.task.encoder is not None:
        export = loaded.task.encoder.export()
        log(f"writing {export.filename} ({len(export.state)} tensors)")
        save_safetensors(export.state, out / export.filename)
        files[export.filename] = {"what": export.what, "tensors": len(export.state), "shapes": shapes(export.state)}
        for name, content in export.files.items():
            (out / name).write_bytes(content)
            files[name] = {"what": f"the encoder's architecture, needed to load {export.filename}"}
        encoder_info = export.info
    else:
        log("no item encoder in this task: no encoder export")

    log(f"encoding the catalogue ({loaded.shards.num_items} items) for item_embeddings.safetensors")
    table = item_embeddings(loaded)
    save_safetensors({"item_embeddings": table}, out / "item_embeddings.safetensors")
    files["item_embeddings.safetensors"] = {
        "what": "the ranking's item table of the whole catalogue, L2-normalised; row i is item index i "
                "(raw id: item_ids.json[i]); score a user by user_embedding @ item_embeddings.T",
        "shapes": {"item_embeddings": list(table.shape)},
        "dtype": "float32",
    }
    ids_src = loaded.shards.path / "item_ids.json"
    if ids_src.is_file():
        shutil.copyfile(ids_src, out / "item_ids.json")
        files["item_ids.json"] = {"what": f"item index -> raw item id (copy of {ids_src})"}

    for name, entry in files.items():
        entry["sha256"] = file_sha256(out / name)
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
                  **(encoder_info or {}), "embed_dim": int(table.shape[1]),
                  "encoder_embed_dim": loaded.task.encoder.embed_dim if loaded.task.encoder is not None else None},
        "num_items": loaded.shards.num_items,
        "num_users": loaded.shards.num_users,
        "shards": str(loaded.shards.path),
        "config": config.to_dict(),
        "files": files,
    }
    tmp = out / "consolidated.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / "consolidated.json")
    log(f"done: {out}")
    return record
