"""encoder.cache_frozen_blocks: the blocks encoder.trainable_blocks freezes run once per item, and training runs only
the trained top of each tower. It is an optimisation only: the same forward, losses, gradients and metrics as the
uncached encoder, with batches that carry no images or text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.dual_encoder import needs_dual_encoder
from helpers.train_worker import case_config, record_gradients

from mmscale.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ARCH = str(REPO / "configs" / "models" / "minilm-effnet.json")

pytestmark = needs_dual_encoder

DUAL_ENCODER = [f"encoder.model={ARCH}", "encoder.image_size=64", "encoder.context_length=16", "encoder.trainable_blocks=1",
                "data.history_content=false"]


def test_the_top_blocks_on_the_frozen_outputs_are_the_encoder():
    """In training mode, seeded alike (dropout in the trained text layers): the same embeddings and the same gradient
    of every trained parameter; the frozen blocks run as in evaluation."""
    from mmscale.models.clip import CLIPEncoder

    encoder = CLIPEncoder(ARCH, image_size=64, context_length=16, trainable_blocks=2)
    encoder.train()
    text = encoder.clip.text.transformer
    assert not text.embeddings.training and not text.encoder.layer[3].training and text.encoder.layer[4].training
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = encoder.preprocess().tokenize(["a cowboy doll", "two friends drive across the desert at night", "x", "", "y z"])
    weights = torch.randn(2, 5, encoder.embed_dim, generator=torch.Generator().manual_seed(1))
    outputs, gradients = [], []
    for cached in (False, True):
        torch.manual_seed(7)
        if cached:
            with torch.no_grad():
                states = encoder.frozen_blocks(images, tokens)
            image, text_emb = encoder.from_frozen_blocks(*states)
        else:
            image, text_emb = encoder(images, tokens)
        ((image * weights[0]).sum() + (text_emb * weights[1]).pow(3).sum()).backward()
        outputs.append((image.detach(), text_emb.detach()))
        gradients.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
        encoder.zero_grad(set_to_none=True)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    assert gradients[0].keys() == gradients[1].keys() and any(n.startswith("clip.text.transformer.encoder.layer.5") for n in gradients[0])
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-5, atol=1e-7, msg=name)


def _train(world_shards: Path, run_dir: Path, case: str, cached: bool, stage: int = 2):
    from mmscale.engine.trainer import Trainer

    config = case_config(case, str(world_shards), run_dir, stage, 16,
                         [*DUAL_ENCODER, f"encoder.cache_frozen_blocks={cached}", "eval.splits=[valid]"])
    trainer = Trainer(config, log=lambda *a, **k: None)
    gradients: dict[str, torch.Tensor] = {}
    record_gradients(trainer, gradients)
    result = trainer.fit()
    losses = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss/total"' in line]
    return trainer, result, losses, gradients


@pytest.mark.parametrize("case, stage", [("two_tower", 2), ("mp4sr_joint", 2), ("two_tower", 3)])
def test_cached_training_equals_the_uncached_encoder(one_rank_group, world_shards, tmp_path, case, stage):
    """Three steps of two-tower end_to_end and MP4SR joint (whose catalogue refresh reads the cache too): the losses of
    every step, every trained parameter's gradient before each optimizer step and the validation metrics."""
    import json

    runs = {cached: _train(world_shards, tmp_path / str(cached), case, cached, stage) for cached in (False, True)}
    (plain, plain_result, plain_losses, plain_grads), (fast, fast_result, fast_losses, fast_grads) = runs[False], runs[True]
    assert plain.stream.content and not fast.stream.content  # cached: batches carry ids only
    for trainer in (plain, fast):  # encoder.trainable_blocks holds in every task (MP4SR joint once trained them all)
        text = trainer.task.encoder.clip.text.transformer
        assert not any(p.requires_grad for p in text.encoder.layer[4].parameters())
        assert all(p.requires_grad for p in text.encoder.layer[5].parameters())
    assert fast.task.frozen_block_states is not None and len(fast.task.frozen_block_has_image) == fast.shards.num_items
    assert len(plain_losses) == len(fast_losses) == 3
    for a, b in zip(plain_losses, fast_losses):
        a, b = json.loads(a), json.loads(b)
        for key in (k for k in a if k.startswith("loss/")):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert plain_grads.keys() == fast_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for metric, value in plain_result["eval"]["valid"].items():
        assert fast_result["eval"]["valid"][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric


@pytest.mark.parametrize("overrides, message", [
    (["encoder.cache_frozen_blocks=true"], "encoder.cache_frozen_blocks: needs encoder.trainable_blocks"),
    (["encoder.cache_frozen_blocks=true", "encoder.trainable_blocks=1", "encoder.paradigm=frozen",
      "objectives.weights={rec: 1.0, itc: 0.0}"], "the encoder is frozen here"),
    (["encoder.cache_frozen_blocks=true", "encoder.trainable_blocks=1", "task=sequential", "sequence.mode=finetune"],
     "the encoder is frozen here"),
    (["encoder.cache_frozen_blocks=true", "encoder.trainable_blocks=1", "data.history_content=true"],
     "data.history_content: batches carry item ids only"),
    (["encoder.cache_frozen_blocks=true", "encoder.kind=vlmo", "encoder.model=vlmo-tiny"],
     "encoder.cache_frozen_blocks: needs an encoder with the 'frozen_block_cache' capability"),
])
def test_contradictions_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_towers_the_cache_cannot_split_are_named():
    from mmscale.models.clip import CLIPEncoder

    tiny = CLIPEncoder(str(REPO / "configs" / "models" / "clip-tiny.json"), trainable_blocks=1)
    with pytest.raises(ConfigError, match="encoder.cache_frozen_blocks: the image tower of .* is not a timm trunk"):
        tiny.check_frozen_block_cache()


@pytest.mark.parametrize("task_settings", [["task=sequential", "sequence.mode=joint", "sequence.item_table=every_step"],
                                           ["task=two_tower"]], ids=["every_step", "two_tower"])
def test_each_rank_keeps_its_share_of_the_frozen_blocks(world_shards, task_settings):
    """Each of 3 ranks keeps the frozen-block outputs of its contiguous share of the 80 items (27, 27 and 26, padded to 27
    like every rank's), and gathers the has_image of its real items only; a catalogue encoding with other collectives
    than the cache's is refused, and so is a catalogue smaller than the ranks."""
    from mmscale.data.item_store import ItemStore
    from mmscale.data.shard_set import ShardSet
    from mmscale.eval.evaluate import Collectives, cache_frozen_blocks, encode_catalogue, single_process
    from mmscale.models import build_preprocess
    from mmscale.tasks import build_task

    config = load_config(None, [f"data.shards={world_shards}", *task_settings, "encoder.cache_frozen_blocks=true", *DUAL_ENCODER])
    task = build_task(config, ShardSet.open(world_shards))
    store, preprocess = ItemStore(world_shards), build_preprocess(config.encoder)
    *whole, has_image = encode_catalogue(task, store, preprocess, single_process(), "cpu", 64, 0, encode=task.encoder.frozen_blocks)
    assert len(store) == 80
    for rank in range(3):
        sent: list[torch.Tensor] = []
        coll = Collectives(rank, 3, gather=lambda x, uneven=False: sent.append(x) or x, all_reduce_sum=lambda x: x, all_to_all=None)
        cache_frozen_blocks(task, store, preprocess, coll, "cpu", 64, 0)
        share = range(80)[coll.contiguous_share(80)]
        assert task.frozen_block_items == share and [len(s) for s in task.frozen_block_states] == [27] * len(whole)
        for held, every in zip(task.frozen_block_states, whole):
            torch.testing.assert_close(held[: len(share)], every[share.start : share.stop])
        assert len(sent) == 1 and torch.equal(sent[0], has_image[share.start : share.stop])
    with pytest.raises(RuntimeError, match="holds items 54..79; rank 0 of 1 encodes items 0..79"):
        encode_catalogue(task, store, preprocess, single_process(), "cpu", 64, 0)
    with pytest.raises(ValueError, match="items 27..53 of 80 needs a fetch"):  # a share with nothing to read the others
        task.set_frozen_block_cache(task.frozen_block_states, has_image, store.identity, range(27, 54))
    with pytest.raises(ConfigError, match="80 items on 81 ranks"):
        cache_frozen_blocks(task, store, preprocess, Collectives(0, 81, lambda x, uneven=False: x, lambda x: x, None), "cpu", 64, 0)
