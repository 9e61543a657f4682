#!/usr/bin/env python
"""Loader throughput: samples/s and unique-item images decoded/s, per worker, at the model's resolution;
the item store's random-access latency and memory.

    python tools/bench_loader.py SHARD_DIR [--model ViT-B-32] [--workers 1,2] [--batches 30] [--lookups 20000]

Figures are printed last. Three settings: ids only (nothing decoded: what a task on cached features reads,
where reading the shards is all the work), targets only (what the end-to-end recommender decodes by default)
and targets + history items (history_content). The item store is read at
--lookups uniformly random items (image bytes and text each), twice: the first pass touches pages
that may not be in memory yet (cold unless the page cache already holds the shards), the second
reads the same items again.
"""

from __future__ import annotations

import argparse
import time


CONTENT = ("ids", "targets", "targets+history")


def measure(shard_dir: str, model: str, workers: int, batches: int, batch_size: int, content: str) -> dict:
    from mmscale.config import EncoderConfig
    from mmscale.data.stream import InteractionStream, make_loader
    from mmscale.models import build_preprocess

    stream = InteractionStream(shard_dir, "train", batch_size, build_preprocess(EncoderConfig(model=model)),
                               history_content=content == "targets+history", content=content != "ids")
    loader = iter(make_loader(stream, workers))
    for _ in range(workers):  # warm-up: workers start and fill their shuffle buffers
        next(loader)
    samples = items = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
        samples += len(batch)
        items += int(batch.has_image.sum())
    seconds = time.perf_counter() - start
    return {"samples_per_s": samples / seconds, "images_per_s": items / seconds, "items_per_batch": items / batches}


def item_store_access(shard_dir: str, lookups: int, seed: int = 0) -> dict:
    """Latency percentiles (µs) of one item's image and text, per pass, and resident memory (bytes)."""
    import numpy as np
    import psutil

    from mmscale.data.item_store import ItemStore

    process = psutil.Process()
    before = process.memory_info().rss
    store = ItemStore(shard_dir)
    opened = process.memory_info().rss
    items = np.random.default_rng(seed).integers(len(store), size=lookups)
    passes = {}
    for name in ("first pass", "second pass"):
        seconds = np.empty(lookups)
        for k, item in enumerate(items.tolist()):
            start = time.perf_counter()
            store.image(item)
            store.text(item)
            seconds[k] = time.perf_counter() - start
        passes[name] = np.percentile(seconds * 1e6, [50, 99])
    index = sum(getattr(store, name).nbytes for name in ("_shard", "_image_offset", "_image_size", "_image_ext", "_text_offset", "_text_size"))
    return {"items": len(store), "passes": passes, "index_bytes": index, "rss_open": opened - before,
            "rss_after": process.memory_info().rss - before}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dir")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model whose transform is used (ViT-B-32: 224 px)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lookups", type=int, default=20000, help="random item-store reads per pass (0: skip)")
    args = p.parse_args(argv)  # before the heavy imports: --help is instant
    store = item_store_access(args.shard_dir, args.lookups) if args.lookups else None
    rows = []
    for content in CONTENT:
        for workers in (int(w) for w in args.workers.split(",")):
            batches = args.batches * (50 if content == "ids" else 1)  # ids-only batches take well under a millisecond
            rows.append((content, workers, measure(args.shard_dir, args.model, workers, batches, args.batch_size, content)))
    print(f"{'content':16} {'workers':>7} {'samples/s':>10} {'images/s':>9} {'images/s/worker':>16} {'images/batch':>13}")
    for content, workers, r in rows:
        print(f"{content:16} {workers:7d} {r['samples_per_s']:10.1f} {r['images_per_s']:9.1f} {r['images_per_s'] / workers:16.1f} {r['items_per_batch']:13.1f}")
    if store:
        mib = 2**20
        print(f"\nitem store: {store['items']:,} items; index {store['index_bytes'] / mib:.1f} MiB; resident memory "
              f"+{store['rss_open'] / mib:.1f} MiB once open, +{store['rss_after'] / mib:.1f} MiB after the reads (mapped pages)")
        print(f"{'random reads':16} {'lookups':>8} {'p50 µs':>8} {'p99 µs':>8}")
        for name, (p50, p99) in store["passes"].items():
            print(f"{name:16} {args.lookups:8d} {p50:8.1f} {p99:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
