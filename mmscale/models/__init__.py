"""Item encoders (CLIP, VLMo) behind one interface, and the item/user towers."""

from __future__ import annotations

from ..config import ConfigError, EncoderConfig
from ..data.preprocess import ItemPreprocess
from .encoder import ItemEncoder


def build_encoder(config: EncoderConfig) -> ItemEncoder:
    if config.kind == "clip":
        from .clip import CLIPEncoder

        return CLIPEncoder(config.model, config.pretrained, config.grad_checkpointing)
    if config.kind == "vlmo":
        from .vlmo import VLMoEncoder

        return VLMoEncoder(config.model, config.pretrained, config.grad_checkpointing, tokenizer=config.tokenizer,
                           item_representation=config.item_representation)
    raise ConfigError(f"encoder.kind: unknown encoder {config.kind!r} (known: clip, vlmo)")


def build_preprocess(config: EncoderConfig) -> ItemPreprocess:
    """The transform and tokenizer of an encoder, without building its weights (for data workers)."""
    if config.kind == "clip":
        from .clip import clip_preprocess

        return clip_preprocess(config.model)
    if config.kind == "vlmo":
        from .vlmo import vlmo_preprocess

        return vlmo_preprocess(config.model, config.tokenizer)
    raise ConfigError(f"encoder.kind: unknown encoder {config.kind!r} (known: clip, vlmo)")
