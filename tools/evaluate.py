#!/usr/bin/env python
"""Evaluate a run's checkpoint: full ranking of the catalogue, recall@K and NDCG@K per split.

    python tools/evaluate.py RUN_DIR_OR_CHECKPOINT [--splits valid,test,cold] [--no-exclude-seen] [--set key=value ...]

RUN_DIR_OR_CHECKPOINT is a run folder (its newest complete tag), its checkpoints/ folder or one
tag folder. The task is rebuilt from the run's config.json (`--set` overrides keys, e.g.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tool is the checkpoint library

from consolidate_checkpoint import SINGLE_PROCESS, USER_ERRORS, load_task  # noqa: E402

import torch  # noqa: E402

from mmscale.config import ConfigError  # noqa: E402
from mmscale.data.format import SPLITS  # noqa: E402
from mmscale.eval.evaluate import evaluate  # noqa: E402
from mmscale.models import build_preprocess  # noqa: E402


def evaluate_checkpoint(source: str | Path, splits: list[str] | None = None, exclude_seen: bool | None = None,
                        overrides: list[str] = (), device: str | None = None, num_workers: int | None = None) -> dict:
    """Rebuilds the task of `source` and evaluates it; returns the printed record."""
    overrides = list(overrides)
    if splits is not None:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise ConfigError(f"--splits: unknown split(s) {unknown} (known: {list(SPLITS)})")
        overrides.append(f"eval.splits={json.dumps(splits)}")
    if exclude_seen is not None:
        overrides.append(f"eval.exclude_seen={'true' if exclude_seen else 'false'}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_task(source, overrides, device, num_workers)
    config, task = loaded.config, loaded.task
    print(f"evaluating splits {list(config.eval.splits)} on {device} (exclude_seen={config.eval.exclude_seen})", file=sys.stderr, flush=True)
    results = evaluate(task, loaded.shard_dir, config.eval, build_preprocess(config.encoder), SINGLE_PROCESS, device, loaded.num_workers)
    missing = [s for s in config.eval.splits if s not in results]
    if missing:
        print(f"note: no samples for split(s) {missing} in {loaded.shard_dir}", file=sys.stderr)
    return {
        "checkpoint": str(loaded.ref.path), "tag": loaded.ref.tag, "step": loaded.step,
        "exclude_seen": config.eval.exclude_seen, "device": str(device), "eval": results,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="run folder (newest complete tag) or a tag folder")
    p.add_argument("--splits", help="comma-separated, e.g. valid,test,cold (default: the run's eval.splits)")
    p.add_argument("--no-exclude-seen", dest="exclude_seen", action="store_const", const=False, default=None,
                   help="keep each user's training items in the ranking (RecBole protocol)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's config, e.g. --set eval.ks=[5,10] (repeatable)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--num-workers", type=int, help="data workers for encoding the catalogue (default: data.num_workers)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
