"""The task contract: everything the engine and evaluation ask of what is trained, and what tasks share.

A task is an nn.Module holding the item encoder (if any), the recommender and the objectives. The engine sees:

    forward(batch, gather) -> {loss name: tensor}     losses over the gathered global batch (`gather`: the engine's
                                                      all-gather with gradient; gather(x, uneven=True) for ranks
                                                      holding different numbers of rows)
    loss_weights: {loss name: weight}                 the losses forward returns now (a phase switch may change them)
    parameter_groups() -> {"part/decay"|"part/no_decay": [(name, parameter)]}
    training_windows() -> {part: (start step, stop step or None)}   when each part learns
    needs_content: bool                               training batches must carry decoded images and tokens
    content_cache_due(step, resumed) -> bool          a phase switch: time to encode the catalogue (eval mode) and ...
    set_content_cache(image, text, has_image)         ... hand every item's content to the task (fine_tuned's freeze,
                                                      joint mode's refresh, a frozen encoder's one pass)
    content_parameters() -> [parameter]               what encoding the catalogue reads (ZeRO-3 gathers them)
    encode_content(images, text_tokens) -> (image, text)
    caches_frozen_blocks: bool                        encoder.cache_frozen_blocks: the engine encodes the catalogue's
    set_frozen_block_cache(states, has_image, store,  frozen blocks once and hands them over; batches then need no content;
                           items, fetch)              the states' first rows are these items' (this rank's contiguous
                                                      share, padded to the length of every rank's: every item on one
                                                      rank); has_image covers every item; fetch(item_ids, host copy):
                                                      any items' rows from the ranks that hold them (a collective)
    cached_content(item_ids) -> (image, text, has_image)  this rank's items from that cache (catalogue encodings)
    uses_catalogue_content: bool                      ranking needs every item's encoder content
    content_cache_is_current: bool                    the cached content is what encoding the catalogue now would
                                                      give (the encoder no longer trains): evaluation ranks with it
    items_encoded(batch) -> int                       items a training step runs through the encoder on this rank
    ranking(content or None) -> Ranking               item table and user vectors for full ranking

A task knows nothing of the ranks but its share of the items; every random draw of an objective is hashed from the sample
and `draws`, the forward count, so a sample gets the same draws on whichever rank it lands.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import Config
from ..data.shard_set import ShardSet
from ..data.stream import Batch
from ..models.encoder import ItemEncoder

Gather = Callable[..., torch.Tensor]
# (item ids, their host copy) -> their frozen-block outputs, from the ranks that hold them
FrozenBlockFetch = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, ...]]


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
    return len(getattr(param, "ds_shape", param.shape)) >= 2 and "proj" in name  # ds_shape: ZeRO-3 partitioned


class Task(nn.Module, ABC):
    encoder: ItemEncoder | None

    def __init__(self, config: Config, shards: ShardSet):
        super().__init__()
        self.config = config
        self.loss_weights: dict[str, float] = {}
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))  # forward count for hashed randomness
        # every item's encoder content once cached (persistent=False: checkpoints save it beside the weights)
        self.register_buffer("content_cache", torch.empty(0), persistent=False)
        # encoder.cache_frozen_blocks: the frozen-block outputs of frozen_block_items (this rank's share), what fetches
        # other ranks' items' (several ranks), every item's has_image, and the item store they are of (never saved: a
        # function of frozen weights and the items, recomputed at every start)
        self.frozen_block_states: tuple[torch.Tensor, ...] | None = None
        self.frozen_block_items = range(0)
        self.frozen_block_fetch: FrozenBlockFetch | None = None
        self.frozen_block_has_image: torch.Tensor | None = None
        self.frozen_block_store: tuple | None = None

    @abstractmethod
    def forward(self, batch: Batch, gather: Gather) -> dict[str, torch.Tensor]:
        ...

    @abstractmethod
    def ranking(self, content: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> Ranking:
        ...

    def count_forward(self) -> None:
        """Advances the draws of hashed randomness; call first in forward."""
        if self.training:
            self.draws += 1

    def _weights_of(self, names) -> dict[str, float]:
        """The configured non-zero loss weights among `names`."""
        return {name: w for name, w in self.config.objectives.weights.items() if name in names and w}

    # -- optimisation -----------------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by "part/decay": the part is "encoder" for the item encoder, else "recommender";
        decay as `decays` says."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "encoder" if name.startswith("encoder.") else "recommender"
            owner_name, _, leaf = name.rpartition(".")
            decay = decays(self.get_submodule(owner_name), leaf, param)
            groups.setdefault(f"{part}/{'decay' if decay else 'no_decay'}", []).append((name, param))
        return groups

    def training_windows(self) -> dict[str, tuple[int, int | None]]:
        """[start, stop) steps in which each part (parameter-group prefix) learns; None: to the end."""
        return {"encoder": (0, None), "recommender": (0, None)}

    # -- the catalogue's content ----------------------------------------------------------------------------
    needs_content = False
    uses_catalogue_content = False
    content_cache_is_current = False

    def content_cache_due(self, step: int, resumed: bool = False) -> bool:
        return False

    def set_content_cache(self, image: torch.Tensor, text: torch.Tensor, has_image: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} caches no content")

    def content_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters()) if self.encoder is not None else []

    def encode_content(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(images, text_tokens)

    @property
    def caches_frozen_blocks(self) -> bool:
        return self.config.encoder.cache_frozen_blocks

    def set_frozen_block_cache(self, states: tuple[torch.Tensor, ...], has_image: torch.Tensor, store_identity: tuple,
                               items: range | None = None, fetch: FrozenBlockFetch | None = None) -> None:
        """`items`: whose outputs the states' first rows are (None: every item's, in order); rows after them are padding.
        `fetch`: any items' rows, on every rank at once; None where the states hold every item."""
        items = range(len(has_image)) if items is None else items
        if fetch is None and len(items) != len(has_image):
            raise ValueError(f"a frozen-block cache of items {items.start}..{items.stop - 1} of {len(has_image)} needs a fetch "
                             f"for the others")
        self.frozen_block_states, self.frozen_block_has_image, self.frozen_block_store = states, has_image, store_identity
        self.frozen_block_items, self.frozen_block_fetch = items, fetch

    def _held_frozen_blocks(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        first = self.frozen_block_items.start
        rows = item_ids - first if first else item_ids
        return tuple(state[rows] for state in self.frozen_block_states)

    def cached_content(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, text, has_image) of these items (held by this rank) from their cached frozen-block outputs."""
        image, text = self.encoder.from_frozen_blocks(*self._held_frozen_blocks(item_ids))
        return image, text, self.frozen_block_has_image[item_ids]

    def items_encoded(self, batch: Batch) -> int:
        return len(batch.item_ids)

    def batch_content(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, text, has_image) of the batch's items (batch.item_ids) through the encoder, with gradient."""
        if self.frozen_block_states is not None:
            states = (self._held_frozen_blocks(batch.item_ids) if self.frozen_block_fetch is None
                      else self.frozen_block_fetch(batch.item_ids, batch.host_item_ids))  # every rank at once
            image, text = self.encoder.from_frozen_blocks(*states)
            return image, text, self.frozen_block_has_image[batch.item_ids]
        image, text = self.encode_content(batch.images, batch.text_tokens)
        return image, text, batch.has_image
