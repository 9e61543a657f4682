"""train.precision=bf16 (the default on CUDA): every task and encoder trains and evaluates with its weights in
bf16, close to the fp32 run. Run on the CPU, whose bf16 kernels take the dtype rules of CUDA's: a float tensor that
meets a bf16 layer (pixels, BatchNorm statistics, cached features) has to be bf16 too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.dual_encoder import needs_dual_encoder
from helpers.train_worker import CASES, case_config

REPO = Path(__file__).resolve().parents[1]
DUAL_ENCODER = [f"encoder.model={REPO / 'configs/models/minilm-effnet.json'}", "encoder.image_size=64", "encoder.context_length=16",
                "encoder.trainable_blocks=1", "data.history_content=false"]
RUNS = {  # name: (parity case, extra overrides)
    **{case: (case, []) for case in CASES},
    "sasrec": ("frozen", ["task=sequential", "sequence.model=sasrec", "sequence.mode=finetune"]),
    "dual_encoder": ("two_tower", DUAL_ENCODER),
    "dual_encoder_cached": ("two_tower", [*DUAL_ENCODER, "encoder.cache_frozen_blocks=true"]),
    "dual_encoder_mp4sr_joint": ("mp4sr_joint", [*DUAL_ENCODER, "encoder.cache_frozen_blocks=true"]),
}


def _train(world_shards, run_dir: Path, case: str, extra: list[str]):
    from mmscale.engine.trainer import Trainer

    trainer = Trainer(case_config(case, str(world_shards), run_dir, 2, 16, [*extra, "eval.splits=[valid]"]), log=lambda *a, **k: None)
    dtypes = {p.dtype for p in trainer.task.parameters()}
    result = trainer.fit()
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss/total"' in line]
    return dtypes, losses, result["eval"]["valid"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_dual_encoder) if n.startswith("dual") else n for n in RUNS])
def test_bf16_trains_and_evaluates_close_to_fp32(one_rank_group, world_shards, vlmo_tokenizer, tmp_path, name):
    case, extra = RUNS[name]
    extra = [*extra, f"encoder.tokenizer={vlmo_tokenizer}"] if case == "vlmo" else extra
    dtypes, losses, metrics = _train(world_shards, tmp_path / "bf16", case, [*extra, "train.precision=bf16"])
    _, reference, _ = _train(world_shards, tmp_path / "fp32", case, [*extra, "train.precision=fp32"])
    assert dtypes == {torch.bfloat16}
    assert len(losses) == len(reference) == 3
    for key in (k for k in reference[0] if k.startswith("loss/")):  # step 1: the same weights, rounded to bf16
        assert losses[0][key] == pytest.approx(reference[0][key], rel=0.03, abs=0.02), key
    assert all(math.isfinite(line["loss/total"]) for line in losses)
    assert metrics and all(math.isfinite(v) for v in metrics.values())
