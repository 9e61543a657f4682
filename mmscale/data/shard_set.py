"""A shard folder opened once: its checked manifest, its identity (to notice a rebuild), its item store.

    shards = ShardSet.open("build/world-shards")
    shards.num_items, shards.split_size("train"), shards.store.text(17), shards.seen()

The trainer opens one and hands it to the task, the stream and evaluation; tools and tests may pass a path
wherever a ShardSet is taken (`ShardSet.of`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .format import MANIFEST, ShardFormatError, check_unchanged, dataset_identity, load_manifest, shard_paths, split_size
from .item_store import ItemStore

PLANNED = Path("<planned>")  # the folder of a dataset that exists nowhere (ShardSet.planned)


@dataclass(frozen=True)
class ShardSet:
    path: Path
    manifest: dict = field(repr=False)
    identity: tuple[int, int, int, int] = field(repr=False)  # taken before the manifest was read

    @classmethod
    def open(cls, path: str | Path) -> "ShardSet":
        """Reads and checks the manifest (a missing, foreign or damaged folder is a ShardFormatError)."""
        try:
            identity = dataset_identity(path)
        except OSError:
            load_manifest(path)  # names what is missing
            raise
        return cls(Path(path), load_manifest(path), identity)

    @classmethod
    def planned(cls, num_users: int, num_items: int, max_history: int = 50) -> "ShardSet":
        """A dataset of these sizes that exists nowhere: for building a task to count it (scale planning)."""
        manifest = {"num_users": num_users, "num_items": num_items, "max_history": max_history, "cold_items": []}
        return cls(PLANNED, manifest, (0, 0, 0, 0))

    @classmethod
    def of(cls, shards: "ShardSet | str | Path") -> "ShardSet":
        return shards if isinstance(shards, ShardSet) else cls.open(shards)

    # -- what the manifest says -----------------------------------------------------------------------
    @property
    def num_users(self) -> int:
        return self.manifest["num_users"]

    @property
    def num_items(self) -> int:
        return self.manifest["num_items"]

    @property
    def max_history(self) -> int:
        return self.manifest["max_history"]

    @property
    def cold_items(self) -> list[int]:
        return self.manifest.get("cold_items", [])

    def split_size(self, split: str) -> int:
        return split_size(self.manifest, split)

    def has_split(self, split: str) -> bool:
        return split in self.manifest["shards"] and bool(self.manifest["counts"]["samples"].get(split))

    def split_urls(self, split: str) -> list[str]:
        return shard_paths(self.path, self.manifest, split)

    @cached_property
    def manifest_sha256(self) -> str:
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()

    # -- what the folder holds -----------------------------------------------------------------------
    @cached_property
    def store(self) -> ItemStore:
        return ItemStore(self.path, self.manifest, self.identity)

    def seen(self) -> tuple[np.ndarray, np.ndarray]:
        """Each user's training items (CSR: indptr [num_users + 1], items); none in a planned dataset."""
        if self.path == PLANNED:
            return np.zeros(self.num_users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        path = self.path / "seen.npz"
        try:
            with np.load(path) as seen:  # allow_pickle stays False: an object array is refused
                indptr, items = seen["indptr"], seen["items"]
        except (OSError, KeyError, ValueError) as e:
            raise ShardFormatError(f"{path}: cannot read the users' training items ({e})") from None
        if (indptr.dtype.kind not in "iu" or items.dtype.kind not in "iu" or indptr.shape != (self.num_users + 1,)
                or indptr[0] != 0 or indptr[-1] != len(items) or (np.diff(indptr) < 0).any()
                or (len(items) and (items.min() < 0 or items.max() >= self.num_items))):
            raise ShardFormatError(f"{path}: not a CSR of {self.num_users} users' training items among {self.num_items} items")
        return indptr, items

    def check_unchanged(self) -> None:
        """Raises ShardFormatError when the folder was rebuilt or replaced since it was opened."""
        check_unchanged(self.path, self.identity)
