"""Two nodes x two ranks across Linux network namespaces (launch/two_node_netns.py): DeepSpeed's launcher and
torchrun, ZeRO over gloo on the veth pair; losses and gradients equal one process's; the checkpoint resumes on one node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
from two_node_netns import NetnsError, run_two_nodes, two_hosts  # noqa: E402

from helpers.parity import assert_parity  # noqa: E402
from helpers.train_worker import CASES  # noqa: E402

WORKER = REPO / "tests" / "helpers" / "train_worker.py"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", autouse=True)
def namespaces_permitted():
    try:
        with two_hosts(tag="probe"):
            pass
    except NetnsError as e:
        pytest.skip(f"network namespaces are not permitted here: {e}")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_nodes_match_one_process(launcher, world_shards, vlmo_tokenizer, parity_reference, tmp_path):
    """2 nodes x 2 ranks, each rank fed only its own production stream: the losses and gradients of one process on the
    same global batches. Every case under stage 0 and ZeRO-1, 2 and 3 with the DeepSpeed launcher; two of them under torchrun."""
    runs = [f"{case}:{stage}" for stage in (0, 1, 2, 3) for case in CASES] if launcher == "deepspeed" else ["two_tower:3", "mp4sr_joint:3"]
    code = run_two_nodes(launcher, [str(WORKER), "--shards", str(world_shards), "--out", str(tmp_path), "--runs", ",".join(runs),
                                    "--vlmo-tokenizer", str(vlmo_tokenizer)], timeout_s=2400)
    assert code == 0
    assert json.loads((tmp_path / "runs" / "two_tower-zero3" / "run_info.json").read_text())["derived"]["world_size"] == 4
    for case, _, stage in (r.partition(":") for r in runs):
        assert_parity(parity_reference(4), case, tmp_path, f"{case}-zero{stage}")
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if ns.startswith(f"mm{os.getpid() % 100000}n")], "namespaces left behind"


def test_a_two_node_checkpoint_resumes_on_one_node(world_shards, tmp_path):
    """ZeRO-3 world_shards written by 2 nodes x 2 ranks load into 4 ranks of one node; the run goes on as if unbroken."""
    def train(run_dir: Path, *extra: str) -> list[str]:
        sets = [f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", f"data.shards={world_shards}", f"train.run_dir={run_dir}",
                "train.deepspeed_config=ds_configs/zero3.json", "data.batch_size=4", "data.num_workers=0", "train.max_steps=4",
                "train.log_every=1", "eval.splits=[]"]
        return ["launch/train.py", *[a for s in sets for a in ("--set", s)], *extra]

    assert run_two_nodes("deepspeed", train(tmp_path / "run", "--stop-at", "2"), timeout_s=900) == 0
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "4", "--master_port", str(29000 + os.getpid() % 900)]
    for run_dir, extra in ((tmp_path / "run", ["--resume", "latest"]), (tmp_path / "straight", [])):
        done = subprocess.run(launcher + train(run_dir, *extra), cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    def losses(run_dir: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}

    resumed, straight = losses(tmp_path / "run"), losses(tmp_path / "straight")
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step
    shutil.rmtree(tmp_path, ignore_errors=True)
