"""Tasks: what is trained. The engine and evaluation use only these members of a task:

    forward(batch, gather) -> {loss name: tensor}     losses over the gathered global batch
    loss_weights: {loss name: weight}                 the losses forward returns now (may change at a phase switch)
    parameter_groups() -> {"part/decay"|"part/no_decay": [(name, parameter)]}
    training_windows() -> {part: (start step, stop step or None)}   when each part learns
    needs_content: bool                               training batches must carry decoded images/tokens
    content_cache_due(step, resumed) -> bool          time to encode the catalogue (eval mode) and call ...
    set_content_cache(image, text, has_image)         ... with every item's encoder content
    encode_content(images, text_tokens) -> (image, text)
    uses_catalogue_content: bool                      ranking needs every item's encoder content
    ranking(content or None) -> Ranking               item table and user vectors for full ranking

`build_task` picks the task from the config; nothing else in the engine depends on which it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import Config


@dataclass(frozen=True)
class Ranking:
    """What full ranking needs from a task: a user's score for item i is user_vectors(users, history) . items[i]."""

    items: torch.Tensor  # [num_items, E]
    user_vectors: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (users [B], history [B, L]) -> [B, E]


def decays(owner: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to the matrices that multiply inputs: linear and convolution weights, attention's
    packed input projection and bare projection matrices (open_clip's `proj`, `text_projection`). Never to
    norms, biases, embeddings, position tables, class tokens, layer scales or the logit scale."""
    if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
        return name == "weight"
    if isinstance(owner, nn.MultiheadAttention):
        return name == "in_proj_weight"
    return param.dim() >= 2 and "proj" in name


def parameter_groups(task: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by "part/decay": the part is "encoder" for the item encoder, else
    "recommender"; decay as `decays` says."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        part = "encoder" if name.startswith("encoder.") else "recommender"
        owner_name, _, leaf = name.rpartition(".")
        decay = decays(task.get_submodule(owner_name), leaf, param)
        groups.setdefault(f"{part}/{'decay' if decay else 'no_decay'}", []).append((name, param))
    return groups


def build_task(config: Config, manifest: dict, shard_dir: str | Path):
    if config.task == "two_tower":
        from .two_tower import RecommendationTask

        return RecommendationTask(config, manifest["num_users"], manifest["num_items"])
    from .sequential import SequentialTask

    return SequentialTask(config, manifest, shard_dir)
