"""Random access to any item's image bytes and text, read straight out of the item shards.

The builder records where each item's image and text lie inside the (uncompressed) item
tar files; a lookup is one slice of a memory map, so history items of a batch can be
fetched without scanning shards. Maps are opened lazily, once per process, so the store
can be handed to DataLoader workers.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from .format import IMAGE_KEYS, ShardFormatError, check_unchanged, dataset_identity, load_manifest


class ItemStore:
    """identity: the dataset_identity taken before `manifest` was read (a rebuild after it is then noticed)."""

    def __init__(self, shard_dir: str | Path, manifest: dict | None = None, identity: tuple[int, int, int, int] | None = None):
        self.shard_dir = Path(shard_dir)
        if manifest is None or identity is None:
            identity, manifest = dataset_identity(self.shard_dir), load_manifest(self.shard_dir)
        self.identity = identity
        self.paths = [self.shard_dir / s["path"] for s in manifest["shards"]["items"]]
        index = np.load(self.shard_dir / "items" / "index.npz")
        self._shard = index["shard"]
        self._image_offset, self._image_size = index["image_offset"], index["image_size"]
        self._image_ext = index["image_ext"]
        self._text_offset, self._text_size = index["text_offset"], index["text_size"]
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self._shard)

    def __getstate__(self):  # memory maps do not cross process boundaries; reopen them there
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _map(self, shard: int) -> mmap.mmap:
        m = self._maps.get(shard)
        if m is None:
            check_unchanged(self.shard_dir, self.identity)
            with open(self.paths[shard], "rb") as f:
                m = self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def has_image(self, item: int) -> bool:
        return bool(self._image_ext[item])

    def image(self, item: int) -> tuple[bytes, str] | None:
        """(encoded bytes, extension) or None for an item without an image."""
        code = int(self._image_ext[item])
        if not code:
            return None
        start = int(self._image_offset[item])
        return self._map(int(self._shard[item]))[start : start + int(self._image_size[item])], IMAGE_KEYS[code - 1]

    def text(self, item: int) -> str:
        start = int(self._text_offset[item])
        data = self._map(int(self._shard[item]))[start : start + int(self._text_size[item])]
        try:
            return data.decode()
        except UnicodeDecodeError:  # the builder writes UTF-8 only: the shard was altered after the build
            raise ShardFormatError(f"{self.paths[int(self._shard[item])]}: item {item}'s text is not valid UTF-8: the item shard "
                                   f"is damaged; rebuild {self.shard_dir}") from None
