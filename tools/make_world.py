#!/usr/bin/env python
"""Generate the embedded default world: a small multimodal recommendation dataset in the raw layout.

    python tools/make_world.py OUT_DIR [--users 400] [--items 600] [--seed 0] [--image-size 64] ...

OUT_DIR gets interactions.csv, items.jsonl, images/, README.md and world.json (the ground truth).
The same arguments always give the same bytes.
"""

from __future__ import annotations

import argparse
import time

from mmscale.build.world import WorldSpec, generate_world


def parse_args(argv: list[str] | None = None) -> tuple[str, WorldSpec, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    d = WorldSpec()
    p.add_argument("--users", type=int, default=d.num_users)
    p.add_argument("--items", type=int, default=d.num_items)
    p.add_argument("--min-interactions", type=int, default=d.min_interactions_per_user, help="per user")
    p.add_argument("--max-interactions", type=int, default=d.max_interactions_per_user, help="per user")
    p.add_argument("--image-size", type=int, default=d.image_size, help="side of the square images, pixels")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--missing-image-fraction", type=float, default=d.missing_image_fraction)
    p.add_argument("--missing-description-fraction", type=float, default=d.missing_description_fraction)
    p.add_argument("--preference-strength", type=float, default=d.preference_strength, help="higher: users' picks more peaked on their tastes")
    p.add_argument("--sequential-fraction", type=float, default=d.sequential_fraction, help="picks that share an attribute with the previous pick")
    p.add_argument("--noise-fraction", type=float, default=d.noise_fraction, help="uniformly random picks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    spec = WorldSpec(
        num_users=args.users,
        num_items=args.items,
        min_interactions_per_user=args.min_interactions,
        max_interactions_per_user=args.max_interactions,
        image_size=args.image_size,
        seed=args.seed,
        missing_image_fraction=args.missing_image_fraction,
        missing_description_fraction=args.missing_description_fraction,
        preference_strength=args.preference_strength,
        sequential_fraction=args.sequential_fraction,
        noise_fraction=args.noise_fraction,
    )
    return args.out_dir, spec, not args.quiet


def main(argv: list[str] | None = None) -> None:
    out_dir, spec, progress = parse_args(argv)
    started = time.perf_counter()
    summary = generate_world(out_dir, spec, progress)
    print(f"wrote {out_dir} in {time.perf_counter() - started:.1f}s")
    for key, value in summary.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
