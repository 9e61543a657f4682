"""Trains a tiny CLIP on fixed global batches and writes the logged losses (run by the tests,
under the deepspeed launcher for several ranks or as one plain process).

Every rank takes its slice of the same global batches, so a run on N ranks and a run in one
process see identical data: their losses must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from itertools import islice
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as launch/train.py does, before torch loads OpenMP
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mmscale.config import load_config  # noqa: E402
from mmscale.data.stream import Batch, InteractionStream  # noqa: E402
from mmscale.models import build_preprocess  # noqa: E402


def rank_slice(batch: Batch, rank: int, world: int) -> Batch:
    """Rows of one rank; the item tensors stay whole (slots keep pointing at the same items)."""
    rows = len(batch) // world
    part = slice(rank * rows, (rank + 1) * rows)
    per_row = ("users", "targets", "history", "target_slots", "history_slots")
    return replace(batch, **{name: getattr(batch, name)[part] for name in per_row})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--encoder", default="clip")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--local_rank", type=int)
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    config = load_config(None, [
        f"encoder.model={REPO / 'configs/models/clip-tiny.json'}",
        f"data.shards={args.shards}",
        f"data.batch_size={args.global_batch // world}",
        "data.num_workers=0",
        "data.history_content=true",
        f"train.run_dir={args.run_dir}",
        f"train.deepspeed_config={REPO / 'ds_configs' / f'zero{args.zero_stage}.json'}",
        f"train.max_steps={args.steps}",
        "train.log_every=1",
        "optim.warmup_steps=1",
        "optim.lr_encoder=1e-3",
        "optim.lr_recommender=1e-2",
        "eval.splits=[]",
        *args.overrides,
    ])
    preprocess = build_preprocess(config.encoder)
    stream = InteractionStream(args.shards, "train", args.global_batch, preprocess, seed=1, history_content=True)
    batches = [rank_slice(b, rank, world) for b in islice(stream.batches(), args.steps)]

    from mmscale.engine.trainer import Trainer

    trainer = Trainer(config, log=lambda *a, **k: None)
    trainer.fit(batches)
    if trainer.dist.is_main:
        logged = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
        losses = [{k: v for k, v in entry.items() if k.startswith("loss/") or k == "step"} for entry in logged]
        Path(args.out).write_text(json.dumps(losses))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
