"""Item encoders (CLIP, VLMo) behind one interface and one registry, and the item/user towers.

An encoder is chosen by `encoder.kind`; what it can do beyond the dual-encoder interface is a declared
capability ("fusion": `models.encoder.FusionEncoder`; "open_clip_towers": encoder.trainable_blocks, image_size and
context_length apply; "frozen_block_cache": `models.encoder.FrozenBlockCache`), which config validation and the tasks ask for instead
of asking which encoder it is. Importing this package loads no model code (config validation reads the registry).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import EncoderConfig
    from ..data.preprocess import ItemPreprocess
    from .encoder import ItemEncoder


@dataclass(frozen=True)
class EncoderEntry:
    module: str  # mmscale.models.<module>
    name: str  # its ItemEncoder class
    capabilities: frozenset[str]  # beyond the dual-encoder interface


ENCODERS: dict[str, EncoderEntry] = {
    "clip": EncoderEntry("clip", "CLIPEncoder", frozenset({"open_clip_towers", "frozen_block_cache"})),
    "vlmo": EncoderEntry("vlmo", "VLMoEncoder", frozenset({"fusion"})),
}


def encoder_can(kind: str, capability: str) -> bool:
    return kind in ENCODERS and capability in ENCODERS[kind].capabilities


def encoder_class(kind: str) -> type[ItemEncoder]:
    from ..config import ConfigError

    if kind not in ENCODERS:
        raise ConfigError(f"encoder.kind: unknown encoder {kind!r} (known: {', '.join(ENCODERS)})")
    entry = ENCODERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{entry.module}"), entry.name)


def build_encoder(config: EncoderConfig) -> ItemEncoder:
    return encoder_class(config.kind).from_config(config)


def build_preprocess(config: EncoderConfig) -> ItemPreprocess:
    """The transform and tokenizer of an encoder, without building its weights (for data workers)."""
    return encoder_class(config.kind).preprocess_for(config)
