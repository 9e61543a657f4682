"""Training on the embedded default learns: Recall@20 far above a random ranking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmscale.build.shards import BuildOptions, build_shards
from mmscale.build.world import WorldSpec, generate_world

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_demo_recipe_beats_random_threefold(tmp_path):
    generate_world(tmp_path / "raw", WorldSpec())
    build_shards(tmp_path / "raw", tmp_path / "shards", BuildOptions(progress=False, shard_size_mb=2, cold_item_fraction=0.05))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "configs/demo.yaml",
         "--set", f"data.shards={tmp_path / 'shards'}", "--set", f"train.run_dir={run_dir}",
         "--set", "train.max_steps=100", "--set", "train.eval_every=0", "--set", "eval.splits=[valid,cold]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/valid/recall@20" in line][-1]
    for split in ("valid", "cold"):
        recall, random = final[f"eval/{split}/recall@20"], final[f"eval/{split}/random_recall@20"]
        assert recall >= 3 * random, f"{split}: Recall@20 {recall:.4f} vs random {random:.4f}"
