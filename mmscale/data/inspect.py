"""Looking inside a shard folder: a manifest summary, a few decoded samples, a contact sheet of item images and texts
(tools/inspect_shards.py is the command line)."""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
import textwrap
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..config import dotted_items
from .format import IMAGE_KEYS, SPLITS, shard_paths
from .item_store import ItemStore

HISTORY_TAIL = 5  # history items shown per sample (the most recent)
TEXT_CHARS = 100  # sample texts are shortened to about this many characters
# Contact sheet layout, in pixels: each tile is an image area above TEXT_LINES lines of text.
SHEET_COLUMNS = 6
TILE_WIDTH = 160
IMAGE_HEIGHT = 160
TEXT_LINES = 3
LINE_HEIGHT = 14
MARGIN = 4
TILE_HEIGHT = IMAGE_HEIGHT + TEXT_LINES * LINE_HEIGHT + MARGIN
NO_IMAGE_GREY = (200, 200, 200)


def _size(num_bytes: int) -> str:
    value, unit = float(num_bytes), 0
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{num_bytes} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def _in_split_order(names: Iterable[str]) -> list[str]:
    """Items first, then the splits in their usual order (the manifest stores keys sorted)."""
    order = ("items", *SPLITS)
    return sorted(names, key=lambda name: (order.index(name) if name in order else len(order), name))


def summary_lines(shard_dir: Path, manifest: dict) -> list[str]:
    counts = manifest["counts"]
    raw, kept = counts["raw"], counts["kept"]
    lines = [f"shard folder {shard_dir} ({manifest['format']})"]
    for what in ("users", "items", "interactions"):
        lines.append(f"{what}: {kept[what]} kept of {raw[what]} raw")
    samples = counts["samples"]
    lines.append("samples: " + ", ".join(f"{split} {samples[split]}" for split in _in_split_order(samples)))
    lines.append(f"images: {counts['images_present']} present, {counts['images_missing']} missing")
    lines.append(f"items without text: {counts['items_without_text']}")
    lines.append(f"cold items: {counts['cold_items']}")

    bad = {kind: n for kind, n in manifest["bad_input"]["counts"].items() if n}
    lines.append(f"bad input: {sum(bad.values())}" if bad else "bad input: none")
    for kind, n in bad.items():
        lines.append(f"  {kind}: {n}")
        lines.extend(f"    e.g. {place}" for place in manifest["bad_input"]["examples"].get(kind, []))

    lines.append("shards:")
    for split in _in_split_order(manifest["shards"]):
        shards = manifest["shards"][split]
        total = sum(s["bytes"] for s in shards)
        lines.append(f"  {split:<6} {len(shards):>4} shard{'' if len(shards) == 1 else 's'}  {_size(total):>10}")
    lines.append("build options:")
    lines.extend(f"  {key}: {value!r}" for key, value in dotted_items(manifest["options"]))
    return lines


def read_samples(shard: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yields the samples (key, {extension: bytes}) of one tar shard in order; a sample's members are adjacent."""
    key, members = None, {}
    with tarfile.open(shard, "r:*") as tar:  # .tar or .tar.gz
        for info in tar:
            if not info.isfile():
                continue
            name_key, _, ext = info.name.partition(".")
            if name_key != key:
                if key is not None:
                    yield key, members
                key, members = name_key, {}
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def _describe_image(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return f"{img.format} {img.width}x{img.height}"


def sample_lines(shard_dir: Path, manifest: dict, split: str, n: int) -> list[str]:
    paths = shard_paths(shard_dir, manifest, split)
    if not paths:
        return [f"no {split} samples in {shard_dir}"]
    item_ids = json.loads((shard_dir / "item_ids.json").read_text())
    store = ItemStore(shard_dir, manifest)
    lines = [f"{split} samples from {Path(paths[0]).relative_to(shard_dir)}:"]
    for key, members in islice(read_samples(paths[0]), n):
        header = json.loads(members["json"])
        history, target = header["history"], header["target"]
        tail = ", ".join(str(i) for i in history[-HISTORY_TAIL:])
        ellipsis = "..., " if len(history) > HISTORY_TAIL else ""
        lines.append(
            f"  {key}: user {header['user']}  history {len(history)} [{ellipsis}{tail}]"
            f"  target {target} (raw id {item_ids[target]})"
        )
        if "txt" in members:  # the target's content is embedded in the sample
            text = members["txt"].decode()
            image = next((members[ext] for ext in IMAGE_KEYS if ext in members), None)
        else:  # built with --no-target-content: the header only; the item store has the rest
            text = store.text(target)
            stored = store.image(target)
            image = stored[0] if stored is not None else None
        lines.append(f"    text: {textwrap.shorten(text, TEXT_CHARS, placeholder=' ...') or '(none)'}")
        lines.append(f"    image: {_describe_image(image) if image is not None else 'none'}")
    return lines


def pick_items(num_items: int, k: int, seed: int) -> list[int]:
    """k distinct item indices (all items if there are fewer), seeded, in index order."""
    return sorted(random.Random(seed).sample(range(num_items), min(k, num_items)))


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """The first words of `text` greedily wrapped into at most `max_lines` lines of `width` pixels."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        if len(lines) == max_lines:
            return lines
        while font.getlength(word) > width:  # a word wider than the tile is cut
            word = word[:-1]
        line = word
    if line and len(lines) < max_lines:
        lines.append(line)
    return lines


def item_tile(store: ItemStore, item: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, caption: str | None = None,
              outline: str | None = None) -> Image.Image:
    """An item's image above its caption (default: #index) and the start of its text; `outline`: a frame colour."""
    tile = Image.new("RGB", (TILE_WIDTH, TILE_HEIGHT), "white")
    draw = ImageDraw.Draw(tile)
    area = (TILE_WIDTH - 2 * MARGIN, IMAGE_HEIGHT - MARGIN)
    stored = store.image(item)
    if stored is None:
        draw.rectangle((MARGIN, MARGIN, MARGIN + area[0] - 1, MARGIN + area[1] - 1), fill=NO_IMAGE_GREY)
        draw.text((TILE_WIDTH / 2, MARGIN + area[1] / 2), "no image", fill="black", font=font, anchor="mm")
    else:
        with Image.open(io.BytesIO(stored[0])) as img:
            thumb = ImageOps.contain(img.convert("RGB"), area)  # small images are scaled up too
        tile.paste(thumb, (MARGIN + (area[0] - thumb.width) // 2, MARGIN + (area[1] - thumb.height) // 2))
    text_lines = [caption or f"#{item}"] + _wrap(store.text(item), font, TILE_WIDTH - 2 * MARGIN, TEXT_LINES - 1)
    for row, line in enumerate(text_lines):
        draw.text((MARGIN, IMAGE_HEIGHT + row * LINE_HEIGHT), line, fill="black", font=font)
    if outline:
        draw.rectangle((0, 0, TILE_WIDTH - 1, TILE_HEIGHT - 1), outline=outline, width=MARGIN)
    return tile


def contact_sheet(shard_dir: Path, manifest: dict, k: int, seed: int) -> tuple[Image.Image, list[int]]:
    """A grid of SHEET_COLUMNS tiles per row for k seeded items; returns (image, items shown)."""
    store = ItemStore(shard_dir, manifest)
    items = pick_items(len(store), k, seed)
    columns = min(SHEET_COLUMNS, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / columns))
    sheet = Image.new("RGB", (columns * TILE_WIDTH, rows * TILE_HEIGHT), "white")
    font = ImageFont.load_default()
    for n, item in enumerate(items):
        sheet.paste(item_tile(store, item, font), ((n % columns) * TILE_WIDTH, (n // columns) * TILE_HEIGHT))
    return sheet, items
