"""The losses against references written with explicit loops over rows (float64, math only)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmscale.objectives.common import first_occurrence
from mmscale.objectives.contrastive import image_text_contrastive_loss
from mmscale.objectives.recommender import bpr_loss, sampled_softmax_loss


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a.tolist(), b.tolist()))


def log_softmax_at(logits: list[float], index: int) -> float:
    m = max(logits)
    return logits[index] - m - math.log(sum(math.exp(v - m) for v in logits))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def embeddings(n: int, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


# -- first_occurrence ------------------------------------------------------------------------------
def test_first_occurrence_small_example():
    first, is_first = first_occurrence(torch.tensor([7, 3, 7, 9, 3, 7]))
    assert first.tolist() == [0, 1, 0, 3, 1, 0]
    assert is_first.tolist() == [True, True, False, True, False, False]


def test_first_occurrence_distinct_and_all_same():
    first, is_first = first_occurrence(torch.tensor([4, 1, 2]))
    assert first.tolist() == [0, 1, 2] and is_first.all()
    first, is_first = first_occurrence(torch.tensor([5, 5, 5, 5]))
    assert first.tolist() == [0, 0, 0, 0] and is_first.tolist() == [True, False, False, False]


# -- sampled softmax -------------------------------------------------------------------------------
def reference_softmax_loss(users, items, ids, temperature) -> float:
    """Row i: softmax over the batch's distinct items (each represented by its first copy);
    the positive is row i's own item id."""
    ids = ids.tolist()
    columns = []  # (id, embedding of its first copy)
    for j, item in enumerate(ids):
        if item not in [c for c, _ in columns]:
            columns.append((item, items[j]))
    total = 0.0
    for i in range(len(ids)):
        logits = [dot(users[i], emb) / temperature for _, emb in columns]
        positive = [c for c, _ in columns].index(ids[i])
        total += -log_softmax_at(logits, positive)
    return total / len(ids)


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_sampled_softmax_distinct_items(temperature):
    users, items = embeddings(6)
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    got = sampled_softmax_loss(users, items, ids, temperature)
    assert got.dim() == 0
    assert float(got) == pytest.approx(reference_softmax_loss(users, items, ids, temperature), rel=1e-9)
    # distinct items: the plain in-batch softmax
    assert float(got) == pytest.approx(float(F.cross_entropy(users @ items.T / temperature, torch.arange(6))), rel=1e-9)


def test_sampled_softmax_shared_target_is_not_a_negative():
    users, items = embeddings(6, seed=1)
    items[4] = items[1]  # rows 1 and 4 have the same target item (same embedding, as from one encoder)
    ids = torch.tensor([20, 21, 22, 23, 21, 25])
    got = float(sampled_softmax_loss(users, items, ids, 0.5))
    assert got == pytest.approx(reference_softmax_loss(users, items, ids, 0.5), rel=1e-9)
    # the naive in-batch softmax would make row 4's copy a negative of row 1 (and vice versa)
    naive = float(F.cross_entropy(users @ items.T / 0.5, torch.arange(6)))
    assert abs(got - naive) > 1e-3


def test_logq_correction_subtracts_each_columns_log_sampling_probability():
    """Each column's logit drops by its item's log sampling probability (a repeated item: one column, one
    correction); a uniform probability changes nothing (softmax is shift-invariant)."""
    users, items = embeddings(5, seed=3)
    ids = torch.tensor([4, 7, 4, 9, 2])
    log_q = torch.tensor([0.1, 0.6, 0.1, 0.25, 0.05], dtype=torch.float64).log()
    logits = users @ items[[0, 1, 3, 4]].T / 0.5 - log_q[[0, 1, 3, 4]]
    expected = sum(-log_softmax_at(logits[i].tolist(), column) for i, column in enumerate([0, 1, 0, 2, 3])) / 5  # ids 4 7 9 2
    got = float(sampled_softmax_loss(users, items, ids, 0.5, log_q))
    assert got == pytest.approx(expected, rel=1e-9)
    assert abs(got - float(sampled_softmax_loss(users, items, ids, 0.5))) > 1e-3
    uniform = torch.full((5,), math.log(0.2), dtype=torch.float64)
    assert float(sampled_softmax_loss(users, items, ids, 0.5, uniform)) == pytest.approx(
        reference_softmax_loss(users, items, ids, 0.5), rel=1e-9)


def test_sampled_softmax_duplicate_uses_first_copy_as_column():
    users, items = embeddings(5, seed=2)
    ids = torch.tensor([1, 2, 1, 3, 2])  # duplicates with *different* embeddings: only the first copy counts
    got = float(sampled_softmax_loss(users, items, ids, 0.7))
    assert got == pytest.approx(reference_softmax_loss(users, items, ids, 0.7), rel=1e-9)


def test_sampled_softmax_duplicated_batch_equals_distinct_batch():
    """Two ranks holding the same batch gather it twice: the loss must not change."""
    users, items = embeddings(5, seed=3)
    ids = torch.tensor([3, 1, 4, 5, 9])
    single = float(sampled_softmax_loss(users, items, ids, 0.2))
    doubled = float(sampled_softmax_loss(torch.cat([users, users]), torch.cat([items, items]), torch.cat([ids, ids]), 0.2))
    assert doubled == pytest.approx(single, rel=1e-9)
    assert single == pytest.approx(reference_softmax_loss(users, items, ids, 0.2), rel=1e-9)


def test_sampled_softmax_gradient_matches_reference_autograd():
    users, items = embeddings(4, seed=4)
    users.requires_grad_(True)
    ids = torch.tensor([1, 2, 1, 3])
    sampled_softmax_loss(users, items, ids, 0.5).backward()
    # reference: explicit distinct columns [0, 1, 3] and positives by id
    u = users.detach().clone().requires_grad_(True)
    cols = items[[0, 1, 3]]
    positive = torch.tensor([0, 1, 0, 2])
    F.cross_entropy(u @ cols.T / 0.5, positive).backward()
    assert torch.allclose(users.grad, u.grad, atol=1e-12)


# -- BPR -------------------------------------------------------------------------------------------
def reference_bpr(users, items, ids) -> float:
    """Row i's negative is row i-1's item (cyclic); pairs with the same item id are skipped."""
    n, total, count = len(ids), 0.0, 0
    for i in range(n):
        j = (i - 1) % n
        if int(ids[j]) == int(ids[i]):
            continue
        total += -log_sigmoid(dot(users[i], items[i]) - dot(users[i], items[j]))
        count += 1
    return total / max(count, 1)


def test_bpr_matches_reference():
    users, items = embeddings(6, seed=5)
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    got = bpr_loss(users, items, ids)
    assert got.dim() == 0
    assert float(got) == pytest.approx(reference_bpr(users, items, ids), rel=1e-9)


def test_bpr_skips_rows_whose_negative_is_the_same_item():
    users, items = embeddings(6, seed=6)
    ids = torch.tensor([7, 7, 8, 9, 9, 9])  # rows 1, 4, 5 see their own item as the rolled negative
    got = float(bpr_loss(users, items, ids))
    assert got == pytest.approx(reference_bpr(users, items, ids), rel=1e-9)
    kept = [0, 2, 3]  # row 0's negative is row 5 (id 9 != 7)
    manual = sum(-log_sigmoid(dot(users[i], items[i]) - dot(users[i], items[(i - 1) % 6])) for i in kept) / 3
    assert got == pytest.approx(manual, rel=1e-9)


def test_bpr_all_same_item_is_zero():
    users, items = embeddings(3, seed=7)
    assert float(bpr_loss(users, items, torch.tensor([4, 4, 4]))) == 0.0


# -- image-text contrastive ------------------------------------------------------------------------
def reference_itc(image, text, ids, has_image, scale: float) -> float:
    """Symmetric InfoNCE over the distinct items that have an image (first copies only)."""
    image = F.normalize(image, dim=-1)
    text = F.normalize(text, dim=-1)
    keep, seen = [], set()
    for i, item in enumerate(ids.tolist()):
        if item not in seen:
            seen.add(item)
            if bool(has_image[i]):
                keep.append(i)
    if not keep:
        return 0.0
    s = math.exp(scale)
    total = 0.0
    for a, i in enumerate(keep):
        img_to_txt = [s * dot(image[i], text[j]) for j in keep]
        txt_to_img = [s * dot(image[j], text[i]) for j in keep]
        total += (-log_softmax_at(img_to_txt, a) - log_softmax_at(txt_to_img, a)) / 2
    return total / len(keep)


@pytest.mark.parametrize(
    "ids,has_image",
    [
        ([1, 2, 3, 4, 5], [True] * 5),
        ([1, 2, 3, 4, 5, 6], [True, False, True, True, False, True]),  # items without an image drop out
        ([1, 2, 1, 3, 2, 4], [True, True, True, True, True, False]),  # duplicates drop out
        ([1, 2, 3], [False, False, False]),  # nothing left: zero
    ],
)
def test_itc_matches_reference(ids, has_image):
    g = torch.Generator().manual_seed(len(ids) + sum(has_image))
    image = F.normalize(torch.randn(len(ids), 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(len(ids), 8, generator=g, dtype=torch.float64), dim=-1)
    logit_scale = torch.tensor([math.log(5.0)], dtype=torch.float64)  # 1-d, as after at_least_1d_parameters
    ids_t, has_t = torch.tensor(ids), torch.tensor(has_image)
    got = image_text_contrastive_loss(image, text, ids_t, has_t, logit_scale)
    assert got.numel() == 1
    assert float(got) == pytest.approx(reference_itc(image, text, ids_t, has_t, float(logit_scale)), rel=1e-9, abs=1e-12)


def test_itc_excluded_rows_do_not_change_the_loss():
    """Appending rows without an image or repeating items leaves the loss of the kept items unchanged."""
    g = torch.Generator().manual_seed(11)
    image = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor([2.0], dtype=torch.float64)
    base = image_text_contrastive_loss(image, text, torch.tensor([1, 2, 3, 4]), torch.ones(4, dtype=torch.bool), scale)
    extra_img = F.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=-1)
    extra_txt = F.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=-1)
    grown = image_text_contrastive_loss(
        torch.cat([image, extra_img[:1], image[:2]]),
        torch.cat([text, extra_txt[:1], text[:2]]),
        torch.tensor([1, 2, 3, 4, 9, 1, 2]),
        torch.tensor([True, True, True, True, False, True, True]),
        scale,
    )
    assert float(grown) == pytest.approx(float(base), rel=1e-9)


def test_itc_gradient_reaches_logit_scale():
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(5, 8, generator=g), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logit_scale = torch.nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
    loss = image_text_contrastive_loss(image, text, torch.tensor([1, 2, 3, 2, 5]), torch.tensor([True, True, False, True, True]), logit_scale)
    loss.backward()
    assert logit_scale.grad is not None and logit_scale.grad.shape == (1,)
    assert torch.isfinite(logit_scale.grad).all() and float(logit_scale.grad.abs()) > 0
    assert torch.isfinite(image.grad).all()
    # finite-difference check of d loss / d logit_scale (float64 reference)
    eps = 1e-4
    img, txt = image.detach().double(), text.double()
    ids, has = torch.tensor([1, 2, 3, 2, 5]), torch.tensor([True, True, False, True, True])
    s0 = float(logit_scale.detach())
    numeric = (reference_itc(img, txt, ids, has, s0 + eps) - reference_itc(img, txt, ids, has, s0 - eps)) / (2 * eps)
    assert float(logit_scale.grad) == pytest.approx(numeric, rel=1e-3, abs=1e-5)
    # rows without an image or duplicated get no gradient
    assert float(image.grad[2].abs().sum()) == 0.0 and float(image.grad[3].abs().sum()) == 0.0


def test_two_tower_logq_correction_uses_each_items_share_of_the_training_interactions(world_shards, monkeypatch):
    """objectives.logq_correction: the task hands the in-batch softmax each target's log share of the training
    interactions (how often batches draw it); without it, nothing."""
    from pathlib import Path

    import numpy as np

    import mmscale.tasks.two_tower as two_tower
    from mmscale.config import load_config
    from mmscale.data.shard_set import ShardSet
    from mmscale.data.stream import InteractionStream
    from mmscale.models import build_preprocess
    from mmscale.tasks import build_task

    tiny_clip = str(Path(__file__).resolve().parents[1] / "configs/models/clip-tiny.json")
    shards = ShardSet.open(world_shards)
    counts = np.bincount(shards.seen()[1], minlength=shards.num_items).clip(min=1)
    handed = []
    monkeypatch.setattr(two_tower, "sampled_softmax_loss", lambda *args: handed.append(args[4:]) or torch.zeros(()))
    for correct in (True, False):
        config = load_config(None, [f"data.shards={world_shards}", f"encoder.model={tiny_clip}", "objectives.weights={rec: 1.0, itc: 0.0}",
                                    f"objectives.logq_correction={str(correct).lower()}"])
        task = build_task(config, shards)
        batch = next(InteractionStream(world_shards, "train", 8, build_preprocess(config.encoder), shuffle_buffer=0).batches())
        task(batch, lambda x, uneven=False: x)
    (corrected,), (plain,) = handed
    expected = np.log(counts[batch.targets.numpy()] / counts.sum())
    assert plain is None and counts.min() < counts.max()
    np.testing.assert_allclose(corrected.numpy(), expected, rtol=1e-6)
