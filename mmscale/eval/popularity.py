"""MostPop: every user gets the catalogue ranked by how often each item was interacted with in training, through the
same full-ranking evaluation as every trained model (same exclusions, same cold protocol)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.shard_set import ShardSet
from ..tasks.base import Ranking


class MostPopular(nn.Module):
    """The ranking protocol of a task (`ranking`, `uses_catalogue_content`) with no parameters to train."""

    uses_catalogue_content = False

    def __init__(self, shards: ShardSet):
        super().__init__()
        _, items = shards.seen()
        counts = np.bincount(items, minlength=shards.num_items).astype(np.float64)
        # log1p keeps the order; tied items (e.g. cold items, never seen in training) count against the target, as
        # every tie does in mmscale.eval.metrics.target_ranks
        self.register_buffer("popularity", torch.from_numpy(np.log1p(counts)).float().unsqueeze(1))

    def ranking(self, content=None) -> Ranking:
        def user_vectors(users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            return torch.ones(len(users), 1, device=self.popularity.device)

        return Ranking(items=self.popularity, user_vectors=user_vectors)
