"""Several CPU ranks under DeepSpeed against one process; resume against an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "helpers" / "train_worker.py"
pytestmark = pytest.mark.distributed


def clean_env(threads: int) -> dict:
    """No launcher variables leak in from the test process; each rank gets its share of cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO)
    return env


def run(cmd: list[str], threads: int, timeout: int = 600) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(threads), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def deepspeed_cmd(ranks: int) -> list[str]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(29500 + os.getpid() % 1000)]


def losses(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def one_process_losses(world_shards, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("single")
    run([sys.executable, str(WORKER), "--shards", str(world_shards), "--run-dir", str(out / "run"), "--out", str(out / "losses.json")], threads=2)
    return losses(out / "losses.json")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_process(stage, world_shards, one_process_losses, tmp_path):
    run(deepspeed_cmd(2) + [str(WORKER), "--shards", str(world_shards), "--run-dir", str(tmp_path / "run"),
                            "--out", str(tmp_path / "losses.json"), "--zero-stage", str(stage)], threads=1)
    two = losses(tmp_path / "losses.json")
    assert [e["step"] for e in two] == [e["step"] for e in one_process_losses] == [1, 2, 3]
    for a, b in zip(one_process_losses, two):
        for name in ("loss/rec", "loss/itc", "loss/total"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (stage, a["step"], name)
    # the updates are not no-ops: the loss moves between steps
    assert abs(two[2]["loss/total"] - two[0]["loss/total"]) > 1e-3


JOINT_MP4SR = ["task=sequential", "sequence.mode=joint", "sequence.dropout=0.0", "sequence.adaptor_dropout=0.0",
               "objectives.weights={rec: 1.0, seq_item: 1.0, seq_seq: 0.1, itc: 0.1}"]


@pytest.fixture(scope="module")
def one_process_joint_losses(world_shards, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("single-joint")
    run([sys.executable, str(WORKER), "--shards", str(world_shards), "--run-dir", str(out / "run"), "--out", str(out / "losses.json")]
        + [a for o in JOINT_MP4SR for a in ("--set", o)], threads=2)
    return losses(out / "losses.json")


@pytest.mark.parametrize("stage", [2, 3])
def test_mp4sr_joint_two_ranks_match_one_process(stage, world_shards, one_process_joint_losses, tmp_path):
    """MP4SR joint mode (tiny CLIP end-to-end, mixup and item drop on): two ranks equal one process."""
    run(deepspeed_cmd(2) + [str(WORKER), "--shards", str(world_shards), "--run-dir", str(tmp_path / "run"),
                            "--out", str(tmp_path / "losses.json"), "--zero-stage", str(stage)]
        + [a for o in JOINT_MP4SR for a in ("--set", o)], threads=1)
    two = losses(tmp_path / "losses.json")
    assert [e["step"] for e in two] == [e["step"] for e in one_process_joint_losses] == [1, 2, 3]
    for a, b in zip(one_process_joint_losses, two):
        for name in ("loss/rec", "loss/seq_item", "loss/seq_seq", "loss/itc", "loss/total"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (stage, a["step"], name)


@pytest.fixture(scope="module")
def vlmo_overrides(world_shards, tmp_path_factory) -> list[str]:
    """A tiny VLMo with a WordPiece vocabulary of the world's item texts, trained with every VLMo objective."""
    from mmscale.data.item_store import ItemStore
    from mmscale.models.vlmo import build_wordpiece_tokenizer

    store = ItemStore(world_shards)
    tokenizer = build_wordpiece_tokenizer([store.text(i) for i in range(len(store))], 300, tmp_path_factory.mktemp("wordpiece"))
    return ["encoder.kind=vlmo", f"encoder.model={REPO / 'configs/models/vlmo-tiny.json'}", f"encoder.tokenizer={tokenizer}",
            "objectives.weights={rec: 1.0, itc: 0.5, itm: 0.5, mlm: 0.5}"]


def test_vlmo_two_ranks_zero3_match_one_process(world_shards, vlmo_overrides, tmp_path):
    """Tiny VLMo end to end with the recommender, its contrastive, matching (hard negatives drawn from the
    gathered batch) and masked-LM losses: two ZeRO-3 ranks equal one process on the same global batches."""
    sets = [a for o in vlmo_overrides for a in ("--set", o)]
    common = [str(WORKER), "--shards", str(world_shards)]
    run([sys.executable] + common + ["--run-dir", str(tmp_path / "one"), "--out", str(tmp_path / "one.json")] + sets, threads=2)
    run(deepspeed_cmd(2) + common + ["--run-dir", str(tmp_path / "two"), "--out", str(tmp_path / "two.json"),
                                     "--zero-stage", "3"] + sets, threads=1)
    one, two = losses(tmp_path / "one.json"), losses(tmp_path / "two.json")
    assert [e["step"] for e in two] == [e["step"] for e in one] == [1, 2, 3]
    for a, b in zip(one, two):
        for name in ("loss/rec", "loss/itc", "loss/itm", "loss/mlm", "loss/total"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (a["step"], name)
    assert abs(two[2]["loss/total"] - two[0]["loss/total"]) > 1e-3


def test_resume_continues_the_same_run(world_shards, tmp_path):
    common = [sys.executable, str(REPO / "launch/train.py"),
              "--set", f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", "--set", f"data.shards={world_shards}",
              "--set", "data.batch_size=8", "--set", "data.num_workers=2", "--set", "train.max_steps=6",
              "--set", "train.log_every=1", "--set", "eval.splits=[]", "--set", "optim.lr_recommender=1e-2"]
    run(common + ["--set", f"train.run_dir={tmp_path / 'straight'}"], threads=2)
    run(common + ["--set", f"train.run_dir={tmp_path / 'resumed'}", "--stop-at", "3"], threads=2)
    run(common + ["--set", f"train.run_dir={tmp_path / 'resumed'}", "--resume", "latest"], threads=2)

    def logged(run_dir: Path) -> dict[int, float]:
        entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {e["step"]: e["loss/total"] for e in entries if "loss/total" in e}

    straight, resumed = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
    tags = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step*"))
    assert tags == ["step00000003", "step00000006"]
