"""tools/inspect_shards.py on a tiny hand-made dataset whose counts and samples are known."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from mmscale.data import inspect as layout  # the summary and contact sheet's library

from mmscale.build.shards import BuildOptions, build_shards
from helpers.programs import load_program

NUM_USERS, NUM_ITEMS, PER_USER = 6, 8, 7
NO_IMAGE = {"3", "7"}  # "image": null
MISSING_FILE = "8"  # names an image file that does not exist
NO_TEXT = "6"  # neither title nor description
COLOURS = [(220, 40, 40), (40, 160, 60), (40, 60, 220), (230, 200, 30), (150, 40, 200), (30, 200, 200), (0, 0, 0), (255, 128, 0)]


def _load_cli() -> ModuleType:
    """tools/inspect_shards.py, to run its command line in this process."""
    return load_program("tools/inspect_shards.py")


cli = _load_cli()


def _image_size(raw_id: str) -> tuple[int, int]:
    return 20 + 2 * int(raw_id), 12 + int(raw_id)


def _write_raw(root: Path) -> None:
    """Item raw ids 1..8 (index = id - 1). User u (raw id u+1) sees items u, u+1, ... (mod 8) in time order."""
    (root / "images").mkdir(parents=True)
    with open(root / "items.jsonl", "w") as f:
        for index in range(NUM_ITEMS):
            raw_id = str(index + 1)
            record: dict = {"item_id": raw_id, "image": None if raw_id in NO_IMAGE else f"images/{raw_id}.jpg"}
            if raw_id != NO_TEXT:
                description = f"A description of item number {raw_id} " + "with many more words " * 8
                record |= {"title": f"Item {raw_id}", "description": description}
            f.write(json.dumps(record) + "\n")
            if raw_id not in NO_IMAGE and raw_id != MISSING_FILE:
                img = Image.new("RGB", _image_size(raw_id), COLOURS[index])
                img.save(root / "images" / f"{raw_id}.jpg", quality=95)
    rows = ["user_id,item_id,rating,timestamp"]
    for user in range(NUM_USERS):
        for step in range(PER_USER):
            rows.append(f"{user + 1},{(user + step) % NUM_ITEMS + 1},4,{1000 + step}")
    (root / "interactions.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    _write_raw(root / "raw")
    build_shards(root / "raw", root / "shards", BuildOptions(progress=False, workers=1))
    return root / "shards"


def test_summary_counts(shard_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(shard_dir), "--samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "users: 6 kept of 6 raw" in out
    assert "items: 8 kept of 8 raw" in out
    assert "interactions: 42 kept of 42 raw" in out
    # leave-one-out over 7 items per user: 4 train, 1 valid, 1 test each
    assert "samples: train 24, valid 6, test 6, cold 0" in out
    assert "images: 5 present, 3 missing" in out
    assert "items without text: 1" in out
    assert "cold items: 0" in out
    assert "bad input: 1\n  missing_image: 1\n    e.g. items.jsonl:8: field 'image':" in out
    assert "unknown_item" not in out  # zero kinds are left out
    assert re.search(r"^  train\s+1 shard\s+\d+\.\d KiB$", out, re.M)
    assert re.search(r"^  cold\s+0 shards\s+0 B$", out, re.M)
    assert "  min_user_interactions: 3" in out
    assert "  raw_format.text_fields: ['title', 'description']" in out


def test_samples_are_decoded(shard_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(shard_dir), "--split", "test", "--samples", "3"]) == 0
    lines = capsys.readouterr().out.split("test samples from test/test-000000.tar:\n")[1].splitlines()
    assert len([line for line in lines if line.startswith("  test")]) == 3
    # user 0 saw items 0..6: target 6 (no image) after a history of 6, of which the last 5 are shown
    assert lines[0] == "  test0000000000: user 0  history 6 [..., 1, 2, 3, 4, 5]  target 6 (raw id 7)"
    assert lines[2] == "    image: none"
    # user 1: target 7, whose image file is missing
    assert lines[3] == "  test0000000001: user 1  history 6 [..., 2, 3, 4, 5, 6]  target 7 (raw id 8)"
    assert lines[5] == "    image: none"
    # user 2 saw items 2..7, 0: target 0, with text and image
    assert lines[6] == "  test0000000002: user 2  history 6 [..., 3, 4, 5, 6, 7]  target 0 (raw id 1)"
    assert lines[7].startswith("    text: Item 1. A description of item number 1 with many more words")
    assert lines[7].endswith(" ...") and len(lines[7]) <= len("    text: ") + layout.TEXT_CHARS
    assert lines[8] == "    image: JPEG {}x{}".format(*_image_size("1"))


def test_sample_without_text(shard_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(shard_dir), "--split", "valid", "--samples", "1"]) == 0
    lines = capsys.readouterr().out.split("valid samples from valid/valid-000000.tar:\n")[1].splitlines()
    assert lines == [
        "  valid0000000000: user 0  history 5 [0, 1, 2, 3, 4]  target 5 (raw id 6)",
        "    text: (none)",
        "    image: JPEG {}x{}".format(*_image_size("6")),
    ]


def test_empty_split(shard_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(shard_dir), "--split", "cold"]) == 0
    assert f"no cold samples in {shard_dir}" in capsys.readouterr().out


def test_contact_sheet(shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    assert cli.main([str(shard_dir), "--samples", "0", "--contact-sheet", str(out), "--items", "100"]) == 0
    sheet = Image.open(out)
    assert sheet.format == "PNG"
    # all 8 items, 6 per row: 2 rows, in index order
    assert sheet.size == (6 * layout.TILE_WIDTH, 2 * layout.TILE_HEIGHT)
    sheet = sheet.convert("RGB")
    centre_y = layout.IMAGE_HEIGHT // 2
    for item in range(NUM_ITEMS):
        left, top = (item % 6) * layout.TILE_WIDTH, (item // 6) * layout.TILE_HEIGHT
        tile = sheet.crop((left, top, left + layout.TILE_WIDTH, top + layout.TILE_HEIGHT))
        lo, hi = zip(*tile.getextrema())
        assert max(hi) - min(lo) > 100, f"tile {item} is one colour"
        text_area = tile.crop((0, layout.IMAGE_HEIGHT, layout.TILE_WIDTH, layout.TILE_HEIGHT))
        assert min(text_area.convert("L").getextrema()) < 100, f"tile {item} has no caption"
        raw_id = str(item + 1)
        # the image area's centre: a grey "no image" tile or the item's own colour (JPEG: roughly)
        pixel = tile.getpixel((layout.TILE_WIDTH // 4, centre_y))
        expected = layout.NO_IMAGE_GREY if raw_id in NO_IMAGE or raw_id == MISSING_FILE else COLOURS[item]
        assert all(abs(a - b) <= 12 for a, b in zip(pixel, expected)), (item, pixel, expected)


def test_contact_sheet_is_seeded(shard_dir: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert cli.main([str(shard_dir), "--samples", "0", "--contact-sheet", str(tmp_path / f"{name}.png"), "--items", "3", "--seed", str(seed)]) == 0
        runs[name] = (tmp_path / f"{name}.png").read_bytes()
    assert runs["a"] == runs["b"]
    assert Image.open(tmp_path / "a.png").size == (3 * layout.TILE_WIDTH, layout.TILE_HEIGHT)
    picks = layout.pick_items(NUM_ITEMS, 3, 1)
    assert picks == sorted(set(picks)) and len(picks) == 3 and all(0 <= i < NUM_ITEMS for i in picks)
    assert picks != layout.pick_items(NUM_ITEMS, 3, 2)
    assert runs["a"] != runs["c"]


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-shards"
    assert cli.main([str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and len(err.splitlines()) == 1


def test_not_a_shard_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    assert cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and len(err.splitlines()) == 1
