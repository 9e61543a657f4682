"""The WebDataset stream: exact and resampled sharding over simulated ranks and workers, seeded
order, resume through a real DataLoader, batch slots and content, and corrupt samples."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from itertools import chain, zip_longest
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmscale.data.format import load_manifest
from mmscale.data.item_store import ItemStore
from mmscale.build.shards import BuildOptions, build_shards
from mmscale.data.stream import PAD, InteractionStream, make_loader, worker_batch_counts

TRAIN_SHARDS = 7  # uneven against 2 ranks x 2 workers
MAX_HISTORY = 8  # users have up to 15 interactions: some histories are cut


@pytest.fixture(scope="module")
def stream_shards(tiny_raw, tmp_path_factory) -> Path:
    """40 users, 31 items (5 without image), 300 train samples in 7 train shards."""
    raw = tiny_raw(num_users=40, num_items=31, lengths=[6 + (u * 7) % 10 for u in range(40)], no_image=(3, 7, 12, 20, 28))
    root = tmp_path_factory.mktemp("stream")
    out = root / "shards"
    manifest = build_shards(raw.write(root / "raw"), out, BuildOptions(shard_size_mb=0.15, max_history=MAX_HISTORY, progress=False, workers=1))
    assert len(manifest["shards"]["train"]) == TRAIN_SHARDS, "fixture precondition: retune shard_size_mb"
    assert manifest["counts"]["samples"]["train"] == 300
    return out


@pytest.fixture(scope="module")
def split_tuples(stream_shards, shard_reader):
    manifest = load_manifest(stream_shards)
    return {s: shard_reader.tuples(shard_reader.split(stream_shards, manifest, s, only=("json",))) for s in ("train", "valid", "test")}


def rows(batch) -> list[tuple[int, int, tuple[int, ...]]]:
    """(user, target, history without padding) of each row of a Batch."""
    out = []
    for u, t, h in zip(batch.users.tolist(), batch.targets.tolist(), batch.history.tolist()):
        out.append((u, t, tuple(i for i in h if i != PAD)))
    return out


def order(batches) -> list[list[tuple[int, int]]]:
    return [list(zip(b.users.tolist(), b.targets.tolist())) for b in batches]


def stream(shards, preprocess, split="train", batch_size=8, **kw) -> InteractionStream:
    return InteractionStream(shards, split, batch_size, preprocess, **kw)


# -- exact (evaluation) mode ----------------------------------------------------------------------
@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1), (1, 3)])
def test_exact_mode_deals_every_sample_exactly_once(world, workers, stream_shards, split_tuples, tiny_preprocess):
    expected = split_tuples["train"]
    assert len(expected) == len(set(expected)) == load_manifest(stream_shards)["counts"]["samples"]["train"]
    parts = {}
    for rank in range(world):
        s = stream(stream_shards, tiny_preprocess, rank=rank, world_size=world, resampled=False, seed=3)
        for w in range(workers):
            batches = list(s.batches(worker=w, num_workers=workers))
            assert all(len(b) == 8 for b in batches[:-1]) and all(0 < len(b) <= 8 for b in batches)
            assert sum(int(b.corrupt_samples) for b in batches) == 0
            parts[rank, w] = [r for b in batches for r in rows(b)]
    assert all(parts.values()), "with 7 shards every (rank, worker) gets at least one"
    seen = Counter(chain.from_iterable(parts.values()))
    assert seen == Counter(expected)  # every sample once, nothing else
    keys = list(parts)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not set(parts[a]) & set(parts[b]), (a, b)


def test_exact_mode_small_split_and_order(stream_shards, split_tuples, tiny_preprocess):
    # valid: one shard, 40 samples, for 2 ranks x 2 workers: exactly one of them reads it
    got = []
    for rank in range(2):
        s = stream(stream_shards, tiny_preprocess, "valid", rank=rank, world_size=2, resampled=False)
        for w in range(2):
            got.append([r for b in s.batches(w, 2) for r in rows(b)])
    assert sorted(map(len, got)) == [0, 0, 0, 40]
    assert Counter(chain.from_iterable(got)) == Counter(split_tuples["valid"])


def test_same_seed_same_order_other_epoch_or_seed_other_order(stream_shards, tiny_preprocess):
    def run(resampled, seed=0, epoch=0):
        """Batch order of every (rank, worker) of 2 ranks x 2 workers."""
        out = {}
        for rank in range(2):
            s = stream(stream_shards, tiny_preprocess, rank=rank, world_size=2, resampled=resampled, seed=seed, shuffle_buffer=50)
            s.set_epoch(epoch)
            for w in range(2):
                out[rank, w] = order(s.batches(worker=w, num_workers=2))
        return out

    for resampled in (False, True):
        base = run(resampled)
        assert all(len(b) >= 2 for b in base.values())
        assert run(resampled) == base
        for other in (run(resampled, epoch=1), run(resampled, seed=1)):
            assert all(other[k] != base[k] for k in base)
            if not resampled:  # the same samples in all, another order
                flat = lambda o: sorted(chain.from_iterable(chain.from_iterable(o.values())))
                assert flat(other) == flat(base)
        # resampled: ranks and workers draw different samples
        if resampled:
            assert len({tuple(map(tuple, b)) for b in base.values()}) == 4


# -- resampled (training) mode --------------------------------------------------------------------
@pytest.mark.parametrize("batches,workers", [(n, w) for n in (0, 1, 5, 17, 18, 37) for w in (1, 2, 3, 4, 8)])
def test_worker_batch_counts(batches, workers):
    counts = worker_batch_counts(batches, workers)
    assert len(counts) == workers and sum(counts) == batches
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
    # round-robin: worker w yields global batches w, w + workers, ...
    assert counts == [len(range(w, batches, workers)) for w in range(workers)]


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_resampled_every_rank_yields_whole_batches(workers, stream_shards, split_tuples, tiny_preprocess):
    train = set(split_tuples["train"])
    totals = []
    for rank in range(2):
        s = stream(stream_shards, tiny_preprocess, batch_size=8, rank=rank, world_size=2)
        assert s.batches_per_rank() == 300 // (2 * 8)
        per_worker = [list(s.batches(w, workers)) for w in range(workers)]
        assert [len(b) for b in per_worker] == worker_batch_counts(s.batches_per_rank(), workers)
        batches = list(chain.from_iterable(per_worker))
        assert all(len(b) == 8 for b in batches)
        assert all(set(rows(b)) <= train for b in batches)
        totals.append(len(batches))
    assert totals == [18, 18]


def test_resampled_refuses_a_split_smaller_than_a_global_batch(stream_shards, tiny_preprocess):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        stream(stream_shards, tiny_preprocess, "valid", batch_size=25, world_size=2)
    stream(stream_shards, tiny_preprocess, "valid", batch_size=25, world_size=2, resampled=False)  # exact mode is fine


def test_resume_through_dataloader_continues_the_same_batches(stream_shards, tiny_preprocess):
    s = stream(stream_shards, tiny_preprocess, batch_size=8, seed=5)
    n = s.batches_per_rank()
    assert n == 37  # odd: the two workers yield 19 and 18
    s.set_epoch(2)
    full = list(make_loader(s, num_workers=2))
    assert len(full) == n
    # the loader takes the workers' batches round-robin
    direct = [b for pair in zip_longest(s.batches(0, 2), s.batches(1, 2)) for b in pair if b is not None]
    assert order(full) == order(direct)
    for k in (3, 0):
        s.set_epoch(2, start_batch=k)
        resumed = list(make_loader(s, num_workers=2))
        assert len(resumed) == n - k
        assert order(resumed) == order(full[k:]), k
        assert all(torch.equal(a.history, b.history) for a, b in zip(resumed, full[k:]))
    s.set_epoch(3)
    assert order(make_loader(s, num_workers=2)) != order(full)


def global_order(shards, preprocess, world: int, batch_size: int, workers: int, start_batch: int = 0, **kw) -> list:
    """(user, target) of each global micro-batch of an epoch, from `world` ranks' loaders joined place by place."""
    per_rank = []
    for rank in range(world):
        s = stream(shards, preprocess, batch_size=batch_size, rank=rank, world_size=world, shuffle_buffer=50, **kw)
        s.set_epoch(1, start_batch)
        per_rank.append(order(make_loader(s, num_workers=workers)))
    return [sum(places, []) for places in zip(*per_rank, strict=True)]


def test_the_training_order_is_the_same_on_any_world_size_and_worker_count(stream_shards, tiny_preprocess):
    """Two streams of 8: 2 ranks x 8, one process x 16 and 4 ranks x 4 (each reading half a stream) read the same
    global micro-batches, with any number of workers, and a resume at step k on another world size continues them."""
    two = global_order(stream_shards, tiny_preprocess, 2, 8, 2)
    assert len(two) == 300 // 16 and all(len(b) == 16 for b in two)
    assert len(set(chain.from_iterable(two))) > 100  # drawn from across the split
    assert global_order(stream_shards, tiny_preprocess, 1, 16, 0, streams=2) == two
    assert global_order(stream_shards, tiny_preprocess, 4, 4, 3, streams=2) == two
    for world, batch, workers in ((1, 16, 2), (4, 4, 1)):
        assert global_order(stream_shards, tiny_preprocess, world, batch, workers, start_batch=7, streams=2) == two[7:]
    # the streams are the order: one stream of 16 is another order
    assert global_order(stream_shards, tiny_preprocess, 1, 16, 0) != two
    with pytest.raises(ValueError, match="does not split into 3 streams"):
        stream(stream_shards, tiny_preprocess, batch_size=8, world_size=2, streams=3)


def test_a_corrupt_sample_is_counted_once_whatever_reads_its_stream(shards_copy, tiny_preprocess):
    manifest = load_manifest(shards_copy)
    for shard in manifest["shards"]["train"][:3]:
        rewrite_tar(shards_copy / shard["path"], lambda i, name, data: b"garbage" if name.endswith(".json") and i % 5 == 0 else None)

    def corrupt(world: int, batch_size: int, workers: int) -> int:
        total = 0
        for rank in range(world):
            s = stream(shards_copy, tiny_preprocess, batch_size=batch_size, rank=rank, world_size=world, streams=2, shuffle_buffer=0)
            total += sum(int(b.corrupt_samples) for w in range(workers) for b in s.batches(w, workers))
        return total

    once = corrupt(2, 8, 1)
    assert once > 0, "a damaged shard was drawn"
    assert corrupt(2, 8, 3) == once and corrupt(4, 4, 2) == once


# -- batch contents -------------------------------------------------------------------------------
def expected_pixels(store: ItemStore, item: int, preprocess) -> torch.Tensor:
    data, _ = store.image(item)
    with Image.open(io.BytesIO(bytes(data))) as img:
        return preprocess.image_transform(img.convert("RGB"))


@pytest.mark.parametrize("split", ["train", "test"])
def test_batch_slots_point_at_the_right_items_and_content(split, stream_shards, split_tuples, tiny_preprocess, detokenize):
    store = ItemStore(stream_shards)
    expected = set(split_tuples[split])
    s = stream(stream_shards, tiny_preprocess, split, batch_size=16, resampled=False)
    seen_image = Counter()
    for batch in s.batches():
        ids = batch.item_ids.tolist()
        assert len(ids) == len(set(ids)), "an item decoded twice in one batch"
        history_items = {i for i in batch.history.flatten().tolist() if i != PAD}
        assert set(ids) == set(batch.targets.tolist()) | history_items
        assert set(rows(batch)) <= expected
        for r in range(len(batch)):
            assert ids[batch.target_slots[r]] == batch.targets[r]
            h, hs = batch.history[r].tolist(), batch.history_slots[r].tolist()
            pads = sum(1 for i in h if i == PAD)
            assert h[:pads] == [PAD] * pads and PAD not in h[pads:], "history is left-padded"
            assert hs[:pads] == [PAD] * pads
            assert [ids[j] for j in hs[pads:]] == h[pads:]
        assert batch.images.shape == (len(ids), 3, 8, 8)
        for slot, item in enumerate(ids):
            has = bool(batch.has_image[slot])
            assert has == store.has_image(item)
            seen_image[has] += 1
            if has:
                assert torch.equal(batch.images[slot], expected_pixels(store, item, tiny_preprocess))
            else:
                assert not batch.images[slot].any()
            assert detokenize(batch.text_tokens[slot]) == store.text(item).encode()[:48].decode()
        assert int(batch.corrupt_samples) == 0
    assert seen_image[True] and seen_image[False], "both items with and without image were exercised"


def test_history_content_off_and_content_off(stream_shards, tiny_preprocess):
    s = stream(stream_shards, tiny_preprocess, batch_size=16, resampled=False, history_content=False)
    for batch in s.batches():
        assert (batch.history_slots == PAD).all()
        assert sorted(batch.item_ids.tolist()) == sorted(set(batch.targets.tolist()))
        assert (batch.history != PAD).any() or len(batch) < 4
    s = stream(stream_shards, tiny_preprocess, batch_size=16, resampled=False, content=False)
    batch = next(iter(s.batches()))
    assert batch.images.numel() == 0 and batch.text_tokens.numel() == 0
    assert batch.item_ids[batch.target_slots].tolist() == batch.targets.tolist()


def test_a_batch_moved_to_a_device_keeps_its_item_ids_on_the_host(stream_shards, tiny_preprocess):
    """What a step decides on the host (the frozen-block cache's fetch sizes) reads the loader's item ids, never the
    device's copy, whose read would wait for the device; pinning and moving again keep them."""
    batch = next(iter(stream(stream_shards, tiny_preprocess, batch_size=16, resampled=False).batches()))
    moved = batch.to("meta", torch.bfloat16)
    assert moved.item_ids.is_meta and moved.images.dtype == torch.bfloat16 and moved.host_item_ids is batch.item_ids
    assert moved.to("meta").host_item_ids is batch.item_ids and batch.to("cpu").host_item_ids is batch.item_ids


# -- corrupt data ---------------------------------------------------------------------------------
def rewrite_tar(path: Path, edit) -> None:
    """Rewrites a shard with edit(index, member name, data) -> new data (None: unchanged)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (name, data) in enumerate(members):
            new = edit(index, name, data)
            data = data if new is None else new
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards_copy(stream_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(stream_shards, out)
    return out


def test_corrupt_json_and_images_are_counted_and_skipped(shards_copy, split_tuples, shard_reader, tiny_preprocess):
    manifest = load_manifest(shards_copy)
    store = ItemStore(shards_copy)
    path = shards_copy / manifest["shards"]["train"][3]["path"]
    sample = shard_reader.tar(path)[5]
    broken = shard_reader.tuples([sample])[0]
    # every train sample targeting item X carries garbage instead of X's JPEG: X loses its image
    # wherever its content comes from such a sample (it is a target in the batch), not elsewhere
    x = next(i for i in range(len(store)) if store.has_image(i) and i != broken[1])
    for shard in manifest["shards"]["train"]:
        targeting = {f"{s['__key__']}.jpg" for s in shard_reader.tar(shards_copy / shard["path"]) if json.loads(s["json"])["target"] == x}
        rewrite_tar(shards_copy / shard["path"], lambda i, name, data: b"\xff\xd8garbage" if name in targeting else None)
    # one sample's json is garbage: the sample is skipped
    rewrite_tar(path, lambda i, name, data: b"{not json" if name == f"{sample['__key__']}.json" else None)

    s = stream(shards_copy, tiny_preprocess, resampled=False)
    for batches in (list(s.batches()), list(make_loader(s, num_workers=2))):
        got = [r for b in batches for r in rows(b)]
        assert Counter(got) == Counter(split_tuples["train"]) - Counter([broken])
        as_target = 0
        for b in batches:
            ids = b.item_ids.tolist()
            if x in ids:
                is_target = x in b.targets.tolist()
                as_target += is_target
                assert bool(b.has_image[ids.index(x)]) == (not is_target)
        assert as_target > 0
        assert sum(int(b.corrupt_samples) for b in batches) == 1 + as_target  # the json, and each bad image decoded


def test_truncated_shard_is_counted_and_the_rest_is_read(shards_copy, split_tuples, shard_reader, tiny_preprocess):
    manifest = load_manifest(shards_copy)
    path = shards_copy / manifest["shards"]["train"][3]["path"]
    samples = shard_reader.tar(path)
    k = len(samples) // 2
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == f"{samples[k]['__key__']}.json").offset_data + 10
    with open(path, "r+b") as f:
        f.truncate(cut)  # in the middle of sample k's json
    lost = Counter(shard_reader.tuples(samples[k:]))

    # one batch larger than the split: it comes after every error, so the count cannot be missed
    s = stream(shards_copy, tiny_preprocess, batch_size=1000, resampled=False)
    batches = list(s.batches())
    got = Counter(r for b in batches for r in rows(b))
    assert got == Counter(split_tuples["train"]) - lost
    assert sum(int(b.corrupt_samples) for b in batches) >= 1


def test_corrupt_samples_at_the_end_of_a_stream_are_still_counted(shards_copy, split_tuples, shard_reader, tiny_preprocess):
    """A final batch made only of corrupt samples decodes to nothing; its count must not vanish."""
    manifest = load_manifest(shards_copy)
    path = shards_copy / manifest["shards"]["valid"][0]["path"]
    samples = shard_reader.tar(path)
    assert len(samples) == 40
    last = {f"{s['__key__']}.json" for s in samples[-4:]}
    rewrite_tar(path, lambda i, name, data: b"garbage" if name in last else None)

    s = stream(shards_copy, tiny_preprocess, "valid", batch_size=4, resampled=False, shuffle_buffer=0)
    batches = list(s.batches())
    assert sum(len(b) for b in batches) == 36
    assert sum(int(b.corrupt_samples) for b in batches) == 4


def test_resampled_keeps_whole_batches_when_a_shard_is_corrupt(shards_copy, split_tuples, shard_reader, tiny_preprocess):
    """Training ranks must stay in step: a corrupt sample is skipped, not a hole in the batch count."""
    s = stream(shards_copy, tiny_preprocess, batch_size=4, shuffle_buffer=0)
    first_drawn = next(s._shards(0, 1))["url"]
    rewrite_tar(Path(first_drawn), lambda i, name, data: b"garbage" if name.endswith(".json") else None)
    batches = list(s.batches())
    assert sum(int(b.corrupt_samples) for b in batches) > 0, "the corrupt shard was drawn"
    assert len(batches) == s.batches_per_rank()
    assert all(len(b) == 4 for b in batches)


def test_a_loader_forks_its_workers_without_the_free_heap(world_shards, tiny_preprocess):
    """Before its workers fork, the process's free heap goes back to the OS: a worker would otherwise keep a private
    copy of every free page the trainer writes again (a 9.1 GB worker beside a 10 GB MP4SR joint trainer)."""
    import gc

    import psutil

    from mmscale.data.stream import InteractionStream, make_loader

    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    torch.ones(512 * 1024)  # a freed 2 MiB mapping raises glibc's mmap threshold above 1 MiB: the blocks below use the heap
    blocks = [torch.ones(256 * 1024) for _ in range(400)]  # 400 MiB in 1 MiB blocks
    top = blocks[-1]  # kept: the heap's top stays in use, so free() alone returns none of the other blocks' pages
    del blocks
    gc.collect()
    before = rss()
    loader = make_loader(InteractionStream(world_shards, "train", 4, tiny_preprocess, content=False), num_workers=1)
    assert before - rss() > 300 * 2**20
    assert next(iter(loader)).targets.shape == (4,)
    del top
