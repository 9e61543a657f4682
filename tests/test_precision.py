"""train.precision=bf16 (the default on CUDA): every task and encoder trains and evaluates with its weights in
bf16, close to the fp32 run. Run on the CPU, whose bf16 kernels take the dtype rules of CUDA's: a float tensor that
meets a bf16 layer (pixels, BatchNorm statistics, cached features) has to be bf16 too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.dual_encoder import needs_dual_encoder
from helpers.train_worker import CASES, case_config

REPO = Path(__file__).resolve().parents[1]
DUAL_ENCODER = [f"encoder.model={REPO / 'configs/models/minilm-effnet.json'}", "encoder.image_size=64", "encoder.context_length=16",
                "encoder.trainable_blocks=1", "data.history_content=false"]
RUNS = {  # name: (parity case, extra overrides)
    **{case: (case, []) for case in CASES},
    "sasrec": ("frozen", ["task=sequential", "sequence.model=sasrec", "sequence.mode=finetune"]),
    "dual_encoder": ("two_tower", DUAL_ENCODER),
    "dual_encoder_mp4sr_joint": ("mp4sr_joint", [*DUAL_ENCODER, "encoder.cache_frozen_blocks=true"]),
}


def _train(world_shards, run_dir: Path, case: str, extra: list[str]):
    from mmscale.engine.trainer import Trainer

    trainer = Trainer(case_config(case, str(world_shards), run_dir, 2, 16, [*extra, "eval.splits=[valid]"]), log=lambda *a, **k: None)
    dtypes = {p.dtype for p in trainer.task.parameters()}
    result = trainer.fit()
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss/total"' in line]
    return dtypes, losses, result["eval"]["valid"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_dual_encoder) if n.startswith("dual") else n for n in RUNS])
def test_bf16_trains_and_evaluates_close_to_fp32(one_rank_group, world_shards, vlmo_tokenizer, tmp_path, name):
    case, extra = RUNS[name]
    extra = [*extra, f"encoder.tokenizer={vlmo_tokenizer}"] if case == "vlmo" else extra
    dtypes, losses, metrics = _train(world_shards, tmp_path / "bf16", case, [*extra, "train.precision=bf16"])
    _, reference, _ = _train(world_shards, tmp_path / "fp32", case, [*extra, "train.precision=fp32"])
    assert dtypes == {torch.bfloat16}
    assert len(losses) == len(reference) == 3
    for key in (k for k in reference[0] if k.startswith("loss/")):  # step 1: the same weights, rounded to bf16
        assert losses[0][key] == pytest.approx(reference[0][key], rel=0.03, abs=0.02), key
    assert all(math.isfinite(line["loss/total"]) for line in losses)
    assert metrics and all(math.isfinite(v) for v in metrics.values())


def test_a_bf16_models_vectors_are_ranked_in_fp32(world_shards, monkeypatch):
    """User and item vectors in bf16 (a bf16 model's) are scored in fp32: item i scores 64 + (i mod 64) / 128, distinct
    in fp32, where a bf16 product (8 significant bits) rounds them to steps of 0.5 and ties counted against the target."""
    from mmscale.data.shard_set import ShardSet
    from mmscale.eval.evaluate import evaluate, single_process
    from mmscale.models import build_preprocess
    from mmscale.tasks import build_task
    from mmscale.tasks.base import Ranking

    config = case_config("two_tower", str(world_shards), Path("unused"), 2, 16, ["eval.splits=[valid]"])
    shards = ShardSet.open(world_shards)
    task = build_task(config, shards)
    items = torch.ones(shards.num_items, 64)
    for i in range(shards.num_items):
        items[i, : i % 64] += 1 / 128
    user = torch.ones(1, 64)
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        ranking = Ranking(items.to(dtype), lambda users, history, dtype=dtype: user.to(dtype).expand(len(users), -1))
        monkeypatch.setattr(task, "ranking", lambda content, ranking=ranking: ranking)
        results[dtype] = evaluate(task, world_shards, config.eval, build_preprocess(config.encoder), single_process(), "cpu")
    assert results[torch.bfloat16] == results[torch.float32]


def test_a_bf16_stage_0_tag_gives_its_fp32_master_weights(one_rank_group, world_shards, tmp_path):
    """One rank runs ZeRO-2 as stage 0, where DeepSpeed's bf16 optimizer keeps the fp32 master weights and the module
    bf16 copies: the export and the universal checkpoint (a resume on more ranks) take the masters and the moments."""
    from mmscale.engine import checkpoint
    from mmscale.engine.restore import consolidated_state_dict
    from mmscale.engine.trainer import Trainer

    run_dir = tmp_path / "run"
    config = case_config("two_tower", str(world_shards), run_dir, 2, 16, ["train.precision=bf16", "train.save_every=3"])
    trainer = Trainer(config, log=lambda *a, **k: None)
    trainer.fit()
    tag_dir = run_dir / "checkpoints" / checkpoint.tag_for(3)
    states = torch.load(checkpoint.model_states_file(tag_dir), map_location="cpu", weights_only=True)
    masters = [tensor for group in states["optimizer"]["fp32_groups"] for tensor in group]
    names = [name for params in trainer.task.parameter_groups().values() for name, _ in params]  # the optimizer's order
    assert len(masters) == len(names) and any(not torch.equal(m, m.bfloat16().float()) for m in masters)
    exported = consolidated_state_dict(checkpoint.resolve_source(tag_dir))
    universal = checkpoint.universal_checkpoint(tag_dir, names, log=lambda *a: None)
    for name, master in zip(names, masters):
        assert torch.equal(exported[name], master), name
        assert torch.equal(torch.load(universal / "zero" / name / "fp32.pt", weights_only=True)["param"], master), name
    assert (universal / "zero" / names[0] / "exp_avg.pt").is_file()


def test_a_resume_at_another_precision_is_refused_naming_the_key(one_rank_group, world_shards, tmp_path):
    """A bf16 tag's optimizer state has another layout than an fp32 run's (DeepSpeed's bf16 optimizer keeps fp32
    masters beside it): resumed in fp32 (a `precision: auto` run moved from a GPU to a CPU) it stopped inside
    DeepSpeed with a KeyError; now at start, naming train.precision and the value that resumes it."""
    from mmscale.config import ConfigError
    from mmscale.engine import checkpoint
    from mmscale.engine.trainer import Trainer

    def trainer(run_dir: Path, precision: str, resume: str | None = None) -> Trainer:
        config = case_config("two_tower", str(world_shards), run_dir, 2, 16, [f"train.precision={precision}", "train.save_every=3"])
        return Trainer(config, resume=resume, log=lambda *a, **k: None)

    trainer(tmp_path / "bf16", "bf16").fit()
    tag = tmp_path / "bf16" / "checkpoints" / checkpoint.tag_for(3)
    assert json.loads((tag / checkpoint.TRAIN_STATE).read_text())["precision"] == "bf16"
    with pytest.raises(ConfigError, match=rf"train.precision: {tag} was trained in bf16; .*--set train.precision=bf16$"):
        trainer(tmp_path / "fp32", "fp32", resume=str(tag))
    assert trainer(tmp_path / "bf16-again", "bf16", resume=str(tag)).step == 3


def test_bf16_vectors_are_scored_in_fp32_by_every_loss(world_shards):
    """A bf16 model's vectors give each loss exactly what their fp32 values give: the similarity products run in fp32
    (bf16 logits near 20, at a temperature of 0.05 or a logit scale of 100, move in steps of 0.125)."""
    import torch.nn.functional as F

    from mmscale.config import load_config
    from mmscale.data.shard_set import ShardSet
    from mmscale.objectives.contrastive import image_text_contrastive_loss
    from mmscale.objectives.mp4sr import sequence_item_loss, sequence_sequence_loss
    from mmscale.objectives.recommender import bpr_loss, sampled_softmax_loss
    from mmscale.tasks import build_task

    torch.manual_seed(0)
    n = 48
    a, b = (F.normalize(torch.randn(n, 32), dim=-1).bfloat16() for _ in range(2))
    ids, scale = torch.arange(n) % 40, torch.tensor(math.log(100.0)).bfloat16()  # repeated items, CLIP's top logit scale
    losses = {
        "sampled softmax": lambda x, y: sampled_softmax_loss(x, y, ids, 0.05, log_sampling=torch.full((n,), -3.0)),
        "bpr": lambda x, y: bpr_loss(x, y, ids),
        "itc": lambda x, y: image_text_contrastive_loss(x, y, ids, ids % 7 > 0, scale),
        "seq-item": lambda x, y: sequence_item_loss(x, y, ids, 0.05),
        "seq-seq": lambda x, y: sequence_sequence_loss(x, y, ids, 0.05),
    }
    for name, loss in losses.items():
        assert loss(a, b).dtype == torch.float32, name
        assert loss(a, b).item() == pytest.approx(loss(a.float(), b.float()).item(), rel=1e-6), name
    config = load_config(None, [f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", f"data.shards={world_shards}",
                                "task=sequential", "sequence.mode=finetune"])
    task = build_task(config, ShardSet.open(world_shards))
    sequences, items = a[:, :16], torch.randn(len(task.cold), 16).bfloat16()
    assert torch.equal(task._next_item_logits(sequences, sequences, items, items),
                       task._next_item_logits(sequences.float(), sequences.float(), items.float(), items.float()))


def test_the_logq_correction_stays_fp32_under_bf16(one_rank_group, world_shards, tmp_path):
    """DeepSpeed casts a bf16 model's float buffers to bf16 (data_types.buffer_dtype): the logQ correction's
    log-probabilities (near -4 to -10 here) had become steps of 0.03-0.06. It keeps integer counts now."""
    import numpy as np

    from mmscale.data.shard_set import ShardSet
    from mmscale.engine.trainer import Trainer

    config = case_config("two_tower", str(world_shards), tmp_path, 2, 16, ["train.precision=bf16", "objectives.logq_correction=true"])
    task = Trainer(config, log=lambda *a, **k: None).task
    _, seen = ShardSet.open(world_shards).seen()
    counts = np.maximum(np.bincount(seen, minlength=len(task.sampling_counts)), 1)
    ids = torch.arange(len(counts))
    assert next(task.parameters()).dtype == torch.bfloat16
    assert torch.equal(task.log_sampling(ids), torch.from_numpy(np.log(counts / counts.sum())).float())
