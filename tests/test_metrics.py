"""Full-ranking metrics, the seen-item mask, equal shares across ranks and the LR schedule,
each against a direct reference written with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmscale.engine.trainer import warmup_cosine
from mmscale.eval.evaluate import Collectives, seen_mask, _share
from mmscale.eval.metrics import metric_sums, target_ranks


# -- references ------------------------------------------------------------------------------------
def reference_rank(scores: list[float], target: int, excluded: set[int]) -> int:
    """Sort every item by score (descending); ties are placed before the target; excluded items
    other than the target are removed. The target's 0-based position is its rank."""
    order = sorted(
        (j for j in range(len(scores)) if j == target or j not in excluded),
        key=lambda j: (-scores[j], 0 if j != target else 1),  # ties count against the target
    )
    return order.index(target)


def reference_metrics(ranks: list[int], ks, weights: list[float] | None) -> dict[str, float]:
    out = {}
    for k in ks:
        recall = ndcg = mrr = 0.0
        for i, r in enumerate(ranks):
            w = 1.0 if weights is None else weights[i]
            if r < k:
                recall += w
                ndcg += w / math.log2(r + 2)
                mrr += w / (r + 1)
        out[f"recall@{k}"] = out[f"hit@{k}"] = recall
        out[f"ndcg@{k}"] = ndcg
        out[f"mrr@{k}"] = mrr
    return out


def random_case(seed: int, batch: int = 7, items: int = 13, tie_levels: int | None = None):
    rng = np.random.default_rng(seed)
    if tie_levels:  # few distinct values: many ties, including with the target
        scores = rng.integers(0, tie_levels, size=(batch, items)).astype(np.float32)
    else:
        scores = rng.standard_normal((batch, items)).astype(np.float32)
    targets = rng.integers(0, items, size=batch)
    excluded = rng.random((batch, items)) < 0.35
    excluded[0, targets[0]] = True  # the target itself is never excluded, even when marked
    return scores, targets, excluded


# -- target_ranks + metric_sums -------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tie_levels", [None, 3])
@pytest.mark.parametrize("exclude", [False, True])
def test_ranks_match_brute_force(seed, tie_levels, exclude):
    scores, targets, excluded = random_case(seed, tie_levels=tie_levels)
    got = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), torch.from_numpy(excluded) if exclude else None)
    expected = [
        reference_rank(scores[i].tolist(), int(targets[i]), set(np.flatnonzero(excluded[i]).tolist()) if exclude else set())
        for i in range(len(targets))
    ]
    assert got.tolist() == expected


def test_ties_count_against_the_target():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [2]  # two other items tie at 2.0
    assert target_ranks(scores, torch.tensor([4])).tolist() == [4]  # the lowest
    excluded = torch.tensor([[False, False, True, False, True]])
    assert target_ranks(scores, torch.tensor([1]), excluded).tolist() == [1]


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_metric_sums_match_brute_force(seed, exclude, weighted):
    scores, targets, excluded = random_case(seed, batch=9, items=15, tie_levels=4 if seed == 4 else None)
    ks = (1, 3, 5, 15)
    ranks = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), torch.from_numpy(excluded) if exclude else None)
    ref_ranks = [
        reference_rank(scores[i].tolist(), int(targets[i]), set(np.flatnonzero(excluded[i]).tolist()) if exclude else set())
        for i in range(len(targets))
    ]
    weights = None
    if weighted:
        weights = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]  # zero weight: padding rows dropped
    got = metric_sums(ranks, ks, None if weights is None else torch.tensor(weights, dtype=torch.float64))
    expected = reference_metrics(ref_ranks, ks, weights)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-12, abs=1e-12), name
    # K = number of items: every target is a hit.
    assert float(got["recall@15"]) == pytest.approx(len(ref_ranks) if weights is None else sum(weights))


def test_zero_weight_drops_a_row():
    ranks = torch.tensor([0, 3, 1])
    with_padding = metric_sums(ranks, (2,), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    without = metric_sums(ranks[:2], (2,))
    for name in without:
        assert float(with_padding[name]) == pytest.approx(float(without[name]))
    assert float(without["recall@2"]) == 1.0
    assert float(without["ndcg@2"]) == pytest.approx(1.0)  # rank 0: 1/log2(2); rank 3 misses K=2
    assert float(without["mrr@2"]) == pytest.approx(1.0)
    assert float(metric_sums(torch.tensor([1, 2]), (3,))["mrr@3"]) == pytest.approx(1 / 2 + 1 / 3)


# -- seen_mask -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_seen_mask_matches_dense_reference(seed):
    rng = np.random.default_rng(seed)
    num_users, num_items = 9, 17
    lists = []
    for u in range(num_users):
        n = 0 if u in (2, 5) else int(rng.integers(1, 8))  # some users have seen nothing
        lists.append(sorted(rng.choice(num_items, size=n, replace=False).tolist()))
    indptr = np.cumsum([0] + [len(x) for x in lists]).astype(np.int64)
    items = np.asarray([i for x in lists for i in x], dtype=np.int64)
    users = rng.integers(0, num_users, size=12)  # repeats allowed, any order
    users[:2] = [2, num_users - 1]

    history = torch.full((len(users), 4), -1)
    history[3, 2:] = torch.tensor([num_items - 1, 0])  # a sample whose history holds items beyond the seen set
    got = seen_mask(torch.from_numpy(users), history, torch.from_numpy(indptr), torch.from_numpy(items), num_items)

    expected = np.zeros((len(users), num_items), dtype=bool)
    for row, u in enumerate(users):
        for p in range(indptr[u], indptr[u + 1]):
            expected[row, items[p]] = True
    expected[3, [num_items - 1, 0]] = True
    assert got.dtype == torch.bool
    assert got.shape == (len(users), num_items)
    assert np.array_equal(got.numpy(), expected)
    assert not got[0].any()  # user 2 has no seen items


def test_the_test_ranking_drops_the_valid_item(tiny_raw, tiny_preprocess, tmp_path):
    """Leave-one-out: a test target's history ends with the valid item, which is not a training item (seen.npz).
    It is removed from the ranking with every other item the user had before the target."""
    from mmscale.build.shards import BuildOptions, build_shards
    from mmscale.data.stream import InteractionStream

    shards = tmp_path / "shards"
    build_shards(tiny_raw().write(tmp_path / "raw"), shards, BuildOptions(progress=False, workers=1))
    seen = np.load(shards / "seen.npz")
    batch = next(InteractionStream(shards, "test", 64, tiny_preprocess, resampled=False, shuffle_buffer=0, content=False).batches())
    mask = seen_mask(batch.users, batch.history, torch.from_numpy(seen["indptr"]), torch.from_numpy(seen["items"]), 8)
    valid = next(InteractionStream(shards, "valid", 64, tiny_preprocess, resampled=False, shuffle_buffer=0, content=False).batches())
    valid_item = dict(zip(valid.users.tolist(), valid.targets.tolist()))
    for row, user in enumerate(batch.users.tolist()):
        trained = set(seen["items"][seen["indptr"][user] : seen["indptr"][user + 1]].tolist())
        assert valid_item[user] not in trained  # what seen.npz alone missed
        assert mask[row, valid_item[user]]
        assert set(torch.nonzero(mask[row]).flatten().tolist()) == trained | {valid_item[user]}


# -- _share ----------------------------------------------------------------------------------------
def _coll(rank: int, world: int) -> Collectives:
    return Collectives(rank, world, gather=lambda x: x, all_reduce_sum=lambda x: x, all_to_all=None)


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (1, 1), (2, 4), (7, 2), (5, 8), (0, 2), (9, 4), (5, 4), (49, 8)])
def test_share_covers_everything_with_equal_lengths(n, world):
    shares = [_share(n, _coll(r, world)) for r in range(world)]
    expected_len = -(-n // world)
    real_seen = []
    for rank, (indices, real) in enumerate(shares):
        assert len(indices) == expected_len  # equal length on every rank
        assert real == (n // world + (rank < n % world))  # none empty while n >= world; lengths differ by one at most
        mine = list(range(sum(r for _, r in shares[:rank]), sum(r for _, r in shares[: rank + 1])))  # contiguous, in rank order
        assert indices[:real] == mine
        for pad in indices[real:]:  # padding only repeats valid indices
            assert 0 <= pad < max(n, 1)
            assert pad in mine or not mine
        real_seen += indices[:real]
    assert sorted(real_seen) == list(range(n))  # every index exactly once among the real ones


# -- warmup_cosine ---------------------------------------------------------------------------------
def test_warmup_cosine_shape():
    warmup, total = 4, 24
    f = warmup_cosine(warmup, total)
    assert [f(s) for s in range(warmup)] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f(warmup - 1) == pytest.approx(1.0)  # the last warmup step reaches the peak
    assert f(warmup) == pytest.approx(1.0)  # cosine starts at the peak
    assert f(warmup + (total - warmup) // 2) == pytest.approx(0.5)
    assert f(total) == pytest.approx(0.0, abs=1e-12)
    assert f(total + 10) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    for s in range(warmup, total + 1):
        progress = (s - warmup) / (total - warmup)
        assert f(s) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
    decay = [f(s) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_warmup_cosine_without_warmup():
    f = warmup_cosine(0, 10)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)
