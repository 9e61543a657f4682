"""The shard builder: counts, the leave-one-out split, content round trips, id maps, cold items,
filters, the bad-input ledger (and --strict), determinism and safe replacement of the output."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from mmscale.data.format import MANIFEST, ShardFormatError, load_manifest
from mmscale.data.item_store import ItemStore
from mmscale.build.raw import BAD_KINDS
from mmscale.build.shards import BuildOptions, build_shards
from helpers.programs import load_program

REPO = Path(__file__).resolve().parents[1]
MAX_HISTORY = 50


def natural(raw_id: str):
    return (0, int(raw_id), "") if raw_id.isdigit() else (1, 0, raw_id)


def composed_text(record: dict) -> str:
    """Title and description as sentences: a part already ending in . ! or ? keeps its punctuation (the builder's rule)."""
    parts = [str(record[f]).strip() for f in ("title", "description") if record.get(f) not in (None, "", [])]
    return " ".join(p if p.endswith((".", "!", "?")) else p + "." for p in parts)


def expected_splits(sequences: dict[str, list[str]], user_index: dict, item_index: dict, cold: set[int] = frozenset(), max_history: int = MAX_HISTORY):
    """Leave-one-out by time recomputed from the raw sequences (raw ids mapped to indices)."""
    out = {s: [] for s in ("train", "valid", "test", "cold")}
    seen = {}
    for raw_user, raw_items in sequences.items():
        u = user_index[raw_user]
        warm: list[int] = []
        for item in (item_index[i] for i in raw_items):
            if item in cold:
                out["cold"].append((u, item, tuple(warm[-max_history:] if warm else [])))
            else:
                warm.append(item)
        n = len(warm)
        hist = lambda p: tuple(warm[max(0, p - max_history) : p])
        if n >= 1:
            out["test"].append((u, warm[n - 1], hist(n - 1)))
        if n >= 2:
            out["valid"].append((u, warm[n - 2], hist(n - 2)))
        out["train"].extend((u, warm[p], hist(p)) for p in range(1, n - 2))
        seen[u] = set(warm[: max(n - 2, 0)])
    return out, seen


def key(t):
    """A compact multiset key for a (user, target, history) tuple."""
    return t[0], t[1], np.asarray(t[2], np.int32).tobytes()


def all_files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest without its build record (time, memory and disk of that build)."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = json.loads(files[MANIFEST])
    assert set(manifest.pop("build")) == {"seconds", "peak_rss_mb", "temp_disk_mb", "writers", "nodes", "executor", "stage_seconds",
                                          "stage_peak_rss_mb"}
    files[MANIFEST] = json.dumps(manifest, sort_keys=True).encode()
    return files


def without_build(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "build"}


def run_cli(argv: list[str]) -> int:
    return load_program("tools/build_shards.py").main(argv)


TINY_OPTS = dict(progress=False, workers=1)
ML_SHARD_BYTES = 64 * 2**20  # conftest builds ml100k with shard_size_mb=64


# =================================================================================================
# ml100k-mm (real data, built once per session)
# =================================================================================================
@pytest.fixture(scope="module")
def ml_raw(ml100k_raw, raw_parser):
    rows, items = raw_parser.parse(ml100k_raw)
    return rows, items, raw_parser.sequences(rows)


@pytest.fixture(scope="module")
def ml_maps(ml100k_shards):
    out, _ = ml100k_shards
    user_ids = json.loads((out / "user_ids.json").read_text())
    item_ids = json.loads((out / "item_ids.json").read_text())
    return user_ids, item_ids, {u: i for i, u in enumerate(user_ids)}, {it: i for i, it in enumerate(item_ids)}


@pytest.fixture(scope="module")
def ml_train(ml100k_shards, shard_reader):
    out, manifest = ml100k_shards
    return shard_reader.tuples(shard_reader.split(out, manifest, "train", only=("json",)))


@pytest.mark.realdata
def test_ml100k_manifest_counts(ml100k_shards, ml100k_raw, ml_raw):
    out, manifest = ml100k_shards
    rows, items, sequences = ml_raw
    assert manifest == load_manifest(out) | {"bad_input_report": manifest["bad_input_report"]}
    counts = manifest["counts"]
    assert counts["raw"] == {"users": 943, "items": 1682, "interactions": 100_000}
    assert counts["kept"] == {"users": 943, "items": 1682, "interactions": 100_000}
    # the same numbers recomputed from the raw files
    assert (len(sequences), len(items), len(rows)) == (943, 1682, 100_000)
    with_image = [r for r in items.values() if r.get("image") and (ml100k_raw / r["image"]).is_file()]
    assert counts["images_present"] == len(with_image) == 1643
    assert counts["images_missing"] == 39
    assert counts["samples"] == {"train": 100_000 - 3 * 943, "valid": 943, "test": 943, "cold": 0}
    assert (manifest["num_users"], manifest["num_items"], manifest["max_history"]) == (943, 1682, MAX_HISTORY)
    assert sum(manifest["bad_input"]["counts"].values()) == 0
    # several train shards, each listed with its real sample count and size
    assert len(manifest["shards"]["train"]) > 3
    for split, shards in manifest["shards"].items():
        assert sum(s["samples"] for s in shards) == (counts["samples"][split] if split != "items" else 1682)
        for s in shards:
            assert (out / s["path"]).stat().st_size == s["bytes"]
            # bounded by shard_size_mb, plus the tar end-of-archive blocks and record padding
            assert s["bytes"] <= ML_SHARD_BYTES + 2 * 512 + tarfile.RECORDSIZE or s["samples"] == 1


@pytest.mark.realdata
def test_ml100k_splits_follow_leave_one_out_by_time(ml100k_shards, ml_raw, ml_maps, ml_train, shard_reader):
    out, manifest = ml100k_shards
    _, _, sequences = ml_raw
    _, _, user_index, item_index = ml_maps
    expected, _ = expected_splits(sequences, user_index, item_index)
    for split in ("valid", "test"):
        got = shard_reader.tuples(shard_reader.split(out, manifest, split, only=("json",)))
        assert len(got) == 943
        assert sorted(got) == sorted(expected[split]), split
    # spot checks by hand for a few users: test = last item, valid = second to last
    for raw_user in ("1", "196", "943"):
        seq = sequences[raw_user]
        u = user_index[raw_user]
        test = [t for t in expected["test"] if t[0] == u]
        assert test == [(u, item_index[seq[-1]], tuple(item_index[i] for i in seq[-1 - MAX_HISTORY : -1]))]
    # train: the multiset of (user, target, history) equals the rule exactly
    assert len(ml_train) == 100_000 - 3 * 943
    assert Counter(map(key, ml_train)) == Counter(map(key, expected["train"]))
    assert all(len(h) <= MAX_HISTORY for _, _, h in ml_train)
    assert max(len(h) for _, _, h in ml_train) == MAX_HISTORY
    # written in a mixed order, not user by user
    first_users = [u for u, _, _ in ml_train[:200]]
    assert len(set(first_users)) > 50


@pytest.mark.realdata
def test_ml100k_id_maps(ml100k_shards, ml_raw, ml_maps, shard_reader):
    out, manifest = ml100k_shards
    _, items, sequences = ml_raw
    user_ids, item_ids, _, _ = ml_maps
    assert sorted(user_ids, key=natural) == user_ids and set(user_ids) == set(sequences)
    assert sorted(item_ids, key=natural) == item_ids and set(item_ids) == set(items)
    assert len(set(user_ids)) == 943 and len(set(item_ids)) == 1682
    # each item sample names its raw id, and its text is that raw item's
    for sample in shard_reader.split(out, manifest, "items", only=("json", "txt")):
        header = json.loads(sample["json"])
        assert sample["__key__"] == f"{header['item']:09d}"
        assert header["raw_id"] == item_ids[header["item"]]
        assert sample["txt"].decode() == composed_text(items[header["raw_id"]])
    # a test sample maps back to the raw user's last interaction
    tests = shard_reader.tuples(shard_reader.split(out, manifest, "test", only=("json",)))
    for u, target, _ in tests:
        assert item_ids[target] == sequences[user_ids[u]][-1]


@pytest.mark.realdata
def test_ml100k_seen_is_each_users_training_items(ml100k_shards, ml_raw, ml_maps, ml_train):
    out, _ = ml100k_shards
    _, _, sequences = ml_raw
    _, _, user_index, item_index = ml_maps
    _, expected_seen = expected_splits(sequences, user_index, item_index)
    seen = np.load(out / "seen.npz")
    indptr, items = seen["indptr"], seen["items"]
    assert len(indptr) == 943 + 1 and indptr[0] == 0 and indptr[-1] == len(items)
    from_train = defaultdict(set)
    for u, target, history in ml_train:
        from_train[u].add(target)
        from_train[u].update(history)
    for u in range(943):
        row = items[indptr[u] : indptr[u + 1]].tolist()
        assert len(row) == len(set(row)), f"user {u}: duplicate seen items"
        assert set(row) == expected_seen[u], f"user {u}"
        assert set(row) == from_train[u], f"user {u}: seen differs from the items of its training samples"


@pytest.mark.realdata
def test_ml100k_item_content_round_trips(ml100k_shards, ml100k_raw, ml_raw, ml_maps, shard_reader):
    out, manifest = ml100k_shards
    _, items, _ = ml_raw
    _, item_ids, _, _ = ml_maps
    store = ItemStore(out)
    assert len(store) == 1682
    in_shards = {s["__key__"]: s for s in shard_reader.split(out, manifest, "items")}
    without_image = 0
    for i, raw_id in enumerate(item_ids):
        record = items[raw_id]
        path = ml100k_raw / record["image"] if record.get("image") else None
        sample = in_shards[f"{i:09d}"]
        header = json.loads(sample["json"])
        if path is not None and path.is_file():
            raw_bytes = path.read_bytes()
            data, ext = store.image(i)
            assert bytes(data) == raw_bytes and ext == "jpg", raw_id
            assert sample["jpg"] == raw_bytes
            assert store.has_image(i) and header["has_image"]
        else:
            without_image += 1
            assert store.image(i) is None and not store.has_image(i) and not header["has_image"]
            assert not set(sample) & {"jpg", "png", "webp", "gif", "bmp"}
        text = composed_text(record)
        assert store.text(i) == text == sample["txt"].decode(), raw_id
        if record.get("description"):
            title = record["title"].strip()
            assert text.startswith((title if title.endswith((".", "!", "?")) else title + ".") + " ")
    assert without_image == 39
    toy = item_ids.index("1")
    assert store.text(toy).startswith("Toy Story. A cowboy doll is profoundly threatened")


@pytest.mark.realdata
def test_ml100k_samples_carry_their_targets_content(ml100k_shards, ml100k_raw, ml_raw, ml_maps, shard_reader):
    out, manifest = ml100k_shards
    _, items, _ = ml_raw
    _, item_ids, _, _ = ml_maps
    for split in ("valid", "test"):
        for sample in shard_reader.split(out, manifest, split):
            target = json.loads(sample["json"])["target"]
            record = items[item_ids[target]]
            assert sample["txt"].decode() == composed_text(record)
            path = ml100k_raw / record["image"] if record.get("image") else None
            if path is not None and path.is_file():
                assert sample["jpg"] == path.read_bytes()
            else:
                assert "jpg" not in sample
    # and a train shard (the first one) too
    first = out / manifest["shards"]["train"][0]["path"]
    for sample in shard_reader.tar(first)[:300]:
        record = items[item_ids[json.loads(sample["json"])["target"]]]
        assert sample["txt"].decode() == composed_text(record)
        if "jpg" in sample:
            assert sample["jpg"] == (ml100k_raw / record["image"]).read_bytes()


@pytest.mark.realdata
def test_ml100k_cold_items_never_reach_training(ml100k_raw, ml_raw, shard_reader, tmp_path):
    """10% cold items: absent from every train/valid/test target and history; cold samples target them."""
    _, _, sequences = ml_raw
    out = tmp_path / "cold"
    manifest = build_shards(ml100k_raw, out, BuildOptions(progress=False, cold_item_fraction=0.1, embed_target_content=False))
    cold = set(manifest["cold_items"])
    assert len(cold) == manifest["counts"]["cold_items"] == round(0.1 * 1682)
    user_ids = json.loads((out / "user_ids.json").read_text())
    item_ids = json.loads((out / "item_ids.json").read_text())
    user_index = {u: i for i, u in enumerate(user_ids)}
    item_index = {it: i for i, it in enumerate(item_ids)}
    expected, expected_seen = expected_splits(sequences, user_index, item_index, cold)
    got = {s: shard_reader.tuples(shard_reader.split(out, manifest, s, only=("json",))) for s in ("train", "valid", "test", "cold")}
    for split in ("train", "valid", "test"):
        for user, target, history in got[split]:
            assert target not in cold, (split, user, target)
            assert not cold & set(history), (split, user)
    for user, target, history in got["cold"]:
        assert target in cold
        assert not cold & set(history)
    cold_interactions = sum(1 for seq in sequences.values() for it in seq if item_index[it] in cold)
    assert len(got["cold"]) == manifest["counts"]["samples"]["cold"] == cold_interactions
    assert {t for _, t, _ in got["cold"]} == cold  # every cold item was interacted with
    for split in got:
        assert Counter(map(key, got[split])) == Counter(map(key, expected[split])), split
    seen = np.load(out / "seen.npz")
    assert not cold & set(seen["items"].tolist())
    for u in range(len(user_ids)):
        assert set(seen["items"][seen["indptr"][u] : seen["indptr"][u + 1]].tolist()) == expected_seen[u]
    shutil.rmtree(out)  # ~120 MB; kept only when the test fails


# =================================================================================================
# Filters on the tiny dataset
# =================================================================================================
def user_sequences_from_shards(out: Path, shard_reader) -> dict[str, list[str]]:
    """Each kept user's whole kept sequence, in raw ids: the test sample's history + its target."""
    manifest = load_manifest(out)
    user_ids = json.loads((out / "user_ids.json").read_text())
    item_ids = json.loads((out / "item_ids.json").read_text())
    return {
        user_ids[u]: [item_ids[i] for i in (*history, target)]
        for u, target, history in shard_reader.tuples(shard_reader.split(out, manifest, "test", only=("json",)))
    }


def test_min_rating_drops_low_ratings(tiny_raw, raw_parser, shard_reader, tmp_path):
    raw = tiny_raw(num_users=6, num_items=8, lengths=[6] * 6)
    for row in raw.rows:
        if row[0] == "6":  # user 6 rated only two items 3 or higher: dropped by the k-core (3)
            row[2] = "5" if row[1] in {raw.rows[-1][1], raw.rows[-2][1]} else "1"
    root = raw.write(tmp_path / "raw")
    rows, _ = raw_parser.parse(root)
    high = [r for r in rows if r[4] >= 3]
    by_user = raw_parser.sequences(high)
    assert len(by_user["6"]) == 2 and all(len(s) >= 3 for u, s in by_user.items() if u != "6")
    expected = {u: s for u, s in by_user.items() if u != "6"}

    manifest = build_shards(root, tmp_path / "out", BuildOptions(min_rating=3, **TINY_OPTS))
    assert manifest["counts"]["raw"]["interactions"] == 36
    assert manifest["counts"]["kept"]["interactions"] == sum(map(len, expected.values())) < len(high) < 36
    assert manifest["counts"]["kept"]["users"] == 5
    assert user_sequences_from_shards(tmp_path / "out", shard_reader) == expected
    # no rating filter: everything kept
    manifest = build_shards(root, tmp_path / "all", BuildOptions(**TINY_OPTS))
    assert manifest["counts"]["kept"]["interactions"] == 36


def k_core_raw(tiny_raw):
    """Users 1, 2: items 1-4; user 3: items 1, 2, 5; user 4: items 5, 6; item 7: nobody.

    With users >= 3 and items >= 2: round 1 drops user 4 (and item 6), which leaves item 5 with
    one interaction; round 2 drops item 5, which leaves user 3 with two; round 3 drops user 3."""
    raw = tiny_raw(num_users=4, num_items=7)
    plan = {"1": ["1", "2", "3", "4"], "2": ["4", "3", "2", "1"], "3": ["1", "2", "5"], "4": ["5", "6"]}
    raw.rows = [[u, it, "4", str(1000 * int(u) + k)] for u, its in plan.items() for k, it in enumerate(its)]
    return raw, plan


def test_k_core_filter_is_iterative(tiny_raw, shard_reader, tmp_path):
    raw, plan = k_core_raw(tiny_raw)
    root = raw.write(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = build_shards(root, out, BuildOptions(min_user_interactions=3, min_item_interactions=2, **TINY_OPTS))
    assert json.loads((out / "user_ids.json").read_text()) == ["1", "2"]
    assert json.loads((out / "item_ids.json").read_text()) == ["1", "2", "3", "4"]
    assert manifest["counts"]["kept"] == {"users": 2, "items": 4, "interactions": 8}
    assert user_sequences_from_shards(out, shard_reader) == {"1": plan["1"], "2": plan["2"]}
    assert len(ItemStore(out)) == 4


def test_k_core_users_only_keeps_the_whole_catalogue(tiny_raw, shard_reader, tmp_path):
    raw, plan = k_core_raw(tiny_raw)
    root = raw.write(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = build_shards(root, out, BuildOptions(min_user_interactions=3, **TINY_OPTS))
    assert json.loads((out / "user_ids.json").read_text()) == ["1", "2", "3"]
    # min_item_interactions=0: every listed item stays in the catalogue, even never-seen ones
    assert json.loads((out / "item_ids.json").read_text()) == [str(i) for i in range(1, 8)]
    assert manifest["counts"]["kept"] == {"users": 3, "items": 7, "interactions": 11}
    assert user_sequences_from_shards(out, shard_reader) == {u: plan[u] for u in ("1", "2", "3")}


@pytest.mark.parametrize("min_item", [0, 2])
def test_the_k_core_runs_in_a_memory_limit_two_joins_at_once_ran_out_of(tmp_path, min_item):
    """The k-core with one semi join a statement: 3M interactions (80K users, 300K items) within 24 MB, where one
    statement joining on users and items at once ran out of memory (as it ran out of 512 MB on 100M interactions)."""
    from mmscale.build.raw import Ledger, RawFormat
    from mmscale.build.relational import Relations

    n, users, items = 3_000_000, 80_000, 300_000
    relations = Relations(tmp_path, RawFormat(), tmp_path, Ledger(), memory_limit_mb=24, threads=2)
    try:
        relations.db.execute(f"CREATE TABLE rows AS SELECT r AS line, 'u' || ((r * 2654435761) % {users}) AS user, "
                             f"'i' || ((r * 40503) % {items}) AS item, r::DOUBLE AS ts, 4.0 AS rating FROM range({n}) t(r)")
        relations.filter(None, 3, min_item)  # every user has 37 or 38 interactions and every item 10
        assert relations.kept_interactions() == n
    finally:
        relations.close()


def test_the_history_text_is_written_without_a_python_string_per_item_of_a_chunk(tmp_path):
    """warm_text.bin for 1M warm items (one export chunk) in under 40 bytes of traced heap an item (24 now: numpy's
    arrays), where a Python string for every item of the chunk took 122 (600 MiB above the split's own peak on the
    10M world); the text is each item's decimal digits and ", "."""
    import tracemalloc

    from mmscale.build.raw import Ledger, RawFormat
    from mmscale.build.relational import Relations

    n, users = 1_000_000, 1_000
    relations = Relations(tmp_path, RawFormat(), tmp_path, Ledger(), memory_limit_mb=256, threads=2)
    try:
        relations.db.execute(f"CREATE TABLE warm AS SELECT r % {users} AS u, r // {users} AS pos, (r * 7919) % 2000003 AS i "
                             f"FROM range({n}) t(r)")
        relations.db.execute("CREATE TABLE warm_count AS SELECT u, count(*) AS n FROM warm GROUP BY u")
        tracemalloc.start()
        try:
            relations.write_sequences(users)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        relations.close()
    indptr = np.load(tmp_path / "warm_indptr.npy")
    items = [(r * 7919) % 2000003 for u in range(users) for r in range(u, n, users)]
    assert indptr.tolist() == list(range(0, n + 1, n // users))
    assert (tmp_path / "warm_text.bin").read_bytes() == "".join(f"{i}, " for i in items).encode()
    digits = np.load(tmp_path / "warm_digits.npy")
    assert digits[-1] == sum(len(str(i)) for i in items) and len(digits) == n + 1
    assert peak < 40 * n, f"{peak / n:.0f} bytes of Python heap an item"


# =================================================================================================
# Planted bad input
# =================================================================================================
BROKEN_JSON = '{"item_id": "99", "title": "Broken'
SHORT_ROW = "3,4,5"  # three columns, the header has four
BAD_TIME = ["2", "3", "4", "yesterday"]
UNKNOWN = ["1", "999", "4", "1000999"]


def plant(raw, *kinds: str) -> dict[str, tuple[str, int, str]]:
    """Plants the named faults between valid neighbours; returns kind -> (file, line, field)."""
    places = {}
    if "unreadable_image" in kinds:  # item 2's JPEG cut in half
        data = raw.images["images/2.jpg"]
        raw.images["images/2.jpg"] = data[: len(data) // 2]
    if "missing_image" in kinds:  # item 4 names a file that is not there
        raw.items[3]["image"] = "images/missing-4.jpg"
    if "malformed_jsonl" in kinds:
        raw.items.insert(5, BROKEN_JSON)
    if "malformed_csv" in kinds:
        raw.rows.insert(7, SHORT_ROW)
    if "bad_timestamp" in kinds:
        raw.rows.insert(12, BAD_TIME)
    if "unknown_item" in kinds:
        raw.rows.insert(3, UNKNOWN)
    # line numbers after every insertion
    if "unreadable_image" in kinds:
        places["unreadable_image"] = ("items.jsonl", raw.item_line("2"), "image")
    if "missing_image" in kinds:
        places["missing_image"] = ("items.jsonl", raw.item_line("4"), "image")
    if "malformed_jsonl" in kinds:
        places["malformed_jsonl"] = ("items.jsonl", raw.items.index(BROKEN_JSON) + 1, "-")
    for kind, planted, fld in (("malformed_csv", SHORT_ROW, "-"), ("bad_timestamp", BAD_TIME, "timestamp"), ("unknown_item", UNKNOWN, "item_id")):
        if kind in kinds:
            index = next(i for i, r in enumerate(raw.rows) if r is planted)
            places[kind] = ("interactions.csv", raw.row_line(index), fld)
    return places


ALL_FAULTS = ("unreadable_image", "missing_image", "malformed_jsonl", "malformed_csv", "bad_timestamp", "unknown_item")
LEDGER_KIND = {"malformed_jsonl": "malformed_row", "malformed_csv": "malformed_row"}


def test_bad_input_is_counted_with_file_and_line_and_neighbours_kept(tiny_raw, shard_reader, tmp_path, capsys):
    raw = tiny_raw(num_users=6, num_items=8, lengths=[5] * 6)
    places = plant(raw, *ALL_FAULTS)
    root = raw.write(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = build_shards(root, out, BuildOptions(**TINY_OPTS))

    counts = manifest["bad_input"]["counts"]
    assert set(counts) == set(BAD_KINDS)
    assert counts == {k: 0 for k in BAD_KINDS} | {"malformed_row": 2, "bad_timestamp": 1, "unknown_item": 1, "missing_image": 1, "unreadable_image": 1}
    assert load_manifest(out)["bad_input"] == manifest["bad_input"]
    examples = manifest["bad_input"]["examples"]
    for fault, (file, line, fld) in places.items():
        kind = LEDGER_KIND.get(fault, fault)
        where = f"{file}:{line}: field '{fld}'"
        assert any(where in e for e in examples[kind]), (fault, where, examples[kind])
    assert any("missing-4.jpg" in e for e in examples["missing_image"])
    assert any("2.jpg" in e for e in examples["unreadable_image"])

    # the valid neighbours are all kept: 30 clean rows, 8 items (the broken line is not an item)
    assert manifest["counts"]["raw"] == {"users": 6, "items": 8, "interactions": 30}
    assert manifest["counts"]["kept"] == {"users": 6, "items": 8, "interactions": 30}
    assert manifest["counts"]["samples"] == {"train": 6 * 2, "valid": 6, "test": 6, "cold": 0}
    # items 2 and 4 are still items, with their text but without an image
    item_ids = json.loads((out / "item_ids.json").read_text())
    assert item_ids == [str(i) for i in range(1, 9)]
    store = ItemStore(out)
    assert manifest["counts"]["images_present"] == 6 and manifest["counts"]["images_missing"] == 2
    for i, raw_id in enumerate(item_ids):
        assert store.text(i) == f"Item {raw_id}. Description of item {raw_id}."
        if raw_id in ("2", "4"):
            assert store.image(i) is None and not store.has_image(i)
        else:
            assert bytes(store.image(i)[0]) == raw.images[f"images/{raw_id}.jpg"]
    headers = {json.loads(x["json"])["raw_id"]: json.loads(x["json"]) for x in shard_reader.split(out, manifest, "items")}
    assert [r for r, h in sorted(headers.items()) if not h["has_image"]] == ["2", "4"]
    assert "unreadable_image: 1" in manifest["bad_input_report"]

    # the CLI (not strict) builds the same and prints the report
    assert run_cli([str(root), str(tmp_path / "cli"), "--quiet", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bad input: 6 rows/files skipped" in printed and "malformed_row: 2" in printed
    assert all_files(tmp_path / "cli") == all_files(out)


@pytest.mark.parametrize("fault", ALL_FAULTS)
def test_strict_cli_exits_2_naming_file_line_and_field(fault, tiny_raw, tmp_path, capsys):
    raw = tiny_raw(num_users=6, num_items=8)
    (file, line, fld), = plant(raw, fault).values()
    root = raw.write(tmp_path / "raw")
    out = tmp_path / "out"
    assert run_cli([str(root), str(out), "--strict", "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{file}:{line}: field '{fld}'" in err, err
    assert LEDGER_KIND.get(fault, fault) in err
    # nothing half-built is left behind
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    # without --strict the same input builds
    assert run_cli([str(root), str(out), "--quiet", "--workers", "1"]) == 0
    assert sum(load_manifest(out)["bad_input"]["counts"].values()) == 1


def test_strict_reports_the_first_bad_input(tiny_raw, tmp_path, capsys):
    raw = tiny_raw(num_users=6, num_items=8)
    places = plant(raw, *ALL_FAULTS)
    root = raw.write(tmp_path / "raw")
    assert run_cli([str(root), str(tmp_path / "out"), "--strict", "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    file, line, fld = places["malformed_jsonl"]  # items.jsonl is read first
    assert f"items.jsonl:{line}: field '-'" in err and err.count("\n") == 1


# =================================================================================================
# Determinism and replacing the output folder
# =================================================================================================
def tiny_for_output(tiny_raw):
    return tiny_raw(num_users=12, num_items=10, lengths=[4 + u % 6 for u in range(12)], no_image=(5,))


def test_two_builds_are_byte_identical(tiny_raw, tmp_path):
    root = tiny_for_output(tiny_raw).write(tmp_path / "raw")
    opts = BuildOptions(shard_size_mb=0.02, cold_item_fraction=0.2, **TINY_OPTS)
    first = build_shards(root, tmp_path / "a", opts)
    second = build_shards(root, tmp_path / "elsewhere" / "b", opts)
    assert without_build(first) == without_build(second)
    assert len(first["shards"]["train"]) > 1 and first["counts"]["samples"]["cold"] > 0
    a, b = all_files(tmp_path / "a"), all_files(tmp_path / "elsewhere" / "b")
    assert sorted(a) == sorted(b)
    assert {"manifest.json", "seen.npz", "user_ids.json", "item_ids.json", "items/index.npz"} <= set(a)
    for name in a:
        assert a[name] == b[name], name


def test_rebuild_in_place_replaces_everything_and_leaves_nothing_behind(tiny_raw, tmp_path):
    root = tiny_for_output(tiny_raw).write(tmp_path / "raw")
    out = tmp_path / "out"
    small = build_shards(root, out, BuildOptions(shard_size_mb=0.02, **TINY_OPTS))
    assert len(small["shards"]["train"]) > 1
    big = build_shards(root, out, BuildOptions(**TINY_OPTS))  # same folder, fewer and bigger shards
    assert len(big["shards"]["train"]) == 1
    listed = {s["path"] for shards in big["shards"].values() for s in shards}
    fixed = {MANIFEST, "seen.npz", "user_ids.json", "item_ids.json", "items/index.npz"}
    assert set(all_files(out)) == listed | fixed  # no stale shard of the first build
    assert load_manifest(out)["options"]["shard_size_mb"] == 256.0
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))]
    assert leftovers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out", "raw"]  # the build lock stays, empty of builds
    # the same as a fresh build with those options
    build_shards(root, tmp_path / "fresh", BuildOptions(**TINY_OPTS))
    assert all_files(out) == all_files(tmp_path / "fresh")


def test_refuses_to_replace_a_folder_that_is_not_a_shard_folder(tiny_raw, tmp_path, capsys):
    root = tiny_for_output(tiny_raw).write(tmp_path / "raw")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ShardFormatError, match="not a shard folder"):
        build_shards(root, out, BuildOptions(**TINY_OPTS))
    assert run_cli([str(root), str(out), "--quiet", "--workers", "1"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "raw"]
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert build_shards(root, tmp_path / "empty", BuildOptions(**TINY_OPTS))["num_users"] == 12


# =================================================================================================
# Parallel and distributed writers: the same bytes from 1 or N processes, and from a 2-node Ray cluster
# =================================================================================================
@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A generated world with a cold split, several shards per split and a few bad rows, built by one process."""
    from mmscale.build.world import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("world-build")
    raw = root / "raw"
    generate_world(raw, WorldSpec(num_users=150, num_items=120, min_interactions_per_user=5, max_interactions_per_user=30))
    with open(raw / "interactions.csv", "a") as f:
        f.write("u9,does-not-exist,1000,4\nu10,,1000,4\n")
    opts = dict(shard_size_mb=0.05, cold_item_fraction=0.1, progress=False)
    manifest = build_shards(raw, root / "one", BuildOptions(workers=1, **opts))
    return raw, root / "one", manifest, opts


def test_output_does_not_depend_on_the_number_of_writers_or_the_memory_limit(small_world, tmp_path):
    raw, one, manifest, opts = small_world
    assert len(manifest["shards"]["train"]) > 3 and len(manifest["shards"]["items"]) > 1 and manifest["counts"]["samples"]["cold"] > 0
    assert manifest["bad_input"]["counts"]["unknown_item"] == 1 and manifest["bad_input"]["counts"]["bad_item_id"] == 1
    two = build_shards(raw, tmp_path / "two", BuildOptions(workers=2, memory_limit_mb=128, **opts))
    assert (manifest["build"]["writers"], two["build"]["writers"]) == (1, 2)
    assert all_files(tmp_path / "two") == all_files(one)


def test_the_manifest_records_each_stage_peak_rss(small_world):
    """Which stage holds the build process's memory at its peak (its RSS sampled from /proc during the build)."""
    build = small_world[2]["build"]
    assert list(build["stage_peak_rss_mb"]) == list(build["stage_seconds"]) == ["scan", "relate", "images", "split", "items", "samples"]
    assert all(0 < peak <= build["peak_rss_mb"] for peak in build["stage_peak_rss_mb"].values()), build


def test_the_temporary_disk_counts_files_that_come_and_go_within_a_stage(tiny_raw, tmp_path, monkeypatch):
    """The work folder's peak (the scanned rows before DuckDB loads them, its spill) can fall inside a stage: it is
    sampled through the stages, not only at their ends."""
    import time
    from mmscale.build import shards
    from mmscale.build.relational import Relations

    filter_rows = Relations.filter

    def filter_beside_a_passing_file(self, *args):
        passing = self.work / "passing.bin"
        passing.write_bytes(bytes(48 << 20))
        time.sleep(0.5)
        passing.unlink()
        return filter_rows(self, *args)

    monkeypatch.setattr(Relations, "filter", filter_beside_a_passing_file)
    monkeypatch.setattr(shards, "DISK_SAMPLE_SECONDS", 0.05)
    manifest = build_shards(tiny_raw().write(tmp_path / "raw"), tmp_path / "out", BuildOptions(progress=False, workers=1))
    assert manifest["build"]["temp_disk_mb"] >= 48, manifest["build"]


def test_a_build_that_cannot_make_its_staging_folder_says_so(small_world, tmp_path, monkeypatch):
    from mmscale.build.shards import BuildError

    raw, _, _, opts = small_world

    mkdir = Path.mkdir

    def refuse_staging(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_staging)
    with pytest.raises(BuildError, match=r"Permission denied.*out is unchanged"):
        build_shards(raw, tmp_path / "out", BuildOptions(workers=1, **opts))


def test_planning_and_writing_in_small_pieces_give_the_same_bytes(small_world, tmp_path, monkeypatch):
    from mmscale.build import relational, writers

    raw, one, manifest, opts = small_world
    monkeypatch.setattr(writers, "RELEASE_EVERY", 3)  # histories read across many drops of the sequence files' pages
    monkeypatch.setattr(relational, "PLAN_ROWS", 7)  # shards planned across many chunks of samples
    build_shards(raw, tmp_path / "chunked", BuildOptions(workers=1, **opts))
    assert all_files(tmp_path / "chunked") == all_files(one)


def _mapped_file_rss_kib() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssFile:")).split()[1])


def test_a_shared_map_leaves_this_process_when_released(tmp_path):
    """What bounds a sample writer's memory: pages read through the map count in its RSS until released."""
    from mmscale.build.writers import SharedMap

    np.save(tmp_path / "values.npy", np.arange(8 * 2**20 // 8, dtype=np.int64))  # 8 MiB
    mapped = SharedMap(tmp_path / "values.npy")
    values = mapped.npy()
    before = _mapped_file_rss_kib()
    assert int(values[::512].sum()) == int(np.arange(0, 2**20, 512).sum())  # one value per 4 KiB page
    touched = _mapped_file_rss_kib()
    mapped.release()
    assert touched - before > 6 * 1024 and _mapped_file_rss_kib() - before < 1024, (before, touched, _mapped_file_rss_kib())
    assert int(values[-1]) == 2**20 - 1 and len(values) == 2**20  # still readable after a release
    (tmp_path / "empty").touch()
    assert SharedMap(tmp_path / "empty").data == b""  # an empty sequence file: every history is empty


def test_a_plan_only_build_lists_the_shards_a_build_writes_and_writes_nothing(small_world, tmp_path, capsys):
    raw, one, manifest, opts = small_world
    out = tmp_path / "out"
    shutil.copytree(one, out)
    plan = build_shards(raw, out, BuildOptions(workers=2, plan_only=True, **opts))
    # the ledger, the counts and every shard's path, samples and bytes, as the build wrote them
    assert without_build(plan) == without_build(manifest)
    assert all_files(out) == all_files(one)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]
    argv = [str(raw), str(tmp_path / "new"), "--plan-only", "--quiet", "--shard-size-mb", "0.05", "--cold-item-fraction", "0.1"]
    assert run_cli(argv) == 0
    assert not (tmp_path / "new").exists()
    printed = capsys.readouterr().out
    train_bytes = sum(s["bytes"] for s in manifest["shards"]["train"])
    assert f"train {len(manifest['shards']['train'])} ({train_bytes / 1e9:.2f} GB)" in printed and "is unchanged" in printed
    assert re.search(r"stages: scan [\d.]+ s \([\d,]+ MiB\), relate ", printed), printed


def test_ids_only_samples_are_gzip_compressed_tars_with_the_same_samples(small_world, shard_reader, tmp_path, capsys):
    """A tar member takes at least 1 KiB, several times an ids-only sample's JSON: those shards are written through
    gzip, deterministically (1 or 2 writers, the same bytes), planned by their tar bytes, and read by the stream."""
    from mmscale.data.stream import InteractionStream

    raw, one, manifest, opts = small_world
    built = {w: build_shards(raw, tmp_path / f"ids-{w}", BuildOptions(workers=w, embed_target_content=False, **opts)) for w in (1, 2)}
    ids = tmp_path / "ids-2"
    assert all_files(tmp_path / "ids-1") == all_files(ids)
    for split in ("train", "valid", "test", "cold"):
        embedded = shard_reader.split(one, manifest, split, only=("json",))
        assert shard_reader.split(ids, built[2], split) == [{"__key__": s["__key__"], "json": s["json"]} for s in embedded], split
        shards = built[2]["shards"][split]
        assert all(s["path"].endswith(".tar.gz") for s in shards)
        on_disk = sum((ids / s["path"]).stat().st_size for s in shards)
        assert on_disk == sum(s["bytes"] for s in shards)
        assert sum(s["tar_bytes"] for s in shards) == sum(len(gzip.decompress((ids / s["path"]).read_bytes())) for s in shards)
        assert on_disk < 200 * sum(s["samples"] for s in shards), f"{split}: {on_disk} bytes"  # 1 KiB a sample as tar
    assert built[2]["shards"]["items"] == manifest["shards"]["items"]  # read at offsets: never compressed

    plan = build_shards(raw, tmp_path / "plan", BuildOptions(plan_only=True, embed_target_content=False, **opts))
    for split, shards in built[2]["shards"].items():
        assert plan["shards"][split] == [{k: v for k, v in s.items() if k != "bytes" or split == "items"} for s in shards]
    assert run_cli([str(raw), str(tmp_path / "new"), "--plan-only", "--quiet", "--shard-size-mb", "0.05", "--cold-item-fraction", "0.1",
                    "--no-target-content"]) == 0
    tar_gb = sum(s["tar_bytes"] for s in built[2]["shards"]["train"]) / 1e9
    assert f"train {len(built[2]['shards']['train'])} ({tar_gb:.2f} GB of tar, less once compressed)" in capsys.readouterr().out

    def read(shards: Path) -> list[tuple]:  # every sample, in order of content (the two builds cut shards elsewhere)
        stream = InteractionStream(shards, "train", 64, None, resampled=False, shuffle_buffer=0, content=False)
        return sorted((u, t, tuple(h)) for b in stream.batches() for u, t, h in zip(b.users.tolist(), b.targets.tolist(), b.history.tolist()))

    samples = read(ids)
    assert samples == read(one) and len(samples) == manifest["counts"]["samples"]["train"]


def test_train_order_is_the_md5_of_seed_user_and_position(small_world, shard_reader):
    """The documented train order, which any tool can reproduce: by MD5("seed:user:position") read little-endian."""
    _, one, manifest, _ = small_world
    samples = shard_reader.tuples(shard_reader.split(one, manifest, "train", only=("json",)))
    keys = [(user, len(history)) for user, _, history in samples]  # at most 30 per user: the history is every earlier item
    assert max(position for _, position in keys) < manifest["max_history"]
    seed = manifest["options"]["seed"]

    def digest(user: int, position: int) -> int:
        return int.from_bytes(hashlib.md5(f"{seed}:{user}:{position}".encode()).digest(), "little")

    assert keys == sorted(keys, key=lambda key: (digest(*key), *key)) and len(set(keys)) == len(keys) > 1000


def test_a_two_node_ray_cluster_writes_the_same_bytes(small_world, ml100k_raw, ml100k_shards, tmp_path):
    """The writers as Ray tasks on a local 2-node cluster (one CPU each, so both nodes get tasks), on the generated
    world and on ml100k-mm, against the builds of one local process pool."""
    from ray.cluster_utils import Cluster

    raw, one, _, opts = small_world
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        world = build_shards(raw, tmp_path / "world", BuildOptions(ray_address=cluster.address, **opts))
        ml_out, ml_manifest = ml100k_shards
        ml = build_shards(ml100k_raw, tmp_path / "ml100k", BuildOptions(ray_address=cluster.address, progress=False,
                                                                          shard_size_mb=ml_manifest["options"]["shard_size_mb"]))
    finally:
        cluster.shutdown()
    for built in (world, ml):
        assert (built["build"]["executor"], built["build"]["nodes"], built["build"]["writers"]) == ("ray", 2, 2)
    assert all_files(tmp_path / "world") == all_files(one)
    assert all_files(tmp_path / "ml100k") == all_files(ml_out)


def test_shard_writer_writes_the_bytes_tarfile_writes(tmp_path):
    """The writer's own USTAR headers against tarfile's, member sizes around block edges included."""
    from mmscale.build.writers import ShardTask, ShardWriter

    samples = [(b"train%010d" % k, {b"json": b"{}" * k, b"txt": bytes(range(256)) * (k % 5), b"jpg": b"\xff" * (BLOCK_EDGES[k % 6])})
               for k in range(40)]
    writer = ShardWriter(tmp_path / "ours.tar")
    for key, members in samples:
        writer.write(key, members)
    writer.close(ShardTask("train", 0, 0, len(samples), writer.offset))
    with tarfile.open(tmp_path / "theirs.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key.decode()}.{ext.decode()}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "theirs.tar").read_bytes()
    compressed = ShardWriter(tmp_path / "ours.tar.gz", compressed=True)
    for key, members in samples:
        compressed.write(key, members)
    compressed.close(ShardTask("train", 0, 0, len(samples), compressed.offset, compressed=True))
    packed = (tmp_path / "ours.tar.gz").read_bytes()
    assert gzip.decompress(packed) == (tmp_path / "theirs.tar").read_bytes()
    assert packed[4:8] == bytes(4) and not packed[3] & 0x08  # no time and no file name: the same bytes on any machine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.tar", "ours.tar.gz", "theirs.tar"]  # no NAME.tmp left
    with pytest.raises(RuntimeError, match="plan"):
        ShardWriter(tmp_path / "short.tar").close(ShardTask("train", 0, 0, 1, 512))


BLOCK_EDGES = (0, 1, 511, 512, 513, 10 * 2**20 + 3)


@pytest.mark.parametrize("block", [1, 7, 4 << 20])
def test_lines_are_read_a_block_at_a_time_as_one_at_a_time(block, tmp_path, monkeypatch):
    """Decoding a block at once gives each line, its number and its bad-encoding report as reading line by line does:
    blocks that cut lines (and lines longer than a block), CRLF, blank lines, a bad byte, no final newline."""
    from mmscale.build import raw

    data = b"u,i,t\r\nalpha,1,2\n\n\xff\xfebad,1,2\r\n" + b"long" * 40 + b",1,2\nb\xc3\xa9ta,3,4\r\r\nlast,5,6"
    path = tmp_path / "interactions.csv"
    path.write_bytes(data)
    expected, reports = [], []
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            expected.append((number, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError:
            reports.append(f"{path}:{number}:")
    monkeypatch.setattr(raw, "LINE_BLOCK", block)
    for parts in (1, 3):
        seen, ledger = [], raw.Ledger()
        for start, end, first in raw.line_ranges(path, parts):
            seen += raw._lines(path, ledger, start, end, first)
        assert seen == expected
        assert ledger.counts == {"bad_encoding": 1} and ledger.examples["bad_encoding"][0].startswith(reports[0])


def test_a_catalogue_drawn_all_cold_builds_cold_samples_with_empty_histories(tmp_path, shard_reader):
    """One item, every interaction with it, and a cold fraction that draws it: no warm item at all, so the warm items'
    text is empty (a file no writer can map) and every cold sample's history is []."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "items.jsonl").write_text('{"item_id": "1", "title": "one"}\n{"item_id": "2", "title": "two"}\n')
    (raw / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n" + "".join(
        f"{user},1,{t},5\n" for user, t in (("a", 1), ("a", 2), ("a", 3), ("b", 4), ("b", 5), ("b", 6))))
    manifest = build_shards(raw, tmp_path / "out", BuildOptions(cold_item_fraction=0.6, progress=False))
    assert manifest["counts"]["samples"] == {"train": 0, "valid": 0, "test": 0, "cold": 6}
    cold = shard_reader.tuples(shard_reader.split(tmp_path / "out", manifest, "cold"))
    assert cold == [(0, 0, ())] * 3 + [(1, 0, ())] * 3
