"""VLMo's fusion-mode losses on a batch's target items, shared by the two-tower and the sequential task.

Each rank builds the pairs of its own rows: the matched pair, the image with a hard-negative text and
the text with a hard-negative image, negatives drawn from the gathered global batch by the contrastive
similarities. The losses are global means (sums gathered from every rank), so they equal one
process's on the same global batch; every random draw is hashed from the item id and the step.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..objectives.common import at_least_fp32, hashed_uniform, similarities
from ..objectives.matching import mask_tokens, masked_lm_sums, matching_loss, sample_hard_negatives



def _global_mean(sums: torch.Tensor, gather: Callable) -> torch.Tensor:
    """sums [2] = (loss sum, count) of this rank -> the mean over every rank's pairs."""
    total = gather(sums.unsqueeze(0)).sum(0)
    return total[0] / total[1].clamp(min=1)


def fusion_losses(encoder, names, images: torch.Tensor, tokens: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
                  item_ids: torch.Tensor, has_image: torch.Tensor, gather: Callable, step: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"itm": ..., "mlm": ...} for the names asked; all inputs are row-aligned over this rank's rows
    (images [B, C, H, W], tokens [B, T], L2-normalised embeddings [B, E], item ids, has_image [B])."""
    losses = {}
    if "itm" in names:
        losses["itm"] = _matching(encoder, images, tokens, image_emb, text_emb, item_ids, has_image, gather, step)
    if "mlm" in names:
        losses["mlm"] = _masked_lm(encoder, images, tokens, item_ids, has_image, gather, step)
    return losses


def _matching(encoder, images, tokens, image_emb, text_emb, item_ids, has_image, gather, step) -> torch.Tensor:
    all_ids, all_has_image = gather(item_ids), gather(has_image)
    all_images, all_tokens = gather(images), gather(tokens)
    with torch.no_grad():  # sampling only: no gradient through the choice of negatives
        scale = at_least_fp32(encoder.logit_scale).exp()
        same_item = item_ids.unsqueeze(1) == all_ids.unsqueeze(0)  # the positive and any copy of it
        text_negative = sample_hard_negatives(scale * similarities(image_emb, gather(text_emb.detach())), same_item,
                                              hashed_uniform(item_ids, step, torch.tensor(1)))
        image_negative = sample_hard_negatives(scale * similarities(text_emb, gather(image_emb.detach())),
                                               same_item | ~all_has_image.unsqueeze(0), hashed_uniform(item_ids, step, torch.tensor(2)))
    # 3B pairs of fixed shape (no host sync): matched, (image, negative text), (negative image, text); a pair
    # whose image is missing or for which no negative exists takes part with weight 0
    pair_images = torch.cat([images, images, all_images[image_negative.clamp(min=0)]])
    pair_tokens = torch.cat([tokens, all_tokens[text_negative.clamp(min=0)], tokens])
    labels = torch.cat([torch.ones_like(item_ids), torch.zeros_like(item_ids), torch.zeros_like(item_ids)])
    weights = torch.cat([has_image, has_image & (text_negative >= 0), image_negative >= 0]).to(image_emb.dtype)
    per_pair = matching_loss(encoder.match_logits(pair_images, pair_tokens), labels)
    return _global_mean(torch.stack([(per_pair * weights).sum(), weights.sum()]), gather)


def _masked_lm(encoder, images, tokens, item_ids, has_image, gather, step) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    uniforms = hashed_uniform(item_ids.view(-1, 1, 1), step, torch.tensor(3), positions.view(1, -1, 1),
                              torch.arange(3, device=tokens.device).view(1, 1, -1))
    maskable = ~torch.isin(tokens, encoder.special_token_ids) & has_image.unsqueeze(1)  # read with the item's own image
    inputs, labels = mask_tokens(tokens, maskable, uniforms, encoder.mask_token_id, encoder.replacement_token_ids)
    return _global_mean(masked_lm_sums(encoder.masked_lm_logits(images, inputs), labels), gather)
