"""What makes training exact beyond the rank-parity runs: which items a loss ranks against, which parameters decay,
how often the encoder runs, what evaluation and caching leave alone, and where the loader restarts."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.dual_encoder import needs_dual_encoder
from PIL import Image
from torch import nn

from mmscale.config import load_config
from mmscale.data.format import load_manifest
from mmscale.data.shard_set import ShardSet
from mmscale.data.stream import PAD, InteractionStream
from mmscale.models import build_preprocess
from mmscale.tasks import build_task, decays

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = str(REPO / "configs/models/clip-tiny.json")
JOINT = ["task=sequential", "sequence.mode=joint", "objectives.weights={rec: 1.0, seq_item: 1.0, seq_seq: 0.1, itc: 0.1}"]


def one_process(x: torch.Tensor, uneven: bool = False) -> torch.Tensor:  # the engine's gather on one process
    return x


def task_for(world_shards, *overrides: str, cold_items: list[int] | None = None):
    config = load_config(None, [f"encoder.model={TINY_CLIP}", f"data.shards={world_shards}", *overrides])
    shards = ShardSet.open(world_shards)
    if cold_items is not None:  # the same shards with these items held out
        shards = replace(shards, manifest=shards.manifest | {"cold_items": cold_items})
    torch.manual_seed(0)
    return build_task(config, shards), config


def first_batch(world_shards, config, batch_size: int = 8):
    stream = InteractionStream(world_shards, "train", batch_size, build_preprocess(config.encoder), shuffle_buffer=0, history_content=True)
    return next(stream.batches())


def catalogue(task, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = task.encoder.embed_dim
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.rand(n, generator=g) > 0.2


def test_cold_items_are_never_negatives_of_the_next_item_loss(world_shards):
    """A held-out cold item can never be a training target: the full softmax leaves it out, so its id vector gets
    no gradient (it is scored only at evaluation)."""
    manifest = load_manifest(world_shards)
    task, config = task_for(world_shards, "task=sequential", "sequence.model=sasrec", "sequence.dropout=0.0")
    batch = first_batch(world_shards, config)
    in_batch = set(batch.targets.tolist()) | set(batch.history[batch.history != PAD].tolist())
    cold = [i for i in range(manifest["num_items"]) if i not in in_batch][:3]
    task, _ = task_for(world_shards, "task=sequential", "sequence.model=sasrec", "sequence.dropout=0.0", cold_items=cold)
    task(batch, one_process)["rec"].backward()
    grad = task.item_id.weight.grad
    assert grad[cold].abs().sum() == 0
    warm_negatives = [i for i in range(manifest["num_items"]) if i not in in_batch and i not in cold]
    assert (grad[warm_negatives].abs().sum(1) > 0).all()  # every other item is a negative


def test_id_dropout_leaves_out_whole_items_in_training_steps_only(world_shards):
    """sequence.id_dropout: in a training step each warm item's id vector is left out with that probability, wherever
    the item appears (as a history item and in the item table), so its id vector gets no gradient; the draw is
    redrawn each step; evaluation keeps every warm item's id, and cold items never have one."""
    n = load_manifest(world_shards)["num_items"]
    cold = [0, 1, 2]
    task, config = task_for(world_shards, "task=sequential", "sequence.features=encoder", "sequence.mode=finetune",
                            "sequence.id_dropout=0.5", "sequence.dropout=0.0", cold_items=cold)
    task.set_content_cache(*catalogue(task, n))
    batch = first_batch(world_shards, config, batch_size=16)
    task(batch, one_process)["rec"].backward()
    left_out = (task._id_table() == 0).all(-1)  # this step's draw (forward advanced it)
    assert left_out[cold].all() and 0.3 < left_out[3:].float().mean() < 0.7
    grad = task.item_id.weight.grad.abs().sum(-1)
    assert (grad[left_out] == 0).all() and (grad[~left_out] > 0).all()  # every kept warm item is a negative at least
    task.count_forward()
    assert not torch.equal((task._id_table() == 0).all(-1), left_out)
    task.eval()
    assert torch.equal((task._id_table() == 0).all(-1), task.cold)


def test_joint_mode_runs_the_encoder_once_per_batch(world_shards):
    task, config = task_for(world_shards, *JOINT, "sequence.dropout=0.0", "sequence.adaptor_dropout=0.0")
    task.set_content_cache(*catalogue(task, load_manifest(world_shards)["num_items"]))
    calls = []
    task.encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    batch = first_batch(world_shards, config)
    losses = task(batch, one_process)
    assert calls == [len(batch.item_ids)]
    sum(losses.values()).backward()
    assert task.encoder.clip.visual.conv1.weight.grad.abs().sum() > 0  # the one pass carries the gradient of every loss


def test_fresh_items_pass_their_gradient_through_the_cache_once_each(world_shards):
    """Every row of the item table keeps its cached value; gathered fresh items (an item may come from several ranks)
    pass their gradient through their row, each once (straight-through)."""
    task, _ = task_for(world_shards, *JOINT)
    n = load_manifest(world_shards)["num_items"]
    task.content_cache = torch.arange(n * 4.0).reshape(n, 4)
    fresh = (1000 * torch.arange(1.0, 5.0)).unsqueeze(1).expand(4, 4).requires_grad_()  # far from any cached row
    batch = SimpleNamespace(item_ids=torch.tensor([3, 7, 3, 9]))  # item 3 twice, as on two ranks
    table = task._with_fresh(fresh, batch, one_process)
    assert torch.equal(table, task.content_cache)
    weights = torch.randn(n, 4)
    (table * weights).sum().backward()
    expected = weights[[3, 7, 3, 9]]
    expected[2] = 0  # the second copy of item 3 is not counted twice
    assert torch.equal(fresh.grad, expected)


def test_joint_targets_cannot_be_told_from_other_items_by_freshness(world_shards):
    """Every batch item is some sequence's target: were its row the fresh encoding while the other items stay as
    cached, the model could pick targets by how far the encoder moved since the refresh (it did: 4-6 logits). The
    next-item loss is the same however far the encoder moved, and its gradient still reaches the encoder."""
    task, config = task_for(world_shards, *JOINT, "sequence.dropout=0.0", "sequence.adaptor_dropout=0.0")
    task.set_content_cache(*catalogue(task, load_manifest(world_shards)["num_items"]))
    batch = first_batch(world_shards, config)
    at_refresh = task(batch, one_process)["rec"].detach()
    with torch.no_grad():  # the encoder's updates since the refresh
        for p in task.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    later = task(batch, one_process)["rec"]
    torch.testing.assert_close(later.detach(), at_refresh, rtol=1e-6, atol=1e-6)
    later.backward()
    assert task.encoder.clip.visual.conv1.weight.grad.abs().sum() > 0


def test_evaluation_leaves_the_training_cache_alone(world_shards):
    task, _ = task_for(world_shards, *JOINT)
    n = load_manifest(world_shards)["num_items"]
    task.set_content_cache(*catalogue(task, n, seed=1))
    before = task.content_cache.clone()
    ranking = task.ranking(catalogue(task, n, seed=2))
    assert torch.equal(task.content_cache, before)
    assert ranking.items.shape == (n, 2 * task.config.sequence.hidden)


def test_a_user_without_history_ranks_nothing_and_feeds_no_padding_row(world_shards):
    task, _ = task_for(world_shards, "task=sequential", "sequence.mode=finetune")
    task.eval()
    seen_rows = []
    task.sequence.register_forward_pre_hook(lambda module, args: seen_rows.append(args[1].any(1)))
    ranking = task.ranking(catalogue(task, load_manifest(world_shards)["num_items"]))
    history = torch.full((2, task.sequence.position.num_embeddings), PAD)
    history[1, -2:] = torch.tensor([4, 9])
    users = ranking.user_vectors(torch.tensor([0, 1]), history)
    assert all(rows.all() for rows in seen_rows)  # no all-padding row reached the sequence encoder
    assert torch.equal(users[0], torch.zeros_like(users[0])) and users[1].norm() > 0
    assert torch.isfinite(users).all()


def test_catalogue_content_is_encoded_in_eval_mode(world_shards, vlmo_tokenizer, tmp_path):
    """A cache holds each item's one deterministic encoding, not one draw of its stochastic depth; the task's
    training mode is left as it was."""
    from mmscale.data.item_store import ItemStore
    from mmscale.eval.evaluate import encode_catalogue, single_process

    arch = json.loads((REPO / "configs/models/vlmo-tiny.json").read_text()) | {"drop_path": 0.5}
    (tmp_path / "vlmo.json").write_text(json.dumps(arch))
    task, config = task_for(world_shards, "encoder.kind=vlmo", f"encoder.model={tmp_path / 'vlmo.json'}", f"encoder.tokenizer={vlmo_tokenizer}")
    task.train()
    store, coll = ItemStore(world_shards), single_process()
    first = encode_catalogue(task, store, build_preprocess(config.encoder), coll, "cpu", 32, 0)
    again = encode_catalogue(task, store, build_preprocess(config.encoder), coll, "cpu", 32, 0)
    assert task.training
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    preprocess = build_preprocess(config.encoder)
    with Image.open(io.BytesIO(store.image(0)[0])) as img:
        images = preprocess.image_transform(img.convert("RGB")).unsqueeze(0)
    tokens = preprocess.tokenize([store.text(0)])
    with torch.no_grad():
        drawn = [task.encode_content(images, tokens)[0] for _ in range(4)]  # training mode: drop-path draws
    assert any(not torch.allclose(d, drawn[0]) for d in drawn[1:])


# -- weight decay --------------------------------------------------------------------------------------------
NO_DECAY_KINDS = ("bias", "norm", "ln_", "embedding", "position", "cls_token", "class_embedding", "logit_scale",
                  "logit_vl_scale", "gamma_", "relative_position_bias_table", "token_type")


@pytest.mark.parametrize("model", ["two_tower_clip", "two_tower_vlmo_fusion", "mp4sr_joint", "sasrec"])
def test_weight_decay_follows_the_readme(model, world_shards, vlmo_tokenizer):
    """Decay on the matrices that multiply inputs only; never on norms, biases, embeddings, position tables,
    class tokens, layer scales or the logit scale, whatever the model."""
    overrides = {
        "two_tower_clip": [],
        "two_tower_vlmo_fusion": ["encoder.kind=vlmo", f"encoder.model={REPO / 'configs/models/vlmo-tiny.json'}",
                                  f"encoder.tokenizer={vlmo_tokenizer}", "encoder.item_representation=fusion"],
        "mp4sr_joint": JOINT,
        "sasrec": ["task=sequential", "sequence.model=sasrec"],
    }[model]
    task, _ = task_for(world_shards, *overrides)
    groups = task.parameter_groups()
    decayed = {n for g, params in groups.items() if g.endswith("/decay") for n, _ in params}
    kept = {n for g, params in groups.items() if g.endswith("/no_decay") for n, _ in params}
    assert decayed and kept and not decayed & kept
    assert decayed | kept == {n for n, p in task.named_parameters() if p.requires_grad}
    for name in decayed:
        owner = task.get_submodule(name.rpartition(".")[0])
        leaf = name.rpartition(".")[2]
        assert (isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) and leaf == "weight") or leaf == "in_proj_weight" \
            or "proj" in leaf, name
    for name in kept:
        owner = task.get_submodule(name.rpartition(".")[0])
        assert isinstance(owner, (nn.Embedding, nn.LayerNorm)) or any(kind in name.lower() for kind in NO_DECAY_KINDS), name
    expected_kept = {
        "two_tower_clip": ["encoder.clip.positional_embedding", "encoder.clip.visual.class_embedding", "encoder.clip.logit_scale",
                           "encoder.clip.token_embedding.weight", "item_tower.id_embedding.weight"],
        "two_tower_vlmo_fusion": ["encoder.model.relative_position_bias_table", "encoder.model.transformer.cls_token",
                                  "encoder.model.transformer.blocks.0.gamma_1"],
        "mp4sr_joint": ["text_adaptor.norm_weight", "image_adaptor.norm_bias", "sequence.position.weight", "sequence.norm.weight"],
        "sasrec": ["item_id.weight", "sequence.position.weight"],
    }[model]
    assert set(expected_kept) <= kept, set(expected_kept) - kept
    if model == "two_tower_clip":
        assert {"encoder.clip.text_projection", "encoder.clip.visual.proj"} <= decayed


def test_decays_by_role_not_by_shape():
    assert decays(nn.Linear(3, 4), "weight", nn.Parameter(torch.zeros(4, 3)))
    assert not decays(nn.Linear(3, 4), "bias", nn.Parameter(torch.zeros(4)))
    assert not decays(nn.LayerNorm(4), "weight", nn.Parameter(torch.zeros(4)))
    assert not decays(nn.Embedding(5, 4), "weight", nn.Parameter(torch.zeros(5, 4)))
    assert not decays(nn.Module(), "norm_weight", nn.Parameter(torch.zeros(8, 4)))  # 2-d, still a norm
    assert decays(nn.Module(), "text_projection", nn.Parameter(torch.zeros(8, 4)))
    partitioned = nn.Parameter(torch.zeros(0))  # as ZeRO-3 leaves it on a rank: its data gone, its shape in ds_shape
    partitioned.ds_shape = torch.Size([8, 4])
    assert decays(nn.Module(), "text_projection", partitioned)


# -- the loader at a phase switch ------------------------------------------------------------------------------
def test_a_phase_switch_stops_decoding_content_at_once_and_keeps_the_order(world_shards, tiny_preprocess):
    """fine_tuned's freeze: batches already prefetched by the loader's workers must not keep decoding images; the
    loader restarts at the same position, so the stream of samples is the one an unbroken loader gives."""
    from mmscale.engine.trainer import Trainer

    def fake_trainer():
        stream = InteractionStream(world_shards, "train", 8, tiny_preprocess, seed=3, history_content=True)
        return SimpleNamespace(stream=stream, task=SimpleNamespace(needs_content=True), epoch=0, batch_in_epoch=0,
                               config=SimpleNamespace(data=SimpleNamespace(num_workers=2)), dist=SimpleNamespace(device=torch.device("cpu")))

    unbroken = list(islice(Trainer._stream_batches(fake_trainer()), 7))
    trainer = fake_trainer()
    batches = Trainer._stream_batches(trainer)
    before = list(islice(batches, 3))
    trainer.task.needs_content = False
    after = list(islice(batches, 4))
    assert all(b.images.shape[-1] > 0 and b.has_image.any() for b in before)
    assert all(b.images.numel() == 0 and b.text_tokens.numel() == 0 for b in after)
    for a, b in zip(unbroken, before + after):
        assert torch.equal(a.users, b.users) and torch.equal(a.targets, b.targets) and torch.equal(a.history, b.history)


def test_fine_tuned_stops_needing_content_at_the_freeze(world_shards):
    """The real task, not a stand-in: before the freeze batches must carry images; from the freeze on they need not
    (on 760936d fine_tuned kept asking for content to the end of training)."""
    task, _ = task_for(world_shards, "encoder.paradigm=fine_tuned", "encoder.adapt_steps=2", "objectives.weights={rec: 1.0, itc: 0.5}")
    assert task.needs_content and task.loss_weights == {"itc": 0.5}
    assert [task.content_cache_due(step) for step in (0, 1, 2, 3)] == [False, False, True, False]
    task.set_content_cache(*catalogue(task, load_manifest(world_shards)["num_items"]))
    assert not task.needs_content and task.loss_weights == {"rec": 1.0}


# -- joint mode's item table ---------------------------------------------------------------------------------
@needs_dual_encoder
def test_joint_every_step_table_gives_the_encoder_the_gradient_of_its_loss(world_shards):
    """Joint mode's next-item loss is a function of the encoder through every item's row of the table, negatives
    included. With `sequence.item_table=every_step` the backward's encoder gradient is that function's: its
    directional derivatives match central differences of the loss recomputed with every row re-encoded (in float64).
    The cached table at a refresh holds the same rows and gives the same loss, but only the batch's items pass their
    gradient, so its encoder gradient points elsewhere (15 of 80 items in the batch: cosine 0.16 on 2026-12-05).
    Items held out cold (here five the batch does not hold) are not encoded: the loss never scores them."""
    from mmscale.data.item_store import ItemStore
    from mmscale.eval.evaluate import encode_catalogue, single_process

    arch = str(REPO / "configs/models/minilm-effnet.json")
    common = ["task=sequential", "sequence.mode=joint", "objectives.weights={rec: 1.0}", "sequence.dropout=0.0",
              "sequence.adaptor_dropout=0.0", f"encoder.model={arch}", "encoder.image_size=64", "encoder.context_length=16",
              "encoder.trainable_blocks=1", "encoder.cache_frozen_blocks=true", "data.history_content=false"]
    store, preprocess = ItemStore(world_shards), build_preprocess(load_config(None, common).encoder)
    stream = InteractionStream(world_shards, "train", 16, preprocess, shuffle_buffer=0, content=False)
    batch = next(stream.batches())
    cold = sorted(set(range(len(store))) - set(batch.history.flatten().tolist()) - set(batch.targets.tolist()))[::2][:5]
    built = {table: task_for(world_shards, *common, f"sequence.item_table={table}", cold_items=cold) for table in ("every_step", "cached")}
    tasks = {table: task for table, (task, _) in built.items()}
    for task in tasks.values():
        task.load_state_dict(tasks["every_step"].state_dict())
        *states, has_image = encode_catalogue(task, store, preprocess, single_process(), "cpu", 80, 0,
                                              encode=task.encoder.frozen_blocks)  # the fixed inputs of the trained blocks
        task.double().eval()  # eval: the trained text layer's dropout off, so every forward is the same function
        task.set_frozen_block_cache(tuple(s.double() if s.is_floating_point() else s for s in states), has_image, store.identity)
    trained = [(n, p) for n, p in tasks["every_step"].encoder.named_parameters() if p.requires_grad]

    def refreshed_loss(task) -> torch.Tensor:  # the cached table refreshed to the encoder as it is now: every row re-encoded
        task.set_content_cache(*encode_catalogue(task, store, preprocess, single_process(), "cpu", 64, 0))
        return task(batch, one_process)["rec"]

    assert len(cold) == 5 and tasks["every_step"].items_encoded(batch) == len(store) - len(cold)
    assert len(store) > tasks["cached"].items_encoded(batch) == len(batch.item_ids)
    loss = tasks["every_step"](batch, one_process)["rec"]
    loss.backward()
    gradient = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten() for _, p in trained])
    cached_loss = refreshed_loss(tasks["cached"])
    cached_loss.backward()
    cached_gradient = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                                 for p in tasks["cached"].encoder.parameters() if p.requires_grad])
    torch.testing.assert_close(cached_loss, loss, rtol=1e-10, atol=1e-10)  # the same rows, the same loss

    g = torch.Generator().manual_seed(0)
    for direction in (gradient, torch.randn(len(gradient), generator=g, dtype=torch.float64)):
        step = 1e-6 * direction / direction.norm()
        moved = []
        for sign in (1, -1):
            with torch.no_grad():
                offset = 0
                for name, p in tasks["cached"].encoder.named_parameters():
                    if p.requires_grad:
                        p.copy_(dict(trained)[name] + sign * step[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
                moved.append(refreshed_loss(tasks["cached"]).item())
        finite_difference = (moved[0] - moved[1]) / (2 * step.norm().item())
        assert float(gradient @ direction / direction.norm()) == pytest.approx(finite_difference, rel=1e-5, abs=1e-9)
    cosine = float(F.cosine_similarity(gradient, cached_gradient, dim=0))
    assert cosine < 0.9, cosine  # the check has teeth: the batch-only gradient is not the loss's


def test_the_same_run_twice_gives_the_same_bits(one_rank_group, world_shards, tmp_path):
    """MP4SR joint on the tiny CLIP, twice in one process: every logged loss and every gradient bit for bit. Torch's
    CPU backward of advanced indexing accumulates in parallel, in thread order: before train.deterministic, 269 of
    these 300 gradients differed between two runs (2 threads)."""
    from helpers.train_worker import case_config, record_gradients

    from mmscale.engine.trainer import Trainer

    runs = []
    for run in ("first", "second"):
        trainer = Trainer(case_config("mp4sr_joint", str(world_shards), tmp_path / run, 2, 16, []), log=lambda *a, **k: None)
        gradients: dict[str, torch.Tensor] = {}
        record_gradients(trainer, gradients)
        trainer.fit()
        losses = [{k: v for k, v in json.loads(line).items() if k.startswith("loss/")}
                  for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"loss/total"' in line]
        runs.append((losses, gradients))
    (losses, gradients), (again, gradients_again) = runs
    assert len(losses) == 3 and losses == again
    assert gradients.keys() == gradients_again.keys() and any(n.startswith("3/encoder.") for n in gradients)
    assert [n for n in gradients if not torch.equal(gradients[n], gradients_again[n])] == []


@pytest.mark.parametrize("case,current", [("frozen", True), ("mp4sr_finetune", True), ("fine_tuned", True), ("two_tower", False)])
def test_evaluation_ranks_with_a_frozen_encoders_cache(one_rank_group, world_shards, tmp_path, monkeypatch, case, current):
    """Once the encoder no longer trains (frozen, an MP4SR stage on a frozen encoder, fine_tuned after its freeze),
    the trainer's cached content is what encoding the catalogue would give: evaluation ranks with it, without
    encoding the catalogue again, and reports the same metrics; an encoder still training is encoded afresh."""
    import mmscale.eval.evaluate as evaluation
    from helpers.train_worker import case_config

    from mmscale.engine.trainer import Trainer
    from mmscale.eval.evaluate import evaluate

    encodings = []
    encode = evaluation.encode_catalogue
    monkeypatch.setattr(evaluation, "encode_catalogue", lambda *a, **k: encodings.append(1) or encode(*a, **k))
    trainer = Trainer(case_config(case, str(world_shards), tmp_path, 2, 16, ["eval.splits=[valid]"]), log=lambda *a, **k: None)
    results = trainer.fit()["eval"]  # the evaluation at the end of training
    assert (len(encodings) == 0) == current and trainer.task.content_cache_is_current == current
    fresh = evaluate(trainer.task, trainer.shards, trainer.config.eval, trainer.preprocess, trainer.collectives, "cpu")
    assert len(encodings) == 2 - current and results == fresh and results["valid"]["samples"] > 0
