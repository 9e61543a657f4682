"""Hostile and broken inputs: data, configs, checkpoints and folders that come from someone else.

Each case here ran wrong on 760936d (code ran from a checkpoint, a NaN model reported perfect metrics, files outside
the dataset were embedded, folders were lost, tracebacks or silence instead of a named error); each now ends in a
ledger entry or a named error naming the file, line, field or key, and nothing is lost.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmscale.config import ConfigError, load_config
from mmscale.data.format import MANIFEST, ShardFormatError, load_manifest
from mmscale.data.item_store import ItemStore
from mmscale.build.raw import BadInputError
from mmscale.build.shards import BuildError, BuildOptions, build_shards
from mmscale.data.stream import InteractionStream
from mmscale.engine import checkpoint
from mmscale.eval.metrics import target_ranks
from helpers.programs import load_program

REPO = Path(__file__).resolve().parents[1]
TINY = dict(progress=False, workers=1)


def build_shards_cli(argv: list[str]) -> int:
    """tools/build_shards.py's main, run in this process."""
    return load_program("tools/build_shards.py").main(argv)


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return env | {"OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def run(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def train_args(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    sets = [f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", f"data.shards={shards}", f"train.run_dir={run_dir}",
            "data.batch_size=8", "data.num_workers=0", "train.max_steps=4", "train.save_every=2", "train.keep_last=3",
            "train.log_every=1", "eval.splits=[valid]", *overrides]
    return [str(REPO / "launch/train.py"), *[a for s in sets for a in ("--set", s)]]


# -- 1. no code runs from a checkpoint ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(world_shards, tmp_path_factory) -> Path:
    """A finished tiny run with complete tags at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("hostile-run") / "run"
    done = run(*train_args(world_shards, run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint.complete_tags(run_dir / "checkpoints") == ["step00000002", "step00000004"]
    return run_dir


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    (copy / ".lock").unlink(missing_ok=True)
    return copy


class Payload:
    """What an attacker plants: unpickling it runs a shell command (here: it leaves a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_payload(tag_dir: Path, marker: Path) -> Path:
    target = tag_dir / "mp_rank_00_model_states.pt"
    states = torch.load(target, weights_only=False)  # our own file, trusted here
    states["payload"] = Payload(marker)
    torch.save(states, target)
    return target


@pytest.mark.parametrize("tool", ["evaluate", "consolidate", "resume"])
def test_a_pickled_payload_in_a_checkpoint_is_refused_and_never_runs(tool, trained_run, world_shards, tmp_path):
    run_dir = copy_run(trained_run, tmp_path)
    marker = tmp_path / "pwned"
    planted = plant_payload(run_dir / "checkpoints" / "step00000004", marker)
    command = {
        "evaluate": [str(REPO / "tools/evaluate.py"), str(run_dir)],
        "consolidate": [str(REPO / "tools/consolidate_checkpoint.py"), str(run_dir), "--out", str(tmp_path / "export")],
        "resume": [*train_args(world_shards, run_dir, "train.max_steps=6"), "--resume", "latest"],
    }[tool]
    done = run(*command)
    assert not marker.exists(), "code from the checkpoint ran"
    assert done.returncode == 2, done.stderr[-3000:]
    assert str(planted) in done.stderr and "refused" in done.stderr and "posix.system" in done.stderr
    assert "Traceback" not in done.stderr


def test_safe_loading_forces_deepspeeds_own_loads_weights_only(trained_run, tmp_path):
    """Defence in depth: even a load that asks for weights_only=False (as DeepSpeed's do) is weights-only inside."""
    marker = tmp_path / "pwned"
    path = tmp_path / "bad.pt"
    torch.save({"x": Payload(marker)}, path)
    with checkpoint.safe_loading(), pytest.raises(Exception, match="posix.system"):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    with checkpoint.safe_loading():  # DeepSpeed's optimizer files load: their three types are allowed
        for tag_file in (trained_run / "checkpoints" / "step00000004").glob("*.pt"):
            torch.load(tag_file, weights_only=False)


def test_a_truncated_state_file_names_itself_and_resume_falls_back(trained_run, world_shards, tmp_path):
    run_dir = copy_run(trained_run, tmp_path)
    state = run_dir / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    state.write_bytes(state.read_bytes()[:1000])
    messages = []
    assert checkpoint.resolve_resume("latest", run_dir, messages.append) == (run_dir / "checkpoints", "step00000002")
    assert any(str(state) in m and "truncated" in m for m in messages), messages
    evaluated = run(str(REPO / "tools/evaluate.py"), str(run_dir / "checkpoints" / "step00000004"))
    assert evaluated.returncode == 2 and str(state) in evaluated.stderr and "Traceback" not in evaluated.stderr
    resumed = run(*train_args(world_shards, run_dir, "train.max_steps=5"), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping {run_dir / 'checkpoints' / 'step00000004'}" in resumed.stdout + resumed.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step00000002'} at step 2" in resumed.stdout + resumed.stderr


# -- 2. no number from a broken model ------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["optim.lr_recommender=.nan", "optim.lr_encoder=.inf", "objectives.weights.rec=-.inf"])
def test_config_rejects_non_finite_numbers(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + ": must be a finite number"):
        load_config(overrides=[override])


def test_a_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(trained_run, world_shards, tmp_path):
    """A temperature so small that the logits overflow: the loss is NaN at step 3. The run stops there, exit 5,
    naming the step and the losses; nothing is saved, step 2 stays the latest checkpoint, no metric is printed."""
    run_dir = copy_run(trained_run, tmp_path)
    for tag in ("step00000004",):
        shutil.rmtree(run_dir / "checkpoints" / tag)
    (run_dir / "checkpoints" / "latest").write_text("step00000002")
    done = run(*train_args(world_shards, run_dir, "objectives.rec_temperature=1e-45"), "--resume", "latest")
    assert done.returncode == 5, done.stderr[-3000:]
    assert "step 3: the loss is not finite (" in done.stderr and "rec nan" in done.stderr
    assert f"the last checkpoint {run_dir / 'checkpoints' / 'step00000002'} is kept" in done.stderr
    assert checkpoint.complete_tags(run_dir / "checkpoints") == ["step00000002"]
    assert "Recall@20" not in done.stdout


SKIP_SCRIPT = """
import sys, torch
from mmscale.config import load_config
from mmscale.engine.trainer import Trainer
config = load_config(None, sys.argv[1:])
trainer = Trainer(config, log=lambda *a, **k: None)
forward, calls = trainer.task.forward, [0]
def poisoned(batch, gather):
    calls[0] += 1
    losses = forward(batch, gather)
    return {k: v * float("nan") for k, v in losses.items()} if calls[0] == 3 else losses
trainer.task.forward = poisoned
print(trainer.fit()["step"])
"""


def test_skip_mode_drops_a_non_finite_batch_and_counts_it(world_shards, tmp_path):
    sets = [f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", f"data.shards={world_shards}", f"train.run_dir={tmp_path / 'run'}",
            "data.batch_size=8", "data.num_workers=0", "train.max_steps=4", "train.log_every=1", "eval.splits=[]",
            "train.on_nonfinite_loss=skip"]
    done = run("-c", SKIP_SCRIPT, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "4"  # four updates, from five batches
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["train/nonfinite_batches_skipped"] for e in logged] == [0, 0, 1, 0]
    assert all(np.isfinite(e["loss/total"]) for e in logged)


def test_nan_scores_rank_last():
    scores = torch.tensor([[0.1, float("nan"), 0.3, 0.2], [float("nan"), 0.5, 0.4, 0.0]])
    ranks = target_ranks(scores, torch.tensor([0, 0]))
    assert ranks.tolist() == [2, 3]  # row 0: the NaN item is not above the target; row 1: a NaN target is last


def test_evaluation_refuses_a_model_with_non_finite_parameters(world_shards):
    from mmscale.data.shard_set import ShardSet
    from mmscale.eval.evaluate import NonFiniteModelError, evaluate, single_process
    from mmscale.models import build_preprocess
    from mmscale.tasks import build_task

    config = load_config(None, [f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", f"data.shards={world_shards}"])
    task = build_task(config, ShardSet.open(world_shards))
    with torch.no_grad():
        task.user_tower.history_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteModelError, match="user_tower.history_proj.weight"):
        evaluate(task, world_shards, config.eval, build_preprocess(config.encoder), single_process(), "cpu")


def test_the_finiteness_check_skips_the_padding_of_zero3_partitions():
    """ZeRO-3 partitions a tensor into equal parts, the last padded with memory DeepSpeed never writes: the padding
    may hold NaN and says nothing of the model (a spurious refusal, seen on a 2-rank ZeRO-3 run's 1-element logit
    scale); a NaN among a partition's real values still stops evaluation."""
    from mmscale.eval.evaluate import Collectives, NonFiniteModelError, check_finite_parameters

    task = torch.nn.Linear(3, 1, bias=False)  # 3 values over 2 ranks: partitions of 2, rank 1's second is padding
    task.weight.ds_numel = 3

    def check(rank: int, partition: list[float]) -> None:
        task.weight.ds_tensor = torch.tensor(partition)
        check_finite_parameters(task, Collectives(rank, 2, lambda x, uneven=False: x, lambda x: x, None), "cpu")

    check(1, [0.5, float("nan")])
    with pytest.raises(NonFiniteModelError, match="weight"):
        check(1, [float("nan"), 0.5])
    with pytest.raises(NonFiniteModelError, match="weight"):
        check(0, [0.5, float("inf")])


@pytest.mark.parametrize("names, message", [
    (["w", "planted"], "'planted': no module weight"),
    (["b", "w"], "'b': no module weight of shape \\(2, 2\\)"),
    (["w"], "2 fp32 master weights for 1 parameter names"),
])
def test_a_stage_0_tags_master_weights_must_name_its_module_weights(names, message):
    """A bf16 stage-0 tag names its fp32 master weights itself (`optimizer_parameters`): a name the module lacks, or
    one of another shape, is refused rather than written into an export."""
    from mmscale.engine.checkpoint import OPTIMIZER_PARAMETERS, CheckpointError, stage0_weights

    states = {"module": {"w": torch.zeros(2, 2, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.bfloat16)},
              "optimizer": {"fp32_groups": [[torch.ones(2, 2), torch.ones(2)]]}, OPTIMIZER_PARAMETERS: names}
    with pytest.raises(CheckpointError, match=message):
        stage0_weights(states)
    assert stage0_weights({**states, OPTIMIZER_PARAMETERS: ["w", "b"]})["w"].dtype == torch.float32


# -- 3. no file outside the dataset is read ------------------------------------------------------------------
def test_image_paths_must_stay_inside_the_dataset(tiny_raw, tmp_path):
    raw = tiny_raw(num_users=6, num_items=8)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(raw.images["images/1.jpg"])
    raw.items[0]["image"] = str(secret)  # absolute
    raw.items[1]["image"] = "../secret.jpg"  # climbs out
    raw.items[2]["image"] = "images/link.jpg"  # a symlink out, made below
    raw.items[3]["image"] = "images/fifo.jpg"  # a FIFO: reading it would hang the build
    raw.items[4]["image"] = "images/zero.jpg"  # a symlink to /dev/zero: reading it would never end
    raw.items[5]["image"] = "images/huge.jpg"  # a sparse 100 MiB file, over the cap
    raw.items[6]["image"] = "out/secret.jpg"  # in a folder that is a symlink out
    raw.items[7]["image"] = "alias/8.jpg"  # in a folder that is a symlink to a folder inside: fine
    root = raw.write(tmp_path / "raw")
    (root / "out").symlink_to(tmp_path)
    (root / "alias").symlink_to(root / "images")
    (root / "images" / "link.jpg").symlink_to(secret)
    os.mkfifo(root / "images" / "fifo.jpg")
    (root / "images" / "zero.jpg").symlink_to("/dev/zero")
    with open(root / "images" / "huge.jpg", "wb") as f:
        f.truncate(100 * 2**20)
    manifest = build_shards(root, tmp_path / "out", BuildOptions(**TINY))
    counts, examples = manifest["bad_input"]["counts"], manifest["bad_input"]["examples"]
    assert counts["image_outside_dataset"] == 5 and counts["image_not_a_file"] == 1 and counts["image_too_large"] == 1
    for line in (1, 2, 3, 5, 7):
        assert any(f"items.jsonl:{line}: field 'image'" in e for e in examples["image_outside_dataset"])
    assert "items.jsonl:4: field 'image'" in examples["image_not_a_file"][0]
    assert manifest["counts"]["images_present"] == 1  # item 8
    store = ItemStore(tmp_path / "out")
    assert [store.has_image(i) for i in range(8)] == [False] * 7 + [True]
    assert bytes(store.image(7)[0]) == raw.images["images/8.jpg"]


def test_an_image_over_the_pixel_cap_is_never_decoded(tiny_raw, tmp_path):
    raw = tiny_raw(num_users=6, num_items=8)
    root = raw.write(tmp_path / "raw")
    Image.new("1", (12000, 12000)).save(root / "images" / "1.jpg", format="PNG")  # 144 M pixels, a few KB on disk
    manifest = build_shards(root, tmp_path / "out", BuildOptions(**TINY))
    assert manifest["bad_input"]["counts"]["image_too_large"] == 1
    assert "12000x12000 pixels" in manifest["bad_input"]["examples"]["image_too_large"][0]


# -- 4. no folder is lost ------------------------------------------------------------------------------------
def test_a_folder_with_a_foreign_manifest_is_not_a_shard_folder(tiny_raw, tmp_path):
    root = tiny_raw().write(tmp_path / "raw")
    out = tmp_path / "thesis"
    out.mkdir()
    (out / MANIFEST).write_text('{"name": "my thesis", "chapters": 7}')
    (out / "chapter1.tex").write_text("keep me")
    with pytest.raises(ShardFormatError, match="not a shard folder"):
        build_shards(root, out, BuildOptions(**TINY))
    assert (out / "chapter1.tex").read_text() == "keep me"


def test_a_second_build_into_the_same_folder_is_a_named_error(tiny_raw, tmp_path):
    from mmscale.build.shards import _output_lock

    root, out = tiny_raw().write(tmp_path / "raw"), tmp_path / "out"
    build_shards(root, out, BuildOptions(**TINY))
    before = (out / MANIFEST).read_bytes()
    with _output_lock(out):  # a build in progress
        with pytest.raises(ShardFormatError, match=f"{out}: another build is writing it \\(pid {os.getpid()}"):
            build_shards(tiny_raw(num_users=7).write(tmp_path / "other"), out, BuildOptions(**TINY))
    assert (out / MANIFEST).read_bytes() == before
    assert not (tmp_path / "out.partial").exists()


def test_a_full_disk_during_a_build_is_a_named_error_and_leaves_nothing(tiny_raw, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); the disk-full build test needs root")
    try:
        root = tiny_raw(num_users=6, num_items=8).write(tmp_path / "raw")
        with pytest.raises(BuildError, match=r"writing .*out failed: \[Errno 28\] No space left on device .* is unchanged"):
            build_shards(root, disk / "out", BuildOptions(**TINY))
        assert sorted(p.name for p in disk.iterdir()) == [".out.lock"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- 5, 6. shards changed or damaged under a reader ----------------------------------------------------------
def test_rebuilding_the_shards_under_a_running_stream_is_a_named_error(tiny_raw, tiny_preprocess, tmp_path):
    root, out = tiny_raw(num_users=12, num_items=10, lengths=[6] * 12).write(tmp_path / "raw"), tmp_path / "out"
    build_shards(root, out, BuildOptions(shard_size_mb=0.002, **TINY))
    stream = InteractionStream(out, "train", 4, tiny_preprocess, shuffle_buffer=0)
    store = ItemStore(out)  # opened, nothing read yet
    batches = stream.batches()
    next(batches)
    build_shards(tiny_raw(num_users=12, num_items=10, lengths=[7] * 12).write(tmp_path / "raw2"), out, BuildOptions(shard_size_mb=0.002, **TINY))
    with pytest.raises(ShardFormatError, match="was rebuilt or replaced while this run was reading it"):
        for _ in batches:  # the next shard the stream opens
            pass
    with pytest.raises(ShardFormatError, match="rebuilt"):
        store.text(3)  # the store's first read of an item shard after the rebuild (shards it mapped before keep the old bytes)


def test_a_truncated_item_shard_is_refused_when_opened(tiny_raw, tmp_path):
    out = tmp_path / "out"
    build_shards(tiny_raw().write(tmp_path / "raw"), out, BuildOptions(**TINY))
    shard = out / "items" / "items-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ShardFormatError, match=f"{shard}: 1,000 bytes, the manifest says .* damaged or truncated"):
        load_manifest(out)
    done = run(str(REPO / "tools/inspect_shards.py"), str(out))
    assert done.returncode != 0 and "damaged or truncated" in done.stderr


def test_a_damaged_item_text_names_the_item(tiny_raw, tmp_path):
    out = tmp_path / "out"
    build_shards(tiny_raw().write(tmp_path / "raw"), out, BuildOptions(**TINY))
    shard = out / "items" / "items-000000.tar"
    data = bytearray(shard.read_bytes())
    data[int(np.load(out / "items" / "index.npz")["text_offset"][2])] = 0xFF  # the same size: only the content is wrong
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match="item 2's text is not valid UTF-8"):
        ItemStore(out).text(2)


def test_a_train_text_that_is_not_utf8_is_a_counted_corrupt_sample(tiny_raw, tiny_preprocess, tmp_path):
    out = tmp_path / "out"
    build_shards(tiny_raw().write(tmp_path / "raw"), out, BuildOptions(**TINY))
    shard = out / "train" / "train-000000.tar"
    members = []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            members.append((member, tar.extractfile(member).read()))
    first_text = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".txt"))
    members[first_text] = (members[first_text][0], b"\xff" + members[first_text][1][1:])
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    stream = InteractionStream(out, "train", 100, tiny_preprocess, resampled=False, shuffle_buffer=0)
    batches = list(stream.batches())
    assert sum(len(b) for b in batches) == load_manifest(out)["counts"]["samples"]["train"] - 1
    assert sum(int(b.corrupt_samples) for b in batches) == 1


def test_a_truncated_compressed_train_shard_gives_its_samples_up_to_the_damage(tiny_raw, tmp_path):
    out = tmp_path / "out"
    build_shards(tiny_raw(num_users=40, num_items=10, lengths=[9] * 40).write(tmp_path / "raw"), out,
                 BuildOptions(embed_target_content=False, **TINY))
    shard = out / "train" / "train-000000.tar.gz"
    total = load_manifest(out)["counts"]["samples"]["train"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    stream = InteractionStream(out, "train", 16, None, resampled=False, shuffle_buffer=0, content=False)
    batches = list(stream.batches())
    assert 0 < sum(len(b) for b in batches) < total
    assert sum(int(b.corrupt_samples) for b in batches) == 1  # the damage, counted once; the stream goes on


def test_every_train_shard_unreadable_is_a_named_error_not_a_hang(tiny_raw, tiny_preprocess, tmp_path):
    out = tmp_path / "out"
    build_shards(tiny_raw(num_users=12, num_items=10, lengths=[6] * 12).write(tmp_path / "raw"), out, BuildOptions(shard_size_mb=0.002, **TINY))
    for shard in (out / "train").glob("*.tar"):
        shard.write_bytes(b"\0" * 100)
    stream = InteractionStream(out, "train", 4, tiny_preprocess, shuffle_buffer=0)
    with pytest.raises(ShardFormatError, match="no readable 'train' sample .* every shard seems damaged"):
        next(stream.batches())


# -- 7, 9. bad raw input becomes a ledger entry with its file and line ----------------------------------------
def ledger_of(raw, tmp_path, **opts) -> tuple[dict, dict]:
    manifest = build_shards(raw.write(tmp_path / "raw"), tmp_path / "out", BuildOptions(**TINY, **opts))
    return manifest["bad_input"]["counts"], manifest["bad_input"]["examples"]


def test_a_non_utf8_byte_is_a_ledger_entry_at_its_line(tiny_raw, tmp_path, capsys):
    raw = tiny_raw(num_users=6, num_items=8)
    root = raw.write(tmp_path / "raw")
    with open(root / "interactions.csv", "rb") as f:
        lines = f.read().split(b"\n")
    lines[4] = lines[4].replace(b",", b"\xff,", 1)  # line 5
    (root / "interactions.csv").write_bytes(b"\n".join(lines))
    with open(root / "items.jsonl", "rb") as f:
        items = f.read().split(b"\n")
    items[2] = items[2].replace(b"Item 3", b"Item \xe9 3")  # line 3: latin-1, not UTF-8
    (root / "items.jsonl").write_bytes(b"\n".join(items))
    manifest = build_shards(root, tmp_path / "out", BuildOptions(**TINY))
    examples = manifest["bad_input"]["examples"]["bad_encoding"]
    assert manifest["bad_input"]["counts"]["bad_encoding"] == 2
    assert any("items.jsonl:3: field '-': not valid UTF-8 (byte 0xe9" in e for e in examples)
    assert any("interactions.csv:5: field '-': not valid UTF-8 (byte 0xff" in e for e in examples)
    with pytest.raises(BadInputError, match="bad_encoding: .*items.jsonl:3"):  # --strict names the true line
        build_shards(root, tmp_path / "strict", BuildOptions(strict=True, **TINY))


def test_an_unclosed_quote_and_a_huge_field_take_only_their_own_line(tiny_raw, tmp_path):
    raw = tiny_raw(num_users=6, num_items=8)
    raw.rows[3] = '2,"3,4,1000030'  # the quote never closes: csv alone would swallow every following row
    raw.rows[7] = "2," + "9" * 200_000 + ",4,1000071"
    counts, examples = ledger_of(raw, tmp_path)
    assert counts["malformed_row"] == 2
    assert any("interactions.csv:5: field '-': unexpected end of data" in e for e in examples["malformed_row"])
    assert any("interactions.csv:9: field '-': field larger than field limit" in e for e in examples["malformed_row"])
    manifest = load_manifest(tmp_path / "out")
    assert manifest["counts"]["raw"]["interactions"] == 30 - 2  # every other row kept


@pytest.mark.parametrize("cell,value,kind", [
    ("rating", "-3", "bad_rating"), ("rating", "1e300", "bad_rating"), ("rating", "nan", "bad_rating"),
    ("timestamp", "1700000000000", "bad_timestamp"),  # milliseconds
    ("timestamp", "-5", "bad_timestamp"),
])
def test_out_of_range_values_are_ledger_entries(cell, value, kind, tiny_raw, tmp_path):
    raw = tiny_raw(num_users=6, num_items=8)
    raw.rows[2][{"rating": 2, "timestamp": 3}[cell]] = value
    counts, examples = ledger_of(raw, tmp_path)
    assert counts[kind] == 1 and f"interactions.csv:4: field '{cell}'" in examples[kind][0]


def test_duplicated_rows_are_dropped_and_never_leak_a_test_target_into_training(tiny_raw, raw_parser, tmp_path):
    raw = tiny_raw(num_users=6, num_items=8)
    raw.rows += [list(row) for row in raw.rows for _ in range(34)][:1000]  # 1,000 repeats of real rows
    counts, examples = ledger_of(raw, tmp_path)
    assert counts["duplicate_interaction"] == 1000
    out = tmp_path / "out"
    manifest = load_manifest(out)
    assert manifest["counts"]["raw"]["interactions"] == 30
    seen = np.load(out / "seen.npz")
    for split in ("valid", "test"):
        stream = InteractionStream(out, split, 64, None, resampled=False, shuffle_buffer=0, content=False)
        for batch in stream.batches():
            for user, target in zip(batch.users.tolist(), batch.targets.tolist()):
                assert target not in seen["items"][seen["indptr"][user] : seen["indptr"][user + 1]]


def test_fields_of_the_wrong_type_are_ledger_entries(tiny_raw, tmp_path):
    raw = tiny_raw(num_users=6, num_items=8)
    raw.items[0]["title"] = {"en": "Toy Story"}
    raw.items[1]["image"] = 42
    counts, examples = ledger_of(raw, tmp_path)
    assert counts["bad_text_field"] == 1 and "items.jsonl:1: field 'title'" in examples["bad_text_field"][0]
    assert counts["bad_image_field"] == 1 and "items.jsonl:2: field 'image'" in examples["bad_image_field"][0]
    store = ItemStore(tmp_path / "out")
    assert store.text(0) == "Description of item 1." and not store.has_image(1)


@pytest.mark.parametrize("empty", ["header_only_csv", "empty_items"])
def test_an_empty_dataset_is_an_error_not_an_empty_build(empty, tiny_raw, tmp_path, capsys):
    raw = tiny_raw()
    if empty == "header_only_csv":
        raw.rows = []
    else:
        raw.items = []
    root = raw.write(tmp_path / "raw")
    assert build_shards_cli([str(root), str(tmp_path / "out"), "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert ("interactions.csv: no interaction" if empty == "header_only_csv" else "items.jsonl: no item") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--cold-item-fraction", "1.5"), ("--workers", "0"), ("--max-history", "-1"),
                                        ("--shard-size-mb", "0")])
def test_bad_build_flags_are_named(flag, value, tiny_raw, tmp_path, capsys):
    root = tiny_raw().write(tmp_path / "raw")
    with pytest.raises(SystemExit) as exit_:
        build_shards_cli([str(root), str(tmp_path / "out"), flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_identical_builds_with_an_unreadable_image_are_byte_identical(tiny_raw, tmp_path):
    raw = tiny_raw()
    raw.images["images/2.jpg"] = b"not an image at all"
    root = raw.write(tmp_path / "raw")
    build_shards(root, tmp_path / "a", BuildOptions(**TINY))
    build_shards(root, tmp_path / "b", BuildOptions(**TINY))
    a, b = ({k: v for k, v in json.loads((tmp_path / out / MANIFEST).read_text()).items() if k != "build"} for out in "ab")
    a, b = json.dumps(a, sort_keys=True), json.dumps(b, sort_keys=True)
    assert "unreadable_image" in a and " at 0x" not in a
    assert a.replace(str(tmp_path / "a"), "") == b.replace(str(tmp_path / "b"), "")


@pytest.mark.parametrize("override,key", [
    ("optim.lr_encoder=-1e-4", "optim.lr_encoder"), ("objectives.weights.itc=-0.1", "objectives.weights.itc"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("train.epochs=-1", "train.epochs"), ("train.max_steps=-3", "train.max_steps"),
    ("train.log_every=0", "train.log_every"), ("eval.ks=[0]", r"eval.ks\[0\]"), ("optim.betas=[0.9, 1.0]", r"optim.betas\[1\]"),
    ("optim.betas=[-0.1, 0.9]", r"optim.betas\[0\]"), ("sequence.dropout=1.0", "sequence.dropout"),
    ("encoder.model=!!python/object/apply:os.system ['true']", "encoder.model=!!python"),
])
def test_bad_config_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])


def test_a_deepspeed_config_with_zero_stage_7_is_named(tmp_path):
    from mmscale.engine.deepspeed_config import build_deepspeed_config

    path = tmp_path / "zero7.json"
    path.write_text('{"zero_optimization": {"stage": 7}}')
    with pytest.raises(ConfigError, match=f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got 7"):
        build_deepspeed_config(load_config(overrides=[f"train.deepspeed_config={path}"]), 1, False)


# -- 8. one training per run folder --------------------------------------------------------------------------
def test_a_second_training_into_a_busy_run_folder_is_a_named_error(world_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:  # a training in progress
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node-a\n")
        held.flush()
        done = run(*train_args(world_shards, run_dir))
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"train.run_dir: {run_dir} is in use by another training (pid 4242 on node-a)" in done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written beside it


def test_an_error_exit_destroys_the_process_group_first(world_shards, tmp_path):
    """gloo's threads left running at interpreter exit can abort the process (SIGABRT), losing the exit status 2
    of a refused start: seen in this file's tests. The entry point destroys the group on every way out."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script, *argv = train_args(world_shards, run_dir)
    probe = ("import importlib.util, sys, torch.distributed as dist; spec = importlib.util.spec_from_file_location('train', sys.argv[1]); "
             "train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train); "
             "status = train.main(sys.argv[2:]); print('exit', status, 'initialised', dist.is_initialized())")
    with open(run_dir / ".lock", "a+") as held:  # a training in progress: the start is refused after the group is made
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = run("-c", probe, script, *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "exit 2 initialised False"


def test_resuming_on_another_dataset_is_a_named_error(trained_run, world_shards, tiny_raw, tmp_path):
    run_dir = copy_run(trained_run, tmp_path)
    other = tmp_path / "other-shards"
    shutil.copytree(world_shards, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["cold_items"] = [1]  # a different dataset with the same counts
    (other / MANIFEST).write_text(json.dumps(manifest))
    done = run(*train_args(other, run_dir, "train.max_steps=6"), "--resume", "latest")
    assert done.returncode == 2 and f"data.shards: {other} is not the dataset run {run_dir} was trained on" in done.stderr


@pytest.mark.parametrize("damage", ["item out of range", "negative item", "short indptr", "pickled", "not a zip"])
def test_a_damaged_seen_file_is_a_named_format_error(world_shards, tmp_path, damage):
    """seen.npz (the training items the ranking excludes, and the two-tower's logQ shares) comes with the data: one
    that is not a CSR of this dataset's users and items stops the reader naming the file, never unpickled."""
    from mmscale.data.shard_set import ShardSet

    folder = shutil.copytree(world_shards, tmp_path / "shards")
    shards = ShardSet.open(folder)
    indptr, items = shards.seen()
    bad = {"item out of range": dict(indptr=indptr, items=np.where(np.arange(len(items)) == 3, shards.num_items, items)),
           "negative item": dict(indptr=indptr, items=np.where(np.arange(len(items)) == 3, -1, items)),
           "short indptr": dict(indptr=indptr[:-1], items=items),
           "pickled": dict(indptr=indptr, items=np.array([object()] * len(items), dtype=object))}.get(damage)
    if bad is None:
        (folder / "seen.npz").write_bytes(b"not a zip")
    else:
        np.savez(folder / "seen.npz", **bad, allow_pickle=True) if damage == "pickled" else np.savez(folder / "seen.npz", **bad)
    with pytest.raises(ShardFormatError, match=f"{folder / 'seen.npz'}: "):
        shards.seen()
