"""The parity harness: trains named cases for a few steps and writes their losses and gradients.

Run under a launcher (N ranks), each rank trains on exactly what production gives it: the Trainer's
own training stream for that rank (its rows, and the content of its own items only). Run as one
plain process with `--reference-ranks N`, it trains the same cases on the *union* of those N rank
streams' batches, each global batch decoded as one batch: the one-process run on the same global
batch. The tests compare the two: losses of every step and the gradients of every parameter after
each step's backward (before the optimizer), which Adam's invariance to a uniform gradient scale
would otherwise hide.

    deepspeed --num_gpus 2 tests/helpers/train_worker.py --shards S --out DIR --runs two_tower:1,two_tower:3,...
    python tests/helpers/train_worker.py --shards S --out DIR --runs two_tower,... --reference-ranks 2

Outputs per run: DIR/CASE-zeroSTAGE.json ({"losses": [{step, loss/...}], "groups": {group: [names]}}) and
DIR/CASE-zeroSTAGE.grads.safetensors ("STEP/NAME": full fp32 gradient; rank 0 writes both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from itertools import islice
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as launch/train.py does, before torch loads OpenMP
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run as a script too

from mmscale.config import load_config  # noqa: E402
from mmscale.data.stream import InteractionStream  # noqa: E402
from helpers.dual_encoder import installed as dual_encoder_installed  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 16
TINY_CLIP = str(REPO / "configs/models/clip-tiny.json")
# Dropout draws differ between a rank's rows and one process's rows: the cases that compare ranks have none
# (a restart with dropout on is checked by the resume tests).
NO_DROPOUT = ["sequence.dropout=0.0", "sequence.adaptor_dropout=0.0"]
SEQUENTIAL_FROZEN = ["task=sequential", "sequence.features=encoder", "encoder.paradigm=frozen", *NO_DROPOUT]
CASES: dict[str, list[str]] = {
    "two_tower": ["objectives.weights={rec: 1.0, itc: 0.1}"],
    "fine_tuned": ["encoder.paradigm=fine_tuned", "encoder.adapt_steps=2", "objectives.weights={rec: 1.0, itc: 0.5}"],
    "frozen": ["encoder.paradigm=frozen", "objectives.weights={rec: 1.0, itc: 0.0}"],
    "mp4sr_pretrain": [*SEQUENTIAL_FROZEN, "sequence.mode=pretrain", "objectives.weights={rec: 0.0, itc: 0.0, seq_item: 1.0, seq_seq: 0.1}"],
    "mp4sr_finetune": [*SEQUENTIAL_FROZEN, "sequence.mode=finetune", "objectives.weights={rec: 1.0, itc: 0.0}"],
    "mp4sr_joint": ["task=sequential", "sequence.features=encoder", "sequence.mode=joint", "sequence.cache_refresh_steps=2",
                    *NO_DROPOUT, "objectives.weights={rec: 1.0, seq_item: 1.0, seq_seq: 0.1, itc: 0.1}"],
    "vlmo": ["encoder.kind=vlmo", f"encoder.model={REPO / 'configs/models/vlmo-tiny.json'}",
             "objectives.weights={rec: 1.0, itc: 0.5, itm: 0.5, mlm: 0.5}"],
}
if dual_encoder_installed:  # the frozen-block cache, each rank holding its share: a batch's items come from both. Every
    # block frozen and cached (MiniLM's layers have dropout): the projections train on the fetched outputs.
    CASES["two_tower_cached"] = [f"encoder.model={REPO / 'configs/models/minilm-effnet.json'}", "encoder.image_size=64",
                                 "encoder.context_length=16", "encoder.trainable_blocks=0", "encoder.cache_frozen_blocks=true",
                                 "data.history_content=false", "objectives.weights={rec: 1.0, itc: 0.1}"]


def case_config(case: str, shards: str, run_dir: Path, stage: int, batch_size: int, extra: list[str]):
    return load_config(None, [
        f"encoder.model={TINY_CLIP}",
        f"data.shards={shards}",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        "data.history_content=true",
        f"train.run_dir={run_dir}",
        f"train.deepspeed_config={REPO / 'ds_configs' / f'zero{stage}.json'}",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "optim.warmup_steps=1",
        "optim.lr_encoder=1e-3",
        "optim.lr_recommender=1e-2",
        "eval.splits=[]",
        *CASES[case],
        *extra,
    ])


def reference_batches(trainer, ranks: int) -> list:
    """The global batches of `ranks` production ranks: each rank's stream, as the Trainer builds it for that
    rank, gives its raw batch; the union is decoded as one batch by the one process's own stream."""
    mine = trainer.stream
    per_rank = [
        InteractionStream(mine.shard_dir, "train", mine.batch_size // ranks, mine.preprocess, rank=r, world_size=ranks, resampled=True,
                          shuffle_buffer=mine.shuffle_buffer, seed=mine.seed, history_content=trainer.config.data.history_content,
                          content=mine.content).raw_batches()
        for r in range(ranks)
    ]
    return [mine.decode([sample for raw in step for sample in raw]) for step in islice(zip(*per_rank), STEPS)]


def record_gradients(trainer, into: dict[str, torch.Tensor]) -> None:
    """Wraps engine.step: before the optimizer steps, every trainable parameter's full gradient (gathered from
    the ZeRO partitions, averaged over ranks as the optimizer sees it) is kept as "STEP/NAME"."""
    from deepspeed.utils import safe_get_full_grad

    engine, step = trainer.engine, trainer.engine.step
    calls = [0]

    def step_recording(*args, **kwargs):
        calls[0] += 1
        for name, param in trainer.task.named_parameters():
            if param.requires_grad:
                grad = safe_get_full_grad(param)
                full = torch.zeros(param.ds_shape if hasattr(param, "ds_shape") else param.shape) if grad is None else grad
                into[f"{calls[0]}/{name}"] = full.detach().float().cpu().clone()
        return step(*args, **kwargs)

    engine.step = step_recording


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", required=True, help="CASE:STAGE,... (a launcher run) or CASE,... (with --reference-ranks)")
    p.add_argument("--reference-ranks", type=int, help="one process on the union of this many ranks' batches")
    p.add_argument("--vlmo-tokenizer", help="the VLMo case's tokenizer (a WordPiece folder)")
    p.add_argument("--local_rank", type=int)
    args = p.parse_args()
    from mmscale.engine.trainer import Trainer
    from safetensors.torch import save_file

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in args.runs.split(","):
        case, _, stage = run.partition(":")
        stage = int(stage or 2)
        name = f"{case}-zero{stage}" if args.reference_ranks is None else case
        extra = [f"encoder.tokenizer={args.vlmo_tokenizer}"] if case == "vlmo" else []
        config = case_config(case, args.shards, out / "runs" / name, stage, GLOBAL_BATCH // world, extra)
        trainer = Trainer(config, log=lambda *a, **k: None)
        gradients: dict[str, torch.Tensor] = {}
        record_gradients(trainer, gradients)
        trainer.fit(reference_batches(trainer, args.reference_ranks) if args.reference_ranks else None)
        if trainer.dist.is_main:
            logged = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
            losses = [{k: v for k, v in entry.items() if k.startswith("loss/") or k == "step"} for entry in logged if "loss/total" in entry]
            groups = {group: [n for n, _ in params] for group, params in trainer.task.parameter_groups().items()}
            (out / f"{name}.json").write_text(json.dumps({"losses": losses, "groups": groups}))
            save_file(gradients, str(out / f"{name}.grads.safetensors"))
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
