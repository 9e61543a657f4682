"""Recommendation losses over a (gathered) batch of users and their target items."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import at_least_fp32, first_occurrence, similarities


def sampled_softmax_loss(users: torch.Tensor, items: torch.Tensor, item_ids: torch.Tensor, temperature: float,
                         log_sampling: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch sampled softmax: row i's positive is item i; the batch's other distinct items are negatives.

    users, items: [N, E] row-aligned; item_ids: [N]. A repeated item is one column (its first copy).
    log_sampling: [N], the log probability that row i's item is drawn into a batch; subtracted from its column's
    logits (the logQ correction), so an item is not pushed down for being drawn as a negative often.
    """
    first, is_first = first_occurrence(item_ids)
    logits = similarities(users, items) / temperature
    if log_sampling is not None:
        logits = logits - log_sampling.unsqueeze(0)
    logits = logits.masked_fill(~is_first.unsqueeze(0), torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, first)


def bpr_loss(users: torch.Tensor, items: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """BPR with the previous row's target as the negative (skipped when it is the same item)."""
    users, items = at_least_fp32(users), at_least_fp32(items)  # the margins as the softmax's logits
    negatives, negative_ids = items.roll(1, dims=0), item_ids.roll(1, dims=0)
    margin = (users * items).sum(-1) - (users * negatives).sum(-1)
    valid = (negative_ids != item_ids).to(margin.dtype)
    return -(F.logsigmoid(margin) * valid).sum() / valid.sum().clamp(min=1)
