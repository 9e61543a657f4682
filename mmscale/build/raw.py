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
import os
import re
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

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

    def merge(self, other: "Ledger") -> None:
        """Adds another ledger's counts and examples after this one's (ledgers of consecutive ranges merge in file order)."""
        self.counts.update(other.counts)
        for kind, places in other.examples.items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(places[: EXAMPLES_PER_KIND - len(mine)])

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
        if not _valid_unicode(str(value)):
            bad.append(name)
            continue
        parts.append(str(value).strip())
    # "Title. Description." -- a part that already ends a sentence keeps its own punctuation.
    return " ".join(p if p[-1] in ".!?" else p + "." for p in parts if p), bad


def line_ranges(path: Path, parts: int, skip_lines: int = 0) -> list[tuple[int, int, int]]:
    """Cuts a file into about `parts` byte ranges that start and end on line boundaries, after its first
    `skip_lines` lines. Returns (start, end, number of the range's first line); the line numbers come from one
    pass counting newlines, so ranges scanned apart still name true lines."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        for _ in range(skip_lines):
            f.readline()
        begin = f.tell()
        cuts = [begin]
        for k in range(1, parts):
            f.seek(max(begin, begin + (size - begin) * k // parts - 1))
            f.readline()  # to the start of the next line
            if cuts[-1] < f.tell() < size:
                cuts.append(f.tell())
        cuts.append(size)
        ranges, line = [], skip_lines + 1
        for start, end in zip(cuts, cuts[1:]):
            ranges.append((start, end, line))
            f.seek(start)
            remaining = end - start
            while remaining:
                block = f.read(min(remaining, 1 << 24))
                line += block.count(b"\n")
                remaining -= len(block)
    return ranges


LINE_BLOCK = 4 << 20  # bytes read and decoded at once


def _lines(path: Path, ledger: Ledger, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line in bytes [start, end), which start and end on line boundaries; a line that is
    not UTF-8 is bad input, its neighbours are read. Decoded a block at a time: a block decodes exactly when each of
    its lines does (no UTF-8 sequence holds a newline byte)."""
    with open(path, "rb") as f:
        f.seek(start)
        left = (os.fstat(f.fileno()).st_size if end is None else end) - start
        line_no, pending = first_line, []  # the start of a line that goes on in the next block
        while left > 0:
            block = f.read(min(left, LINE_BLOCK))
            if not block:
                break
            left -= len(block)
            cut = block.rfind(b"\n") + 1 if left > 0 else len(block)  # whole lines now, the rest with the next block
            if not cut:  # a line longer than a block: gathered, not copied again with every block
                pending.append(block)
                continue
            block, pending = b"".join([*pending, block[:cut]]), [block[cut:]]
            try:
                lines, decoded = block.decode("utf-8").split("\n"), True
            except UnicodeDecodeError:  # then line by line, so a bad line is reported in its place among the others
                lines, decoded = block.split(b"\n"), False
            if not lines[-1]:
                lines.pop()  # nothing after the last newline
            for k, line in enumerate(lines, line_no):
                if decoded:
                    yield k, line.rstrip("\r")
                    continue
                try:
                    yield k, line.decode("utf-8").rstrip("\r")
                except UnicodeDecodeError as e:
                    ledger.record("bad_encoding", path, k, "-", f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
            line_no += len(lines)


def _valid_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (a JSON escape such as \\ud800), which has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scan_items(path: Path, fmt: RawFormat, start: int, end: int, first_line: int, out: Path, strict: bool) -> Ledger:
    """Parses items.jsonl lines in bytes [start, end) and writes one JSON record per readable item to `out`:
    line, id, text, image (the path as written) and the field problems to report if the item is kept (a
    duplicate's are not). Returns the ledger of the lines it rejected. Runs in worker processes."""
    ledger = Ledger(strict=strict)
    with open(out, "w", encoding="utf-8") as sink:
        for line_no, line in _lines(path, ledger, start, end, first_line):
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
            if (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == ""
                    or not _valid_unicode(str(raw_id))):
                ledger.record("bad_item_id", path, line_no, fmt.item_id_field, f"bad id {str(raw_id)[:100]!r}")
                continue
            text, bad_fields = _text_of(record, fmt.text_fields)
            problems = [("bad_text_field", name, f"a {type(record[name]).__name__}, not text (the field is left out)") for name in bad_fields]
            image = record.get(fmt.image_field)
            if image is not None and (not isinstance(image, str) or not _valid_unicode(image)):
                problems.append(("bad_image_field", fmt.image_field, f"{str(image)[:100]!r} is not a path (the item has no image)"))
                image = None
            sink.write(json.dumps({"line": line_no, "id": str(raw_id).strip(), "text": text, "image": image or None,
                                   "problems": json.dumps(problems)}) + "\n")
    return ledger


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


def interaction_columns(path: Path, fmt: RawFormat) -> tuple[list[str], dict[str, int]]:
    """The header of interactions.csv and the index of each column the build reads, or a named error."""
    ledger = Ledger(strict=True)
    header = next((_split_row(text, fmt) for _, text in _lines(path, ledger)), None)
    if not header:
        raise BadInputError(f"{path}:1: empty file, expected a header row")
    header = [h.strip() for h in header]
    wanted = [fmt.user_column, fmt.item_column, fmt.time_column] + ([fmt.rating_column] if fmt.rating_column else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise BadInputError(f"{path}:1: header {header} lacks column(s) {missing} (set them with --*-column flags)")
    return header, {name: header.index(name) for name in wanted}


def scan_interactions(path: Path, fmt: RawFormat, start: int, end: int, first_line: int, out: Path, strict: bool) -> Ledger:
    """Checks interactions.csv lines in bytes [start, end) one by one (a bad row, an unclosed quote included, never
    takes its neighbours) and writes each readable row to `out` as CSV: line, user, item, timestamp, rating.
    Unknown items and duplicates are the relational stage's to find. Returns the ledger of the rejected lines."""
    ledger = Ledger(strict=strict)
    header, col = interaction_columns(path, fmt)
    user_col, item_col, time_col = col[fmt.user_column], col[fmt.item_column], col[fmt.time_column]
    rating_col = col.get(fmt.rating_column) if fmt.rating_column else None
    low, high = fmt.rating_range
    delimiter, width = fmt.delimiter, len(header)
    with open(out, "w", encoding="utf-8", newline="") as sink:
        writer = csv.writer(sink, lineterminator="\n")
        for line_no, text in _lines(path, ledger, start, end, first_line):
            if not text.strip():
                continue
            if '"' in text or "\r" in text or len(text) > FIELD_LIMIT:
                try:
                    row = _split_row(text, fmt)
                except csv.Error as e:
                    ledger.record("malformed_row", path, line_no, "-", f"{e} (one record per line)")
                    continue
            else:  # no quoting: a plain split is what csv would give, and several times faster
                row = text.split(delimiter)
            if len(row) != width:
                ledger.record("malformed_row", path, line_no, "-", f"{len(row)} columns, header has {width}")
                continue
            user, item = row[user_col].strip(), row[item_col].strip()
            if not user:
                ledger.record("bad_user_id", path, line_no, fmt.user_column, "empty")
                continue
            if not item:
                ledger.record("bad_item_id", path, line_no, fmt.item_column, "empty")
                continue
            try:
                timestamp = _parse_timestamp(row[time_col])
            except ValueError as e:
                ledger.record("bad_timestamp", path, line_no, fmt.time_column, f"{row[time_col][:50]!r}: {e}")
                continue
            rating = ""
            if rating_col is not None:
                try:
                    rating = float(row[rating_col])
                except ValueError:
                    rating = math.nan
                if not low <= rating <= high:  # NaN fails too
                    ledger.record("bad_rating", path, line_no, fmt.rating_column,
                                  f"{row[rating_col][:50]!r} is not a number in [{low:g}, {high:g}]")
                    continue
            writer.writerow((line_no, user, item, repr(timestamp), repr(rating) if rating != "" else ""))
    return ledger


FIELD_LIMIT = csv.field_size_limit()


def _split_row(text: str, fmt: RawFormat) -> list[str]:
    """One CSV record from one line; csv.Error for an unclosed quote or a field over csv's size limit."""
    return next(csv.reader([text], delimiter=fmt.delimiter, strict=True), [])


class ImagePaths:
    """Resolves image paths of one dataset folder as Path.resolve() does (symlinks followed), each folder once: of an
    image only its own name is checked for a symlink. One per batch of images, so a folder changed since is seen."""

    def __init__(self, root: Path):
        self.root, self.real_root = str(root), os.path.realpath(root)
        self._inside_prefix = os.path.join(self.real_root, "")  # the root and a separator: what a path inside starts with
        self._folders: dict[str, str] = {}

    def resolve(self, image: str) -> str:
        path = os.path.join(self.root, image)
        folder, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.islink(path):
            return os.path.realpath(path)
        if folder not in self._folders:
            self._folders[folder] = os.path.realpath(folder)
        return os.path.join(self._folders[folder], name)

    def inside(self, resolved: str) -> bool:
        """For a path resolved as above (absolute, normalised); a prefix test, as commonpath would answer, at a tenth
        of its cost."""
        return resolved == self.real_root or resolved.startswith(self._inside_prefix)


IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


# Image files read at once by each checker: 1.5x the images/s from a cold page cache (2 processes: 17.3k/s against
# 11.6k/s with none), 5% under it when cached.
IO_THREADS = 4
IO_CHUNK = 64  # files per read task, so the thread pool's overhead is paid per chunk, not per image


def _read_checked(image: str, paths: ImagePaths, max_bytes: int) -> bytes | str:
    """The bytes of an image file if it is a regular file inside the dataset folder and under the byte cap, else
    "kind:reason". Only system calls: runs in reader threads."""
    resolved = paths.resolve(image)  # follows symlinks: one that leaves the folder is caught here
    if not paths.inside(resolved):
        return f"image_outside_dataset:resolves to {resolved}, outside {paths.root}"
    try:
        info = os.stat(resolved)
    except FileNotFoundError:
        return "missing_image"
    except OSError as e:
        return f"unreadable_image:{e.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return "image_not_a_file:not a regular file (a folder, FIFO or device is never read)"
    if info.st_size > max_bytes:
        return f"image_too_large:{info.st_size} bytes, over the cap of {max_bytes}"
    try:
        with open(resolved, "rb") as f:
            return f.read()
    except OSError as e:
        return f"unreadable_image:{e.strerror}"


def _decode_checked(data: bytes, max_pixels: int) -> tuple[str, int, str]:
    """Fully decodes image bytes (a truncated file fails here, not mid-training) unless the header is over the
    pixel cap; (extension, size in bytes, "") or ("", 0, "kind:reason")."""
    try:
        with Image.open(io.BytesIO(data), formats=list(IMAGE_EXTENSIONS)) as img:
            if img.width * img.height > max_pixels:  # checked from the header, before any decoding
                return "", 0, f"image_too_large:{img.width}x{img.height} pixels, over the cap of {max_pixels}"
            img.load()  # verify() alone misses truncated JPEGs
            ext = IMAGE_EXTENSIONS[img.format]
    except UnidentifiedImageError:
        return "", 0, f"unreadable_image:not a {', '.join(IMAGE_EXTENSIONS)} image"
    except Exception as e:  # PIL raises many types for corrupt data
        # no object addresses in the message: the same input must give the same manifest bytes
        return "", 0, f"unreadable_image:{type(e).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', str(e))}"
    return ext, len(data), ""


def check_images(images: list[str], root: Path, max_bytes: int, max_pixels: int) -> list[tuple[str, int, str]]:
    """Checks each image (a path as written in items.jsonl): (extension, size in bytes, "") or ("", 0, "kind:reason").
    Files are read by IO_THREADS threads ahead of the decoding, which runs here. Runs in worker processes."""
    paths = ImagePaths(root)
    chunks = [images[k : k + IO_CHUNK] for k in range(0, len(images), IO_CHUNK)]
    with ThreadPoolExecutor(min(IO_THREADS, len(chunks)) or 1) as readers:
        read = readers.map(lambda chunk: [_read_checked(image, paths, max_bytes) for image in chunk], chunks)
        return [("", 0, data) if isinstance(data, str) else _decode_checked(data, max_pixels) for chunk in read for data in chunk]
