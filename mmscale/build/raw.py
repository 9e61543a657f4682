"""Readers for the raw dataset layout, with a ledger of every bad input they meet.

The layout (documented in docs/data-format.md):
    DIR/interactions.csv   user, item, timestamp and optionally rating columns
    DIR/items.jsonl        one item per line: id, text fields, optional image path
    DIR/<image paths>      relative to DIR

Nothing is silent: each rejected row or image is counted by kind in the ledger, with
its file, line and field; in strict mode the first one raises instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from PIL import Image

# Kinds of bad input, each counted separately in the manifest.
BAD_KINDS = (
    "malformed_row",  # wrong number of columns, an unclosed quote, a field over the size limit / not valid JSON
    "bad_encoding",  # a line that is not valid UTF-8
    "bad_user_id",
    "bad_item_id",
    "bad_timestamp",  # unparsable, or outside 1970-2100 (milliseconds given as seconds, say)
    "bad_rating",  # unparsable, or outside the rating range
    "duplicate_item",  # an item id listed twice in items.jsonl (the first wins)
    "duplicate_interaction",  # the same (user, item, timestamp) again (the first wins)
    "unknown_item",  # an interaction naming an item that items.jsonl lacks
    "bad_text_field",  # a text field that is neither a string, a number nor a list of them (the field is dropped)
    "bad_image_field",  # an image field that is not a path string (the item stays, without image)
    "image_outside_dataset",  # an image path that leaves the dataset folder (absolute, ../, a symlink out)
    "image_not_a_file",  # a folder, FIFO, device...: never read
    "image_too_large",  # over the byte or pixel cap: never decoded
    "missing_image",  # items.jsonl names an image file that does not exist
    "unreadable_image",  # the file exists but does not decode completely
)
EXAMPLES_PER_KIND = 5
LATEST_TIMESTAMP = 4102444800.0  # 2100-01-01: a later one is almost surely milliseconds, not seconds


class BadInputError(ValueError):
    """Raised in strict mode on the first bad input; the message names file, line and field."""


@dataclass
class Ledger:
    """Counts bad input by kind and keeps the first few places of each."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def record(self, kind: str, file: str | Path, line: int, fld: str, message: str) -> None:
        assert kind in BAD_KINDS, kind
        where = f"{file}:{line}: field '{fld}': {message}"
        if self.strict:
            raise BadInputError(f"{kind}: {where}")
        self.counts[kind] += 1
        places = self.examples.setdefault(kind, [])
        if len(places) < EXAMPLES_PER_KIND:
            places.append(where)

    def as_dict(self) -> dict:
        return {
            "counts": {kind: self.counts.get(kind, 0) for kind in BAD_KINDS},
            "examples": dict(sorted(self.examples.items())),
        }

    def report(self) -> str:
        if not self.counts:
            return "bad input: none"
        lines = [f"bad input: {sum(self.counts.values())} rows/files skipped"]
        for kind in BAD_KINDS:
            if self.counts.get(kind):
                lines.append(f"  {kind}: {self.counts[kind]}")
                lines.extend(f"    e.g. {place}" for place in self.examples.get(kind, []))
        return "\n".join(lines)


@dataclass(frozen=True)
class RawFormat:
    """Where the raw files are and what their columns and fields are called."""

    interactions_file: str = "interactions.csv"
    items_file: str = "items.jsonl"
    user_column: str = "user_id"
    item_column: str = "item_id"
    time_column: str = "timestamp"
    rating_column: str | None = "rating"  # None: the data has no ratings
    rating_range: tuple[float, float] = (0.0, 1e6)  # a rating outside is bad input
    item_id_field: str = "item_id"
    text_fields: tuple[str, ...] = ("title", "description")
    image_field: str = "image"
    delimiter: str = ","


@dataclass
class RawItem:
    raw_id: str
    text: str
    image_path: Path | None  # None: the item has no image
    line: int


@dataclass
class RawInteraction:
    user: str
    item: str
    timestamp: float
    rating: float | None
    line: int


def _text_of(record: dict, fields: tuple[str, ...]) -> tuple[str, list[str]]:
    """Joins the configured text fields; lists (genres, cast) become comma-separated. Returns the text and the
    fields left out because they are neither a string, a number nor a list of those."""
    parts, bad = [], []
    for name in fields:
        value = record.get(name)
        if value is None or value == "" or value == []:
            continue
        scalar = (str, int, float)
        if isinstance(value, list) and all(isinstance(v, scalar) and not isinstance(v, bool) for v in value):
            value = ", ".join(str(v) for v in value)
        elif not isinstance(value, scalar) or isinstance(value, bool):
            bad.append(name)
            continue
        parts.append(str(value).strip())
    # "Title. Description." -- a part that already ends a sentence keeps its own punctuation.
    return " ".join(p if p[-1] in ".!?" else p + "." for p in parts if p), bad


def _lines(path: Path, ledger: Ledger) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; a line that is not UTF-8 is bad input, its neighbours are read."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                ledger.record("bad_encoding", path, line_no, "-", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")


def read_items(root: Path, fmt: RawFormat, ledger: Ledger) -> dict[str, RawItem]:
    """Reads items.jsonl; returns raw id -> item, in file order."""
    path = root / fmt.items_file
    items: dict[str, RawItem] = {}
    for line_no, line in _lines(path, ledger):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            ledger.record("malformed_row", path, line_no, "-", f"not a JSON object ({str(e)[:200]})")
            continue
        raw_id = record.get(fmt.item_id_field)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
            ledger.record("bad_item_id", path, line_no, fmt.item_id_field, f"bad id {str(raw_id)[:100]!r}")
            continue
        raw_id = str(raw_id).strip()
        if raw_id in items:
            ledger.record("duplicate_item", path, line_no, fmt.item_id_field, f"item {raw_id} listed again")
            continue
        text, bad_fields = _text_of(record, fmt.text_fields)
        for name in bad_fields:
            ledger.record("bad_text_field", path, line_no, name, f"a {type(record[name]).__name__}, not text (the field is left out)")
        image = record.get(fmt.image_field)
        if image is not None and not isinstance(image, str):
            ledger.record("bad_image_field", path, line_no, fmt.image_field, f"{str(image)[:100]!r} is not a path (the item has no image)")
            image = None
        items[raw_id] = RawItem(raw_id, text, (root / image) if image else None, line_no)
    if not items:
        raise BadInputError(f"{path}: no item could be read (empty, or every line is bad input)")
    return items


def _parse_timestamp(value: str) -> float:
    """Unix seconds (int or float) or an ISO-8601 date/time."""
    try:
        ts = float(value)
    except ValueError:
        when = datetime.fromisoformat(value.strip())
        if when.tzinfo is None:  # naive times are UTC, so a build does not depend on the machine's zone
            when = when.replace(tzinfo=timezone.utc)
        ts = when.timestamp()
    if not math.isfinite(ts):
        raise ValueError("not finite")
    if not 0 <= ts < LATEST_TIMESTAMP:
        raise ValueError(f"{ts:.0f} s is outside 1970-2100 (milliseconds? timestamps are Unix seconds)")
    return ts


def read_interactions(root: Path, fmt: RawFormat, known_items: dict[str, RawItem], ledger: Ledger) -> list[RawInteraction]:
    """Reads interactions.csv, one record per line, rejecting rows one by one (a bad row, an unclosed quote
    included, never takes its neighbours)."""
    path = root / fmt.interactions_file
    rows: list[RawInteraction] = []
    seen: set[tuple[str, str, float]] = set()
    lines = _lines(path, ledger)
    header = next((_split_row(text, fmt) for _, text in lines), None)
    if not header:
        raise BadInputError(f"{path}:1: empty file, expected a header row")
    header = [h.strip() for h in header]
    wanted = [fmt.user_column, fmt.item_column, fmt.time_column] + ([fmt.rating_column] if fmt.rating_column else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise BadInputError(f"{path}:1: header {header} lacks column(s) {missing} (set them with --*-column flags)")
    col = {name: header.index(name) for name in wanted}
    low, high = fmt.rating_range
    for line_no, text in lines:
        if not text.strip():
            continue
        try:
            row = _split_row(text, fmt)
        except csv.Error as e:
            ledger.record("malformed_row", path, line_no, "-", f"{e} (one record per line)")
            continue
        if len(row) != len(header):
            ledger.record("malformed_row", path, line_no, "-", f"{len(row)} columns, header has {len(header)}")
            continue
        user = row[col[fmt.user_column]].strip()
        item = row[col[fmt.item_column]].strip()
        if not user:
            ledger.record("bad_user_id", path, line_no, fmt.user_column, "empty")
            continue
        if not item:
            ledger.record("bad_item_id", path, line_no, fmt.item_column, "empty")
            continue
        try:
            timestamp = _parse_timestamp(row[col[fmt.time_column]])
        except ValueError as e:
            ledger.record("bad_timestamp", path, line_no, fmt.time_column, f"{row[col[fmt.time_column]][:50]!r}: {e}")
            continue
        rating = None
        if fmt.rating_column:
            try:
                rating = float(row[col[fmt.rating_column]])
            except ValueError:
                rating = math.nan
            if not low <= rating <= high:  # NaN fails too
                ledger.record("bad_rating", path, line_no, fmt.rating_column,
                              f"{row[col[fmt.rating_column]][:50]!r} is not a number in [{low:g}, {high:g}]")
                continue
        if item not in known_items:
            ledger.record("unknown_item", path, line_no, fmt.item_column, f"item {item[:100]} is not in {fmt.items_file}")
            continue
        if (user, item, timestamp) in seen:
            ledger.record("duplicate_interaction", path, line_no, "-", f"user {user[:100]}, item {item[:100]} at {timestamp:g} again")
            continue
        seen.add((user, item, timestamp))
        rows.append(RawInteraction(user, item, timestamp, rating, line_no))
    if not rows:
        raise BadInputError(f"{path}: no interaction could be read (header only, or every row is bad input)")
    return rows


def _split_row(text: str, fmt: RawFormat) -> list[str]:
    """One CSV record from one line; csv.Error for an unclosed quote or a field over csv's size limit."""
    return next(csv.reader([text], delimiter=fmt.delimiter, strict=True), [])


IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


def load_image_bytes(path: Path, root: Path, max_bytes: int, max_pixels: int) -> tuple[bytes | None, str, str]:
    """Reads and fully decodes an image (a truncated file fails here, not mid-training), if it is a regular file
    inside the dataset folder `root` and under the byte and pixel caps.

    Returns (bytes, extension, "") or (None, "", "kind:reason"). Runs in worker processes.
    """
    resolved = path.resolve()  # follows symlinks: one that leaves the folder is caught here
    if not resolved.is_relative_to(root.resolve()):
        return None, "", f"image_outside_dataset:resolves to {resolved}, outside {root}"
    try:
        info = resolved.stat()
    except FileNotFoundError:
        return None, "", "missing_image"
    except OSError as e:
        return None, "", f"unreadable_image:{e.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return None, "", "image_not_a_file:not a regular file (a folder, FIFO or device is never read)"
    if info.st_size > max_bytes:
        return None, "", f"image_too_large:{info.st_size} bytes, over the cap of {max_bytes}"
    try:
        data = resolved.read_bytes()
    except OSError as e:
        return None, "", f"unreadable_image:{e.strerror}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:  # checked from the header, before any decoding
                return None, "", f"image_too_large:{img.width}x{img.height} pixels, over the cap of {max_pixels}"
            img.load()  # verify() alone misses truncated JPEGs
            ext = IMAGE_EXTENSIONS.get(img.format or "", "")
        if not ext:
            return None, "", f"unreadable_image:unsupported format {img.format}"
    except Exception as e:  # PIL raises many types for corrupt data
        # no object addresses in the message: the same input must give the same manifest bytes
        return None, "", f"unreadable_image:{type(e).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', str(e))}"
    return data, ext, ""
