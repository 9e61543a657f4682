"""VLMo's fusion-mode objectives: image-text matching (ITM) with hard negatives, masked language modelling (MLM).

Pure functions over tensors; the random draws come in as uniforms (the tasks hash them from item ids
and the step), so a sample gets the same negatives and masks on whichever rank it lands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # cross-entropy's ignore_index: MLM labels of positions that are not predicted


def sample_hard_negatives(similarity: torch.Tensor, forbidden: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One negative column per row, drawn with probability softmax(similarity row) over allowed columns.

    similarity [K, G] (e.g. a local image against the global batch's texts); forbidden [K, G] True where
    a column may not be drawn (the positive itself, any copy of the same item, a column without the
    needed modality); uniforms [K] in [0, 1). Returns [K] column indices, -1 where nothing is allowed.
    Harder negatives (more similar) are likelier, as in VLMo and ALBEF.
    """
    weights = torch.softmax(similarity.float().masked_fill(forbidden, float("-inf")), dim=-1).nan_to_num(0.0)
    cumulative = weights.cumsum(-1)
    total = cumulative[:, -1:]
    # inverse CDF: the first column whose cumulative weight exceeds u * total
    pick = torch.searchsorted(cumulative, uniforms.unsqueeze(-1).to(cumulative.dtype) * total, right=True).squeeze(-1)
    pick = pick.clamp(max=similarity.shape[1] - 1)
    return torch.where(total.squeeze(-1) > 0, pick, torch.full_like(pick, -1))


def matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pair cross-entropy of the 2-way ITM head ([P, 2] logits, labels 1 = matched, 0 = not)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def mask_tokens(tokens: torch.Tensor, maskable: torch.Tensor, uniforms: torch.Tensor, mask_id: int, replacement_ids: torch.Tensor,
                probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each maskable position is chosen with `probability`; a chosen token becomes
    [MASK] 80% of the time, a random ordinary token (uniform over `replacement_ids`, never [PAD], [CLS],
    [MASK] or another special token) 10%, itself 10%. Returns (inputs, labels), labels IGNORE where not chosen.

    tokens, maskable [N, T]; uniforms [N, T, 3]: choice, action, random token.
    """
    chosen = maskable & (uniforms[..., 0] < probability)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE))
    action = uniforms[..., 1]
    random_tokens = replacement_ids[(uniforms[..., 2] * len(replacement_ids)).long().clamp(max=len(replacement_ids) - 1)]
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    return inputs, labels


def masked_lm_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[2]: the summed cross-entropy over predicted positions and their count (sums add across ranks)."""
    loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return torch.stack([loss, (labels != IGNORE).sum().to(loss.dtype)])
