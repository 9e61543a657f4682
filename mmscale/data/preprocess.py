"""How an item's raw content becomes model input: an image transform and a text tokenizer.

Each item encoder supplies its own (open_clip's transforms and tokenizer for CLIP); the
data stream only calls them, so it never depends on which encoder is training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image


@dataclass
class ItemPreprocess:
    image_transform: Callable[[Image.Image], torch.Tensor]  # PIL RGB -> [3, H, W]
    tokenize: Callable[[list[str]], torch.Tensor]  # texts -> [N, T] token ids
    image_size: int
