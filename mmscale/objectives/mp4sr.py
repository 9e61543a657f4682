"""MP4SR's pre-training losses over a (gathered) batch of sequences.

Both treat sequences that share a target item as non-negatives of each other: they are
left out of each other's denominators, not pushed apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import similarities


def _same_target(target_ids: torch.Tensor) -> torch.Tensor:
    """[N, N] True where two different rows have the same target."""
    same = target_ids.unsqueeze(0) == target_ids.unsqueeze(1)
    return same & ~torch.eye(len(target_ids), dtype=torch.bool, device=target_ids.device)


def sequence_item_loss(sequences: torch.Tensor, items: torch.Tensor, target_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next-item InfoNCE: row i's sequence against the batch's target items, row i's target positive.

    sequences, items: [N, H], L2-normalised, row-aligned.
    """
    logits = similarities(sequences, items) / temperature
    logits = logits.masked_fill(_same_target(target_ids), torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def sequence_sequence_loss(first: torch.Tensor, second: torch.Tensor, target_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-modality InfoNCE between the two mixed sequences of the same user.

    For anchor first[i] the positive is second[i]; negatives are the other rows of the other
    modality and of the same modality (itself excluded); symmetric in the two modalities.
    """
    n = len(first)
    blocked = _same_target(target_ids)
    self_pair = torch.eye(n, dtype=torch.bool, device=first.device)
    targets = torch.arange(n, device=first.device)

    def one_side(anchor, other):
        cross, same = similarities(anchor, other) / temperature, similarities(anchor, anchor) / temperature
        low = torch.finfo(cross.dtype).min
        cross, same = cross.masked_fill(blocked, low), same.masked_fill(blocked | self_pair, low)
        return F.cross_entropy(torch.cat([cross, same], dim=1), targets)

    return (one_side(first, second) + one_side(second, first)) / 2
