"""The item encoder interface: (images, text tokens) -> (image embeddings, text embeddings), and the
fusion capability some encoders add.

Every encoder (CLIP, VLMo) implements ItemEncoder, so towers, objectives and the engine never depend on which
one is training; what an encoder can do beyond that is a capability it declares (FusionEncoder), registered in
mmscale.models.ENCODERS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.preprocess import ItemPreprocess

if TYPE_CHECKING:
    from ..config import EncoderConfig


@dataclass
class EncoderExport:
    """An encoder's weights in the layout of the library users load it with, for consolidation."""

    filename: str  # e.g. open_clip_model.safetensors
    state: dict[str, torch.Tensor]
    what: str  # how to load it, for consolidated.json
    info: dict = field(default_factory=dict)  # e.g. the open_clip model name
    files: dict[str, bytes] = field(default_factory=dict)  # name -> content of a file beside it (e.g. open_clip_config.json)


class ItemEncoder(nn.Module, ABC):
    embed_dim: int  # width of each modality embedding

    @classmethod
    @abstractmethod
    def from_config(cls, config: EncoderConfig) -> "ItemEncoder":
        """The encoder `config` describes (weights from config.pretrained, a local file, if given)."""

    @classmethod
    @abstractmethod
    def preprocess_for(cls, config: EncoderConfig) -> ItemPreprocess:
        """Its image transform and tokenizer, without building weights (for data workers)."""

    @abstractmethod
    def preprocess(self) -> ItemPreprocess:
        ...

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """Learned log temperature of the image-text contrastive loss, shape [1]."""

    @abstractmethod
    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings, [U, embed_dim] each."""

    @abstractmethod
    def export(self) -> EncoderExport:
        """The weights in the layout of the library users load this encoder with."""


class FusionEncoder(ABC):
    """The "fusion" capability: image and text read together (VLMo's fusion mode), for fused items, ITM and MLM."""

    @abstractmethod
    def fused_embedding(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] L2-normalised item vectors from the image and text read together."""

    @abstractmethod
    def match_logits(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """[N, 2] image-text matching logits (not matched, matched) of row-aligned pairs."""

    @abstractmethod
    def masked_lm_logits(self, images: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, vocab] masked-LM logits of text tokens read with their image."""

    # buffers, on the model's device: a step builds no tensor from host data
    special_token_ids: torch.Tensor  # never predicted by MLM
    replacement_token_ids: torch.Tensor  # MLM's random replacements: ordinary tokens only
    mask_token_id: int


class FrozenBlockCache(ABC):
    """The "frozen_block_cache" capability: the blocks encoder.trainable_blocks freezes run as in evaluation, so their
    outputs are a function of the item alone; computed once per item (frozen_blocks), they let training run only the
    trained top of each tower (from_frozen_blocks), with no images decoded and no frozen block run per step."""

    @abstractmethod
    def check_frozen_block_cache(self) -> None:
        """Raises ConfigError naming encoder.cache_frozen_blocks where this model's towers cannot be split."""

    @abstractmethod
    def frozen_blocks(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per item, [N, ...] each: the outputs of the frozen lower blocks (what from_frozen_blocks reads)."""

    @abstractmethod
    def from_frozen_blocks(self, *states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's image and text embeddings from frozen_blocks' outputs (rows of them)."""


def at_least_1d_parameters(module: nn.Module) -> frozenset[str]:
    """Reshapes 0-d parameters (e.g. logit_scale) to shape [1]; returns their names.

    DeepSpeed's parameter broadcast fails on 0-d tensors on the CPU accelerator; [1]
    broadcasts the same in every expression. Export restores the original shapes.
    """
    reshaped = set()
    for name, param in list(module.named_parameters()):
        if param.dim() == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            setattr(owner, attr, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            reshaped.add(name)
    return frozenset(reshaped)
