"""tools/evaluate.py on a run folder gives the metrics the trainer logged at the end of training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmscale.engine.restore import evaluate_checkpoint
from helpers.programs import load_program

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "evaluate.py"
STEPS = 6


def clean_env(threads: int = 2) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = str(threads)
    # CPU tests everywhere: on a GPU machine training would run in bf16 and no longer match fp32 exactly
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def cli(argv: list[str]) -> int:
    """tools/evaluate.py's command line, run in this process (its name would clash with other `evaluate` packages)."""
    return load_program("tools/evaluate.py").main(argv)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from mmscale.build.shards import BuildOptions, build_shards
    from mmscale.build.world import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("evaluate-world")
    generate_world(root / "raw", WorldSpec(num_users=120, num_items=150))
    build_shards(root / "raw", root / "shards", BuildOptions(progress=False, workers=1, cold_item_fraction=0.05))
    return root / "shards"


def train(shards: Path, run_dir: Path, *overrides: str) -> Path:
    """A tiny one-process run through launch/train.py, evaluated at its end."""
    sets = ["encoder.model=configs/models/clip-tiny.json",  # relative, as a user would type it
            f"data.shards={shards}", f"train.run_dir={run_dir}", f"train.max_steps={STEPS}", "data.batch_size=16",
            "data.num_workers=0", "optim.warmup_steps=1", "optim.lr_recommender=1e-2", "optim.lr_encoder=1e-3", *overrides]
    run([sys.executable, str(REPO / "launch" / "train.py")] + [a for s in sets for a in ("--set", s)])
    return run_dir


@pytest.fixture(scope="module")
def trained_run(shards, tmp_path_factory) -> Path:
    """End to end under ZeRO-3."""
    return train(shards, tmp_path_factory.mktemp("evaluate-runs") / "run", "train.deepspeed_config=ds_configs/zero3.json")


def logged_eval(run_dir: Path) -> tuple[int, dict[str, dict[str, float]]]:
    """The trainer's last evaluation from metrics.jsonl, as {split: {metric: value}}."""
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in entries if any(k.startswith("eval/") for k in e)][-1]
    results: dict[str, dict[str, float]] = {}
    for key, value in last.items():
        if key.startswith("eval/"):
            _, split, metric = key.split("/", 2)
            results.setdefault(split, {})[metric] = value
    return last["step"], results


def test_metrics_equal_the_trainers(trained_run):
    step, logged = logged_eval(trained_run)
    assert step == STEPS and sorted(logged) == ["cold", "test", "valid"]
    proc = run([sys.executable, str(TOOL), str(trained_run), "--num-workers", "0"])
    out = json.loads(proc.stdout)  # stdout holds the JSON alone; progress goes to stderr
    assert out["step"] == STEPS and out["tag"] == f"step{STEPS:08d}"
    assert Path(out["checkpoint"]) == trained_run / "checkpoints" / out["tag"]
    assert out["exclude_seen"] is True
    assert sorted(out["eval"]) == sorted(logged)
    for split, metrics in logged.items():
        assert sorted(out["eval"][split]) == sorted(metrics), split
        assert metrics["samples"] > 0
        for name, value in metrics.items():
            assert out["eval"][split][name] == pytest.approx(value, rel=0, abs=1e-6), (split, name)


def test_splits_and_recbole_protocol(trained_run, capsys):
    """--splits picks splits; without excluding seen items, history items compete: recall can only drop."""
    tag = trained_run / "checkpoints" / f"step{STEPS:08d}"
    _, logged = logged_eval(trained_run)
    kept = evaluate_checkpoint(tag, splits=["valid"], exclude_seen=False, device="cpu", num_workers=0)
    assert kept["exclude_seen"] is False and list(kept["eval"]) == ["valid"]
    valid, base = kept["eval"]["valid"], logged["valid"]
    assert valid["samples"] == base["samples"]
    recalls = [k for k in base if k.startswith("recall@")]
    assert recalls
    for k in recalls:
        assert valid[k] <= base[k] + 1e-12, k
    assert any(valid[k] < base[k] for k in recalls + [k.replace("recall", "ndcg") for k in recalls])

    # the command line's flags map onto the same config keys
    capsys.readouterr()
    assert cli([str(tag), "--splits", "valid", "--no-exclude-seen", "--set", "eval.ks=[5]", "--device", "cpu", "--num-workers", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["exclude_seen"] is False and list(printed["eval"]) == ["valid"]
    assert sorted(k for k in printed["eval"]["valid"] if k.startswith("recall@")) == ["recall@5"]


def test_cold_split_ranks_among_cold_items_by_default(trained_run, shards):
    """A cold target competes with the other cold items only (eval.cold_candidates=cold); with "all" the
    warm catalogue joins in, which can only push the target down."""
    num_cold = len(json.loads((shards / "manifest.json").read_text())["cold_items"])
    overrides = ["eval.ks=[2,5]"]  # K below the number of cold items (8 here)
    among = {name: evaluate_checkpoint(trained_run, splits=["cold"], overrides=overrides + [f"eval.cold_candidates={name}"],
                                       device="cpu", num_workers=0)["eval"]["cold"] for name in ("cold", "all")}
    assert num_cold > 5
    assert among["cold"]["random_recall@5"] == pytest.approx(5 / num_cold)
    assert among["all"]["random_recall@5"] < among["cold"]["random_recall@5"]
    for k in (2, 5):
        assert among["all"][f"recall@{k}"] <= among["cold"][f"recall@{k}"] + 1e-12
    assert among["all"]["ndcg@5"] < among["cold"]["ndcg@5"]


@pytest.mark.parametrize("name, overrides", [
    # frozen encoder: the trainer ranked with cached content (history items through the full item tower);
    # the rebuilt task must be put in the same state to give the same numbers
    ("frozen", ["encoder.paradigm=frozen", "objectives.weights.itc=0"]),
    # sequential tasks: SASRec has no item encoder at all; MP4SR reads the frozen encoder's cached features
    ("sasrec", ["task=sequential", "sequence.model=sasrec"]),
    ("mp4sr", ["task=sequential", "sequence.mode=finetune", "objectives.weights={rec: 1.0}"]),
])
def test_other_tasks_and_paradigms(name, overrides, shards, tmp_path):
    run_dir = train(shards, tmp_path / name, "train.deepspeed_config=ds_configs/zero2.json", *overrides)
    _, logged = logged_eval(run_dir)
    out = evaluate_checkpoint(run_dir, device="cpu", num_workers=0)
    assert sorted(out["eval"]) == sorted(logged)
    for split, metrics in logged.items():
        for metric, value in metrics.items():
            assert out["eval"][split][metric] == pytest.approx(value, rel=0, abs=1e-6), (split, metric)


def test_missing_run_exits_2(tmp_path):
    proc = run([sys.executable, str(TOOL), str(tmp_path / "no-such-run")], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and proc.stdout == ""


def test_bad_override_and_incomplete_tag_exit_2(trained_run, tmp_path, capsys):
    assert cli([str(trained_run), "--set", "eval.no_such_key=1"]) == 2
    assert "eval.no_such_key" in capsys.readouterr().err
    assert cli([str(trained_run), "--splits", "valid,tset"]) == 2
    assert "tset" in capsys.readouterr().err
    partial = tmp_path / "run" / "checkpoints" / "step00000001"
    partial.mkdir(parents=True)
    assert cli([str(partial)]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
