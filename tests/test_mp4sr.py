"""MP4SR pieces against direct reference computations on tiny tensors, and loading an earlier run into the task."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmscale.models.sequence import AttentionPooling, CausalSequenceEncoder, Dropout, MoEAdaptor, complementary_mixup, random_item_drop
from mmscale.objectives.mp4sr import sequence_item_loss, sequence_sequence_loss
from mmscale.objectives.common import hashed_uniform

PAD = -1
REPO = Path(__file__).resolve().parents[1]


def test_mixup_is_complementary_and_leaves_padding_alone():
    torch.manual_seed(0)
    text, image = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1]] * 4, dtype=torch.bool)
    draws = torch.rand(4, 6)
    text_led, image_led = complementary_mixup(text, image, valid, 0.5, draws)
    swapped = (draws < 0.5) & valid
    for b in range(4):
        for p in range(6):
            if swapped[b, p]:
                assert torch.equal(text_led[b, p], image[b, p]) and torch.equal(image_led[b, p], text[b, p])
            else:  # padding included: never swapped
                assert torch.equal(text_led[b, p], text[b, p]) and torch.equal(image_led[b, p], image[b, p])
    assert swapped.any() and (~swapped & valid).any()  # the case is not trivial


def test_mixup_ratio_zero_keeps_sequences_pure():
    text, image = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    valid = torch.ones(2, 5, dtype=torch.bool)
    text_led, image_led = complementary_mixup(text, image, valid, 0.0, torch.rand(2, 5))
    assert torch.equal(text_led, text) and torch.equal(image_led, image)


def test_item_drop_keeps_order_and_the_latest_item():
    history = torch.tensor([[PAD, PAD, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    draws = torch.tensor([[0.0, 0.0, 0.05, 0.9, 0.01, 0.0], [0.9, 0.01, 0.9, 0.9, 0.01, 0.01]])
    dropped = random_item_drop(history, 0.1, draws)
    # row 0: 5 and 7 dropped (draws < 0.1), 8 kept although its draw is 0 (the latest always stays)
    assert dropped.tolist() == [[PAD, PAD, PAD, PAD, 6, 8], [PAD, PAD, 1, 3, 4, 6]]
    assert torch.equal(random_item_drop(history, 0.0, draws), history)


def test_sequence_item_loss_matches_reference_and_masks_shared_targets():
    torch.manual_seed(1)
    seq = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    targets = torch.tensor([3, 7, 3, 9, 1])  # rows 0 and 2 share a target
    seq[0] = torch.nn.functional.normalize(items[0] + 3 * items[2], dim=-1)  # so the false negative matters
    tau = 0.1
    expected = 0.0
    for i in range(5):
        denominator = sum(math.exp(float(seq[i] @ items[j]) / tau) for j in range(5) if j == i or targets[j] != targets[i])
        expected += -(float(seq[i] @ items[i]) / tau - math.log(denominator))
    assert sequence_item_loss(seq, items, targets, tau).item() == pytest.approx(expected / 5, rel=1e-5)
    unmasked = sequence_item_loss(seq, items, torch.arange(5), tau).item()
    assert unmasked > expected / 5 + 0.1  # without the masking, row 0 is pushed away from its own target's twin


def test_sequence_sequence_loss_matches_reference():
    torch.manual_seed(2)
    a = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    targets = torch.tensor([2, 2, 5, 8])
    tau = 0.2

    def side(anchor, other):
        total = 0.0
        for i in range(4):
            negatives = [j for j in range(4) if j == i or targets[j] != targets[i]]
            cross = sum(math.exp(float(anchor[i] @ other[j]) / tau) for j in negatives)
            same = sum(math.exp(float(anchor[i] @ anchor[j]) / tau) for j in negatives if j != i)
            total += -(float(anchor[i] @ other[i]) / tau - math.log(cross + same))
        return total / 4

    expected = (side(a, b) + side(b, a)) / 2
    assert sequence_sequence_loss(a, b, targets, tau).item() == pytest.approx(expected, rel=1e-5)


def test_causal_encoder_ignores_padding_and_the_future():
    torch.manual_seed(3)
    encoder = CausalSequenceEncoder(hidden=8, layers=1, heads=2, dropout=0.0, max_len=5).eval()
    x = torch.randn(1, 5, 8)
    valid = torch.tensor([[False, False, True, True, True]])
    base = encoder(x, valid)
    changed_padding = x.clone()
    changed_padding[0, :2] = torch.randn(2, 8)
    assert torch.allclose(encoder(changed_padding, valid), base, atol=1e-6)
    # the last position sees every real item: changing an earlier real item changes the output
    changed_item = x.clone()
    changed_item[0, 2] += torch.randn(8)  # not a constant shift: LayerNorm would remove that
    assert not torch.allclose(encoder(changed_item, valid), base, atol=1e-4)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_cpu_dropout_drops_at_rate_p_keeps_the_expectation_and_replays_from_the_seed(p):
    x = torch.ones(1_000_003, requires_grad=True)  # not a multiple of the four draws per random word
    dropout = Dropout(p)
    torch.manual_seed(7)
    out = dropout(x)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 2e-3  # 4 standard deviations at p = 0.5
    assert out.mean().item() == pytest.approx(1.0, abs=4e-3)
    assert torch.all((out == 0) | (out == out.max()))  # one scale for every kept value
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient is the same mask and scale
    for lane in range(4):  # each 16-bit slice of a word drops at rate p
        assert abs((out[lane::4] == 0).float().mean().item() - p) < 4e-3
    torch.manual_seed(7)
    assert torch.equal(dropout(x), out)  # the torch generator's state decides the mask (a restored run replays it)
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))


def test_causal_encoder_equals_the_full_stack_at_the_last_position():
    """The last layer runs for the last position only; outputs and gradients are the whole stack's last row."""
    torch.manual_seed(4)
    encoder = CausalSequenceEncoder(hidden=16, layers=3, heads=2, dropout=0.0, max_len=7)
    x = torch.randn(5, 7, 16, requires_grad=True)
    valid = torch.rand(5, 7) > 0.3
    valid[:, -1] = True
    valid[0, :-1] = False  # a history of one item

    def full_stack(x):
        h = encoder.dropout(encoder.norm(x + encoder.position.weight)) * valid.unsqueeze(-1)
        mask = (encoder.causal_mask.unsqueeze(0) | ~valid.unsqueeze(1)) & ~torch.eye(7, dtype=torch.bool)
        return encoder.transformer(h, mask=mask.repeat_interleave(2, dim=0))[:, -1]

    weights = torch.randn(5, 16)
    out = encoder(x, valid)
    (out * weights).sum().backward()
    grads = [t.grad.clone() for t in (x, *encoder.parameters())]
    encoder.zero_grad()
    x.grad = None
    expected = full_stack(x)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    for got, want in zip(grads, (x.grad, *(p.grad for p in encoder.parameters()))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_attention_pooling_respects_the_mask_and_trains():
    pool = AttentionPooling(4, 8)
    vectors = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = pool(vectors, mask)
    other = vectors.clone()
    other[0, 2] = 100.0
    assert torch.allclose(pool(other, mask), out)
    assert torch.equal(out[1], torch.zeros(4))  # an item without features pools to zeros
    out[0].sum().backward()
    assert pool.score[0].weight.grad is not None and pool.score[0].weight.grad.abs().sum() > 0


def test_moe_adaptor_is_the_gated_mixture_of_its_experts():
    torch.manual_seed(4)
    adaptor = MoEAdaptor(5, 3, experts=4, dropout=0.0).eval()
    for param in (adaptor.gate.weight, adaptor.norm_weight, adaptor.norm_bias):
        torch.nn.init.normal_(param)
    x = torch.randn(2, 5)
    gates = torch.softmax(x @ adaptor.gate.weight.T, dim=-1)

    def expert(e: int) -> torch.Tensor:  # expert e: its own linear layer, then its own LayerNorm
        rows = slice(3 * e, 3 * (e + 1))
        linear = x @ adaptor.proj.weight[rows].T + adaptor.proj.bias[rows]
        return torch.nn.functional.layer_norm(linear, (3,), adaptor.norm_weight[e], adaptor.norm_bias[e], eps=1e-12)

    expected = sum(gates[:, e : e + 1] * expert(e) for e in range(4))
    assert torch.allclose(adaptor(x), expected, atol=1e-5)


def test_moe_adaptor_dropout_masks_the_experts_input_not_the_gate():
    torch.manual_seed(5)
    adaptor = MoEAdaptor(6, 2, experts=3, dropout=0.5)
    torch.nn.init.normal_(adaptor.gate.weight)
    x = torch.randn(4, 6)
    torch.manual_seed(9)
    out = adaptor.train()(x)
    torch.manual_seed(9)
    dropped = Dropout(0.5)(x)  # the same draws: one mask shared by the experts
    gates = torch.softmax(x @ adaptor.gate.weight.T, dim=-1)
    experts = torch.nn.functional.layer_norm((adaptor.proj(dropped)).unflatten(-1, (3, 2)), (2,), eps=1e-12)
    experts = experts * adaptor.norm_weight + adaptor.norm_bias
    assert not torch.equal(dropped, x)
    assert torch.allclose(out, (gates.unsqueeze(-1) * experts).sum(1), atol=1e-6)


def test_hashed_draws_depend_only_on_the_keys():
    users, targets = torch.tensor([[3], [4]]), torch.tensor([[10], [10]])
    first = hashed_uniform(users, targets, torch.tensor(7), torch.arange(6).unsqueeze(0))
    again = hashed_uniform(users[[1, 0]], targets, torch.tensor(7), torch.arange(6).unsqueeze(0))
    assert torch.equal(first, again[[1, 0]])  # row order (which rank holds it) does not matter
    assert ((first >= 0) & (first < 1)).all() and first.std() > 0.1
    assert not torch.equal(first, hashed_uniform(users, targets, torch.tensor(8), torch.arange(6).unsqueeze(0)))


def test_sequence_pretrained_continues_a_trained_model_ids_included_and_names_a_misfit(world_shards, tmp_path):
    """A finetune run's export carries on in joint mode with everything it learnt, item id vectors included (a
    pre-training export has none: ids start fresh); a file of another catalogue is refused, naming the key."""
    from safetensors.torch import save_file

    from mmscale.config import ConfigError, load_config
    from mmscale.data.shard_set import ShardSet
    from mmscale.tasks import build_task

    common = ["task=sequential", "sequence.features=encoder", f"encoder.model={REPO / 'configs/models/clip-tiny.json'}",
              f"data.shards={world_shards}"]
    shards = ShardSet.open(world_shards)
    torch.manual_seed(0)
    trained = build_task(load_config(None, [*common, "sequence.mode=finetune"]), shards)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param))
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(state, tmp_path / "finetuned.safetensors")
    torch.manual_seed(1)
    joint = build_task(load_config(None, [*common, "sequence.mode=joint", f"sequence.pretrained={tmp_path / 'finetuned.safetensors'}"]), shards)
    for name, value in joint.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)

    state["item_id.weight"] = torch.cat([state["item_id.weight"], state["item_id.weight"][:1]])
    save_file(state, tmp_path / "other-catalogue.safetensors")
    with pytest.raises(ConfigError, match=r"sequence.pretrained: .*other-catalogue.* item_id.weight is \(81, 64\) there, \(80, 64\) here"):
        build_task(load_config(None, [*common, "sequence.mode=joint", f"sequence.pretrained={tmp_path / 'other-catalogue.safetensors'}"]), shards)
