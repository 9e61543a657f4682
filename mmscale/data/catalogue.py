"""Every item's content, for encoding the whole catalogue (evaluation, cached features)."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .item_store import ItemStore
from .preprocess import ItemPreprocess
from .workers import leave_sigterm_to_the_trainer, release_free_heap


class CatalogueItems(Dataset):
    """Items by index from the item store, decoded and transformed in DataLoader workers."""

    def __init__(self, store: ItemStore, preprocess: ItemPreprocess, items: list[int]):
        self.store, self.preprocess, self.items = store, preprocess, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool, str]:
        item = self.items[i]
        size = self.preprocess.image_size
        image, pixels = self.store.image(item), None
        if image is not None:
            try:
                with Image.open(io.BytesIO(image[0])) as img:
                    pixels = self.preprocess.image_transform(img.convert("RGB"))
            except Exception:  # as in the stream: a bad image costs the item its image only
                pixels = None
        has_image = pixels is not None
        return item, pixels if has_image else torch.zeros(3, size, size), has_image, self.store.text(item)

    def collate(self, rows: list[tuple[int, torch.Tensor, bool, str]]) -> dict[str, torch.Tensor]:
        items, images, has_image, texts = zip(*rows)
        return {
            "item_ids": torch.tensor(items),
            "images": torch.stack(images),
            "has_image": torch.tensor(has_image),
            "text_tokens": self.preprocess.tokenize(list(texts)),
        }


def catalogue_loader(store: ItemStore, preprocess: ItemPreprocess, items: list[int], batch_size: int, num_workers: int) -> DataLoader:
    dataset = CatalogueItems(store, preprocess, items)
    if num_workers:
        release_free_heap()
    # its own generator: worker seeds drawn from the global one would shift training's dropout draws
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=dataset.collate, generator=torch.Generator(),
                      worker_init_fn=leave_sigterm_to_the_trainer)
