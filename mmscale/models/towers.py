"""Item and user towers: map encoder content and ids into one embedding space for ranking."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ItemTower(nn.Module):
    """Fuses an item's image and text embeddings (and optionally a learned id vector).

    The id vectors start at zero, so an item never seen in training (cold start) is
    represented by its content alone rather than by random noise.
    """

    def __init__(self, modality_dim: int, embed_dim: int, num_items: int, use_id: bool):
        super().__init__()
        # input: image embedding (zeros when absent), text embedding, an "image present" flag
        self.fuse = nn.Sequential(nn.Linear(2 * modality_dim + 1, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.id_embedding = nn.Embedding(num_items, embed_dim) if use_id else None
        if self.id_embedding is not None:
            nn.init.zeros_(self.id_embedding.weight)

    def forward(self, image: torch.Tensor, text: torch.Tensor, has_image: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        flag = has_image.to(image.dtype).unsqueeze(-1)
        out = self.fuse(torch.cat([image * flag, text, flag], dim=-1))
        if self.id_embedding is not None:
            out = out + self.id_embedding(item_ids)
        return F.normalize(out, dim=-1)

    def id_only(self, item_ids: torch.Tensor) -> torch.Tensor:
        """History items without decoded content are represented by their id vectors alone."""
        assert self.id_embedding is not None, "validated: history without content needs item id embeddings"
        return self.id_embedding(item_ids)


class UserTower(nn.Module):
    """A user is a learned id vector and/or the mean of their history items' embeddings."""

    def __init__(self, num_users: int, embed_dim: int, use_id: bool, pool_history: bool):
        super().__init__()
        self.id_embedding = nn.Embedding(num_users, embed_dim) if use_id else None
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=0.02)
        self.history_proj = nn.Linear(embed_dim, embed_dim) if pool_history else None

    def forward(self, users: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        """users [B]; history [B, L, E] item embeddings; history_mask [B, L] True where real."""
        out = 0
        if self.id_embedding is not None:
            out = self.id_embedding(users)
        if self.history_proj is not None:
            weights = history_mask.to(history.dtype).unsqueeze(-1)
            pooled = (history * weights).sum(1) / weights.sum(1).clamp(min=1)
            out = out + self.history_proj(pooled)
        return F.normalize(out, dim=-1)
