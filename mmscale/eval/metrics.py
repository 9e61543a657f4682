"""Full-ranking metrics for one held-out target per sample."""

from __future__ import annotations

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all items (ties count against the target).

    scores [B, N]; targets [B]; excluded [B, N] bool: items removed from the ranking
    (a user's training items). The target itself is never excluded. A NaN score ranks last: a NaN
    target is beaten by every item, a NaN item beats none (`>=` with NaN is false either way).
    """
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    target_scores = scores.gather(1, targets.unsqueeze(1))
    above = scores >= target_scores
    above.scatter_(1, targets.unsqueeze(1), False)
    if excluded is not None:
        above &= ~excluded
    return above.sum(1)


def metric_sums(ranks: torch.Tensor, ks: tuple[int, ...], weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weighted sums over the samples of Recall@K (hit of the one target) and NDCG@K (1 / log2(rank + 2))."""
    out = {}
    gain = 1.0 / torch.log2(ranks.to(torch.float64) + 2.0)
    if weights is not None:
        gain = gain * weights
    for k in ks:
        hit = (ranks < k).to(torch.float64) * (1.0 if weights is None else weights)
        out[f"recall@{k}"] = hit.sum()
        out[f"ndcg@{k}"] = (gain * (ranks < k)).sum()
    return out
