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
    """Weighted sums over the samples of Recall@K, NDCG@K (1 / log2(rank + 2)), MRR@K (1 / (rank + 1)) and Hit@K.

    With one held-out target per sample, Hit@K (the target is in the top K) equals Recall@K; both are reported
    because RecBole users compare Hit and others Recall."""
    out = {}
    ranks = ranks.to(torch.float64)
    weight = torch.ones_like(ranks) if weights is None else weights
    for k in ks:
        hit = (ranks < k) * weight
        out[f"recall@{k}"] = out[f"hit@{k}"] = hit.sum()
        out[f"ndcg@{k}"] = (hit / torch.log2(ranks + 2.0)).sum()
        out[f"mrr@{k}"] = (hit / (ranks + 1.0)).sum()
    return out
