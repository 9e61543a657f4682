#!/usr/bin/env python
"""Look inside a shard folder: manifest summary, a few decoded samples, and an optional contact sheet.

    python tools/inspect_shards.py SHARD_DIR [--samples 3] [--split train] [--contact-sheet OUT.png] [--items 24] [--seed 0]

The summary covers counts, bad input, shard sizes and build options; the samples come from the
split's first shard; the contact sheet is a PNG grid of item images with their index and the
first words of their text, so a person can look at what the model will see.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmscale.data.format import SPLITS, ShardFormatError, load_manifest
from mmscale.data.inspect import contact_sheet, sample_lines, summary_lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard_dir", type=Path)
    p.add_argument("--samples", type=int, default=3, help="decoded samples to print (0: none)")
    p.add_argument("--split", choices=SPLITS, default="train", help="split the samples come from")
    p.add_argument("--contact-sheet", type=Path, metavar="OUT.png", help="write a PNG grid of item images and texts")
    p.add_argument("--items", type=int, default=24, help="items on the contact sheet")
    p.add_argument("--seed", type=int, default=0, help="chooses the contact sheet's items")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = load_manifest(args.shard_dir)
        print("\n".join(summary_lines(args.shard_dir, manifest)))
        if args.samples > 0:
            print()
            print("\n".join(sample_lines(args.shard_dir, manifest, args.split, args.samples)))
        if args.contact_sheet is not None:
            sheet, items = contact_sheet(args.shard_dir, manifest, args.items, args.seed)
            sheet.save(args.contact_sheet, format="PNG")
            print(f"\nwrote {args.contact_sheet}: {len(items)} items, {sheet.width}x{sheet.height} px")
    except (ShardFormatError, OSError) as e:
        print(f"inspect_shards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
