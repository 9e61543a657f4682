"""Sequential recommendation: SASRec (item ids only) and MP4SR (multimodal mixup sequence encoder).

MP4SR modes:
  pretrain  sequence-to-item and sequence-to-sequence contrastive losses on mixed sequences, no ids
  finetune  next-item cross-entropy over all items; item ids added to the input and the item side
  joint     both, with the item encoder trained end-to-end (features = encoder only)

Item features come from the item encoder (CLIP's image and text embeddings: one vector per
modality, cached when the encoder is frozen) or from feature files written by
tools/extract_features.py (sets of vectors, pooled by a trained attention layer). Joint mode's item
table (`sequence.item_table`) is either every item encoded each step with gradient (every_step: each
rank runs the trained blocks over its share of the catalogue) or a cache refreshed every
`sequence.cache_refresh_steps` through which only the global batch's items pass their gradient (cached).

The adaptors run once per item of the catalogue each step, never per sequence position.
Random draws (mixup, item drop) are hashed from (user, target, forward count), so a sample gets
the same draws whichever rank it lands on: several ranks reproduce one process exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..data.shard_set import ShardSet
from ..data.stream import PAD, Batch
from ..models import build_encoder
from ..models.sequence import AttentionPooling, CausalSequenceEncoder, MoEAdaptor, complementary_mixup, random_item_drop
from ..objectives import FUSION_LOSSES, VISION_LANGUAGE_LOSSES
from ..objectives.common import at_least_fp32, hashed_uniform, similarities
from ..objectives.contrastive import image_text_contrastive_loss
from ..objectives.mp4sr import sequence_item_loss, sequence_sequence_loss
from .base import FrozenBlockFetch, Gather, Ranking, Task
from .vision_language import fusion_losses


# Items per pass of the trained blocks when every item is encoded: glibc maps each allocation over 32 MiB afresh every
# step (its pages faulted in again); chunks keep the activations under that. 1,682 items, top 2 blocks of MiniLM and
# EfficientNet-Lite0 at 128 px and 32 tokens, forward and backward on 2 threads: 12.7 s in one pass (5.2M minor
# faults), 8.5 s in passes of 128 (0.46M).
EVERY_ITEM_CHUNK = 128


class NextItemTask(Task):
    """What SASRec and MP4SR share: a causal sequence encoder over each user's history, item id vectors, the
    next-item softmax over the catalogue with cold items masked out, and ranking a user by their sequence."""

    def __init__(self, config: Config, shards: ShardSet, losses: tuple[str, ...], what: str):
        super().__init__(config, shards)
        self.loss_weights = self._weights_of(losses)
        if not self.loss_weights:
            raise ConfigError(f"objectives.weights: none of {list(losses)} (the losses of {what}) is non-zero")

    def _add_sequence_encoder(self, shards: ShardSet, with_ids: bool) -> None:
        seq = self.config.sequence
        self.item_id = nn.Embedding(shards.num_items, seq.hidden) if with_ids else None
        if self.item_id is not None:
            nn.init.normal_(self.item_id.weight, std=0.02)
        # Cold-start items never appear in training: they have no id vector, are scored by content alone, and are
        # never negatives of the next-item loss (they could never be its positive; only evaluation ranks them).
        cold = torch.zeros(shards.num_items, dtype=torch.bool)
        cold[shards.cold_items] = True
        self.register_buffer("cold", cold, persistent=False)
        self.register_buffer("warm_items", (~cold).nonzero().squeeze(1), persistent=False)  # the ids training can score
        self.sequence = CausalSequenceEncoder(seq.hidden, seq.layers, seq.heads, seq.dropout, shards.max_history)

    def _id_table(self) -> torch.Tensor | None:
        """Each item's id vector, zero where an item has none: cold items, and in training the items whose id this
        step leaves out (sequence.id_dropout; one draw per item and step, hashed, so every rank drops the same)."""
        if self.item_id is None:
            return None
        has_id, dropout = ~self.cold, self.config.sequence.id_dropout
        if self.training and dropout:
            items = torch.arange(len(has_id), device=has_id.device)
            has_id = has_id & (hashed_uniform(items, self.draws.to(has_id.device), torch.tensor(5)) >= dropout)
        return self.item_id.weight * has_id.unsqueeze(-1).to(self.item_id.weight.dtype)

    @staticmethod
    def _with_ids(table: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        return table if ids is None else table + ids

    def _encode(self, inputs: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.sequence(inputs, history != PAD), dim=-1)

    def _next_item_logits(self, text_seq, image_seq, text_items, image_items) -> torch.Tensor:
        """Each modality's sequence against that modality's item table, summed; cold items masked out (training)."""
        logits = similarities(text_seq, F.normalize(at_least_fp32(text_items), dim=-1))
        if image_seq is not None:
            logits = logits + similarities(image_seq, F.normalize(at_least_fp32(image_items), dim=-1))
        return (logits / self.config.sequence.temperature).masked_fill(self.cold, torch.finfo(logits.dtype).min)

    def _user_vectors(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The sequence representation over `items` (id vectors included); a user with no history gets zeros (no
        all-padding row reaches the sequence encoder): every item ties, so the target counts as missed."""
        has_history = (history != PAD).any(1, keepdim=True)
        return self._encode(items[history.clamp(min=0)], torch.where(has_history, history, 0)) * has_history


class SASRecTask(NextItemTask):
    """SASRec: item id vectors through the causal sequence encoder, next-item cross-entropy over all items."""

    def __init__(self, config: Config, shards: ShardSet):
        super().__init__(config, shards, ("rec",), "sasrec")
        self.encoder = None
        self._add_sequence_encoder(shards, with_ids=True)

    def forward(self, batch: Batch, gather: Gather) -> dict[str, torch.Tensor]:
        self.count_forward()
        seq = self._encode(self.item_id(batch.history.clamp(min=0)), batch.history)
        return {"rec": F.cross_entropy(self._next_item_logits(gather(seq), None, self.item_id.weight, None), gather(batch.targets))}

    @torch.no_grad()
    def ranking(self, content=None) -> Ranking:
        return Ranking(F.normalize(self.item_id.weight, dim=-1), lambda users, history: self._user_vectors(history, self.item_id.weight))


class MP4SRTask(NextItemTask):
    MODE_LOSSES = {"pretrain": ("seq_item", "seq_seq"), "finetune": ("rec",), "joint": ("rec", "seq_item", "seq_seq", *VISION_LANGUAGE_LOSSES)}

    def __init__(self, config: Config, shards: ShardSet):
        seq = config.sequence
        super().__init__(config, shards, self.MODE_LOSSES[seq.mode], seq.mode)
        self.trains_encoder = seq.mode == "joint"  # else the encoder, if any, is frozen and cached (validated)
        self.encodes_every_item = self.trains_encoder and seq.item_table == "every_step"
        self.every_item_passes: list[tuple[torch.Tensor, int]] = []  # (items, how many kept) per pass: set with the cache
        self.from_encoder = seq.features == "encoder"
        self.encoder = build_encoder(config.encoder) if self.from_encoder else None
        if self.encoder is not None:
            if not self.trains_encoder:  # joint mode trains what encoder.trainable_blocks leaves trainable
                self.encoder.requires_grad_(False)
            text_dim = image_dim = self.encoder.embed_dim
        else:
            text_dim, image_dim = self._load_feature_files(shards)
        self.text_adaptor = MoEAdaptor(text_dim, seq.hidden, seq.experts, seq.adaptor_dropout)
        self.image_adaptor = MoEAdaptor(image_dim, seq.hidden, seq.experts, seq.adaptor_dropout)
        self._add_sequence_encoder(shards, with_ids=seq.mode != "pretrain")
        if seq.pretrained:
            self._load_pretrained(seq.pretrained)

    def _load_feature_files(self, shards: ShardSet) -> tuple[int, int]:
        from ..data.features import FeatureFileError, load_features

        dims = []
        for modality, name in (("text", self.config.sequence.text_features), ("image", self.config.sequence.image_features)):
            try:
                tensors, _ = load_features(shards, name)
            except FeatureFileError as e:
                raise ConfigError(f"sequence.{modality}_features: {e}") from e
            vectors = torch.from_numpy(tensors["vectors"]).float()
            self.register_buffer(f"{modality}_vectors", vectors, persistent=False)
            self.register_buffer(f"{modality}_mask", torch.from_numpy(tensors["mask"]).bool(), persistent=False)
            setattr(self, f"{modality}_pool", AttentionPooling(vectors.shape[-1], self.config.sequence.hidden))
            dims.append(vectors.shape[-1])
        return dims[0], dims[1]

    def _load_pretrained(self, path: str) -> None:
        """What an earlier run learnt: a pre-training run's adaptors, pooling and sequence encoder (ids then start
        fresh), or a trained model's, its item id vectors included (joint mode continuing from a finetune run)."""
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise ConfigError(f"sequence.pretrained: {path} does not exist (consolidate the pretrain run first)")
        state = {k: v for k, v in load_file(path).items() if self.item_id is not None or not k.startswith("item_id.")}
        shapes = {k: v.shape for k, v in self.state_dict().items()}
        wrong = [f"{k} is {tuple(v.shape)} there, {tuple(shapes[k])} here" for k, v in state.items() if k in shapes and v.shape != shapes[k]]
        missing, unexpected = self.load_state_dict(state, strict=False) if not wrong else ([], [])
        problems = [*wrong[:5], *(f"{k} missing" for k in missing if not k.startswith("item_id."))][:5] + [f"{k} unexpected" for k in unexpected[:5]]
        if problems:
            raise ConfigError(f"sequence.pretrained: {path} does not fit this model: {'; '.join(problems)}")

    # -- the catalogue's content ----------------------------------------------------------------------------
    @property
    def needs_content(self) -> bool:
        return self.trains_encoder and not self.caches_frozen_blocks

    @property
    def uses_catalogue_content(self) -> bool:
        return self.from_encoder

    @property
    def content_cache_is_current(self) -> bool:
        return self.from_encoder and not self.trains_encoder  # a frozen encoder's one pass

    def content_cache_due(self, step: int, resumed: bool = False) -> bool:
        if not self.from_encoder:
            return False
        if self.encodes_every_item:  # nothing is cached: every step encodes every item
            return False
        if self.trains_encoder:  # refresh: the cache is never more than cache_refresh_steps old
            return resumed or step % self.config.sequence.cache_refresh_steps == 0
        return step == 0 or resumed

    def set_content_cache(self, image: torch.Tensor, text: torch.Tensor, has_image: torch.Tensor) -> None:
        self.content_cache = self._content_features(image, text, has_image)

    # -- item features ---------------------------------------------------------------------------------
    @staticmethod
    def _content_features(image: torch.Tensor, text: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """[N, 2E]: text then image embeddings, a missing image as zeros."""
        return torch.cat([text, image * has_image.unsqueeze(-1).to(image.dtype)], dim=-1)

    def _raw_features(self, content: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's (text, image) features before the adaptors, [N, Dt] and [N, Di], from the encoder's
        content [N, 2E] (the cache or a catalogue encoding) or the feature files."""
        if not self.from_encoder:
            return self.text_pool(self.text_vectors, self.text_mask), self.image_pool(self.image_vectors, self.image_mask)
        d = self.encoder.embed_dim
        return content[:, :d], content[:, d:]

    def set_frozen_block_cache(self, states: tuple[torch.Tensor, ...], has_image: torch.Tensor, store_identity: tuple,
                               items: range | None = None, fetch: FrozenBlockFetch | None = None) -> None:
        super().set_frozen_block_cache(states, has_image, store_identity, items, fetch)
        if not self.encodes_every_item:  # the cached table reads the batch's items only
            return
        items = self.frozen_block_items
        held = (self.warm_items >= items.start) & (self.warm_items < items.stop)
        # Selected once: a boolean index each step would be a host sync.
        self.every_item_passes = [(chunk, len(chunk)) for chunk in self.warm_items[held].split(EVERY_ITEM_CHUNK)]
        if len(items) < len(self.cold):  # one rank's share: the same number of passes on every rank (ZeRO-3 gathers
            # the trained blocks' parameters for each), a rank with fewer warm items encoding one item and dropping it
            missing = -(-len(states[0]) // EVERY_ITEM_CHUNK) - len(self.every_item_passes)
            self.every_item_passes += [(self.warm_items.new_tensor([items.start]), 0)] * missing

    def _every_item(self, gather: Gather) -> torch.Tensor:
        """Every item's content [N, 2E] through the encoder's trained blocks, with gradient: each rank encodes the warm
        items whose frozen-block outputs it holds (its contiguous share of the catalogue) and the all-gather (with
        gradient) lays the shares end to end, so the loss's gradient reaches the encoder through every item, a negative
        as much as a target. Cold items get zero rows without running the encoder: training never scores them (masked
        out of the softmax, absent from every training sequence), so their rows carry no gradient."""
        parts = [self._content_features(*self.cached_content(items))[:kept] for items, kept in self.every_item_passes]
        rows = gather(torch.cat(parts), uneven=True)
        return rows.new_zeros(len(self.cold), rows.shape[1]).index_copy(0, self.warm_items, rows)

    def items_encoded(self, batch: Batch) -> int:
        if self.encodes_every_item:
            return sum(kept for _, kept in self.every_item_passes)
        return len(batch.item_ids)

    def _with_fresh(self, fresh: torch.Tensor, batch: Batch, gather: Gather) -> torch.Tensor:
        """The cache, its rows of the global batch's items carrying their fresh encodings' gradient [N, 2E].

        Every row keeps the cache's value; a batch item's row is `cached + fresh - fresh.detach()`
        (straight-through), so the encoder gets the gradient of the table's batch rows at the cached point, and none
        through the other rows: the loss's push away from negatives outside the batch never reaches it (at a refresh,
        the encoder gradient's cosine with the loss's is 0.16 in tests/test_exactness.py). Given their fresh
        values instead, the batch's items (each one some sequence's target) would differ from every other item
        by how far the encoder moved since the refresh, and the model learns to pick the fresh rows: with tiny
        CLIP on ml100k-mm, 9 steps after a refresh they scored 4-6 logits above the same items' cached rows
        and the next-item loss was 5.6 against 7.5 on the cached table.

        Every rank holds every rank's fresh items (an uneven all-gather with gradient), so each rank's loss
        sees the table one process would on the same global batch. An item on several ranks is taken once:
        its other copies are written to a scratch row that is dropped.
        """
        rows, ids = gather(fresh, uneven=True), gather(batch.item_ids, uneven=True)
        rows = self.content_cache[ids].to(rows.dtype) + (rows - rows.detach())
        n = len(self.content_cache)
        position = torch.arange(len(ids), device=ids.device)
        first = torch.full((n + 1,), len(ids), device=ids.device, dtype=ids.dtype).scatter_reduce(0, ids, position, "amin")
        target = torch.where(first[ids] == position, ids, torch.full_like(ids, n))
        table = torch.cat([self.content_cache, self.content_cache.new_zeros(1, self.content_cache.shape[1])])
        return table.index_put((target,), rows.to(table.dtype))[:n]

    # -- training ----------------------------------------------------------------------------------------
    def forward(self, batch: Batch, gather: Gather) -> dict[str, torch.Tensor]:
        self.count_forward()
        history, index = batch.history, batch.history.clamp(min=0)
        all_targets = gather(batch.targets)
        tau = self.config.sequence.temperature
        losses = {}
        content = self.content_cache
        if self.encodes_every_item:  # the encoder runs once: its outputs feed the item table and the vision-language losses
            content = self._every_item(gather)
            d = self.encoder.embed_dim
            text_emb, image_emb = content[batch.item_ids, :d], content[batch.item_ids, d:]  # image: zeros where none
            has_image = self.frozen_block_has_image[batch.item_ids]
        elif self.trains_encoder:
            image_emb, text_emb, has_image = self.batch_content(batch)
            content = self._with_fresh(self._content_features(image_emb, text_emb, has_image), batch, gather)
        text, image = self._raw_features(content)
        text, image = self.text_adaptor(text), self.image_adaptor(image)
        if "rec" in self.loss_weights:
            ids = self._id_table()
            text_seq = self._encode(text[index] + ids[index], history)
            image_seq = self._encode(image[index] + ids[index], history)
            logits = self._next_item_logits(gather(text_seq), gather(image_seq), self._with_ids(text, ids), self._with_ids(image, ids))
            losses["rec"] = F.cross_entropy(logits, all_targets)
        if "seq_item" in self.loss_weights or "seq_seq" in self.loss_weights:
            text_led, image_led, kept = self._mixed_sequences(batch, text, image)
            text_led, image_led = gather(self._encode(text_led, kept)), gather(self._encode(image_led, kept))
            target_text, target_image = gather(F.normalize(text[batch.targets], dim=-1)), gather(F.normalize(image[batch.targets], dim=-1))
            if "seq_item" in self.loss_weights:
                losses["seq_item"] = sequence_item_loss(text_led, target_text, all_targets, tau) + sequence_item_loss(image_led, target_image, all_targets, tau)
            if "seq_seq" in self.loss_weights:
                losses["seq_seq"] = sequence_sequence_loss(text_led, image_led, all_targets, tau)
        fusion = [n for n in FUSION_LOSSES if n in self.loss_weights]
        if "itc" in self.loss_weights or fusion:
            slots = batch.target_slots
            if "itc" in self.loss_weights:
                losses["itc"] = image_text_contrastive_loss(gather(image_emb[slots]), gather(text_emb[slots]), all_targets,
                                                            gather(has_image[slots]), self.encoder.logit_scale)
            if fusion:
                losses.update(fusion_losses(self.encoder, fusion, batch.images[slots], batch.text_tokens[slots], image_emb[slots],
                                            text_emb[slots], batch.targets, has_image[slots], gather, self.draws))
        return losses

    def _mixed_sequences(self, batch: Batch, text: torch.Tensor, image: torch.Tensor):
        """Item drop, then complementary mixup, with per-sequence ratios and per-position draws hashed from the sample."""
        seq = self.config.sequence
        users, targets = batch.users.unsqueeze(1), batch.targets.unsqueeze(1)
        positions = torch.arange(batch.history.shape[1], device=users.device).unsqueeze(0)
        draw = self.draws.to(users.device)
        drop_ratio = seq.drop_max * hashed_uniform(users, targets, draw, torch.tensor(1))
        drop_draws = hashed_uniform(users, targets, draw, torch.tensor(2), positions)
        kept = random_item_drop(batch.history, drop_ratio, draws=drop_draws)
        mix_ratio = seq.mixup_max * hashed_uniform(users, targets, draw, torch.tensor(3))
        mix_draws = hashed_uniform(users, targets, draw, torch.tensor(4), positions)
        index = kept.clamp(min=0)
        text_led, image_led = complementary_mixup(text[index], image[index], kept != PAD, mix_ratio, draws=mix_draws)
        return text_led, image_led, kept

    # -- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def ranking(self, content) -> Ranking:
        """Items: [N, 2H], each modality's item vectors side by side (ids added), normalised per modality; users:
        the text-led and image-led sequence representations, so user . item sums the modalities. Computed from
        `content` (a catalogue encoding), never from or into the training cache."""
        text, image = self._raw_features(self._content_features(*content) if content is not None else None)
        ids = self._id_table()
        text, image = self._with_ids(self.text_adaptor(text), ids), self._with_ids(self.image_adaptor(image), ids)
        items = torch.cat([F.normalize(text, dim=-1), F.normalize(image, dim=-1)], dim=-1)
        return Ranking(items, lambda users, history: torch.cat([self._user_vectors(history, text), self._user_vectors(history, image)], dim=-1))
