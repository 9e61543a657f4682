"""The training stream's accounting at cluster scale, computed (not launched): 512 ranks x 4 data workers over
about 100 shards, every (rank, worker) pipeline run for real on one process."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmscale.data.format import split_size
from mmscale.build.shards import BuildOptions, build_shards
from mmscale.data.stream import InteractionStream
from mmscale.build.world import WorldSpec, generate_world

RANKS, WORKERS, BATCH = 512, 4, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-world")
    generate_world(root / "raw", WorldSpec(num_users=1500, num_items=300, min_interactions_per_user=8, max_interactions_per_user=14))
    build_shards(root / "raw", root / "shards", BuildOptions(progress=False, workers=1, embed_target_content=False, shard_size_mb=0.05))
    return root / "shards"


def streams(shards: Path, resampled: bool, epoch: int = 0) -> list[InteractionStream]:
    out = []
    for rank in range(RANKS):
        stream = InteractionStream(shards, "train", BATCH, None, rank=rank, world_size=RANKS, resampled=resampled,
                                   shuffle_buffer=16, content=False)
        stream.set_epoch(epoch)
        out.append(stream)
    return out


def sample_keys(batch: list[dict]) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(s["parsed"][0], s["parsed"][1], tuple(s["parsed"][2])) for s in batch]


def test_every_rank_gets_the_same_number_of_whole_batches(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    total = split_size(manifest, "train")
    assert len(manifest["shards"]["train"]) >= 90  # about 100 shards, fewer than the 2,048 (rank, worker) pipelines
    per_rank = total // (RANKS * BATCH)
    assert per_rank >= 2
    drawn = Counter()
    for stream in streams(shards, resampled=True):
        assert stream.batches_per_rank() == per_rank
        batches = [b for w in range(WORKERS) for b in stream.raw_batches(w, WORKERS)]
        assert len(batches) == per_rank and all(len(b) == BATCH for b in batches), stream.rank
        drawn.update(k for b in batches for k in sample_keys(b))
    # an epoch is whole global batches: at most one global batch of samples short of the split
    epoch_samples = sum(drawn.values())
    assert epoch_samples == per_rank * RANKS * BATCH and 0 <= total - epoch_samples < RANKS * BATCH


def test_exact_mode_reads_every_sample_once_across_all_ranks_and_workers(shards):
    """Evaluation-style exact mode: shards dealt to the 2,048 pipelines; nothing lost, nothing twice."""
    manifest = json.loads((shards / "manifest.json").read_text())
    seen = Counter()
    for stream in streams(shards, resampled=False):
        for w in range(WORKERS):
            for batch in stream.raw_batches(w, WORKERS):
                assert 0 < len(batch) <= BATCH
                seen.update(sample_keys(batch))
    assert sum(seen.values()) == split_size(manifest, "train")
    assert max(seen.values()) == 1
