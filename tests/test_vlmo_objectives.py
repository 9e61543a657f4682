"""VLMo's fusion-mode objectives (ITM with hard negatives, MLM) against direct reference computations,
the fusion item representation, and the config rules around them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmscale.config import ConfigError, load_config
from mmscale.models.vlmo import VLMoConfig, VLMoEncoder, build_wordpiece_tokenizer
from mmscale.objectives.common import hashed_uniform
from mmscale.objectives.matching import IGNORE, mask_tokens, masked_lm_sums, sample_hard_negatives
from mmscale.tasks.vision_language import fusion_losses

TEXTS = ["a red circle on stripes", "a blue square on dots", "a green triangle on waves", "a red square on plain",
         "a yellow star on stripes", "a blue circle on checks"]


def identity(x: torch.Tensor) -> torch.Tensor:  # the gather of one process
    return x


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> VLMoEncoder:
    torch.manual_seed(0)
    tokenizer = build_wordpiece_tokenizer(TEXTS * 5, 120, tmp_path_factory.mktemp("wordpiece"))
    return VLMoEncoder(VLMoConfig.tiny(max_text_len=12, text_rel_pos_len=12), tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def batch(encoder):
    """Six rows: item 7 twice (a duplicate), item 9 without an image."""
    torch.manual_seed(1)
    images = torch.randn(6, 3, 32, 32)
    item_ids = torch.tensor([3, 7, 5, 7, 9, 11])
    has_image = torch.tensor([True, True, True, True, False, True])
    images[~has_image] = 0
    tokens = encoder.preprocess().tokenize(TEXTS)
    with torch.no_grad():
        image_emb, text_emb = encoder(images, tokens)
    return images, tokens, image_emb, text_emb, item_ids, has_image


def test_hard_negatives_follow_the_softmax_and_skip_forbidden_columns():
    similarity = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(20000, 1)
    forbidden = torch.tensor([[False, False, True, False]]).repeat(20000, 1)
    picks = sample_hard_negatives(similarity, forbidden, torch.rand(20000))
    counts = torch.bincount(picks, minlength=4).double() / len(picks)
    expected = torch.softmax(torch.tensor([0.0, 1.0, -math.inf, 3.0], dtype=torch.float64), 0)
    assert counts[2] == 0
    assert torch.allclose(counts, expected, atol=0.01)
    nothing = sample_hard_negatives(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.rand(2))
    assert nothing.tolist() == [-1, -1]


def test_itm_equals_a_direct_computation_and_never_pairs_an_item_with_itself(encoder, batch):
    images, tokens, image_emb, text_emb, item_ids, has_image = batch
    step = torch.tensor(4)
    with torch.no_grad():
        loss = fusion_losses(encoder, ["itm"], images, tokens, image_emb, text_emb, item_ids, has_image, identity, step)["itm"]

    def draw(row_sims: list[float], allowed: list[bool], u: float) -> int:  # inverse CDF over softmax(allowed)
        weights = [math.exp(s) if ok else 0.0 for s, ok in zip(row_sims, allowed)]
        threshold, running = u * sum(weights), 0.0
        for j, w in enumerate(weights):
            running += w
            if w > 0 and running > threshold:
                return j
        raise AssertionError("no allowed column")

    scale = encoder.logit_scale.exp().item()
    sims = (scale * image_emb @ text_emb.T).tolist()
    pairs = []  # (image row, text row, label)
    for i in range(6):
        others = [item_ids[j] != item_ids[i] for j in range(6)]
        if has_image[i]:
            pairs.append((i, i, 1))
            pairs.append((i, draw(sims[i], others, hashed_uniform(item_ids[i], step, torch.tensor(1)).item()), 0))
        text_sims = [sims[j][i] for j in range(6)]  # text i against every image
        pairs.append((draw(text_sims, [o and bool(has_image[j]) for j, o in enumerate(others)],
                           hashed_uniform(item_ids[i], step, torch.tensor(2)).item()), i, 0))
    for image_row, text_row, label in pairs:
        if label == 0:
            assert item_ids[image_row] != item_ids[text_row] and has_image[image_row]
    with torch.no_grad():
        logits = encoder.match_logits(images[[p[0] for p in pairs]], tokens[[p[1] for p in pairs]])
    expected = F.cross_entropy(logits, torch.tensor([p[2] for p in pairs]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mlm_masking_follows_bert():
    torch.manual_seed(2)
    tokens = torch.randint(5, 100, (400, 30))
    maskable = torch.rand(400, 30) > 0.2
    ordinary = torch.arange(5, 100)  # ids 0-4 are special
    inputs, labels = mask_tokens(tokens, maskable, torch.rand(400, 30, 3), mask_id=4, replacement_ids=ordinary)
    chosen = labels != IGNORE
    assert not (chosen & ~maskable).any()
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    assert chosen.sum() / maskable.sum() == pytest.approx(0.15, abs=0.01)
    masked = (inputs[chosen] == 4).double().mean()
    kept = (inputs[chosen] == tokens[chosen]).double().mean()
    assert masked == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1 + 0.1 / 95, abs=0.03)
    # a replacement is an ordinary token, never [PAD], [CLS], [SEP], [MASK] or [UNK]; every ordinary one is drawn
    replaced = inputs[chosen & (inputs != 4) & (inputs != tokens)]
    assert len(replaced) > 0 and replaced.min() >= 5


def test_mlm_replacement_draws_ordinary_tokens_only(encoder):
    """Uniforms at the very bottom and top of [0, 1) draw the first and last ordinary token, never a special one."""
    ids = encoder.replacement_token_ids
    vocabulary = encoder.preprocess().tokenize._tok.get_vocab()
    specials = {vocabulary[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert not specials & set(ids.tolist()) and len(ids) == encoder.vocab_size - len(specials)
    # both id sets are buffers, moved with the model: MLM builds no tensor from a host list each step
    assert set(encoder.special_token_ids.tolist()) == {vocabulary[t] for t in ("[PAD]", "[CLS]", "[SEP]")}  # never predicted
    assert {"special_token_ids", "replacement_token_ids"} <= dict(encoder.named_buffers()).keys()
    tokens = torch.full((1, 3), 7)
    uniforms = torch.tensor([[[0.0, 0.85, 0.0], [0.0, 0.85, 0.999999], [0.0, 0.85, 0.5]]])
    inputs, _ = mask_tokens(tokens, torch.ones(1, 3, dtype=torch.bool), uniforms, encoder.mask_token_id, ids)
    assert inputs[0].tolist() == [int(ids[0]), int(ids[-1]), int(ids[len(ids) // 2])]
    assert not specials & set(inputs[0].tolist())


def test_mlm_equals_a_direct_computation(encoder, batch):
    images, tokens, image_emb, text_emb, item_ids, has_image = batch
    step = torch.tensor(9)
    with torch.no_grad():
        loss = fusion_losses(encoder, ["mlm"], images, tokens, image_emb, text_emb, item_ids, has_image, identity, step)["mlm"]
    special = set(encoder.special_token_ids.tolist())
    total, count = 0.0, 0
    for i in range(6):
        row_inputs, targets = tokens[i].clone(), []
        for t in range(tokens.shape[1]):
            u = [hashed_uniform(item_ids[i], step, torch.tensor(3), torch.tensor(t), torch.tensor(k)).item() for k in range(3)]
            if int(tokens[i, t]) in special or not has_image[i] or u[0] >= 0.15:
                continue
            targets.append((t, int(tokens[i, t])))
            if u[1] < 0.8:
                row_inputs[t] = encoder.mask_token_id
            elif u[1] < 0.9:
                ordinary = encoder.replacement_token_ids
                row_inputs[t] = int(ordinary[min(int(u[2] * len(ordinary)), len(ordinary) - 1)])
        if targets:
            with torch.no_grad():
                logits = encoder.masked_lm_logits(images[i : i + 1], row_inputs.unsqueeze(0))[0]
            for t, label in targets:
                total += F.cross_entropy(logits[t : t + 1], torch.tensor([label]), reduction="sum").item()
                count += 1
    assert count > 0
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert masked_lm_sums(torch.zeros(1, 2, 5), torch.full((1, 2), IGNORE)).tolist() == [0.0, 0.0]


def test_fusion_item_representation_learns(encoder, batch):
    """Items as their fusion-mode [CLS]: a few steps of ITC + ITM + MLM training move every loss down."""
    images, tokens, _, _, item_ids, has_image = batch
    torch.manual_seed(3)
    model = VLMoEncoder(encoder.config, tokenizer=encoder.preprocess().tokenize.path, item_representation="fusion")
    fused = model.fused_embedding(images, tokens)
    assert fused.shape == (6, 64) and torch.allclose(fused.norm(dim=-1), torch.ones(6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for step in range(12):
        image_emb, text_emb = model(images, tokens)
        losses = fusion_losses(model, ["itm", "mlm"], images, tokens, image_emb, text_emb, item_ids, has_image, identity,
                               torch.tensor(0))  # the same draws every step: a fixed problem to fit
        # the fused item vectors should find their own item among the batch's
        fused = model.fused_embedding(images, tokens)
        losses["items"] = F.cross_entropy(fused @ image_emb.detach().T * 10, torch.arange(6))
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: v.item() for k, v in losses.items()})
    for name in ("itm", "mlm", "items"):
        assert history[-1][name] < history[0][name], name


@pytest.mark.parametrize("override, message", [
    ("objectives.weights.itm=1.0", "needs an encoder with the 'fusion' capability \\(encoder.kind=vlmo\\)"),
    ("objectives.weights.mlm=0.5", "needs an encoder with the 'fusion' capability \\(encoder.kind=vlmo\\)"),
    ("encoder.item_representation=fusion", "fusion needs an encoder with the 'fusion' capability"),
    ("encoder.item_representation=joint", "is not one of"),
])
def test_config_refuses_fusion_settings_without_vlmo(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
