"""A checkpoint (any ZeRO stage, any number of ranks) turned into plain files other tools load.

OUT receives:
    model.safetensors              the whole task's fp32 state dict (the task's load_state_dict, strict)
    <the encoder's own export>     e.g. open_clip_model.safetensors + open_clip_config.json for CLIP (the folder
                                   loads with open_clip.create_model_and_transforms("local-dir:OUT")), or
                                   encoder_vlmo_release.safetensors for VLMo (the public release's names)
    item_embeddings.safetensors    {"item_embeddings": [num_items, embed_dim] float32}: the ranking's item table,
                                   L2-normalised; row i is item index i
    user_embeddings.safetensors    {"user_embeddings": [U, embed_dim], "users": [U] user indices}: each user's vector
                                   over the history before their test sample (the one evaluation ranks with)
    items.faiss                    a FAISS inner-product index of item_embeddings (flat: exact; or hnsw / ivf)
    item_ids.json                  index -> raw item id (a copy of the shard folder's item_ids.json)
    consolidated.json              what each file is, shapes, source (run, tag, step), ZeRO stage, model, number of
                                   items and each file's sha256; written last
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.format import file_sha256
from ..data.shard_set import ShardSet
from ..eval.recommend import HeldOut, build_index, held_out, read_index, user_vectors, write_index
from .restore import LoadedCheckpoint, Log, load_task, log_to_stderr


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


def consolidate(source: str | Path, out_dir: str | Path, overrides: list[str] = (), device: str = "cpu",
                num_workers: int | None = None, index: str = "flat", log: Log = log_to_stderr) -> dict:
    """Writes the exports of `source` (run folder or tag) into out_dir; returns consolidated.json's content.
    `index`: the kind of FAISS item index (mmscale.eval.recommend.INDEX_KINDS)."""
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
            files[name] = {"what": f"what open_clip needs beside {export.filename} to load the folder (local-dir:)"}
        encoder_info = export.info
    else:
        log("no item encoder in this task: no encoder export")

    log(f"encoding the catalogue ({loaded.shards.num_items} items) for item_embeddings.safetensors")
    tables = ranking_tables(loaded)
    table = tables.items
    save_safetensors({"item_embeddings": table}, out / "item_embeddings.safetensors")
    files["item_embeddings.safetensors"] = {
        "what": "the ranking's item table of the whole catalogue, L2-normalised; row i is item index i "
                "(raw id: item_ids.json[i]); score a user by user_embedding @ item_embeddings.T",
        "shapes": {"item_embeddings": list(table.shape)},
        "dtype": "float32",
    }
    log(f"writing user_embeddings.safetensors ({len(tables.users)} users: their history before the test sample)")
    save_safetensors({"user_embeddings": tables.user_vectors, "users": tables.users}, out / "user_embeddings.safetensors")
    files["user_embeddings.safetensors"] = {
        "what": "each user's vector over the history before their test sample (row r is user index users[r]); "
                "user_embeddings @ item_embeddings.T are the scores evaluation ranks the test item with",
        "shapes": {"user_embeddings": list(tables.user_vectors.shape), "users": [len(tables.users)]},
    }
    log(f"building a FAISS {index} inner-product index of the items")
    write_index(build_index(table, index, seed=config.train.seed), out / "items.faiss")
    files["items.faiss"] = {"what": f"FAISS {index} inner-product index of item_embeddings (faiss.read_index; ids = item "
                                    f"indices); mmscale.eval.recommend.index_top_k queries it leaving seen items out",
                            "kind": index}
    ids_src = loaded.shards.path / "item_ids.json"
    if ids_src.is_file():
        shutil.copyfile(ids_src, out / "item_ids.json")
        files["item_ids.json"] = {"what": f"item index -> raw item id (copy of {ids_src})"}

    for name, entry in files.items():
        entry["sha256"] = file_sha256(out / name)
        entry["bytes"] = (out / name).stat().st_size
    record = {
        "format": "mmscale-consolidated/2",  # 2: open_clip local-dir files, user vectors, FAISS index
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


class ExportError(ValueError):
    """An export folder that is incomplete, altered or not an mmscale export."""


@dataclass(frozen=True)
class RankingTables:
    """What recommending needs: item and user vectors (rows of `users`), the shards they index, a FAISS index."""

    items: torch.Tensor  # [N, E]
    users: torch.Tensor  # [U] user indices
    user_vectors: torch.Tensor  # [U, E]
    shards: ShardSet
    index: object | None  # a faiss.Index over `items`, or None (brute force)
    source: str


def load_export(folder: str | Path, shards: str | Path | None = None) -> RankingTables:
    """An export folder's tables, every file read checked against consolidated.json's sha256 first; the shards are
    the ones it was made from (or `shards`). Nothing is unpickled: safetensors and FAISS's own format."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index_file = folder / "consolidated.json"
    try:
        record = json.loads(index_file.read_text())
        files = record["files"]
    except FileNotFoundError:
        raise ExportError(f"{folder} is not an export folder: {index_file.name} is missing "
                          f"(write one with tools/consolidate_checkpoint.py)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{index_file}: not an export index ({e})") from None

    def checked(name: str) -> Path:
        path, entry = folder / name, files.get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or not path.is_file():
            raise ExportError(f"{path}: missing (consolidate again with this version of mmscale)")
        if file_sha256(path) != entry.get("sha256"):
            raise ExportError(f"{path}: its sha256 differs from {index_file.name}'s: the file was altered or damaged")
        return path

    def tensors(name: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        found = load_file(str(checked(name)))
        if set(keys) - set(found):
            raise ExportError(f"{folder / name}: holds {sorted(found)}, not {list(keys)}")
        return found

    items = tensors("item_embeddings.safetensors", ("item_embeddings",))["item_embeddings"]
    users = tensors("user_embeddings.safetensors", ("user_embeddings", "users"))
    index = read_index(checked("items.faiss"))
    shard_set = ShardSet.open(shards or record["shards"])
    if shard_set.num_items != len(items) or index.ntotal != len(items):
        raise ExportError(f"{folder}: {len(items)} items (index {index.ntotal}) against {shard_set.num_items} in {shard_set.path}")
    return RankingTables(items, users["users"], users["user_embeddings"], shard_set, index, str(folder))


@torch.no_grad()
def ranking_tables(loaded: LoadedCheckpoint) -> RankingTables:
    """A loaded checkpoint's item table and the user vectors of every test sample (no FAISS index yet)."""
    content = loaded.catalogue_content() if loaded.task.uses_catalogue_content else None
    ranking = loaded.task.ranking(content)
    samples = held_out(loaded.shards, "test") if loaded.shards.has_split("test") else HeldOut.empty(loaded.shards.max_history)
    return RankingTables(ranking.items.float().cpu(), samples.users, user_vectors(ranking, samples), loaded.shards, None,
                         str(loaded.ref.path))
