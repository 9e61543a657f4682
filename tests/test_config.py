"""The typed config (file + `--set` overrides), the DeepSpeed JSON merge, and launch/train.py's
exit code 2 for bad configurations and mismatched shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmscale.config import Config, ConfigError, load_config, parse_override, validate
from mmscale.engine.deepspeed_config import build_deepspeed_config
from helpers.process_state import process_state_restored
from helpers.programs import load_program

REPO = Path(__file__).resolve().parents[1]
CLIP_TINY = REPO / "configs" / "models" / "clip-tiny.json"


# -- defaults, file, overrides ---------------------------------------------------------------------
def test_defaults_load():
    config = load_config()
    assert config.encoder.paradigm == "end_to_end"  # unset: the two-tower task's own
    config.encoder.paradigm = None
    assert config == Config()
    assert config.data.batch_size == 32
    assert config.optim.betas == (0.9, 0.98)
    assert config.eval.ks == (10, 20, 50)
    assert config.encoder.pretrained is None
    assert config.objectives.weights == {"rec": 1.0, "itc": 0.1, "seq_item": 1.0, "seq_seq": 0.01}


def test_parse_override_values():
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
    assert parse_override("a=0.25") == {"a": 0.25}
    assert parse_override("a=1e-3") == {"a": "1e-3"}  # YAML 1.1: a string; _coerce turns it into a float field's value
    assert parse_override("a.b=true") == {"a": {"b": True}}
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("a.b=null") == {"a": {"b": None}}
    assert parse_override("a.b=x=y") == {"a": {"b": "x=y"}}  # only the first '=' splits
    assert parse_override("a.b=") == {"a": {"b": ""}}
    with pytest.raises(ConfigError):
        parse_override("a.b")


def test_file_and_overrides_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n"
        "  batch_size: 8\n"
        "  num_workers: 0\n"
        "optim:\n"
        "  lr_encoder: 1e-5\n"  # YAML 1.1 reads this as a string: coerced to float
        "  warmup_steps: 7\n"
        "encoder:\n"
        "  pretrained: weights.bin\n"
        "eval:\n"
        "  ks: [1, 2]\n"
    )
    config = load_config(
        path,
        [
            "data.batch_size=16",  # override > file
            "optim.grad_clip=2",  # int for a float field
            "data.history_content=true",  # bool
            "eval.ks=[5, 10, 20]",  # list -> tuple, override > file
            "optim.betas=[0.8, 0.9]",
            "encoder.pretrained=null",  # null beats the file's value
            "objectives.weights.itc=0.5",
        ],
    )
    default = Config()
    assert config.data.batch_size == 16  # override
    assert config.data.num_workers == 0  # file
    assert config.data.shuffle_buffer == default.data.shuffle_buffer  # default
    assert config.optim.lr_encoder == 1e-5 and isinstance(config.optim.lr_encoder, float)
    assert config.optim.warmup_steps == 7
    assert config.optim.grad_clip == 2.0 and isinstance(config.optim.grad_clip, float)
    assert config.data.history_content is True
    assert config.eval.ks == (5, 10, 20)
    assert config.optim.betas == (0.8, 0.9)
    assert config.encoder.pretrained is None
    assert config.objectives.weights["itc"] == 0.5
    assert config.train == default.train  # untouched section: all defaults


def test_json_file_loads(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"max_steps": 5, "precision": "fp32"}, "eval": {"exclude_seen": False}}))
    config = load_config(path, ["train.max_steps=9"])
    assert config.train.max_steps == 9 and config.train.precision == "fp32" and config.eval.exclude_seen is False


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.batch_size=abc", "data.batch_size"),  # string for an int
        ("data.batch_size=2.5", "data.batch_size"),  # float for an int
        ("train.max_steps=true", "train.max_steps"),  # bool is not an int
        ("optim.lr_encoder=fast", "optim.lr_encoder"),  # string for a float
        ("data.history_content=3", "data.history_content"),  # int for a bool
        ("optim.betas=[0.9]", "optim.betas"),  # wrong length
        ("eval.ks=[1, x]", "eval.ks[1]"),
        ("encoder.pretrained=5", "encoder.pretrained"),  # str | None
        ("data=4", "data"),  # a scalar where a section is expected
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert key in str(err.value)


@pytest.mark.parametrize(
    "override,key",
    [("foo=1", "foo"), ("foo.bar=1", "foo"), ("data.foo=1", "data.foo"), ("optim.warmup=3", "optim.warmup")],
)
def test_unknown_key_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert f"'{key}'" in str(err.value)


def test_unknown_key_in_file_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_step"):
        load_config(path)


@pytest.mark.parametrize(
    "override,key",
    [
        ("encoder.paradigm=sideways", "encoder.paradigm"),
        ("objectives.rec_loss=hinge", "objectives.rec_loss"),
        ("train.precision=fp8", "train.precision"),
        ("recommender.history_pooling=max", "recommender.history_pooling"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.grad_accum=0", "optim.grad_accum"),
        ("objectives.rec_temperature=0", "objectives.rec_temperature"),
        ("objectives.logq_correction=true objectives.rec_loss=bpr", "objectives.logq_correction"),
        ("objectives.logq_correction=true task=sequential", "objectives.logq_correction"),
    ],
)
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override.split())
    assert key in str(err.value)


SEQUENTIAL_ENCODER = ["task=sequential", "sequence.features=encoder"]


@pytest.mark.parametrize("overrides,paradigm", [
    ([], "end_to_end"),
    (SEQUENTIAL_ENCODER + ["sequence.mode=joint"], "end_to_end"),
    (SEQUENTIAL_ENCODER + ["sequence.mode=finetune"], "frozen"),
    (SEQUENTIAL_ENCODER + ["sequence.mode=pretrain", "encoder.paradigm=frozen"], "frozen"),
    (["task=sequential", "sequence.model=sasrec", "encoder.paradigm=end_to_end"], "end_to_end"),  # no encoder: moot
])
def test_an_unset_paradigm_is_the_tasks_own(overrides, paradigm):
    assert load_config(overrides=overrides).encoder.paradigm == paradigm


@pytest.mark.parametrize("overrides,message", [
    # joint mode trains the encoder end to end: a frozen or fine_tuned encoder contradicts it
    (SEQUENTIAL_ENCODER + ["sequence.mode=joint", "encoder.paradigm=frozen"], "encoder.paradigm: 'frozen' contradicts"),
    (SEQUENTIAL_ENCODER + ["sequence.mode=joint", "encoder.paradigm=fine_tuned"], "encoder.paradigm: 'fine_tuned'"),
    # pretrain / finetune read a frozen encoder's cached features: end_to_end would be silently ignored
    (SEQUENTIAL_ENCODER + ["sequence.mode=finetune", "encoder.paradigm=end_to_end"], "encoder.paradigm: 'end_to_end'"),
    (["task=sequential", "sequence.model=sasrec", "encoder.paradigm=fine_tuned"], "encoder.paradigm: 'fine_tuned'"),
    (["task=sequential", "sequence.mode=joint", "sequence.features=files"], "sequence.features"),
    (["sequence.cache_refresh_steps=0"], "sequence.cache_refresh_steps"),
    (["sequence.item_table=fresh"], "sequence.item_table: 'fresh' is not one of"),
    (SEQUENTIAL_ENCODER + ["sequence.mode=finetune", "sequence.item_table=every_step"], "sequence.item_table: every_step is joint mode's"),
    (SEQUENTIAL_ENCODER + ["sequence.mode=joint", "sequence.item_table=every_step"], "needs encoder.cache_frozen_blocks=true"),
    (["task=sequential", "sequence.model=sasrec", "sequence.id_dropout=0.5"], "sequence.id_dropout: leaves out the item id vectors"),
    (SEQUENTIAL_ENCODER + ["sequence.mode=pretrain", "sequence.id_dropout=0.5"], "sequence.id_dropout: leaves out"),
    (["sequence.id_dropout=0.5"], "sequence.id_dropout: leaves out"),  # the two-tower task
    (SEQUENTIAL_ENCODER + ["sequence.id_dropout=1"], r"sequence.id_dropout: must be in \[0, 1\)"),
    (["encoder.paradigm=fine_tuned", "objectives.weights={rec: 1.0, itc: 0.0}"], "vision-language losses"),
])
def test_a_paradigm_the_task_contradicts_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=overrides)


@pytest.mark.parametrize("overrides,message", [
    (["train.patience=3"], "train.patience: early stopping needs train.best_metric"),
    (["train.best_metric=valid/ndcg@10", "train.patience=3"], "needs periodic evaluations"),
    (["train.best_metric=test/ndcg@10"], "choosing a checkpoint on the test split"),
    (["train.best_metric=valid/ndcg@7"], "K in eval.ks"),
    (["train.best_metric=valid/auc@10"], "METRIC one of recall, ndcg, mrr, hit"),
    (["train.best_metric=cold/ndcg@10", "eval.splits=[valid]"], "SPLIT in eval.splits"),
    (["train.patience=-1"], "train.patience: must not be negative"),
    (["train.peak_tflops=-1"], "train.peak_tflops: must not be negative"),
    (["train.report_to=[tensorboard, neptune]"], "train.report_to: 'neptune' is not one of tensorboard, wandb, mlflow"),
    (["encoder.trainable_blocks=-1"], "encoder.trainable_blocks: must not be negative"),
])
def test_early_stopping_and_tower_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


@pytest.mark.parametrize("metric", ["valid/mrr@10", "valid/hit@20", "valid/recall@50"])
def test_every_reported_ranking_metric_can_choose_the_best_checkpoint(metric):
    assert load_config(overrides=[f"train.best_metric={metric}"]).train.best_metric == metric


def test_validate_rejects_empty_user_tower():
    config = Config()
    config.recommender.user_id_embedding = False
    config.recommender.history_pooling = "none"
    with pytest.raises(ConfigError, match="recommender"):
        validate(config)


def test_overriding_one_loss_weight_keeps_the_others():
    """`--set objectives.weights.itc=0.5` sets one key; the default `rec` weight must survive.

    Today the override dict {"weights": {"itc": 0.5}} replaces the whole default mapping
    (_build coerces values["weights"] alone, never merged with ObjectiveConfig's default), so
    the recommendation loss silently disappears from training.
    """
    config = load_config(overrides=["objectives.weights.itc=0.5"])
    assert config.objectives.weights == {"rec": 1.0, "itc": 0.5, "seq_item": 1.0, "seq_seq": 0.01}


def test_unknown_loss_name_in_weights_is_rejected():
    """`objectives.weights` keys name losses; the task computes only 'rec' and 'itc'.

    A typo such as `recc` passes load_config today and the trainer then fails with a bare
    KeyError('recc') at the first training step (trainer.fit: `weights[n] * losses[n]`),
    after the model and DeepSpeed engine are built. It should be a ConfigError at start.
    """
    with pytest.raises(ConfigError, match=r"objectives\.weights"):
        load_config(overrides=["objectives.weights.recc=1.0"])


# -- DeepSpeed config ------------------------------------------------------------------------------
def config_with(ds_path: Path, **changes) -> Config:
    config = Config()
    config.train.deepspeed_config = str(ds_path)
    for dotted, value in changes.items():
        section, name = dotted.split("__")
        setattr(getattr(config, section), name, value)
    return config


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("bf16", [False, True])
def test_deepspeed_config_injects_mmscale_values(tmp_path, bf16):
    ds_path = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}})
    config = config_with(ds_path, data__batch_size=6, optim__grad_accum=3, optim__grad_clip=0.5)
    ds = build_deepspeed_config(config, world_size=4, bf16=bf16)
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is bf16
    assert ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 123}  # engine settings kept
    assert "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize("zero,world_size,stage", [
    ({"stage": 2, "overlap_comm": True}, 1, 0),  # nothing to partition on one rank
    ({"stage": 1}, 1, 0),
    ({"stage": 2}, 2, 2),
    ({"stage": 3}, 1, 3),  # partitioned parameters still mean something alone (offload, gathering)
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, 1, 2),  # ZeRO-Offload on one GPU
])
def test_one_rank_runs_zero_1_and_2_as_stage_0(tmp_path, zero, world_size, stage):
    ds = build_deepspeed_config(config_with(write_json(tmp_path / "ds.json", {"zero_optimization": zero})), world_size, False)
    assert ds["zero_optimization"]["stage"] == stage
    if stage:
        assert ds["zero_optimization"] == zero


def test_deepspeed_config_accepts_agreeing_values(tmp_path):
    ds_path = write_json(
        tmp_path / "ds.json",
        {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 16, "gradient_accumulation_steps": 2, "bf16": {"enabled": "auto"}},
    )
    ds = build_deepspeed_config(config_with(ds_path, data__batch_size=4, optim__grad_accum=2), world_size=2, bf16=True)
    assert ds["train_batch_size"] == 16 and ds["bf16"]["enabled"] is True


@pytest.mark.parametrize(
    "ds,key,bf16",
    [
        ({"train_micro_batch_size_per_gpu": 64}, "train_micro_batch_size_per_gpu", False),
        ({"gradient_accumulation_steps": 5}, "gradient_accumulation_steps", False),
        ({"train_batch_size": 1000}, "train_batch_size", False),
        ({"gradient_clipping": 0.0}, "gradient_clipping", False),
        ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, "optimizer", False),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler", False),
        ({"bf16": {"enabled": True}}, "bf16.enabled", False),  # fp32 asked
        ({"bf16": {"enabled": False}}, "bf16.enabled", True),  # bf16 asked
        ({"fp16": {"enabled": True}}, "fp16.enabled", True),
    ],
)
def test_deepspeed_config_contradictions_name_the_key(tmp_path, ds, key, bf16):
    ds_path = write_json(tmp_path / "ds.json", ds)
    with pytest.raises(ConfigError) as err:
        build_deepspeed_config(config_with(ds_path), world_size=1, bf16=bf16)
    assert key in str(err.value)


def test_deepspeed_config_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="train.deepspeed_config"):
        build_deepspeed_config(config_with(tmp_path / "missing.json"), 1, False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="train.deepspeed_config"):
        build_deepspeed_config(config_with(bad), 1, False)


@pytest.mark.parametrize("name,stage", [("zero0.json", 0), ("zero1.json", 1), ("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)])
@pytest.mark.parametrize("bf16", [False, True])
def test_shipped_deepspeed_configs_build(name, stage, bf16):
    path = REPO / "ds_configs" / name
    config = config_with(path, data__batch_size=3, optim__grad_accum=2)
    ds = build_deepspeed_config(config, world_size=2, bf16=bf16)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 12
    assert ds["bf16"]["enabled"] is bf16
    assert "optimizer" not in ds


# -- launch/train.py main --------------------------------------------------------------------------
def _load_train_main():
    return load_program("launch/train.py").main


@pytest.fixture
def train_main(monkeypatch, session_process_group):
    """launch/train.py's main on the session's process group, which outlives it; the process-wide state main
    touches is restored afterwards."""
    with process_state_restored():
        monkeypatch.chdir(REPO)  # default relative paths (ds_configs/...) resolve
        monkeypatch.setattr("mmscale.engine.distributed.shutdown_distributed", lambda: None)
        yield _load_train_main()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from mmscale.build.shards import BuildOptions, build_shards
    from mmscale.build.world import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("tiny-world")
    spec = WorldSpec(num_users=12, num_items=20, min_interactions_per_user=4, max_interactions_per_user=8, image_size=16)
    generate_world(root / "raw", spec)
    manifest = build_shards(root / "raw", root / "shards", BuildOptions(progress=False, workers=1))
    assert (manifest["num_users"], manifest["num_items"]) != (5, 7)
    return root / "shards"


def test_main_unknown_key_exits_2(train_main, capsys, tmp_path):
    assert train_main(["--set", "foo.bar=1", "--set", f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "train: error:" in err and "unknown config key 'foo'" in err
    assert not (tmp_path / "run").exists()


def test_main_missing_shards_exits_2(train_main, capsys, tmp_path):
    missing = tmp_path / "nonexistent-shards"
    code = train_main(["--set", f"data.shards={missing}", "--set", f"train.run_dir={tmp_path / 'run'}", "--set", f"encoder.model={CLIP_TINY}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train: error:" in err and str(missing) in err and "does not exist" in err


def test_main_shard_mismatch_exits_2(train_main, capsys, tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_info.json").write_text(json.dumps({"data": {"num_users": 5, "num_items": 7, "manifest_sha256": "0" * 64}}))
    code = train_main([
        "--set", f"data.shards={tiny_shards}",
        "--set", f"train.run_dir={run_dir}",
        "--set", f"encoder.model={CLIP_TINY}",
        "--set", "data.num_workers=0",
    ])
    assert code == 2
    err = capsys.readouterr().err
    assert "train: error: data.shards:" in err
    assert f"{tiny_shards} is not the dataset run {run_dir} was trained on (manifest sha256" in err and "the run's 000000000000" in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "run_info.json"]  # nothing written to the old run but the lock


@pytest.mark.parametrize(
    "override,key",
    [("encoder.kind=nonsense", "encoder.kind"), ("encoder.model=no-such-clip-model", "encoder.model")],
)
def test_main_unknown_encoder_exits_2(train_main, capsys, tmp_path, tiny_shards, override, key):
    """An unknown encoder kind or model name is a configuration error like any other.

    Today build_preprocess / build_encoder / clip._resolve_model raise a plain ValueError, which
    launch/train.py main does not catch (it catches ConfigError, ShardFormatError, FileNotFoundError):
    the run ends in a traceback instead of exit code 2.
    """
    args = ["--set", f"data.shards={tiny_shards}", "--set", f"train.run_dir={tmp_path / 'run'}", "--set", override]
    if key == "encoder.kind":
        args += ["--set", f"encoder.model={CLIP_TINY}"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "train: error:" in err and key in err
