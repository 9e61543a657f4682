"""Early stopping on a validation metric: the best checkpoint is kept and described, and a run stopped and resumed
part-way stops at the step, with the best, of the run that was never interrupted (SASRec, dropout 0.2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVERY, PATIENCE = 2, 2


def train(shards: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "mp4sr" / "world-sasrec.yaml"),
               "--set", f"data.shards={shards}", "--set", f"train.run_dir={run_dir}", "--set", "data.batch_size=16",
               "--set", "data.num_workers=0", "--set", "train.max_steps=200", "--set", f"train.eval_every={EVERY}",
               "--set", "train.best_metric=valid/ndcg@10", "--set", f"train.patience={PATIENCE}", "--set", "train.keep_last=1",
               "--set", "optim.lr_recommender=1e-2", "--set", "eval.splits=[valid]", *extra]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def evaluations(run_dir: Path) -> dict[int, float]:
    """step -> valid NDCG@10, the last entry of a step winning (a resumed run may log a step again)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["eval/valid/ndcg@10"] for e in lines if "eval/valid/ndcg@10" in e}


def test_early_stop_keeps_the_best_and_resumes_exactly(world_shards, tmp_path):
    straight = tmp_path / "straight"
    train(world_shards, straight)
    scores = evaluations(straight)
    best = json.loads((straight / "best.json").read_text())
    stop = max(scores)
    assert stop < 200, "the run should have stopped early (else this test proves nothing)"
    assert best["value"] == max(scores.values()) and scores[best["step"]] == best["value"]
    assert stop == best["step"] + EVERY * PATIENCE  # exactly `patience` evaluations without a better one
    # keep_last=1 would have pruned it: the best tag is kept, complete, and named
    assert (straight / "checkpoints" / best["tag"] / "COMPLETE").is_file() and best["tag"] != "step00000000"

    # stopped at an evaluation step after the best, then resumed: the same evaluations, the same stop
    cut = tmp_path / "cut"
    train(world_shards, cut, "--stop-at", str(stop - EVERY))
    train(world_shards, cut, "--resume", "latest")
    assert evaluations(cut) == scores
    assert json.loads((cut / "best.json").read_text())["step"] == best["step"]
