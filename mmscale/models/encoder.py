"""The item encoder interface: (images, text tokens) -> (image embeddings, text embeddings).

Every encoder (CLIP, VLMo) implements it, so towers, objectives and the engine never
depend on which one is training.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.preprocess import ItemPreprocess


class ItemEncoder(nn.Module):
    embed_dim: int  # width of each modality embedding

    def preprocess(self) -> ItemPreprocess:
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        """Learned log temperature of the image-text contrastive loss, shape [1]."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings, [U, embed_dim] each."""
        raise NotImplementedError


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
