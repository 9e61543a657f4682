from __future__ import annotations

import torch


def first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the index of the first position holding the same id, and whether it is that one.

    Batches gathered from several ranks repeat items; scoring each item once makes the loss
    equal to one process's over the same global batch and keeps duplicates from being negatives.
    """
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    first = same.int().argmax(dim=1)
    return first, first == torch.arange(len(ids), device=ids.device)
