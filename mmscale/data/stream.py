"""The WebDataset stream: shards -> per-stream samples -> shuffled raw batches -> this rank's share -> Batch.

Order of stages and why:
  1. shard selection (explicit rank/world, so tests can simulate many);
  2. tar -> raw samples (bytes only, nothing decoded yet);
  3. seeded shuffle buffer;
  4. batching raw samples, then skipping batches already consumed (resume is cheap: no decode);
  5. decoding each *unique* item of a batch once (targets from the sample, history items from
     the item store), transforming images and tokenising texts.

Two modes:
  * resampled (training): the global micro-batch of step t is the concatenation of the t-th batches
    of `streams` logical streams, each drawing shards with replacement through its own seeded shuffle;
    rank r takes places [r * batch, (r + 1) * batch) of it. The order is a function of (seed, epoch,
    streams) alone, so 1, N or M ranks (and any number of loader workers) read the same global batches:
    a run resumed on another world size continues the order it started. With streams = ranks (the
    default) each rank reads one stream; otherwise the few it overlaps. An epoch is
    floor(samples / global micro-batch) steps, from the manifest.
  * exact (evaluation): shards are dealt round-robin to (rank, worker); every sample is seen once;
    the last batch of a worker may be partial.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, fields
from itertools import count, islice
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import IMAGE_KEYS, ShardFormatError
from .shard_set import ShardSet
from .preprocess import ItemPreprocess
from .workers import leave_sigterm_to_the_trainer, release_free_heap

PAD = -1  # history padding and "no slot"
# Resampled reading draws shards with replacement: with a single readable shard among N, the chance that none of
# 20 N draws hits it is e^-20. More draws than that without one readable sample: every shard is damaged.
UNREADABLE_DRAWS_PER_SHARD = 20


@dataclass
class Batch:
    """One micro-batch. Items are referenced by slot in `item_ids`, decoded once each."""

    users: torch.Tensor  # [B] user index
    targets: torch.Tensor  # [B] item index
    history: torch.Tensor  # [B, L] item index, left-padded with PAD (most recent last)
    item_ids: torch.Tensor  # [U] the batch's unique items with content
    target_slots: torch.Tensor  # [B] slot of each target in item_ids
    history_slots: torch.Tensor  # [B, L] slot of each history item, PAD where none/no content
    images: torch.Tensor  # [U, 3, H, W]
    has_image: torch.Tensor  # [U] bool; False rows of `images` are zeros
    text_tokens: torch.Tensor  # [U, T]
    corrupt_samples: torch.Tensor  # [] samples this worker skipped as corrupt since its last batch
    # item_ids as the loader made them, kept on the host by `to`: what a step decides on the host reads them there,
    # never the device's copy (that read would wait for the device)
    host_item_ids: torch.Tensor | None = None

    def to(self, device, float_dtype: torch.dtype | None = None, non_blocking: bool = True) -> "Batch":
        """On `device`, the float fields (pixels) in `float_dtype` where given: a bf16 model takes bf16 input."""
        def moved(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype=float_dtype if t.is_floating_point() else None, non_blocking=non_blocking)

        return Batch(**{f.name: moved(getattr(self, f.name)) for f in fields(self) if f.name != "host_item_ids"},
                     host_item_ids=self.item_ids if self.item_ids.is_cpu else self.host_item_ids)

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self) if f.name != "host_item_ids"})

    def __len__(self) -> int:
        return len(self.users)


def worker_batch_counts(batches: int, num_workers: int) -> list[int]:
    """How many of `batches` each worker yields when a DataLoader takes them round-robin."""
    return [batches // num_workers + (1 if w < batches % num_workers else 0) for w in range(num_workers)]


class InteractionStream(IterableDataset):
    """Yields `Batch`es of one split for one rank; give it to `make_loader` or iterate directly."""

    def __init__(
        self,
        shards: ShardSet | str | Path,
        split: str,
        batch_size: int,
        preprocess: ItemPreprocess,
        *,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        history_content: bool = True,
        content: bool = True,
        streams: int = 0,
    ):
        """`streams`: the logical streams of the training order (0: one per rank); world_size x batch_size must be a
        multiple of it."""
        self.shards = ShardSet.of(shards)
        self.shard_dir = self.shards.path
        self.split, self.batch_size, self.preprocess = split, batch_size, preprocess
        self.rank, self.world_size = rank, world_size
        self.streams = streams or world_size
        if resampled and (world_size * batch_size) % self.streams:
            raise ValueError(f"a global micro-batch of {world_size} ranks x {batch_size} does not split into {self.streams} streams")
        self.stream_batch = world_size * batch_size // self.streams
        self.resampled, self.shuffle_buffer, self.seed = resampled, shuffle_buffer, seed
        self.wants_history_content = history_content
        self.content = content  # False: ids only, nothing decoded (evaluation, cached features)
        self.urls = self.shards.split_urls(split)
        self.max_history = self.shards.max_history
        self.store = self.shards.store
        self._shards_since_sample = 0
        self.epoch, self.start_batch = 0, 0
        self._corrupt = 0
        if resampled and self.batches_per_rank() == 0:
            raise ValueError(
                f"{self.shard_dir}: split '{split}' has {self.shards.split_size(split)} samples, "
                f"fewer than one global batch ({world_size} ranks x {batch_size})"
            )

    @property
    def history_content(self) -> bool:
        """Whether history items' content is decoded too (only while content is)."""
        return self.wants_history_content and self.content

    # -- epoch accounting ------------------------------------------------------------------
    def batches_per_rank(self) -> int:
        """Resampled mode: whole batches each rank yields per epoch (the same on every rank)."""
        return self.shards.split_size(self.split) // (self.world_size * self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0, content: bool | None = None) -> None:
        """Where the next iteration starts: `start_batch` batches of `epoch` are already consumed; `content`: whether
        its batches decode images and texts from there on (unchanged when None)."""
        self.epoch, self.start_batch = epoch, start_batch
        if content is not None:
            self.content = content

    # -- stages -----------------------------------------------------------------------------
    def _rng(self, *parts) -> random.Random:
        # A string seed is hashed with SHA-512: the same in every process, unlike hash().
        return random.Random("-".join(str(p) for p in (self.seed, self.epoch, *parts)))

    def _shards(self, source: int, num_sources: int) -> Iterator[dict]:
        """Shard urls for logical stream `source` (resampled) or for this rank's worker `source` of `num_sources`
        (exact); each is checked against the dataset the run started on."""
        if self.resampled:
            rng = self._rng("shards", source)
            while True:
                self.shards.check_unchanged()
                self._shards_since_sample += 1
                if self._shards_since_sample > UNREADABLE_DRAWS_PER_SHARD * len(self.urls):
                    raise ShardFormatError(f"{self.shard_dir}: no readable '{self.split}' sample in the last {self._shards_since_sample} "
                                           f"shard reads: every shard seems damaged; rebuild the folder")
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        self._rng("shards").shuffle(urls)  # the same permutation on every rank
        slot, slots = self.rank * num_sources + source, self.world_size * num_sources
        for url in urls[slot::slots]:
            self.shards.check_unchanged()
            yield {"url": url}

    def _count_corrupt(self, exn: Exception) -> bool:
        self._corrupt += 1
        return True  # continue with the next sample/shard

    def _parse_headers(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Drops (and counts) samples whose header is unreadable, before batching, so batches stay whole."""
        for sample in samples:
            try:
                header = json.loads(sample["json"])
                history = [int(i) for i in header["history"]][-self.max_history :]
                sample["parsed"] = (int(header["user"]), int(header["target"]), history)
                if "txt" in sample:
                    sample["txt"] = sample["txt"].decode()  # not UTF-8: the sample is corrupt, not the worker
            except Exception:
                self._corrupt += 1
                continue
            self._shards_since_sample = 0
            yield sample

    def _pipeline(self, source: int, num_sources: int, batch_size: int) -> Iterator[list[dict]]:
        """Raw batches of one logical stream (resampled) or of one (rank, worker)'s shards (exact)."""
        pipeline = wds.DataPipeline(
            lambda: self._shards(source, num_sources),
            wds.tarfile_to_samples(handler=self._count_corrupt),
            self._parse_headers,
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                        rng=self._rng("samples", source) if self.resampled else self._rng("samples", self.rank, source))
            if self.shuffle_buffer > 1
            else (lambda src: src),
            wds.batched(batch_size, collation_fn=list, partial=not self.resampled),
        )
        return iter(pipeline)

    def raw_batches(self, worker: int = 0, num_workers: int = 1) -> Iterator[list[dict]]:
        """Undecoded batches for one (logical) worker of this rank: in resampled mode, this rank's places of global
        micro-batches worker, worker + num_workers, ..."""
        if not self.resampled:
            return self._pipeline(worker, num_workers, self.batch_size)
        return islice(self._rank_share(worker, num_workers), worker_batch_counts(self.batches_per_rank(), num_workers)[worker])

    def _rank_share(self, worker: int, num_workers: int) -> Iterator[list[dict]]:
        first, size = self.rank * self.batch_size, self.stream_batch
        streams = range(first // size, (first + self.batch_size - 1) // size + 1)
        pipelines = [self._pipeline(s, self.streams, size) for s in streams]
        # Every worker reads its streams whole and keeps its own steps: raw reading is cheap, decoding is not. A corrupt
        # sample is counted once: by the worker whose step it precedes, on the rank that holds its stream's first place.
        counts = [first <= s * size < first + self.batch_size for s in streams]
        for step in count():
            mine, parts = step % num_workers == worker, []
            for pipeline, counted in zip(pipelines, counts):
                before = self._corrupt
                part = next(pipeline, None)
                if part is None:
                    return
                if not (mine and counted):
                    self._corrupt = before
                parts.append(part)
            if mine:
                offset = first - streams[0] * size
                yield [sample for part in parts for sample in part][offset : offset + self.batch_size]

    def batches(self, worker: int = 0, num_workers: int = 1) -> Iterator[Batch]:
        """Decoded batches of one logical worker, after skipping those consumed before a resume."""
        skip = worker_batch_counts(self.start_batch, num_workers)[worker] if self.resampled else 0
        for raw in islice(self.raw_batches(worker, num_workers), skip, None):
            yield self.decode(raw)
        if self._corrupt and not self.resampled:  # corrupt samples after the last batch: report them in an empty one
            yield self.decode([])

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # On resume the DataLoader still asks worker 0 first; rotating the roles makes the
        # physical worker 0 play the worker that owns batch `start_batch`, keeping the order.
        logical = (worker + self.start_batch) % num_workers if self.resampled else worker
        return self.batches(logical, num_workers)

    # -- decoding ------------------------------------------------------------------------------
    def _decode_image(self, data: bytes) -> torch.Tensor | None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                return self.preprocess.image_transform(img.convert("RGB"))
        except Exception:  # a corrupt image costs its item the image, never the run
            self._corrupt += 1
            return None

    def _content(self, item: int, sample: dict | None) -> tuple[tuple[bytes, str] | None, str]:
        """(image bytes and extension or None, text): from the sample when it carries them, else the store."""
        if sample is not None and "txt" in sample:
            ext = next((k for k in IMAGE_KEYS if k in sample), None)
            return ((sample[ext], ext) if ext else None), sample["txt"]
        return self.store.image(item), self.store.text(item)

    def decode(self, raw: list[dict]) -> Batch:
        headers, slots = [], {}
        contents: list[tuple[tuple[bytes, str] | None, str]] = []

        def slot_of(item: int, sample: dict | None) -> int:
            if item not in slots:
                slots[item] = len(slots)
                if self.content:
                    contents.append(self._content(item, sample))
            return slots[item]

        for sample in raw:
            user, target, history = sample["parsed"]
            headers.append((user, target, history, slot_of(target, sample)))
        b, length = len(headers), self.max_history
        history = torch.full((b, length), PAD, dtype=torch.long)
        history_slots = torch.full((b, length), PAD, dtype=torch.long)
        for row, (_, _, items, _) in enumerate(headers):
            if items:
                history[row, length - len(items) :] = torch.tensor(items)
                if self.history_content:
                    history_slots[row, length - len(items) :] = torch.tensor([slot_of(i, None) for i in items])

        size = self.preprocess.image_size if self.content else 0
        images = torch.zeros(len(contents), 3, size, size)
        has_image = torch.zeros(len(contents), dtype=torch.bool)
        for slot, (image, _) in enumerate(contents):
            pixels = self._decode_image(image[0]) if image is not None else None
            if pixels is not None:
                images[slot], has_image[slot] = pixels, True
        texts = [text for _, text in contents]
        corrupt, self._corrupt = self._corrupt, 0
        return Batch(
            users=torch.tensor([h[0] for h in headers], dtype=torch.long),
            targets=torch.tensor([h[1] for h in headers], dtype=torch.long),
            history=history,
            item_ids=torch.tensor(list(slots), dtype=torch.long),
            target_slots=torch.tensor([h[3] for h in headers], dtype=torch.long),
            history_slots=history_slots,
            images=images,
            has_image=has_image,
            text_tokens=self.preprocess.tokenize(texts) if self.content else torch.zeros(0, 0, dtype=torch.long),
            corrupt_samples=torch.tensor(corrupt),
        )


def make_loader(stream: InteractionStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the stream: batches are made in the workers, so batch_size=None.

    Its worker seeds come from a generator of its own: drawn from the global one (torch's default), each new
    loader would shift the dropout draws, and a resumed run would no longer equal an uninterrupted one."""
    if num_workers:
        release_free_heap()
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # each epoch re-forks workers with the new epoch/start_batch
        prefetch_factor=4 if num_workers else None,
        generator=torch.Generator(),
        worker_init_fn=leave_sigterm_to_the_trainer,
    )
