"""The three training paradigms: which parameters learn when."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def train(world_shards: Path, run_dir: Path, *overrides: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "launch/train.py", "--config", "configs/demo.yaml", "--set", f"data.shards={world_shards}",
           "--set", f"train.run_dir={run_dir}", "--set", "data.batch_size=16", "--set", "train.max_steps=8",
           "--set", "train.log_every=1", "--set", "optim.warmup_steps=1", "--set", "eval.splits=[valid]",
           "--set", "train.save_every=4", "--set", "train.keep_last=3"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The tag's fp32 weights, whatever ZeRO stage ran (one rank runs ZeRO-2 as stage 0), through the tools' loader."""
    from mmscale.engine.checkpoint import resolve_source
    from mmscale.engine.restore import consolidated_state_dict

    return consolidated_state_dict(resolve_source(run_dir / "checkpoints" / tag))


def changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def test_fine_tuned_adapts_then_freezes_the_encoder(world_shards, tmp_path):
    logged = train(world_shards, tmp_path, "encoder.paradigm=fine_tuned", "encoder.adapt_steps=4")
    steps = {e["step"]: e for e in logged if "loss/total" in e}
    assert all("loss/itc" in steps[s] and "loss/rec" not in steps[s] for s in range(1, 5))
    assert all("loss/rec" in steps[s] and "loss/itc" not in steps[s] for s in range(5, 9))
    assert all(steps[s]["lr/recommender"] == 0 for s in range(1, 4)) and all(steps[s]["lr/encoder"] == 0 for s in range(4, 9))
    adapted, final = weights(tmp_path, "step00000004"), weights(tmp_path, "step00000008")
    assert not changed(adapted, final, "encoder.")  # frozen after adaptation
    assert changed(adapted, final, "user_tower.") and changed(adapted, final, "item_tower.")
    assert "eval/valid/recall@20" in logged[-1]


def test_frozen_never_updates_the_encoder(world_shards, tmp_path):
    train(world_shards, tmp_path, "encoder.paradigm=frozen", "objectives.weights.itc=0")
    first, final = weights(tmp_path, "step00000004"), weights(tmp_path, "step00000008")
    assert not changed(first, final, "encoder.")
    assert changed(first, final, "user_tower.")
    # the encoder still holds its seeded initial weights
    from mmscale.config import load_config
    from mmscale.data.shard_set import ShardSet
    from mmscale.tasks.two_tower import RecommendationTask

    torch.manual_seed(0)
    config = load_config(REPO / "configs/demo.yaml", [f"data.shards={world_shards}", "encoder.paradigm=frozen", "objectives.weights.itc=0"])
    fresh = RecommendationTask(config, ShardSet.planned(60, 80)).state_dict()
    assert all(torch.equal(fresh[k], final[k]) for k in final if k.startswith("encoder."))
