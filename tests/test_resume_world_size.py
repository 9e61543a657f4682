"""A run saved on 2 ranks resumes on 1 and on 4 (ZeRO-2 and ZeRO-3) and under the other stage, and one saved on 1 rank
resumes on 2 (ZeRO-2 and ZeRO-3),
through DeepSpeed's universal checkpoint: the losses after the resume and the final weights equal the uninterrupted 2-rank run's, because the
data order belongs to the run (its logical streams), not to the world size. Stage 0 on 2 ranks, which averages
gradients during the backward, accumulates and resumes as one process does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed
STEPS, SAVED_AT, GLOBAL_BATCH = 6, 3, 16


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return clean | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train(shards: Path, run_dir: Path, ranks: int, stage: int, *extra: str, batch_size: int | None = None) -> subprocess.CompletedProcess:
    """The tiny CLIP two-tower end to end (no dropout), logging every step, saving at step 3."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    sets = [f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", f"data.shards={shards}", f"train.run_dir={run_dir}",
            f"data.batch_size={batch_size or GLOBAL_BATCH // ranks}", "data.num_workers=0", f"train.max_steps={STEPS}",
            "train.log_every=1", "eval.splits=[]", "objectives.weights={rec: 1.0, itc: 0.1}", f"train.save_every={SAVED_AT}",
            f"train.deepspeed_config={REPO / 'ds_configs' / f'zero{stage}.json'}"]
    command = [launcher, "--num_gpus", str(ranks), "--master_port", str(29000 + (os.getpid() + ranks * 7 + stage) % 1000),
               str(REPO / "launch/train.py"), *[a for s in sets for a in ("--set", s)], *extra]
    return subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from mmscale.engine.checkpoint import resolve_source
    from mmscale.engine.restore import consolidated_state_dict

    return consolidated_state_dict(resolve_source(run_dir / "checkpoints" / f"step{STEPS:08d}"))


def resumed_copy(source: Path, run_dir: Path) -> Path:
    """A new run folder holding only the source's step-3 tag (so the resumed run's metrics are its own)."""
    tag = f"step{SAVED_AT:08d}"
    shutil.copytree(source / "checkpoints" / tag, run_dir / "checkpoints" / tag)
    return run_dir / "checkpoints" / tag


@pytest.fixture(scope="module")
def two_ranks(world_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume-world") / "two-ranks"
    done = train(world_shards, run_dir, 2, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((run_dir / "checkpoints" / f"step{SAVED_AT:08d}" / "train_state.json").read_text())
    assert state == {"world_size": 2, "batch_size": 8, "grad_accum": 1, "streams": 2, "zero_stage": 2, "precision": "fp32"}
    return run_dir


@pytest.fixture(scope="module")
def saved_elsewhere(world_shards, tmp_path_factory):
    """The same run stopped at step 3 by 2 ZeRO-3 ranks, or by one rank (which runs ZeRO-2 as stage 0) reading the
    2-rank order (data.streams=2); made once each."""
    made = {}

    def source(ranks: int, stage: int) -> Path:
        if (ranks, stage) not in made:
            run_dir = tmp_path_factory.mktemp("resume-world") / f"{ranks}-ranks-zero{stage}"
            saved = train(world_shards, run_dir, ranks, stage, "--stop-at", str(SAVED_AT), "--set", "data.streams=2")
            assert saved.returncode == 0, saved.stderr[-3000:]
            made[ranks, stage] = run_dir
        return made[ranks, stage]

    return source


@pytest.mark.parametrize("saved_on,saved_stage,ranks,stage", [
    (2, 2, 1, 2), (2, 2, 4, 2), (2, 3, 1, 3), (2, 3, 4, 3),  # another world size
    (1, 2, 2, 2), (1, 2, 2, 3),  # one rank's stage-0 tag (ZeRO-2 runs as stage 0 there) on two ranks
    (2, 2, 2, 3), (2, 3, 2, 2),  # another ZeRO stage
])
def test_a_run_resumes_on_another_world_size(saved_on, saved_stage, ranks, stage, two_ranks, saved_elsewhere, world_shards, tmp_path):
    """A step-3 tag of the 2-rank run (ZeRO-2 or 3) or of its one-rank twin continues on `ranks` under ZeRO-`stage`
    as the unbroken 2-rank ZeRO-2 run did."""
    source = two_ranks if (saved_on, saved_stage) == (2, 2) else saved_elsewhere(saved_on, saved_stage)
    saved_stage = 0 if saved_on == 1 else saved_stage
    tag = resumed_copy(source, tmp_path / "resumed")
    resumed = train(world_shards, tmp_path / "resumed", ranks, stage, "--resume", str(tag))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert (f"(saved on {saved_on} ranks, ZeRO-{saved_stage}) on {ranks} ranks: data.batch_size {GLOBAL_BATCH // ranks}"
            in out), out[-3000:]
    assert (tag / "universal" / "COMPLETE").is_file()

    expected, after = losses(two_ranks), losses(tmp_path / "resumed")
    assert sorted(after) == list(range(SAVED_AT + 1, STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(expected[step], rel=1e-5), step
    # Adam would hide a wrong moment in the losses of a few steps; the weights after three updates do not
    reference, weights = final_weights(two_ranks), final_weights(tmp_path / "resumed")
    assert reference.keys() == weights.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_resume_on_another_world_size_keeps_the_global_micro_batch(two_ranks, world_shards, tmp_path):
    tag = resumed_copy(two_ranks, tmp_path / "resumed")
    wrong = train(world_shards, tmp_path / "resumed", 1, 2, "--resume", str(tag), batch_size=8)
    assert wrong.returncode == 2
    assert "data.batch_size: " in wrong.stderr and "its global micro-batch of 16 needs data.batch_size=16" in wrong.stderr, wrong.stderr[-2000:]
    assert not (tag / "universal").exists()


def test_stage_0_on_two_ranks_accumulates_and_resumes_as_one_process(world_shards, tmp_path):
    """Stage 0 on several ranks averages gradients during the backward (torch's DDP reducer), once per step: 2 ranks x
    batch 4 x 2 accumulated micro-batches, stopped at step 3 and resumed, train as one process does on the same global
    batches (batch 8 x 2, reading the run's 2 streams): the same losses at every step and the same final weights."""
    accumulate = ("--set", "optim.grad_accum=2")
    one = train(world_shards, tmp_path / "one", 1, 0, *accumulate, "--set", "data.streams=2", batch_size=8)
    stopped = train(world_shards, tmp_path / "two", 2, 0, *accumulate, "--stop-at", str(SAVED_AT), batch_size=4)
    assert one.returncode == 0 and stopped.returncode == 0, (one.stderr + stopped.stderr)[-3000:]
    resumed = train(world_shards, tmp_path / "two", 2, 0, *accumulate, "--resume", "latest", batch_size=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    reference, weights = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert reference.keys() == weights.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
