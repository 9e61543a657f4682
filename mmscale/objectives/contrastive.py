"""CLIP's image-text contrastive loss (ITC) over the batch's distinct items that have an image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import first_occurrence, similarities


def image_text_contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, item_ids: torch.Tensor, has_image: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE between normalised image and text embeddings, [N, D] each, row-aligned.

    Only the first copy of each item with an image takes part, as row and as column.
    """
    _, is_first = first_occurrence(item_ids)
    keep = is_first & has_image
    similarity = similarities(image, text)
    logits = logit_scale.to(similarity.dtype).exp() * similarity
    blocked = ~(keep.unsqueeze(0) & keep.unsqueeze(1)) & ~torch.eye(len(keep), dtype=torch.bool, device=keep.device)
    logits = logits.masked_fill(blocked, torch.finfo(logits.dtype).min)
    targets = torch.arange(len(keep), device=keep.device)
    per_row = (F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.T, targets, reduction="none")) / 2
    weights = keep.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp(min=1)
