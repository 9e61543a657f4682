"""tools/consolidate_checkpoint.py against the weights the engine itself holds at the end of training.

Two tiny runs: one process under ZeRO-2 and two CPU ranks under ZeRO-3 (partitioned parameters),
both trained by this file run as a worker script (`python tests/test_consolidate.py --worker ...`,
under the deepspeed launcher for two ranks). The worker saves the task's gathered state dict, in
the training process, before and after training; the consolidated export must equal the latter
exactly and differ from the former.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.programs import load_program

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
ARCH = REPO / "configs" / "models" / "clip-tiny.json"
STEPS = 4


def _worker(argv: list[str]) -> int:
    """Trains a tiny run and saves the engine's gathered task state dict before and after (rank 0)."""
    import contextlib

    sys.path.insert(0, str(REPO))
    import torch

    from mmscale.config import load_config

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--shards", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--eval", action="store_true", help="evaluate at the end (default splits), as train.py does")
    p.add_argument("--local_rank", "--local-rank", type=int)
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = load_config(None, [
        f"encoder.model={ARCH}", f"data.shards={args.shards}", f"data.batch_size={args.global_batch // world}",
        "data.num_workers=0", f"train.run_dir={args.run_dir}",
        f"train.deepspeed_config={REPO / 'ds_configs' / f'zero{args.stage}.json'}",
        f"train.max_steps={STEPS}", "train.log_every=1", "optim.warmup_steps=1", "optim.lr_encoder=1e-3",
        "optim.lr_recommender=1e-2", "train.peak_tflops=1", *([] if args.eval else ["eval.splits=[]"]),
    ])
    from mmscale.engine.distributed import deepspeed
    from mmscale.engine.trainer import Trainer

    trainer = Trainer(config, log=lambda *a, **k: None)

    def gathered() -> dict:
        params = list(trainer.task.parameters())
        ctx = deepspeed.zero.GatheredParameters(params) if args.stage == 3 else contextlib.nullcontext()
        with ctx:  # a collective under ZeRO-3: every rank enters
            return {k: v.detach().clone() for k, v in trainer.task.state_dict().items()}

    initial = gathered()
    trainer.fit()
    final = gathered()
    if trainer.dist.is_main:
        torch.save({"initial": initial, "final": final, "world_size": trainer.dist.world_size}, args.out)
    torch.distributed.barrier()
    return 0


# -- fixtures --------------------------------------------------------------------------------------
def clean_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = str(threads)
    # CPU tests everywhere (gloo ranks, fp32): the same numbers on a machine with GPUs
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run(cmd: list[str], threads: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(threads), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def deepspeed_cmd(ranks: int) -> list[str]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(29500 + (os.getpid() + 517) % 1000)]


def cli(argv: list[str]) -> int:
    """tools/consolidate_checkpoint.py's command line, run in this process."""
    return load_program("tools/consolidate_checkpoint.py").main(argv)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from mmscale.build.shards import BuildOptions, build_shards
    from mmscale.build.world import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("consolidate-world")
    generate_world(root / "raw", WorldSpec(num_users=120, num_items=150))
    build_shards(root / "raw", root / "shards", BuildOptions(progress=False, workers=1, cold_item_fraction=0.05))
    return root / "shards"


RUN_SPECS = {"zero2-1rank": (2, 1), "zero3-2ranks": (3, 2)}  # name: (ZeRO stage, ranks)


def _train_and_export(name: str, shards: Path, root: Path) -> dict:
    """Trains run `name`, then consolidates it: through the library function for one process,
    through the command line for two ranks."""
    import torch

    stage, ranks = RUN_SPECS[name]
    run_dir, states, export = root / name, root / f"{name}-states.pt", root / f"{name}-export"
    args = [str(Path(__file__).resolve()), "--worker", "--shards", str(shards), "--run-dir", str(run_dir),
            "--stage", str(stage), "--out", str(states)]
    if ranks == 1:
        run([sys.executable] + args, threads=2)
        from mmscale.engine.export import consolidate

        record = consolidate(run_dir, export, num_workers=0)
    else:
        run(deepspeed_cmd(ranks) + args + ["--eval"], threads=1)
        proc = run([sys.executable, str(TOOLS / "consolidate_checkpoint.py"), str(run_dir), "--out", str(export), "--num-workers", "0"])
        assert json.loads(proc.stdout)["step"] == STEPS
        record = json.loads((export / "consolidated.json").read_text())
    return {"run_dir": run_dir, "stage": stage, "ranks": ranks, "export": export, "record": record,
            **torch.load(states, weights_only=False)}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """runs(name) -> run folder, the engine's states (initial, final), the export; built on first use."""
    root = tmp_path_factory.mktemp("consolidate-runs")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = _train_and_export(name, shards, root)
        return cache[name]

    return get


RUNS = ["zero2-1rank", pytest.param("zero3-2ranks", marks=pytest.mark.distributed)]


def task_from_export(export: Path, shard_dir: Path):
    """A RecommendationTask holding the exported whole-task weights (config: the recorded one)."""
    from safetensors.torch import load_file

    from mmscale.config import config_from_values
    from mmscale.data.shard_set import ShardSet
    from mmscale.engine.restore import task_with_weights

    record = json.loads((export / "consolidated.json").read_text())
    config = config_from_values(record["config"])
    return task_with_weights(config, ShardSet.open(shard_dir), load_file(str(export / "model.safetensors"))), config


def item_batch(shard_dir: Path, preprocess, items: list[int]) -> dict:
    from mmscale.data.catalogue import CatalogueItems
    from mmscale.data.item_store import ItemStore

    dataset = CatalogueItems(ItemStore(shard_dir), preprocess, items)
    return dataset.collate([dataset[i] for i in range(len(items))])


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RUNS)
def test_weights_equal_the_engines(name, runs):
    import torch
    from safetensors.torch import load_file

    r = runs(name)
    assert r["world_size"] == r["ranks"]
    exported = load_file(str(r["export"] / "model.safetensors"))
    final, initial = r["final"], r["initial"]
    assert sorted(exported) == sorted(final)
    for key, value in final.items():
        dtype = torch.float32 if value.is_floating_point() else value.dtype  # counters (the draws buffer) stay integers
        assert exported[key].dtype == dtype, key
        assert exported[key].shape == value.shape, key
        assert torch.equal(exported[key], value.to(dtype)), f"{name}: {key} differs from the engine's weights"
    # not vacuous: training moved the weights, and the export holds the trained ones
    moved = [k for k in final if not torch.equal(final[k], initial[k])]
    assert len(moved) > 0.8 * len(final), f"{name}: training changed only {len(moved)}/{len(final)} tensors"
    assert "encoder.clip.visual.conv1.weight" in moved and "item_tower.fuse.0.weight" in moved


@pytest.mark.parametrize("name", RUNS)
def test_encoder_loads_into_open_clip(name, runs, shards):
    """The export folder is an open_clip `local-dir:` model: create_model_and_transforms and get_tokenizer load it
    with no registration; strict=True into a fresh model too; same embeddings as the task's encoder."""
    import io

    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from mmscale.data.item_store import ItemStore

    export = runs(name)["export"]
    state = load_file(str(export / "open_clip_model.safetensors"))
    assert state["logit_scale"].shape == torch.Size([])
    assert not any(k.startswith("encoder.") for k in state)

    loaded, _, transform = open_clip.create_model_and_transforms(f"local-dir:{export}")
    loaded.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    open_clip.add_model_config(ARCH)
    fresh = open_clip.create_model("clip-tiny")
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in state.items()}
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    assert runs(name)["record"]["model"]["open_clip"]["model_name"] == "clip-tiny"

    task, _ = task_from_export(export, shards)
    preprocess = task.encoder.preprocess()
    batch = item_batch(shards, preprocess, [0, 3, 17, 88, 149])
    store = ItemStore(shards)
    with Image.open(io.BytesIO(store.image(3)[0])) as img:  # open_clip's transform and tokenizer are the run's
        torch.testing.assert_close(transform(img.convert("RGB")), preprocess.image_transform(img.convert("RGB")))
    assert torch.equal(tokenizer([store.text(3)]), preprocess.tokenize([store.text(3)]))
    with torch.no_grad():
        image, text = task.encode_content(batch["images"], batch["text_tokens"])
        for model in (fresh, loaded):
            torch.testing.assert_close(model.encode_image(batch["images"], normalize=True), image, rtol=0, atol=1e-6)
            torch.testing.assert_close(model.encode_text(batch["text_tokens"], normalize=True), text, rtol=0, atol=1e-6)
        assert float(fresh.logit_scale) == pytest.approx(float(task.encoder.logit_scale))
    # and they are the trained weights, not a fresh model's
    assert torch.equal(state["visual.conv1.weight"], runs(name)["final"]["encoder.clip.visual.conv1.weight"])


def test_training_scalars_carry_epoch_logit_scale_and_mfu(runs):
    """Beside the losses: the epoch (fractional), the contrastive logit scale as trained, and with train.peak_tflops
    the encoder's MFU, from its FLOPs per item and the items encoded per second."""
    from safetensors.torch import load_file

    r = runs("zero2-1rank")
    rows = [json.loads(line) for line in (r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss/total" in row]
    assert len(rows) == STEPS
    epochs = [row["train/epoch"] for row in rows]
    assert epochs == sorted(epochs) and 0 < epochs[0] < epochs[-1] < 1
    scale = float(load_file(str(r["export"] / "open_clip_model.safetensors"))["logit_scale"].exp())
    assert rows[-1]["train/logit_scale"] == pytest.approx(scale, rel=1e-6)
    for row in rows:
        # a tiny CLIP on CPU: a few GFLOP/s against the 1 TFLOP/s peak given
        assert 1e-5 < row["perf/encoder_mfu"] < 0.2
        assert row["perf/encoder_mfu"] / row["perf/items_encoded_per_s"] == pytest.approx(
            rows[0]["perf/encoder_mfu"] / rows[0]["perf/items_encoded_per_s"])  # a fixed FLOPs per item


@pytest.mark.parametrize("name", RUNS)
def test_item_table(name, runs, shards):
    import torch
    from safetensors import safe_open

    export = runs(name)["export"]
    manifest = json.loads((shards / "manifest.json").read_text())
    with safe_open(str(export / "item_embeddings.safetensors"), "pt") as f:
        assert list(f.keys()) == ["item_embeddings"]
        table = f.get_tensor("item_embeddings")
    assert table.dtype == torch.float32
    embed_dim = runs(name)["record"]["config"]["recommender"]["embed_dim"]
    assert table.shape == (manifest["num_items"], embed_dim)
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(len(table)), rtol=0, atol=1e-5)
    assert json.loads((export / "item_ids.json").read_text()) == json.loads((shards / "item_ids.json").read_text())

    # row i is item index i: a few items encoded one by one with the trained task
    task, _ = task_from_export(export, shards)
    items = [0, 1, 42, manifest["cold_items"][0], manifest["num_items"] - 1]
    batch = item_batch(shards, task.encoder.preprocess(), items)
    with torch.no_grad():
        image, text = task.encode_content(batch["images"], batch["text_tokens"])
        rows = task.item_embeddings(image, text, batch["has_image"], batch["item_ids"])
    torch.testing.assert_close(table[items], rows, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(table[0], table[1])


@pytest.mark.parametrize("name", RUNS)
def test_consolidated_json(name, runs):
    from mmscale.data.format import file_sha256 as sha256

    r = runs(name)
    export, record = r["export"], r["record"]
    assert json.loads((export / "consolidated.json").read_text()) == json.loads(json.dumps(record))
    listed = set(record["files"])
    assert {"model.safetensors", "open_clip_model.safetensors", "item_embeddings.safetensors"} <= listed
    assert listed | {"consolidated.json"} == {p.name for p in export.iterdir()}
    for file, entry in record["files"].items():
        assert entry["sha256"] == sha256(export / file), file
        assert entry["bytes"] == (export / file).stat().st_size
    source = record["source"]
    assert source["tag"] == f"step{STEPS:08d}" and source["step"] == STEPS
    assert Path(source["run_dir"]) == r["run_dir"].resolve()
    effective = 0 if r["ranks"] == 1 else r["stage"]  # one rank runs ZeRO-2 as stage 0: nothing to partition
    assert record["zero_stage"] == source["zero_stage"] == effective
    assert source["world_size"] == r["ranks"]
    assert record["num_items"] == 150
    embed_dim = record["config"]["recommender"]["embed_dim"]
    assert record["files"]["item_embeddings.safetensors"]["shapes"]["item_embeddings"] == [150, embed_dim]
    assert record["files"]["open_clip_model.safetensors"]["shapes"]["logit_scale"] == []
    assert record["files"]["model.safetensors"]["shapes"]["encoder.clip.logit_scale"] == [1]


@pytest.mark.distributed
def test_evaluate_tool_on_the_two_rank_run(runs):
    """tools/evaluate.py in one process on the merged ZeRO-3 partitions gives the 2-rank trainer's metrics."""
    from mmscale.engine.restore import evaluate_checkpoint

    r = runs("zero3-2ranks")
    entries = [json.loads(line) for line in (r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for e in entries for k, v in e.items() if k.startswith("eval/")}
    assert logged, "the 2-rank run logged no evaluation"
    out = evaluate_checkpoint(r["run_dir"], device="cpu", num_workers=0)
    assert out["step"] == STEPS
    flat = {f"eval/{split}/{k}": v for split, metrics in out["eval"].items() for k, v in metrics.items()}
    assert sorted(flat) == sorted(logged)
    for key, value in logged.items():
        assert flat[key] == pytest.approx(value, rel=0, abs=1e-6), key


def test_reproducible(runs, tmp_path):
    """Consolidating the same tag again, from the tag folder, gives byte-identical files."""
    r = runs("zero2-1rank")
    tag_dir = r["run_dir"] / "checkpoints" / f"step{STEPS:08d}"
    from mmscale.engine.export import consolidate

    again = consolidate(tag_dir, tmp_path / "again", num_workers=0)
    assert {k: v["sha256"] for k, v in again["files"].items()} == {k: v["sha256"] for k, v in r["record"]["files"].items()}
    assert again["source"] == r["record"]["source"]


def test_tag_folder_and_resolution(runs, tmp_path):
    """A tag folder is taken as is; a run folder gives its newest complete tag, never an incomplete one."""
    import torch

    from mmscale.engine.checkpoint import resolve_source

    run_dir = runs("zero2-1rank")["run_dir"]
    tag_dir = run_dir / "checkpoints" / f"step{STEPS:08d}"
    assert resolve_source(tag_dir) == resolve_source(run_dir) == resolve_source(run_dir / "checkpoints")
    fake = tmp_path / "run" / "checkpoints"
    for tag in ("step00000003", "step00000009"):
        (fake / tag).mkdir(parents=True)
        torch.save({"module": {}}, fake / tag / "mp_rank_00_model_states.pt")
    (fake / "step00000003" / "COMPLETE").write_text("step00000003\n")
    assert resolve_source(tmp_path / "run").tag == "step00000003"


def _error(argv: list[str], capsys) -> str:
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "export")]
    assert "does not exist" in _error([str(tmp_path / "missing-run")] + out, capsys)

    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    assert "no complete checkpoint" in _error([str(tmp_path / "empty-run")] + out, capsys)

    partial = tmp_path / "crashed-run" / "checkpoints" / "step00000007"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"")
    err = _error([str(tmp_path / "crashed-run")] + out, capsys)
    assert "no complete checkpoint" in err and "step00000007" in err
    assert "incomplete checkpoint" in _error([str(partial)] + out, capsys)

    (tmp_path / "not-a-run").mkdir()
    assert "not a run folder" in _error([str(tmp_path / "not-a-run")] + out, capsys)
    assert not (tmp_path / "export").exists()


def test_cli_exit_status_on_a_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "consolidate_checkpoint.py"), str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
                          cwd=REPO, env=clean_env(2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and proc.stdout == ""


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))


def test_recommendations_from_export_and_run_agree_and_damage_is_named(runs, shards, tmp_path):
    """tools/recommend.py gives the same top K from the export (FAISS) and from the run (brute force, in memory); an
    altered export file is refused by name, before FAISS reads it."""
    import io
    from contextlib import redirect_stdout

    import torch

    from mmscale.engine.export import ExportError, load_export

    r = runs("zero2-1rank")
    recommend = load_program("tools/recommend.py").main
    shown = {}
    for source in (r["export"], r["run_dir"]):
        out = io.StringIO()
        with redirect_stdout(out):
            assert recommend([str(source), "--random", "5", "--k", "7", "--json", "--shards", str(shards)]) == 0
        shown[source] = json.loads(out.getvalue())
    from_export, from_run = shown[r["export"]], shown[r["run_dir"]]
    assert [u["user"] for u in from_export] == [u["user"] for u in from_run] and len(from_export) == 5
    for a, b in zip(from_export, from_run):
        assert [x["item"] for x in a["recommended"]] == [x["item"] for x in b["recommended"]]
        assert len(a["recommended"]) == 7 and not set(x["item"] for x in a["recommended"]) & set(a["history"])

    damaged = tmp_path / "export"
    shutil.copytree(r["export"], damaged)
    data = bytearray((damaged / "items.faiss").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "items.faiss").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="items.faiss: its sha256 differs"):
        load_export(damaged, shards)
    # a tensor file of other names, its hash made to match: named, not a KeyError
    from mmscale.data.format import file_sha256
    from mmscale.engine.export import save_safetensors

    shutil.copyfile(r["export"] / "items.faiss", damaged / "items.faiss")
    save_safetensors({"something_else": torch.zeros(2)}, damaged / "user_embeddings.safetensors")
    record = json.loads((damaged / "consolidated.json").read_text())
    record["files"]["user_embeddings.safetensors"]["sha256"] = file_sha256(damaged / "user_embeddings.safetensors")
    (damaged / "consolidated.json").write_text(json.dumps(record))
    with pytest.raises(ExportError, match=r"user_embeddings.safetensors: holds \['something_else'\]"):
        load_export(damaged, shards)
    (damaged / "consolidated.json").unlink()
    with pytest.raises(ExportError, match="not an export folder"):
        load_export(damaged, shards)
