"""Early stopping on a validation metric: the best checkpoint is kept and described, the tools take it as RUN/best,
and a run stopped and resumed part-way stops at the step, with the best, of the run that was never interrupted
(SASRec, dropout 0.2). The resumed run also reports to every tracker (TensorBoard, Weights & Biases offline, MLflow
on a local file store) and its text log: each continues across the restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVERY, PATIENCE = 2, 2


def train(shards: Path, run_dir: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), **(env_extra or {}))
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

    # the tools take the best checkpoint as RUN/best
    from mmscale.engine.restore import evaluate_checkpoint

    evaluated = evaluate_checkpoint(straight / "best", device="cpu", num_workers=0)
    assert evaluated["tag"] == best["tag"] and evaluated["eval"]["valid"]["ndcg@10"] == best["value"]

    # stopped at an evaluation step after the best, then resumed: the same evaluations, the same stop
    cut = tmp_path / "cut"
    trackers = {"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    report = ("--set", "train.report_to=[tensorboard, wandb, mlflow]")
    train(world_shards, cut, "--stop-at", str(stop - EVERY), *report, env_extra=trackers)
    train(world_shards, cut, "--resume", "latest", *report, env_extra=trackers)
    assert evaluations(cut) == scores
    assert json.loads((cut / "best.json").read_text())["step"] == best["step"]
    check_trackers(cut, tmp_path / "mlruns", scores)


def check_trackers(run_dir: Path, mlruns: Path, scores: dict[int, float]) -> None:
    """One tracker run per training run, continued after the restart, holding the same evaluations as metrics.jsonl."""
    from mlflow.tracking import MlflowClient

    ids = json.loads((run_dir / "trackers.json").read_text())
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    history = MlflowClient(tracking_uri=f"file:{mlruns}").get_metric_history(ids["mlflow"], "eval/valid/ndcg_at_10")
    assert {m.step: m.value for m in history} == pytest.approx(scores)
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(offline) == 2 and all(list(d.glob("*.wandb")) for d in offline)  # both halves, one run id
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    log = (run_dir / "out.log").read_text()
    assert log.count("| INFO |") >= 2 and f"step {max(scores)}: early stop" in log


def test_an_unreadable_trackers_file_starts_new_tracker_runs(tmp_path):
    from mmscale.engine.monitor import _tracker_ids

    path = tmp_path / "trackers.json"
    for broken in ("{not json", "[1, 2]", '{"wandb": 5, "mlflow": "abc"}'):
        path.write_text(broken)
        assert _tracker_ids(path) == ({"mlflow": "abc"} if "mlflow" in broken else {})
    assert _tracker_ids(tmp_path / "missing.json") == {}
