"""Top-K recommendations from a ranking's tables: exact (brute force) or through a FAISS index of the items.

A user's vector is the one evaluation ranks their held-out item with: the task's user vector over the history
before the user's sample in a split (the test split by default: everything but the last interaction), so the
held-out item can be marked among the recommendations. Items the user interacted with before it are never
recommended, as in evaluation.

FAISS indexes are inner product over the L2-normalised item table (`item_embeddings`), the score the ranking
uses: "flat" is exact; "hnsw" (graph) and "ivf" (k-means cells, probed `nprobe` at a time) are approximate
options for catalogues where a flat scan is too slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.shard_set import ShardSet
from ..data.stream import InteractionStream
from ..tasks.base import Ranking
from .evaluate import seen_mask

INDEX_KINDS = ("flat", "hnsw", "ivf")
HNSW_NEIGHBOURS = 32  # graph degree (faiss's M)
IVF_POINTS_PER_CELL = 39  # faiss's k-means wants at least 39 training points per cell


@dataclass(frozen=True)
class HeldOut:
    """Each user's sample of one split: the history before it and its item, ids as in the shards."""

    users: torch.Tensor  # [U] user indices
    history: torch.Tensor  # [U, L] item indices, PAD-padded on the left (most recent last)
    targets: torch.Tensor  # [U] the held-out item

    @classmethod
    def empty(cls, max_history: int) -> "HeldOut":
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, max_history, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    def rows(self, users: torch.Tensor) -> torch.Tensor:
        """Positions of `users` in this table; raises naming the first user without a sample."""
        position = {int(u): i for i, u in enumerate(self.users)}
        missing = [int(u) for u in users if int(u) not in position]
        if missing:
            raise KeyError(f"user index {missing[0]} has no held-out sample")
        return torch.tensor([position[int(u)] for u in users], dtype=torch.long)


def held_out(shards: ShardSet, split: str = "test", batch_size: int = 1024) -> HeldOut:
    if not shards.has_split(split):
        raise ValueError(f"{shards.path} has no {split} split")
    stream = InteractionStream(shards, split, batch_size, None, resampled=False, shuffle_buffer=0, content=False)
    batches = list(stream.batches())
    return HeldOut(torch.cat([b.users for b in batches]), torch.cat([b.history for b in batches]), torch.cat([b.targets for b in batches]))


@torch.no_grad()
def user_vectors(ranking: Ranking, samples: HeldOut, batch_size: int = 1024) -> torch.Tensor:
    """[U, E] float32: the ranking's user vector of each held-out sample."""
    device = ranking.items.device
    parts = [ranking.user_vectors(samples.users[i : i + batch_size].to(device), samples.history[i : i + batch_size].to(device))
             for i in range(0, len(samples.users), batch_size)]
    return torch.cat(parts).float().cpu() if parts else torch.zeros(0, ranking.items.shape[1])


def excluded_items(shards: ShardSet, samples: HeldOut, rows: torch.Tensor) -> torch.Tensor:
    """[R, N] True at the items each user interacted with before the held-out one (never recommended)."""
    indptr, items = (torch.from_numpy(a) for a in shards.seen())
    return seen_mask(samples.users[rows], samples.history[rows], indptr, items, shards.num_items)


def top_k(vectors: torch.Tensor, items: torch.Tensor, k: int, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: (scores [R, k], item indices [R, k]) by brute force over every item, excluded items left out."""
    scores = (vectors @ items.T).masked_fill(excluded, float("-inf"))
    return scores.topk(min(k, items.shape[0]), dim=1)


def build_index(items: torch.Tensor, kind: str = "flat", seed: int = 0):
    """A FAISS inner-product index over the item table (row = item index)."""
    import faiss

    table = np.ascontiguousarray(items.float().numpy())
    n, dim = table.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        cells = max(1, min(int(np.sqrt(n)), n // IVF_POINTS_PER_CELL))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(table)
        index.nprobe = max(1, cells // 4)
    else:
        raise ValueError(f"index kind {kind!r}: one of {', '.join(INDEX_KINDS)}")
    index.add(table)
    return index


def index_top_k(index, vectors: torch.Tensor, k: int, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [R, k], item indices [R, k]) from a FAISS index: it is asked for k plus each user's excluded count,
    the excluded items are dropped, the first k kept (an approximate index may return fewer: -1, -inf)."""
    wanted = min(index.ntotal, k + int(excluded.sum(1).max()) if len(excluded) else k)
    scores, ids = index.search(np.ascontiguousarray(vectors.float().numpy()), wanted)
    out_scores = torch.full((len(vectors), k), float("-inf"))
    out_items = torch.full((len(vectors), k), -1, dtype=torch.long)
    for row in range(len(vectors)):
        kept = [(s, i) for s, i in zip(scores[row].tolist(), ids[row].tolist()) if i >= 0 and not excluded[row, i]][:k]
        if kept:
            out_scores[row, : len(kept)] = torch.tensor([s for s, _ in kept])
            out_items[row, : len(kept)] = torch.tensor([i for _, i in kept])
    return out_scores, out_items


def write_index(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def read_index(path: Path):
    """FAISS's own binary format (no pickle); a damaged file raises RuntimeError from faiss."""
    import faiss

    return faiss.read_index(str(path))


@dataclass(frozen=True)
class UserRecommendations:
    label: str  # e.g. the raw user id
    history: list[int]  # item indices, most recent first
    items: list[int]  # recommended item indices, best first
    scores: list[float]
    target: int  # the held-out item


def recommendation_sheet(store, rows: list[UserRecommendations], item_ids: list, history_shown: int = 5):
    """A PNG-ready image: per user one row, their history (most recent first) then the top-K, the held-out item
    framed in green wherever it was recommended; items captioned by their raw ids (`item_ids[index]`)."""
    from PIL import Image, ImageDraw, ImageFont

    from ..data.inspect import TILE_HEIGHT, TILE_WIDTH, item_tile

    font = ImageFont.load_default()
    label_width, gap = 120, 24
    shown = max((len(r.items) for r in rows), default=0)
    width = label_width + history_shown * TILE_WIDTH + gap + shown * TILE_WIDTH
    sheet = Image.new("RGB", (width, max(1, len(rows)) * TILE_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(rows):
        top = n * TILE_HEIGHT
        draw.multiline_text((4, top + 8), f"user {row.label}\n\nhistory,\nmost recent\nfirst\n\nthen top {len(row.items)}\n"
                                          f"(green: held out)", fill="black", font=font)
        for col, item in enumerate(row.history[:history_shown]):
            sheet.paste(item_tile(store, item, font, caption=f"{item_ids[item]} (-{col + 1})"), (label_width + col * TILE_WIDTH, top))
        left = label_width + history_shown * TILE_WIDTH + gap
        for col, (item, score) in enumerate(zip(row.items, row.scores)):
            outline = "green" if item == row.target else None
            tile = item_tile(store, item, font, caption=f"{col + 1}. {item_ids[item]}  {score:.3f}", outline=outline)
            sheet.paste(tile, (left + col * TILE_WIDTH, top))
        draw.line((label_width + history_shown * TILE_WIDTH + gap // 2, top, label_width + history_shown * TILE_WIDTH + gap // 2,
                   top + TILE_HEIGHT), fill="grey", width=2)
    return sheet
