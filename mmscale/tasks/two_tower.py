"""Two-tower recommendation: item encoder + item/user towers + recommender and vision-language losses.

Losses are computed over the gathered global batch, so they equal a single process's on the same global batch.
The members the engine and evaluation use are the `Task` contract (mmscale/tasks/base.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..data.shard_set import ShardSet
from ..data.stream import PAD, Batch
from ..models import build_encoder
from ..models.towers import ItemTower, UserTower
from ..objectives import FUSION_LOSSES, VISION_LANGUAGE_LOSSES
from ..objectives.contrastive import image_text_contrastive_loss
from ..objectives.recommender import bpr_loss, sampled_softmax_loss
from .base import Gather, Ranking, Task
from .vision_language import fusion_losses


class RecommendationTask(Task):
    uses_catalogue_content = True  # the item table is built from every item's encoded content

    def __init__(self, config: Config, shards: ShardSet):
        super().__init__(config, shards)
        rec = config.recommender
        self.encoder = build_encoder(config.encoder)
        self.item_tower = ItemTower(self.encoder.embed_dim, rec.embed_dim, shards.num_items, rec.item_id_embedding)
        self.user_tower = UserTower(shards.num_users, rec.embed_dim, rec.user_id_embedding, rec.history_pooling == "mean")
        self.history_content = config.data.history_content
        self.fusion_items = config.encoder.item_representation == "fusion"
        # fine_tuned: the configured vision-language losses alone until the engine caches the content (the freeze).
        adapting = config.encoder.paradigm == "fine_tuned"
        self.loss_weights = self._weights_of(VISION_LANGUAGE_LOSSES if adapting else ("rec", *VISION_LANGUAGE_LOSSES))
        self.frozen = False
        if config.objectives.logq_correction:  # an item's share of the training interactions: how often batches draw it
            _, seen = shards.seen()
            # an item never drawn counts once (it is never a training target anyway), so none is infinite
            # counts, not their logs: under bf16 DeepSpeed casts float buffers, and log-probabilities near -10 would
            # move in steps of 0.06
            counts = torch.from_numpy(np.bincount(seen, minlength=shards.num_items)).long().clamp(min=1)
            self.register_buffer("sampling_counts", counts, persistent=False)
            self.sampling_total = int(counts.sum())
        else:
            self.sampling_counts = None
        if config.encoder.paradigm == "frozen":
            self.encoder.requires_grad_(False)

    @property
    def freeze_at_step(self) -> int | None:
        """The step at which the encoder is frozen and every item cached (None: never)."""
        return {"frozen": 0, "fine_tuned": self.config.encoder.adapt_steps}.get(self.config.encoder.paradigm)

    @property
    def content_cache_is_current(self) -> bool:
        return self.frozen  # cached at the freeze, in eval mode; the encoder has not trained since

    @property
    def needs_content(self) -> bool:
        """Whether training batches must carry decoded images and tokens."""
        return not self.frozen and self.freeze_at_step != 0 and not self.caches_frozen_blocks

    def content_cache_due(self, step: int, resumed: bool = False) -> bool:
        """Whether the engine should encode the catalogue and call set_content_cache now."""
        freeze = self.freeze_at_step
        return freeze is not None and (step == freeze or (resumed and step >= freeze))

    def training_windows(self) -> dict[str, tuple[int, int | None]]:
        freeze = self.freeze_at_step
        recommender_start = freeze if self.config.encoder.paradigm == "fine_tuned" else 0
        return {"encoder": (0, freeze), "recommender": (recommender_start, None)}

    @property
    def history_from_content(self) -> bool:
        return self.history_content or self.frozen

    def set_content_cache(self, image: torch.Tensor, text: torch.Tensor, has_image: torch.Tensor) -> None:
        """Freezes the encoder: from now on items are this cached content; the encoder's own losses stop."""
        self.content_cache = torch.cat([image, text, has_image.unsqueeze(-1).to(image.dtype)], dim=-1)
        self.frozen = True
        self.loss_weights = self._weights_of(("rec",))

    # -- content ----------------------------------------------------------------------------------
    def encode_content(self, images: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the item tower reads: the image and text embeddings, or the fused item vector in both slots."""
        if self.fusion_items:
            fused = self.encoder.fused_embedding(images, text_tokens)
            return fused, fused
        return self.encoder(images, text_tokens)

    def _cached_content(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cached = self.content_cache[item_ids]
        d = self.encoder.embed_dim
        return cached[..., :d], cached[..., d : 2 * d], cached[..., -1] > 0.5

    def batch_content(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.frozen:
            return self._cached_content(batch.item_ids)
        return super().batch_content(batch)

    def log_sampling(self, item_ids: torch.Tensor) -> torch.Tensor:
        """log P(item drawn into a batch): its share of the training interactions (logQ correction), in fp32."""
        return (self.sampling_counts[item_ids].double() / self.sampling_total).log().float()

    # -- towers -----------------------------------------------------------------------------------
    def item_embeddings(self, image, text, has_image, item_ids) -> torch.Tensor:
        return self.item_tower(image, text, has_image, item_ids)

    @torch.no_grad()
    def ranking(self, content: tuple[torch.Tensor, torch.Tensor, torch.Tensor], chunk: int = 4096) -> Ranking:
        """Items: the item tower over the whole catalogue's (image, text, has_image) content; users: the user tower
        over their ids and history (history items as those item vectors, or their ids alone)."""
        image, text, has_image = content
        ids = torch.arange(len(image), device=image.device)
        items = torch.cat([self.item_embeddings(image[s : s + chunk], text[s : s + chunk], has_image[s : s + chunk], ids[s : s + chunk])
                           for s in range(0, len(ids), chunk)])
        return Ranking(items, lambda users, history: self.user_embeddings(users, history, self.history_embeddings(history, items)))

    def user_embeddings(self, users: torch.Tensor, history: torch.Tensor, history_items: torch.Tensor) -> torch.Tensor:
        """history [B, L] item ids (PAD = none); history_items [B, L, E] their embeddings."""
        return self.user_tower(users, history_items, history != PAD)

    def history_embeddings(self, history: torch.Tensor, content_items: torch.Tensor | None) -> torch.Tensor:
        """History items through the full item tower when their content is at hand, else their ids alone.

        content_items: item tower embeddings indexed by the values of `history` (batch slots in
        training, item ids against the catalogue table in evaluation).
        """
        index = history.clamp(min=0)
        if content_items is not None and self.history_from_content:
            return content_items[index]
        return self.item_tower.id_only(index)

    # -- training ---------------------------------------------------------------------------------
    def forward(self, batch: Batch, gather: Gather) -> dict[str, torch.Tensor]:
        self.count_forward()
        image, text, has_image = self.batch_content(batch)
        targets, all_ids = batch.target_slots, gather(batch.targets)
        losses = {}
        if "rec" in self.loss_weights:
            items = self.item_embeddings(image, text, has_image, batch.item_ids)
            if self.frozen:  # every item's content is cached: history items go through the full tower
                ids = batch.history.clamp(min=0)
                hist = self.item_embeddings(*self._cached_content(ids), ids)
            else:
                hist = self.history_embeddings(batch.history_slots if self.history_content else batch.history, items)
            all_users = gather(self.user_embeddings(batch.users, batch.history, hist))
            all_items = gather(items[targets])
            if self.config.objectives.rec_loss == "softmax":
                log_sampling = self.log_sampling(all_ids) if self.sampling_counts is not None else None
                losses["rec"] = sampled_softmax_loss(all_users, all_items, all_ids, self.config.objectives.rec_temperature, log_sampling)
            else:
                losses["rec"] = bpr_loss(all_users, all_items, all_ids)
        if self.fusion_items and not self.frozen and any(n in self.loss_weights for n in VISION_LANGUAGE_LOSSES):
            image, text = self.encoder(batch.images, batch.text_tokens)  # the contrastive losses compare the modalities
        if "itc" in self.loss_weights:
            losses["itc"] = image_text_contrastive_loss(
                gather(image[targets]), gather(text[targets]), all_ids, gather(has_image[targets]), self.encoder.logit_scale
            )
        fusion = [n for n in FUSION_LOSSES if n in self.loss_weights]
        if fusion:
            losses.update(fusion_losses(self.encoder, fusion, batch.images[targets], batch.text_tokens[targets], image[targets],
                                        text[targets], batch.targets, has_image[targets], gather, self.draws))
        return losses
