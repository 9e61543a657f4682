"""CLIP item encoder over open_clip."""

from __future__ import annotations

import open_clip

from ..data.preprocess import ItemPreprocess


def clip_preprocess(model_name: str) -> ItemPreprocess:
    """open_clip's evaluation transform and tokenizer for a model name (no downloads)."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    return ItemPreprocess(
        image_transform=open_clip.image_transform(size, is_train=False),
        tokenize=open_clip.get_tokenizer(model_name),
        image_size=size,
    )
