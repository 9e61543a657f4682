"""The on-disk shard format shared by the builder (writer) and the loader/item store (readers).

A shard folder holds:
    manifest.json                counts, options, shard lists (written last)
    user_ids.json, item_ids.json index -> raw id (the id maps)
    items/items-NNNNNN.tar       one sample per item: KEY.json, KEY.txt, KEY.<jpg|png|...>
    items/index.npz              byte offsets of each item's image and text inside the item shards
    SPLIT/SPLIT-NNNNNN.tar       SPLIT in train, valid, test, cold: one sample per interaction; .tar.gz (gzip) when
                                 the samples carry ids only
    seen.npz                     each user's training items (CSR), excluded when ranking
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# 2: train samples in a hashed order (the out-of-core build); 3: ids-only samples in gzip-compressed tars
FORMAT_VERSION = "mmscale-shards/3"
READABLE_FORMATS = ("mmscale-shards/2", FORMAT_VERSION)  # the readers take both: they tell a shard's compression by its name
SPLITS = ("train", "valid", "test", "cold")
IMAGE_KEYS = ("jpg", "png", "webp", "gif", "bmp")
# uint8 codes for image extensions in the item index; 0 means "no image"
IMAGE_EXT_CODES = {ext: code for code, ext in enumerate(IMAGE_KEYS, start=1)}
MANIFEST = "manifest.json"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardFormatError(ValueError):
    """A shard folder that is missing, incomplete or of another format version."""


def load_manifest(shard_dir: str | Path) -> dict:
    """Reads and checks a shard folder's manifest, naming what is wrong."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not shard_dir.is_dir():
        raise ShardFormatError(f"shard folder {shard_dir} does not exist (build it with tools/build_shards.py)")
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing: {shard_dir} is not a finished shard folder")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardFormatError(f"{path}: format {found!r}, expected one of {', '.join(READABLE_FORMATS)}: rebuild it with "
                               f"tools/build_shards.py")
    for split, shards in manifest["shards"].items():
        for shard in shards:
            shard_path = shard_dir / shard["path"]
            if not shard_path.resolve().is_relative_to(shard_dir.resolve()):
                raise ShardFormatError(f"{path}: {split} shard {shard['path']} lies outside {shard_dir}")
            if not shard_path.is_file():
                raise ShardFormatError(f"{path}: {split} shard {shard['path']} is listed but missing")
            # Items are read at random offsets: a cut item shard would give blank content, not an error, so it is
            # refused here. A damaged train shard is read up to the damage, its bad samples counted and skipped.
            if split == "items" and shard_path.stat().st_size != shard["bytes"]:
                raise ShardFormatError(f"{shard_path}: {shard_path.stat().st_size:,} bytes, the manifest says {shard['bytes']:,}: "
                                       f"the item shard is damaged or truncated; rebuild {shard_dir}")
    return manifest


def dataset_identity(shard_dir: str | Path) -> tuple[int, int, int, int]:
    """What changes when a shard folder is rebuilt (swapped in whole) or its manifest rewritten: the folder's and the
    manifest's inodes, the manifest's size and modification time."""
    folder, manifest = os.stat(shard_dir), os.stat(Path(shard_dir) / MANIFEST)
    return folder.st_ino, manifest.st_ino, manifest.st_size, manifest.st_mtime_ns


def check_unchanged(shard_dir: str | Path, identity: tuple[int, int, int, int]) -> None:
    """A dataset rebuilt under a running reader is a named error, never a silent mix of the two."""
    try:
        now = dataset_identity(shard_dir)
    except OSError:
        now = None
    if now != identity:
        raise ShardFormatError(f"{shard_dir} was rebuilt or replaced while this run was reading it; its samples would mix two "
                               f"datasets. Restart (or resume) on the new shards deliberately")


def shard_paths(shard_dir: str | Path, manifest: dict, split: str) -> list[str]:
    if split not in manifest["shards"]:
        raise ShardFormatError(f"{shard_dir}: no '{split}' split (has {sorted(manifest['shards'])})")
    return [str(Path(shard_dir) / s["path"]) for s in manifest["shards"][split]]


def split_size(manifest: dict, split: str) -> int:
    return sum(s["samples"] for s in manifest["shards"].get(split, []))
