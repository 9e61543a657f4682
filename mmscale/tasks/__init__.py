"""Tasks: what is trained. The engine and evaluation use only these members of a task:

    forward(batch, gather) -> {loss name: tensor}     losses over the gathered global batch
    loss_weights: {loss name: weight}                 the losses forward returns now (may change at a phase switch)
    parameter_groups() -> {"part/decay"|"part/no_decay": [(name, parameter)]}
    training_windows() -> {part: (start step, stop step or None)}   when each part learns
    needs_content: bool                               training batches must carry decoded images/tokens
    content_cache_due(step, resumed) -> bool          time to encode the catalogue and call ...
    set_content_cache(image, text, has_image)         ... with every item's encoder content
    encode_content(images, text_tokens) -> (image, text)
    uses_catalogue_content: bool                      item_table needs every item's encoder content
    item_table(content or None) -> [num_items, E]     for full ranking
    user_vectors(users, history, table) -> [B, E]     a user's score for item i is user . table[i]

`build_task` picks the task from the config; nothing else in the engine depends on which it is.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import Config


def parameter_groups(task: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by "part/decay": the part is "encoder" for the item encoder, else
    "recommender". No weight decay for norms, biases, embeddings and the logit scale."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    embeddings = {id(m.weight) for m in task.modules() if isinstance(m, nn.Embedding)}
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        part = "encoder" if name.startswith("encoder.") else "recommender"
        decay = param.dim() >= 2 and id(param) not in embeddings and "logit_scale" not in name
        groups.setdefault(f"{part}/{'decay' if decay else 'no_decay'}", []).append((name, param))
    return groups


def build_task(config: Config, manifest: dict, shard_dir: str | Path):
    if config.task == "two_tower":
        from .two_tower import RecommendationTask

        return RecommendationTask(config, manifest["num_users"], manifest["num_items"])
    from .sequential import SequentialTask

    return SequentialTask(config, manifest, shard_dir)
