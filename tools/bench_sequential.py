#!/usr/bin/env python
"""MP4SR's joint mode: its step cost against fine-tuning, and the effect of the feature cache's staleness bound.

    python tools/bench_sequential.py --shards build/ml100k-seq [--batch-size 256] [--steps 40] [--warmup 10]
        [--window 10] [--repeats 1] [--refresh 10,50,250] [--staleness-steps 400] [--work-dir DIR]

1. Step cost: `finetune` on the item encoder's cached features (tiny CLIP, frozen: the catalogue is
   encoded once) against `joint` (the batch's items encoded fresh with gradient in one encoder pass,
   the encoder trained, the MP4SR and image-text losses added) and against `joint` with finetune's
   loss plus the encoder's own (rec + itc: what training the encoder end to end costs, without the
   MP4SR pre-training losses and their two extra sequence-encoder passes), same shards, batch and
   step count, one process, alternating per repeat. Throughput comes from the runs' logging windows
   after the warm-up (median and best window, as in tools/bench_train.py).
2. Staleness: `joint` for --staleness-steps steps with each `sequence.cache_refresh_steps` of
   --refresh (history items are read from the catalogue cache, which is at most that many steps
   old); prints valid NDCG@10 / Recall@20 and samples/s including the refreshes.
Recipes: configs/mp4sr/ml100k-finetune.yaml and ml100k-joint.yaml, so the figures are those of the shipped settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from mmscale.bench import REPO, TRAIN_SCRIPT, Run, Throughput, after_warmup, logged_windows, rank_env, run_logged, throughput_header, throughput_row

CLIP_TINY = REPO / "configs/models/clip-tiny.json"
FINETUNE_ON_ENCODER = {"sequence.features": "encoder", "encoder.model": CLIP_TINY, "sequence.pretrained": "null"}


def train(args, work: Path, name: str, recipe: str, steps: int, window: int, overrides: dict) -> Path:
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl is appended to
    settings = {"data.shards": args.shards, "data.batch_size": args.batch_size, "train.run_dir": run_dir,
                "train.max_steps": steps, "train.log_every": window, "train.eval_every": 0, **overrides}
    sets = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    run_logged([sys.executable, str(TRAIN_SCRIPT), "--config", str(REPO / "configs/mp4sr" / f"{recipe}.yaml"), *sets],
               rank_env(1), work / f"{name}.log")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run_dir


def throughput(args, work: Path, name: str, recipe: str, overrides: dict) -> Run:
    load = os.getloadavg()[0]
    run_dir = train(args, work, name, recipe, args.warmup + args.steps, args.window, {"eval.splits": "[]", **overrides})
    windows = after_warmup(logged_windows(run_dir / "metrics.jsonl", args.batch_size), args.warmup)
    return Run(windows, args.batch_size, load, None, None)


JOINT_FINETUNE_LOSSES = {"objectives.weights": "{rec: 1.0, seq_item: 0.0, seq_seq: 0.0, itc: 0.1}"}


def step_cost(args, work: Path) -> None:
    runs = {"finetune (cached CLIP)": [], "joint (CLIP trained)": [], "joint, rec + itc only": []}
    for i in range(args.repeats):
        runs["finetune (cached CLIP)"].append(throughput(args, work, f"finetune-{i}", "ml100k-finetune", FINETUNE_ON_ENCODER))
        runs["joint (CLIP trained)"].append(throughput(args, work, f"joint-{i}", "ml100k-joint", {}))
        runs["joint, rec + itc only"].append(throughput(args, work, f"joint-rec-itc-{i}", "ml100k-joint", JOINT_FINETUNE_LOSSES))
    finetune, joint, encoder_only = (Throughput.of(r) for r in runs.values())
    print(f"\n== Step cost: batch {args.batch_size}, one process, {args.steps} steps after {args.warmup}, windows of "
          f"{args.window}, x {args.repeats}, OMP_NUM_THREADS {rank_env(1)['OMP_NUM_THREADS']}")
    print(throughput_header())
    for name, throughput_of in zip(runs, (finetune, joint, encoder_only)):
        print(throughput_row(name, throughput_of))
    for name, other in (("joint", joint), ("joint, rec + itc only", encoder_only)):
        print(f"step cost, {name} / finetune: {finetune.median / other.median:.2f}x (medians), "
              f"{finetune.best / other.best:.2f}x (best windows)")


def staleness(args, work: Path) -> None:
    print(f"\n== Staleness bound: joint, {args.staleness_steps} steps, batch {args.batch_size}")
    print(f"{'cache_refresh_steps':>19} {'valid NDCG@10':>13} {'valid Recall@20':>15} {'samples/s':>9}")
    for refresh in args.refresh:
        run_dir = train(args, work, f"joint-refresh{refresh}", "ml100k-joint", args.staleness_steps, 50,
                        {"sequence.cache_refresh_steps": refresh, "eval.splits": "[valid]"})
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in rows if "eval/valid/ndcg@10" in r][-1]
        windows = logged_windows(run_dir / "metrics.jsonl", args.batch_size)
        rate = sum(last - first + 1 for first, last, _, _ in windows) * args.batch_size / sum(w[2] for w in windows)
        print(f"{refresh:19d} {final['eval/valid/ndcg@10']:13.4f} {final['eval/valid/recall@20']:15.4f} {rate:9.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a shard folder written by tools/build_shards.py")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="measured steps of the step-cost runs, after the warm-up")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--window", type=int, default=10, help="steps per logging window")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--refresh", type=lambda s: [int(x) for x in s.split(",") if x], default=[10, 50, 250],
                   help="cache_refresh_steps values of the staleness runs (comma-separated; empty: skip)")
    p.add_argument("--staleness-steps", type=int, default=400)
    p.add_argument("--skip-step-cost", action="store_true")
    p.add_argument("--work-dir", help="keep run folders and logs here (default: a temporary folder, removed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (Path(args.shards) / "manifest.json").is_file():
        raise SystemExit(f"bench_sequential: {args.shards}: no manifest.json (build it with tools/build_shards.py)")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_sequential-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_step_cost:
            step_cost(args, work)
        if args.refresh:
            staleness(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
