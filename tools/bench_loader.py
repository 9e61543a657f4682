#!/usr/bin/env python
"""Loader throughput: samples/s and unique-item images decoded/s, per worker, at the model's resolution.

    python tools/bench_loader.py SHARD_DIR [--model ViT-B-32] [--workers 1,2] [--batches 30]

Figures are printed last. Two settings: targets only (what the end-to-end recommender
decodes by default) and targets + history items (history_content).
"""

from __future__ import annotations

import argparse
import time

from mmscale.data.stream import InteractionStream, make_loader
from mmscale.models import build_preprocess
from mmscale.config import EncoderConfig


def measure(shard_dir: str, model: str, workers: int, batches: int, batch_size: int, history_content: bool) -> dict:
    stream = InteractionStream(shard_dir, "train", batch_size, build_preprocess(EncoderConfig(model=model)), history_content=history_content)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dir")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model whose transform is used (ViT-B-32: 224 px)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    rows = []
    for history_content in (False, True):
        for workers in (int(w) for w in args.workers.split(",")):
            r = measure(args.shard_dir, args.model, workers, args.batches, args.batch_size, history_content)
            rows.append((("targets+history" if history_content else "targets"), workers, r))
    print(f"{'content':16} {'workers':>7} {'samples/s':>10} {'images/s':>9} {'images/s/worker':>16} {'images/batch':>13}")
    for content, workers, r in rows:
        print(f"{content:16} {workers:7d} {r['samples_per_s']:10.1f} {r['images_per_s']:9.1f} {r['images_per_s'] / workers:16.1f} {r['items_per_batch']:13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
