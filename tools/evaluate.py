#!/usr/bin/env python
"""Evaluate a run's checkpoint: full ranking of the catalogue, Recall, NDCG, MRR and Hit @K per split.

    python tools/evaluate.py RUN_DIR_OR_CHECKPOINT [--splits valid,test,cold] [--no-exclude-seen] [--set key=value ...]

RUN_DIR_OR_CHECKPOINT is a run folder or RUN/latest (its newest complete tag), RUN/best (the tag
of train.best_metric's best evaluation), its checkpoints/ folder or one tag folder. The task is rebuilt from the run's config.json (`--set` overrides keys, e.g.
--set eval.ks=[5,10] or --set data.shards=PATH), the ZeRO partitions of every rank are merged into
fp32 weights, and `mmscale.eval.evaluate` runs in this one process (CUDA if available, else CPU;
--device to choose). Prints on stdout:

    {"checkpoint": ..., "tag": ..., "step": ..., "exclude_seen": ..., "device": ..., "eval": {split: {metric: value}}}

the same numbers the trainer logs as eval/<split>/<metric> in metrics.jsonl (on the CPU in fp32
exactly those; a bf16 GPU run was evaluated with its bf16 weights, these are its fp32 master weights).
Progress goes to stderr. --no-exclude-seen ranks each user's training items too (RecBole's protocol).
Exit status 2: no such run, no complete checkpoint, a bad config key.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="run folder or RUN/latest (newest complete tag), RUN/best, or a tag folder")
    p.add_argument("--splits", help="comma-separated, e.g. valid,test,cold (default: the run's eval.splits)")
    p.add_argument("--no-exclude-seen", dest="exclude_seen", action="store_const", const=False, default=None,
                   help="keep each user's training items in the ranking (RecBole protocol)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's config, e.g. --set eval.ks=[5,10] (repeatable)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--num-workers", type=int, help="data workers for encoding the catalogue (default: data.num_workers)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help is instant
    from mmscale.engine.restore import USER_ERRORS, evaluate_checkpoint

    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits is not None else None
    try:
        record = evaluate_checkpoint(args.source, splits, args.exclude_seen, args.overrides, args.device, args.num_workers)
    except USER_ERRORS as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
