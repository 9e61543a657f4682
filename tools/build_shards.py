#!/usr/bin/env python
"""Build WebDataset shards (+ item store, id maps, manifest) from a raw dataset folder.

    python tools/build_shards.py RAW_DIR OUT_DIR [--min-user-interactions 5] [--cold-item-fraction 0.1] ...

RAW_DIR holds interactions.csv, items.jsonl and images (docs/data-format.md); column and
field names are flags. Bad input is counted and reported; --strict exits non-zero on the first.
"""

from __future__ import annotations

import argparse
import sys

from mmscale.build.raw import BadInputError, RawFormat
from mmscale.build.shards import BuildError, BuildOptions, build_shards
from mmscale.data.format import ShardFormatError


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, BuildOptions]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw_dir")
    p.add_argument("out_dir")
    raw = RawFormat()
    g = p.add_argument_group("raw format")
    g.add_argument("--interactions-file", default=raw.interactions_file)
    g.add_argument("--items-file", default=raw.items_file)
    g.add_argument("--user-column", default=raw.user_column)
    g.add_argument("--item-column", default=raw.item_column)
    g.add_argument("--time-column", default=raw.time_column)
    g.add_argument("--rating-column", default=raw.rating_column, help="empty string: the data has no ratings")
    g.add_argument("--rating-range", type=float, nargs=2, default=raw.rating_range, metavar=("MIN", "MAX"),
                   help="a rating outside is bad input")
    g.add_argument("--delimiter", default=raw.delimiter)
    g.add_argument("--item-id-field", default=raw.item_id_field)
    g.add_argument("--text-fields", default=",".join(raw.text_fields), help="comma-separated items.jsonl fields joined into the item text")
    g.add_argument("--image-field", default=raw.image_field)
    d = BuildOptions()
    g = p.add_argument_group("filtering and splits")
    g.add_argument("--min-user-interactions", type=int, default=d.min_user_interactions, help="k-core threshold for users")
    g.add_argument("--min-item-interactions", type=int, default=d.min_item_interactions, help="k-core threshold for items (0: keep every item)")
    g.add_argument("--min-rating", type=float, default=d.min_rating, help="keep interactions rated at least this")
    g.add_argument("--cold-item-fraction", type=float, default=d.cold_item_fraction, help="fraction of items held out of training (cold-start split)")
    g.add_argument("--max-history", type=int, default=d.max_history)
    g = p.add_argument_group("output")
    g.add_argument("--shard-size-mb", type=float, default=d.shard_size_mb)
    g.add_argument("--no-target-content", action="store_true", help="interaction samples carry ids only (content via the item store)")
    g.add_argument("--max-image-mb", type=float, default=d.max_image_mb, help="a larger image file is bad input, never read")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="a larger image is bad input, never decoded")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("resources")
    g.add_argument("--workers", type=int, default=d.workers, help="processes that scan, check images and write shards")
    g.add_argument("--memory-limit", type=int, default=d.memory_limit_mb, metavar="MB",
                   help="memory of the relational stage (DuckDB); beyond it, it spills to the work folder")
    g.add_argument("--work-dir", default=None, help="where the build's temporary files go (default: inside OUT_DIR.partial)")
    g.add_argument("--ray-address", default=None, help="write on a running Ray cluster ('auto' or HOST:PORT) instead of a "
                   "local pool; the raw folder, OUT_DIR and the work folder must be on a file system every node sees")
    g.add_argument("--plan-only", action="store_true", help="run every stage but the shard writes and print what they would "
                   "write (OUT_DIR is left as it is): checks the data and sizes the output before a long build")
    g.add_argument("--strict", action="store_true", help="exit non-zero on the first bad input")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    raw_format = RawFormat(
        interactions_file=args.interactions_file, items_file=args.items_file, user_column=args.user_column,
        item_column=args.item_column, time_column=args.time_column, rating_column=args.rating_column or None,
        rating_range=tuple(args.rating_range), item_id_field=args.item_id_field, text_fields=tuple(f for f in args.text_fields.split(",") if f),
        image_field=args.image_field, delimiter=args.delimiter,
    )
    try:
        opts = BuildOptions(
            raw_format=raw_format, min_user_interactions=args.min_user_interactions,
            min_item_interactions=args.min_item_interactions, min_rating=args.min_rating,
            cold_item_fraction=args.cold_item_fraction, max_history=args.max_history,
            shard_size_mb=args.shard_size_mb, embed_target_content=not args.no_target_content,
            max_image_mb=args.max_image_mb, max_image_pixels=args.max_image_pixels, seed=args.seed, workers=args.workers,
            memory_limit_mb=args.memory_limit, work_dir=args.work_dir, ray_address=args.ray_address,
            strict=args.strict, progress=not args.quiet, plan_only=args.plan_only,
        )
    except ValueError as e:
        p.error(f"--{str(e).replace('_', '-').replace('memory-limit-mb', 'memory-limit')}")
    return args, opts


def shard_sizes(shards: list[dict]) -> str:
    """A split's size on disk; for gzip-compressed shards also their tar bytes, all a plan knows of them."""
    tar = sum(s.get("tar_bytes", 0) for s in shards) / 1e9
    if any("bytes" not in s for s in shards):
        return f"{tar:.2f} GB of tar, less once compressed"
    written = f"{sum(s['bytes'] for s in shards) / 1e9:.2f} GB"
    return f"{written}, {tar:.2f} GB of tar" if tar else written


def main(argv: list[str] | None = None) -> int:
    args, opts = parse_args(argv)
    try:
        manifest = build_shards(args.raw_dir, args.out_dir, opts)
    except (BadInputError, BuildError, ShardFormatError, FileNotFoundError) as e:
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(f"raw: {counts['raw']}")
    print(f"kept: {counts['kept']}  images present {counts['images_present']}, missing {counts['images_missing']}")
    print(f"samples: {counts['samples']}  cold items: {counts['cold_items']}")
    print(("planned shards: " if args.plan_only else "shards: ") + ", ".join(
        f"{split} {len(shards)} ({shard_sizes(shards)})" for split, shards in manifest["shards"].items()))
    print(manifest["bad_input_report"])
    build = manifest["build"]
    print(f"build: {build['seconds']:.1f} s, {counts['raw']['interactions'] / max(build['seconds'], 1e-9):,.0f} interactions/s; "
          f"peak RSS {build['peak_rss_mb']:,} MiB (largest process), temporary disk {build['temp_disk_mb']:,} MiB; "
          f"{build['writers']} writers on {build['nodes']} node(s)")
    peaks = build.get("stage_peak_rss_mb", {})
    print("stages: " + ", ".join(
        f"{stage} {seconds:.1f} s" + (f" ({peaks[stage]:,} MiB)" if stage in peaks else "") for stage, seconds in build["stage_seconds"].items()))
    print(f"plan only: {args.out_dir} is unchanged" if args.plan_only else f"wrote {args.out_dir}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
