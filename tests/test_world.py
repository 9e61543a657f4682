"""The generated default world: deterministic, in the raw layout, and learnable from content."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmscale.build.world import COLOURS, WorldSpec, generate_world

TINY = WorldSpec(num_users=30, num_items=60, min_interactions_per_user=5, max_interactions_per_user=20, image_size=32)
# Big enough for hit rates to be stable, small enough to generate in well under a second.
SMALL = WorldSpec(
    num_users=150,
    num_items=300,
    min_interactions_per_user=10,
    max_interactions_per_user=30,
    image_size=48,
    seed=7,
    missing_image_fraction=0.1,
    missing_description_fraction=0.1,
)


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def read_interactions(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(root / "interactions.csv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_items(root: Path) -> list[dict]:
    with open(root / "items.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(root, SMALL)
    return root


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = generate_world(tmp_path / "a", TINY)
    generate_world(tmp_path / "b", TINY)
    generate_world(tmp_path / "c", replace(TINY, seed=TINY.seed + 1))
    a, b, c = (file_hashes(tmp_path / name) for name in "abc")
    assert len(a) == 4 + first["images"]  # csv, jsonl, README, world.json and the pictures
    assert a == b
    assert a["interactions.csv"] != c["interactions.csv"]
    assert a["items.jsonl"] != c["items.jsonl"]


def test_regenerating_in_place_removes_stale_images(tmp_path):
    generate_world(tmp_path, TINY)
    (tmp_path / "images" / "9999.jpg").write_bytes(b"left over")
    summary = generate_world(tmp_path, TINY)
    assert len(list((tmp_path / "images").glob("*.jpg"))) == summary["images"]


def test_interactions_layout(world):
    header, rows = read_interactions(world)
    assert header == ["user_id", "item_id", "rating", "timestamp"]
    item_ids = {item["item_id"] for item in read_items(world)}
    times_by_user: dict[str, list[int]] = defaultdict(list)
    items_by_user: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        assert row["item_id"] in item_ids
        assert re.fullmatch(r"[1-9][0-9]*", row["user_id"]) and int(row["user_id"]) <= SMALL.num_users
        assert row["rating"] in {"1", "2", "3", "4", "5"}
        assert re.fullmatch(r"[0-9]+", row["timestamp"])
        times_by_user[row["user_id"]].append(int(row["timestamp"]))
        items_by_user[row["user_id"]].append(row["item_id"])
    assert len(times_by_user) == SMALL.num_users
    for user, times in times_by_user.items():
        assert all(earlier < later for earlier, later in zip(times, times[1:])), f"user {user}: times not strictly increasing"
        assert SMALL.min_interactions_per_user <= len(times) <= SMALL.max_interactions_per_user
        assert len(set(items_by_user[user])) == len(times), f"user {user} picked an item twice"
    all_times = [t for times in times_by_user.values() for t in times]
    assert 1_577_836_800 <= min(all_times) and max(all_times) < 1_609_459_200  # within 2020
    ratings = {row["rating"] for row in rows}
    assert {"1", "5"} <= ratings  # the scale is used, not a constant


def test_items_layout_images_and_gaps(world):
    items = read_items(world)
    assert [item["item_id"] for item in items] == [str(k) for k in range(1, SMALL.num_items + 1)]
    for item in items:
        assert set(item) == {"item_id", "title", "description", "genres", "image"}
        assert isinstance(item["title"], str) and item["title"]
        assert item["description"] is None or isinstance(item["description"], str)
        assert len(item["genres"]) == 3 and all(isinstance(g, str) for g in item["genres"])
        if item["image"] is not None:
            assert item["image"] == f"images/{item['item_id']}.jpg"
            with Image.open(world / item["image"]) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == (SMALL.image_size, SMALL.image_size)
    images_on_disk = {f"images/{p.name}" for p in (world / "images").iterdir()}
    assert images_on_disk == {item["image"] for item in items if item["image"]}
    missing_images = sum(item["image"] is None for item in items) / len(items)
    missing_descriptions = sum(item["description"] is None for item in items) / len(items)
    assert abs(missing_images - SMALL.missing_image_fraction) < 0.03
    assert abs(missing_descriptions - SMALL.missing_description_fraction) < 0.03


def test_text_and_image_carry_the_attributes(world):
    truth = json.loads((world / "world.json").read_text())["items"]
    palette = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    colour_recognised = pictures = 0
    for item in read_items(world):
        attributes = truth[item["item_id"]]
        assert item["genres"] == [attributes["colour"], attributes["shape"], attributes["pattern"]]
        for text in (item["title"], item["description"] or ""):
            words = set(re.findall(r"[a-z]+", text.lower()))
            assert not text or set(item["genres"]) <= words, text
        if item["image"]:
            # The shape colour is the palette colour with most pixels near it.
            with Image.open(world / item["image"]) as image:
                pixels = np.asarray(image, dtype=float).reshape(-1, 3)
            near = {name: int((np.linalg.norm(pixels - rgb, axis=1) < 50).sum()) for name, rgb in palette.items()}
            colour_recognised += max(near, key=near.get) == attributes["colour"]
            pictures += 1
    assert colour_recognised >= 0.95 * pictures


def test_history_of_caption_attributes_predicts_next_item(world):
    """Ranking every item by how often its title words occur in the user's history finds the
    held-out last interaction far more often than chance: the world is learnable from text."""
    items = read_items(world)
    index = {item["item_id"]: k for k, item in enumerate(items)}
    # Title words minus the "#123" id: pattern, colour and shape.
    words = [set(re.findall(r"[a-z]+", item["title"].lower())) for item in items]
    vocabulary = {word: n for n, word in enumerate(sorted(set().union(*words)))}
    features = np.zeros((len(items), len(vocabulary)))
    for k, item_words in enumerate(words):
        features[k, [vocabulary[w] for w in item_words]] = 1.0
    _, rows = read_interactions(world)
    sequences: dict[str, list[int]] = defaultdict(list)
    for row in rows:  # the file is sorted by time, so each sequence is in order
        sequences[row["user_id"]].append(index[row["item_id"]])

    hits = 0
    for sequence in sequences.values():
        history, target = sequence[:-1], sequence[-1]
        scores = features @ features[history].mean(axis=0)
        scores[history] = -np.inf  # users never pick an item twice
        hits += target in np.argsort(-scores, kind="stable")[:20]
    hit_rate = hits / len(sequences)
    random_hit_rate = 20 / SMALL.num_items
    assert hit_rate >= 3 * random_hit_rate, f"hit@20 {hit_rate:.3f} vs random {random_hit_rate:.3f}"


def test_spec_rejects_impossible_worlds():
    with pytest.raises(ValueError):
        WorldSpec(num_items=10, max_interactions_per_user=20)
    with pytest.raises(ValueError):
        WorldSpec(min_interactions_per_user=30, max_interactions_per_user=20)
    with pytest.raises(ValueError):
        WorldSpec(missing_image_fraction=1.5)


def test_grouped_picks_follow_the_per_item_distribution():
    """Picks are drawn by attribute group, then item; exactly, that is the per-item law: a user's k-th pick
    is item i with probability exp(strength x score) x popularity over the unseen items. Checked on the
    second pick (which must skip the first) of many users who share the same tastes."""
    from mmscale.build import world

    spec = WorldSpec(num_users=40_000, num_items=12, min_interactions_per_user=2, max_interactions_per_user=2,
                     sequential_fraction=0.0, noise_fraction=0.0)
    rng = np.random.default_rng(3)
    items = world._draw_items(rng, spec)
    users = world._draw_users(rng, spec)
    for weights in (users.colour_weight, users.shape_weight, users.pattern_weight):
        weights[:] = weights[0]  # everyone has user 0's tastes
    groups = world._Groups(items)
    scores = groups.scores(users)
    picks, _ = world._draw_sequences(rng, spec, items, groups, scores, progress=False)
    appeal = np.exp(spec.preference_strength * scores[0, groups.of_item]) * items.popularity
    first = appeal / appeal.sum()
    # P(second = j) = sum over first picks i != j of P(i) P(j | i unseen excluded)
    expected = np.array([sum(first[i] * appeal[j] / (appeal.sum() - appeal[i]) for i in range(12) if i != j) for j in range(12)])
    assert (picks[:, 0] != picks[:, 1]).all()
    np.testing.assert_allclose(np.bincount(picks[:, 0], minlength=12) / spec.num_users, first, atol=0.01)
    np.testing.assert_allclose(np.bincount(picks[:, 1], minlength=12) / spec.num_users, expected, atol=0.01)
