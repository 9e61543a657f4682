"""Encode the catalogue across ranks, embed held-out users, rank every item, sum the metrics.

Ranks are handled only through the `Collectives` the engine passes in. Every rank runs
the same number of forward calls (items and samples are padded to equal shares), which
ZeRO-3's parameter gathering requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..config import ConfigError, EvalConfig
from ..data.catalogue import catalogue_loader
from ..data.item_store import ItemStore
from ..data.preprocess import ItemPreprocess
from ..data.shard_set import ShardSet
from ..data.stream import PAD, InteractionStream
from .metrics import metric_sums, target_ranks


class NonFiniteModelError(ValueError):
    """The model holds NaN or infinite parameters: no metric is reported from it."""


@dataclass(frozen=True)
class Collectives:
    rank: int
    world_size: int
    gather: Callable[..., torch.Tensor]  # all-gather along dim 0 (uneven=True: ranks may hold different numbers of rows)
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    all_to_all: Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]  # along dim 0 (send sizes, receive sizes)

    def contiguous_share(self, n: int, rank: int | None = None) -> slice:
        """This rank's (or `rank`'s) contiguous part of range(n), in rank order (an uneven all-gather of the parts is
        range(n)); the parts differ in length by one at most, so none is empty while n >= world_size."""
        rank = self.rank if rank is None else rank
        per_rank, longer = divmod(n, self.world_size)
        start = rank * per_rank + min(rank, longer)
        return slice(start, start + per_rank + (rank < longer))


def _identity(x: torch.Tensor, *sizes, uneven: bool = False) -> torch.Tensor:
    return x


def single_process() -> Collectives:
    """One process holds every rank's share: the collectives are identities."""
    return Collectives(0, 1, _identity, _identity, _identity)


def _share(n: int, coll: Collectives) -> tuple[list[int], int]:
    """This rank's contiguous indices of range(n) and how many are real: padded (repeating the last) to equal length."""
    mine = list(range(n)[coll.contiguous_share(n)])
    length = -(-n // coll.world_size)
    return mine + [mine[-1] if mine else 0] * (length - len(mine)), len(mine)


@torch.no_grad()
def encode_catalogue(task, store: ItemStore, preprocess: ItemPreprocess, coll: Collectives, device, batch_size: int, num_workers: int,
                     encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
                     own_share: bool = False) -> tuple[torch.Tensor, ...]:
    """(image, text, has_image) of every item, [N, D], [N, D], [N], identical on every rank; with `encode`, what it
    returns per item (each [N, ...]) and has_image; with `own_share`, the rows of this rank's contiguous share of the
    items only (Collectives.contiguous_share, padded as every rank's is to the same length by repeating its last item),
    nothing gathered.

    In eval mode (no dropout or stochastic depth): a cache or an evaluation holds each item's one deterministic
    encoding, not one random draw of it. Where the task holds this store's frozen-block cache, items are encoded from
    it (the trained blocks only, nothing decoded)."""
    n = len(store)
    outputs: list[torch.Tensor] | None = None
    was_training = task.training
    task.eval()
    mine = _share(n, coll)[0]
    own: list[tuple[torch.Tensor, ...]] = []
    pixel_dtype = next(task.encoder.parameters()).dtype  # bf16 under train.precision=bf16
    from_cache = encode is None and task.frozen_block_states is not None and task.frozen_block_store == store.identity
    if from_cache:
        held = task.frozen_block_items
        if mine and not held.start <= min(mine) <= max(mine) < held.stop:
            raise RuntimeError(f"the frozen-block cache holds items {held.start}..{held.stop - 1}; rank {coll.rank} of "
                               f"{coll.world_size} encodes items {min(mine)}..{max(mine)}: encode with the collectives it was cached with")
        ids = torch.tensor(mine, device=device)
        parts = [{"item_ids": ids[s : s + batch_size]} for s in range(0, len(ids), batch_size)]
    else:
        parts = catalogue_loader(store, preprocess, mine, batch_size, num_workers)
    for part in tqdm(parts, desc=f"encoding {n} items", unit="batch", leave=False, disable=coll.rank != 0):
        ids = part["item_ids"].to(device)
        if from_cache:
            encoded = task.cached_content(ids)
        else:
            images, tokens = part["images"].to(device, pixel_dtype), part["text_tokens"].to(device)
            encoded = (*(encode or task.encode_content)(images, tokens), part["has_image"].to(device))
        if own_share:
            own.append(encoded)
            continue
        ids = coll.gather(ids)
        if outputs is None:
            outputs = [torch.zeros(n, *t.shape[1:], device=device, dtype=t.dtype) for t in encoded]
        for out, t in zip(outputs, encoded):
            out[ids] = coll.gather(t)
    task.train(was_training)
    if own_share:
        return tuple(torch.cat(parts) for parts in zip(*own))
    return tuple(outputs)


def cache_frozen_blocks(task, store: ItemStore, preprocess: ItemPreprocess, coll: Collectives, device, batch_size: int,
                        num_workers: int) -> tuple[int, float]:
    """Hands the task every item's frozen-block outputs (encoder.cache_frozen_blocks), encoded in parallel across ranks,
    each rank keeping its contiguous share alone (padded to the length of every rank's) and every item's has_image;
    a batch's rows of other ranks' items come through `fetch_across_ranks`. Returns the items and MiB this rank holds."""
    if len(store) < coll.world_size:
        raise ConfigError(f"encoder.cache_frozen_blocks: {len(store)} items on {coll.world_size} ranks; each rank holds "
                          f"its share of the catalogue's frozen blocks and needs at least one item")
    sharded = coll.world_size > 1
    *states, has_image = encode_catalogue(task, store, preprocess, coll, device, batch_size, num_workers,
                                          encode=task.encoder.frozen_blocks, own_share=sharded)
    share = coll.contiguous_share(len(store))
    if sharded:  # every item's has_image (a byte each), in item order: the real items of each share
        has_image = coll.gather(has_image[: share.stop - share.start], uneven=True)
    fetch = fetch_across_ranks(tuple(states), len(store), coll) if sharded else None
    task.set_frozen_block_cache(tuple(states), has_image, store.identity, range(len(store))[share], fetch)
    return share.stop - share.start, sum(state.numel() * state.element_size() for state in states) / 2**20


def fetch_across_ranks(states: tuple[torch.Tensor, ...], n: int,
                       coll: Collectives) -> Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, ...]]:
    """A function from item ids (with a host copy of them) to their rows of per-item `states`, which the ranks hold in
    contiguous shares of range(n) (this rank's first). A collective: every rank calls it at once, each with its own
    ids. Each id goes to the rank that holds it and its rows come back (one all-to-all for the ids, one per state for
    the rows, sized by counts taken from the host copy and exchanged over the host group: no device sync); rows are
    copied, never summed, so a rank gets exactly what one process holding every row would read."""
    shares = [coll.contiguous_share(n, rank) for rank in range(coll.world_size)]
    own = shares[coll.rank]
    boundaries = torch.tensor([share.start for share in shares[1:]])  # an id's holder: how many of these it reaches
    boundaries_on_device = boundaries.to(states[0].device)

    def fetch(item_ids: torch.Tensor, host_item_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        on_host = item_ids if item_ids.is_cpu else host_item_ids
        if on_host is None:
            raise RuntimeError("fetching frozen-block rows across ranks needs the batch's item ids on the host (Batch.to keeps them)")
        counts = torch.zeros(coll.world_size, coll.world_size, dtype=torch.int64)  # [asking rank, holding rank]
        counts[coll.rank] = torch.bincount(torch.bucketize(on_host, boundaries, right=True), minlength=coll.world_size)
        counts = coll.all_reduce_sum(counts)
        asked, answered = counts[coll.rank].tolist(), counts[:, coll.rank].tolist()
        # this rank's ids grouped by holder, in their order within each group (a stable sort, on the ids' device)
        by_holder = torch.argsort(torch.bucketize(item_ids, boundaries_on_device, right=True), stable=True)
        wanted_here = coll.all_to_all(item_ids[by_holder], asked, answered) - own.start
        return tuple(torch.empty_like(rows).index_copy_(0, by_holder, rows) for rows in
                     (coll.all_to_all(state[wanted_here], answered, asked) for state in states))

    return fetch


def _held_values(param: torch.Tensor, rank: int) -> torch.Tensor:
    """The values this rank holds: its ZeRO-3 partition less the padding of the last ones, which DeepSpeed allocates
    and never writes (a 1-element logit scale on 2 ranks: rank 1 holds one element of padding), or the whole tensor."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param
    return part.view(-1)[: max(0, min(part.numel(), param.ds_numel - rank * part.numel()))]


def check_finite_parameters(task, coll: Collectives, device) -> None:
    """Raises on every rank if any rank's parameters (its ZeRO-3 partition, or the whole tensors) hold NaN or inf."""
    bad = [name for name, p in task.named_parameters() if not torch.isfinite(_held_values(p, coll.rank)).all()]
    if float(coll.all_reduce_sum(torch.tensor([float(len(bad))], device=device))[0]) > 0:
        where = f" (e.g. {', '.join(bad[:3])})" if bad else " (on another rank)"
        raise NonFiniteModelError(f"the model has non-finite parameters{where}: the run diverged; no metrics are reported "
                                  f"from a broken model")


def seen_mask(users: torch.Tensor, history: torch.Tensor, indptr: torch.Tensor, items: torch.Tensor, num_items: int) -> torch.Tensor:
    """[B, N] True at every item the user interacted with before the target: the training items (seen.npz) and
    the sample's own history, which for a test target also holds the valid item."""
    starts, ends = indptr[users], indptr[users + 1]
    counts = ends - starts
    rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
    offsets = torch.arange(int(counts.sum()), device=users.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    mask = torch.zeros(len(users), num_items + 1, dtype=torch.bool, device=users.device)
    mask[rows, items[torch.repeat_interleave(starts, counts) + offsets]] = True
    mask.scatter_(1, torch.where(history == PAD, num_items, history), True)  # padding marks a scratch column
    return mask[:, :num_items]


@torch.no_grad()
def evaluate(
    task,
    shards: ShardSet | str | Path,
    config: EvalConfig,
    preprocess: ItemPreprocess,
    coll: Collectives,
    device,
    num_workers: int = 0,
    content: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """{split: {"recall@K", "ndcg@K", "mrr@K", "hit@K", "random_recall@K": ..., "samples": n}} over the configured splits.
    `content`: the catalogue's (image, text, has_image) as encoding it now would give (a frozen encoder's cache);
    left None, the catalogue is encoded here when the task ranks by content."""
    check_finite_parameters(task, coll, device)
    shards = ShardSet.of(shards)
    was_training = task.training
    task.eval()
    if task.uses_catalogue_content and content is None:
        content = encode_catalogue(task, shards.store, preprocess, coll, device, config.batch_size, num_workers)
    ranking = task.ranking(content)
    table = ranking.items.float()  # scores in fp32: a bf16 product ties thousands of items with the target
    indptr, seen_items = (torch.from_numpy(a).to(device) for a in shards.seen())

    warm = torch.ones(1, len(table), dtype=torch.bool, device=device)
    warm[0, shards.cold_items] = False

    results = {}
    for split in config.splits:
        if not shards.has_split(split):
            continue
        # Held-out samples are ids only: every rank reads them all and takes an equal share.
        split_stream = InteractionStream(shards, split, config.batch_size, preprocess, resampled=False, shuffle_buffer=0, content=False)
        batches = list(split_stream.batches())
        all_users = torch.cat([b.users for b in batches])
        all_targets = torch.cat([b.targets for b in batches])
        all_history = torch.cat([b.history for b in batches])
        share, real = _share(len(all_users), coll)
        share = torch.tensor(share)
        weight = (torch.arange(len(share)) < real).to(torch.float64)  # padding repeats count zero
        sums: dict[str, torch.Tensor] = {}
        starts = range(0, len(share), config.batch_size)
        for start in tqdm(starts, desc=f"ranking {split}", unit="batch", leave=False, disable=coll.rank != 0):
            rows = share[start : start + config.batch_size]
            users, targets, history = all_users[rows].to(device), all_targets[rows].to(device), all_history[rows].to(device)
            scores = ranking.user_vectors(users, history).float() @ table.T
            excluded = seen_mask(users, history, indptr, seen_items, len(table)) if config.exclude_seen else None
            if split == "cold" and config.cold_candidates == "cold":
                excluded = warm.expand(len(rows), -1) if excluded is None else excluded | warm
            ranks = target_ranks(scores, targets, excluded)
            w = weight[start : start + len(rows)].to(device)
            batch_sums = metric_sums(ranks, config.ks, w)
            # A random ranking's expected Recall@K: K over the items left to rank, for comparison.
            candidates = torch.full_like(targets, len(table), dtype=torch.float64)
            if excluded is not None:
                candidates -= excluded.sum(1) - excluded.gather(1, targets.unsqueeze(1)).squeeze(1).long()
            for k in config.ks:
                batch_sums[f"random_recall@{k}"] = ((k / candidates).clamp(max=1.0) * w).sum()
            for name, value in batch_sums.items():
                sums[name] = sums.get(name, 0) + value
        totals = coll.all_reduce_sum(torch.stack([sums[k] for k in sorted(sums)] + [weight.sum().to(device)]))
        count = float(totals[-1])
        results[split] = {k: float(v) / max(count, 1.0) for k, v in zip(sorted(sums), totals[:-1].tolist())}
        results[split]["samples"] = int(count)
    task.train(was_training)
    return results
