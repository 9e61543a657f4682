"""Feature files beside the shards: SHARD_DIR/features/NAME.safetensors + NAME.json, written and checked.

Row i of every tensor is item index i (the order of item_ids.json). Both files are written as *.tmp and renamed
(the .json last), so a crash never leaves a half-written pair in place. The .json records the format, name, item
count, the SHA-256 of item_ids.json and of the arrays of items/index.npz (so content changes under the same ids
show), each tensor's shape and dtype, and the SHA-256 of the tensor file, whose own header repeats the name, item
count and both checksums. `load_features` refuses a file built for other shards, whose tensors do not match the
description, or whose tensor file is not the one the description was written with. What the two standard sets
hold, and how they are computed: mmscale/build/features.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .format import ShardFormatError, file_sha256
from .shard_set import ShardSet

FEATURES_FORMAT = "mmscale-features/1"
FEATURES_DIR = "features"
TEXT_FEATURES = "minilm-text"
IMAGE_FEATURES = "effnet-image"


class FeatureFileError(ValueError):
    """A feature file that is missing, damaged, or built for another shard folder."""


# -- the single-vector view ----------------------------------------------------------------------
def pool_tokens(vectors: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Masked mean of each item's tokens, L2-normalised: [N, T, D], [N, T] (or [N, 1]) -> [N, D]
    float32. An item with no valid token gets a zero vector."""
    vectors = np.asarray(vectors, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[1] == 1 and vectors.shape[1] != 1:
        mask = np.repeat(mask, vectors.shape[1], axis=1)
    if mask.shape != vectors.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match vectors {vectors.shape}")
    weights = mask.astype(np.float32)[..., None]
    total = (vectors * weights).sum(1)
    mean = total / np.maximum(weights.sum(1), 1.0)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return np.where(norm > 0, mean / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def load_pooled(shards: ShardSet | str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(one unit vector per item [N, D] by `pool_tokens`, bool [N]: the item has any token) from
    stored features, checked as `load_features` checks them."""
    tensors, _ = load_features(shards, name)
    return pool_tokens(tensors["vectors"], tensors["mask"]), tensors["mask"].any(1)


# -- storing -------------------------------------------------------------------------------------
def item_ids_checksum(shard_dir: str | Path) -> str:
    """SHA-256 of the shard folder's item_ids.json (index -> raw id)."""
    path = Path(shard_dir) / "item_ids.json"
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing: {shard_dir} is not a finished shard folder")
    return file_sha256(path)


def item_index_checksum(shard_dir: str | Path) -> str:
    """SHA-256 of the arrays in items/index.npz (where and how long each item's image and text
    are): two shard folders with the same ids but other content almost surely differ here. The
    arrays are hashed, not the file, whose zip headers carry the time it was written."""
    path = Path(shard_dir) / "items" / "index.npz"
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing: {shard_dir} is not a finished shard folder")
    digest = hashlib.sha256()
    with np.load(path) as index:
        for key in sorted(index.files):
            array = np.ascontiguousarray(index[key])
            digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def feature_paths(shard_dir: str | Path, name: str) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) under SHARD_DIR/features/."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"feature name {name!r}: use letters, digits, '-', '_' and '.'")
    folder = Path(shard_dir) / FEATURES_DIR
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _replace(tmp: Path, final: Path) -> None:
    """fsync, give the file the permissions of any new file here, rename over the final name."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its file private (0600)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def save_features(shards: ShardSet | str | Path, name: str, tensors: dict[str, np.ndarray], meta: dict) -> dict:
    """Writes SHARD_DIR/features/NAME.safetensors and NAME.json (tmp + rename, the json last).

    Every tensor's first axis must be the shard folder's item count. `meta` is completed with the
    format, name, item count, item_ids.json checksum, tensor shapes and the tensor file's
    checksum; the completed description is returned."""
    from safetensors.numpy import save_file

    shards = ShardSet.of(shards)
    shard_dir, num_items = shards.path, shards.num_items
    if not tensors:
        raise ValueError("no tensors to save")
    arrays = {}
    for key, value in tensors.items():
        value = np.ascontiguousarray(value)
        if value.ndim < 1 or value.shape[0] != num_items:
            raise ValueError(f"{name}: tensor '{key}' has shape {value.shape}; its first axis must be the "
                             f"{num_items} items of {shard_dir} (partial extractions cannot be saved)")
        arrays[key] = value
    checksum, index_checksum = item_ids_checksum(shard_dir), item_index_checksum(shard_dir)
    tensor_path, meta_path = feature_paths(shard_dir, name)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    # One metadata key: safetensors writes several in hash order, which would make the bytes vary.
    header = {"format": FEATURES_FORMAT, "name": name, "num_items": num_items,
              "item_ids_sha256": checksum, "item_index_sha256": index_checksum}
    save_file(arrays, str(tmp), metadata={"mmscale": json.dumps(header, sort_keys=True)})
    meta = {
        **meta,
        "format": FEATURES_FORMAT,
        "name": name,
        "num_items": num_items,
        "item_ids_sha256": checksum,
        "item_index_sha256": index_checksum,
        "tensors": {key: {"shape": list(a.shape), "dtype": str(a.dtype)} for key, a in arrays.items()},
        "safetensors_sha256": file_sha256(tmp),
    }
    _replace(tmp, tensor_path)
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    _replace(tmp_meta, meta_path)
    return meta


def load_features(shards: ShardSet | str | Path, name: str, verify_checksum: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, description) of SHARD_DIR/features/NAME, checked against the shard folder.

    Raises FeatureFileError, naming the problem, when the files are missing, when they were built
    for another shard folder (item count or item_ids.json checksum differ), or when the tensor
    file does not match its description."""
    from safetensors import safe_open

    shards = ShardSet.of(shards)
    shard_dir, num_items = shards.path, shards.num_items
    tensor_path, meta_path = feature_paths(shard_dir, name)
    rebuild = f"(re)build them with: python tools/extract_features.py {shard_dir}"
    if not meta_path.is_file() or not tensor_path.is_file():
        have = sorted(p.stem for p in (shard_dir / FEATURES_DIR).glob("*.json")) if (shard_dir / FEATURES_DIR).is_dir() else []
        raise FeatureFileError(f"no '{name}' features in {shard_dir / FEATURES_DIR} (found: {have or 'none'}); {rebuild}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FeatureFileError(f"{meta_path}: not valid JSON ({e}); {rebuild}") from e
    if meta.get("format") != FEATURES_FORMAT:
        raise FeatureFileError(f"{meta_path}: format {meta.get('format')!r}, expected {FEATURES_FORMAT!r}; {rebuild}")
    checksum, index_checksum = item_ids_checksum(shard_dir), item_index_checksum(shard_dir)
    if meta.get("num_items") != num_items or meta.get("item_ids_sha256") != checksum:
        raise FeatureFileError(
            f"{meta_path} was built for other shards: it covers {meta.get('num_items')} items with item_ids.json "
            f"sha256 {str(meta.get('item_ids_sha256'))[:12]}..., but {shard_dir} has {num_items} items "
            f"with sha256 {checksum[:12]}...; {rebuild}")
    if meta.get("item_index_sha256") != index_checksum:
        raise FeatureFileError(
            f"{meta_path} was built for other shards: the item ids agree but the items' content does not "
            f"(items/index.npz sha256 {str(meta.get('item_index_sha256'))[:12]}... vs {index_checksum[:12]}...); {rebuild}")
    if verify_checksum and file_sha256(tensor_path) != meta.get("safetensors_sha256"):
        raise FeatureFileError(f"{tensor_path} is not the file {meta_path.name} describes (checksum differs: "
                               f"damaged, or a write was interrupted); {rebuild}")
    with safe_open(str(tensor_path), framework="numpy") as f:
        try:
            header = json.loads((f.metadata() or {}).get("mmscale", "{}"))
        except ValueError:
            header = {}
        if (header.get("item_ids_sha256"), header.get("item_index_sha256"), header.get("name")) != (checksum, index_checksum, name):
            raise FeatureFileError(f"{tensor_path} was built for other shards or under another name "
                                   f"({header.get('name')!r}); {rebuild}")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    described = meta.get("tensors", {})
    actual = {key: {"shape": list(a.shape), "dtype": str(a.dtype)} for key, a in tensors.items()}
    if actual != described:
        raise FeatureFileError(f"{tensor_path}: tensors {actual} do not match {meta_path.name} ({described}); {rebuild}")
    return tensors, meta
