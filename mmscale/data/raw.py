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
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

# Kinds of bad input, each counted separately in the manifest.
BAD_KINDS = (
    "malformed_row",  # wrong number of columns / not valid JSON
    "bad_user_id",
    "bad_item_id",
    "bad_timestamp",
    "bad_rating",
    "duplicate_item",  # an item id listed twice in items.jsonl (the first wins)
    "unknown_item",  # an interaction naming an item that items.jsonl lacks
    "missing_image",  # items.jsonl names an image file that does not exist
    "unreadable_image",  # the file exists but does not decode completely
)
EXAMPLES_PER_KIND = 5


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


def _text_of(record: dict, fields: tuple[str, ...]) -> str:
    """Joins the configured text fields; lists (genres, cast) become comma-separated."""
    parts = []
    for name in fields:
        value = record.get(name)
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        parts.append(str(value).strip())
    # "Title. Description." -- a part that already ends a sentence keeps its own punctuation.
    return " ".join(p if p[-1] in ".!?" else p + "." for p in parts if p)


def read_items(root: Path, fmt: RawFormat, ledger: Ledger) -> dict[str, RawItem]:
    """Reads items.jsonl; returns raw id -> item, in file order."""
    path = root / fmt.items_file
    items: dict[str, RawItem] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                ledger.record("malformed_row", path, line_no, "-", f"not a JSON object ({e})")
                continue
            raw_id = record.get(fmt.item_id_field)
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
                ledger.record("bad_item_id", path, line_no, fmt.item_id_field, f"bad id {raw_id!r}")
                continue
            raw_id = str(raw_id).strip()
            if raw_id in items:
                ledger.record("duplicate_item", path, line_no, fmt.item_id_field, f"item {raw_id} listed again")
                continue
            image = record.get(fmt.image_field)
            image_path = (root / image) if isinstance(image, str) and image else None
            items[raw_id] = RawItem(raw_id, _text_of(record, fmt.text_fields), image_path, line_no)
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
    return ts


def read_interactions(root: Path, fmt: RawFormat, known_items: dict[str, RawItem], ledger: Ledger) -> list[RawInteraction]:
    """Reads interactions.csv, rejecting rows one by one (a bad row never takes its neighbours)."""
    path = root / fmt.interactions_file
    rows: list[RawInteraction] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=fmt.delimiter)
        header = next(reader, None)
        if header is None:
            raise BadInputError(f"{path}:1: empty file, expected a header row")
        header = [h.strip() for h in header]
        wanted = [fmt.user_column, fmt.item_column, fmt.time_column] + ([fmt.rating_column] if fmt.rating_column else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise BadInputError(f"{path}:1: header {header} lacks column(s) {missing} (set them with --*-column flags)")
        col = {name: header.index(name) for name in wanted}
        for row in reader:
            line_no = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
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
            except ValueError:
                ledger.record("bad_timestamp", path, line_no, fmt.time_column, f"cannot parse {row[col[fmt.time_column]]!r}")
                continue
            rating = None
            if fmt.rating_column:
                try:
                    rating = float(row[col[fmt.rating_column]])
                    if not math.isfinite(rating):
                        raise ValueError
                except ValueError:
                    ledger.record("bad_rating", path, line_no, fmt.rating_column, f"cannot parse {row[col[fmt.rating_column]]!r}")
                    continue
            if item not in known_items:
                ledger.record("unknown_item", path, line_no, fmt.item_column, f"item {item} is not in {fmt.items_file}")
                continue
            rows.append(RawInteraction(user, item, timestamp, rating, line_no))
    return rows


IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


def load_image_bytes(path: Path) -> tuple[bytes | None, str, str]:
    """Reads and fully decodes an image (a truncated file fails here, not mid-training).

    Returns (bytes, extension, "") or (None, "", reason). Runs in worker processes.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "", "missing_image"
    except OSError as e:
        return None, "", f"unreadable_image:{e}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # verify() alone misses truncated JPEGs
            ext = IMAGE_EXTENSIONS.get(img.format or "", "")
        if not ext:
            return None, "", f"unreadable_image:unsupported format {img.format}"
    except Exception as e:  # PIL raises many types for corrupt data
        return None, "", f"unreadable_image:{type(e).__name__}: {e}"
    return data, ext, ""
