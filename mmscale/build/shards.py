"""Raw data -> WebDataset shards: filter, map ids, split by time, write deterministically.

The build runs in a sibling staging folder and replaces the output folder only when
everything (shards, item index, id maps, manifest) is written, so a reader never sees
a half-built dataset and a crash leaves the previous one intact.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..locks import try_lock
from ..data.format import FORMAT_VERSION, IMAGE_EXT_CODES, MANIFEST, ShardFormatError
from .raw import BadInputError, Ledger, RawFormat, RawInteraction, RawItem, load_image_bytes, read_interactions, read_items


@dataclass(frozen=True)
class BuildOptions:
    raw_format: RawFormat = field(default_factory=RawFormat)
    min_user_interactions: int = 3  # leave-one-out needs train, valid and test
    min_item_interactions: int = 0
    min_rating: float | None = None  # keep interactions rated at least this
    cold_item_fraction: float = 0.0  # items held out of training entirely
    max_history: int = 50  # most recent items kept in each sample's history
    shard_size_mb: float = 256.0
    embed_target_content: bool = True  # put the target's image and text in each interaction sample
    seed: int = 0
    max_image_mb: float = 64.0  # a larger image file is bad input, never read
    max_image_pixels: int = 50_000_000  # a larger image (from its header) is bad input, never decoded
    workers: int = max(1, min(2, os.cpu_count() or 1))
    strict: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "cold_item_fraction": 0 <= self.cold_item_fraction < 1, "max_history": self.max_history >= 1,
            "shard_size_mb": self.shard_size_mb > 0, "workers": self.workers >= 1, "max_image_mb": self.max_image_mb > 0,
            "max_image_pixels": self.max_image_pixels > 0, "min_user_interactions": self.min_user_interactions >= 0,
            "min_item_interactions": self.min_item_interactions >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]}: {getattr(self, bad[0])!r} is out of range (cold_item_fraction in [0, 1); max_history, "
                             f"workers >= 1; shard_size_mb, max_image_mb, max_image_pixels > 0; minimum counts >= 0)")


class ShardWriter:
    """Writes samples into numbered tar shards of bounded size, deterministically.

    Headers carry no time, owner or mode of the build machine, so the same samples give
    the same bytes. Each shard is written as NAME.tar.tmp and renamed when complete.
    """

    def __init__(self, directory: Path, prefix: str, max_bytes: int):
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._samples = 0

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = self.directory / name
        self._tar = tarfile.open(self._path.with_suffix(".tar.tmp"), "w", format=tarfile.USTAR_FORMAT)
        self._samples = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        tmp = self._path.with_suffix(".tar.tmp")
        size = tmp.stat().st_size
        os.replace(tmp, self._path)
        self.shards.append({"path": f"{self.directory.name}/{self._path.name}", "samples": self._samples, "bytes": size})
        self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> tuple[int, dict[str, tuple[int, int]]]:
        """Adds one sample; returns (shard number, member -> (data offset, size))."""
        size = sum(512 + len(data) + 511 for data in members.values())
        if self._tar is None or (self._samples and self._tar.offset + size > self.max_bytes):
            self._open_next()
        offsets = {}
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            offsets[ext] = (self._tar.offset + len(info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)), len(data))
            self._tar.addfile(info, io.BytesIO(data))
        self._samples += 1
        return len(self.shards), offsets

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def _natural_key(raw_id: str):
    return (0, int(raw_id), "") if raw_id.isdigit() else (1, 0, raw_id)


def _k_core(rows: list[RawInteraction], min_user: int, min_item: int) -> list[RawInteraction]:
    """Drops users/items under the minimum counts until every survivor meets them."""
    while True:
        users = Counter(r.user for r in rows)
        items = Counter(r.item for r in rows)
        kept = [r for r in rows if users[r.user] >= min_user and items[r.item] >= min_item]
        if len(kept) == len(rows):
            return kept
        rows = kept


def _load_images(items: list[RawItem], root: Path, ledger: Ledger, opts: BuildOptions) -> dict[str, tuple[bytes, str]]:
    """Reads and decodes every item image in parallel; bad ones are recorded, their items kept."""
    with_image = [it for it in items if it.image_path is not None]
    images: dict[str, tuple[bytes, str]] = {}
    chunks = max(1, len(with_image) // (opts.workers * 8))
    load = partial(load_image_bytes, root=root, max_bytes=int(opts.max_image_mb * 2**20), max_pixels=opts.max_image_pixels)
    with Pool(opts.workers) as pool:
        results = pool.imap(load, [it.image_path for it in with_image], chunksize=chunks)
        for item, (data, ext, error) in tqdm(zip(with_image, results), total=len(with_image), desc="images", disable=not opts.progress):
            if data is not None:
                images[item.raw_id] = (data, ext)
                continue
            kind, _, detail = error.partition(":")
            where = opts.raw_format.items_file
            ledger.record(kind, where, item.line, opts.raw_format.image_field, f"{item.image_path} {detail or 'does not exist'}".strip())
    return images


def _split_user(sequence: list[int], cold: set[int]) -> tuple[dict[str, list[tuple[int, int]]], list[int]]:
    """Leave-one-out by time over the user's warm items; every cold-item interaction is a cold sample.

    Returns ({split: [(position, item)]}, warm sequence): a sample's history is
    warm[:position]. Cold samples see the warm items that came before them.
    """
    warm: list[int] = []
    cold_samples: list[tuple[int, int]] = []
    for item in sequence:
        if item in cold:
            cold_samples.append((len(warm), item))
        else:
            warm.append(item)
    n = len(warm)
    out = {"train": [(p, warm[p]) for p in range(1, max(n - 2, 0))], "valid": [], "test": [], "cold": cold_samples}
    if n >= 1:
        out["test"].append((n - 1, warm[n - 1]))
    if n >= 2:
        out["valid"].append((n - 2, warm[n - 2]))
    return out, warm


class BuildError(RuntimeError):
    """Writing the shards failed (disk full, permissions); the output folder is left as it was."""


def _is_shard_folder(folder: Path) -> bool:
    """Recognised by the format marker in its manifest, not by a file name."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(FORMAT_VERSION.split("/")[0] + "/")


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not _is_shard_folder(out_dir):
        raise ShardFormatError(f"{out_dir} exists, is not empty and is not a shard folder (no {MANIFEST} of format "
                               f"{FORMAT_VERSION}): refusing to replace it")


@contextmanager
def _output_lock(out_dir: Path) -> Iterator[None]:
    """One build per output folder at a time: an flock on `.OUT.lock` beside it (the file stays, naming its last holder)."""
    lock, holder = try_lock(out_dir.with_name(f".{out_dir.name}.lock"))
    if lock is None:
        raise ShardFormatError(f"{out_dir}: another build is writing it ({holder}); wait for it to finish or build elsewhere")
    with lock:
        yield


def build_shards(raw_dir: str | Path, out_dir: str | Path, opts: BuildOptions = BuildOptions()) -> dict:
    """Builds the shard folder; returns the manifest. Raises BadInputError in strict mode.

    The build writes into `OUT.partial`, under a lock on OUT, and swaps the finished folder in; any failure
    removes the staging folder and leaves OUT as it was."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw folder {raw_dir} does not exist")
    _check_replaceable(out_dir)
    with _output_lock(out_dir):
        _check_replaceable(out_dir)  # again, now that no other build can be writing it
        staging = out_dir.with_name(out_dir.name + ".partial")
        try:
            return _build(raw_dir, out_dir, staging, opts)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _build(raw_dir: Path, out_dir: Path, staging: Path, opts: BuildOptions) -> dict:
    fmt = opts.raw_format
    ledger = Ledger(strict=opts.strict)

    raw_items = read_items(raw_dir, fmt, ledger)
    rows = read_interactions(raw_dir, fmt, raw_items, ledger)
    raw_counts = {"users": len({r.user for r in rows}), "items": len(raw_items), "interactions": len(rows)}

    if opts.min_rating is not None:
        rows = [r for r in rows if r.rating is not None and r.rating >= opts.min_rating]
    rows = _k_core(rows, opts.min_user_interactions, opts.min_item_interactions)
    if not rows:
        raise BadInputError(f"{raw_dir}: no interaction is left after the rating filter and the k-core (at least "
                            f"{opts.min_user_interactions} per user, {opts.min_item_interactions} per item)")
    kept_items = raw_items if opts.min_item_interactions <= 0 else {r.item: raw_items[r.item] for r in rows}

    # Id maps: contiguous indices in natural id order, so they do not depend on file order.
    user_ids = sorted({r.user for r in rows}, key=_natural_key)
    item_ids = sorted(kept_items, key=_natural_key)
    user_index = {u: i for i, u in enumerate(user_ids)}
    item_index = {it: i for i, it in enumerate(item_ids)}

    images = _load_images([kept_items[i] for i in item_ids], raw_dir, ledger, opts)
    texts = [kept_items[i].text for i in item_ids]

    # Cold items: a seeded fraction of the items that have interactions, never seen in training.
    rng = random.Random(opts.seed)
    interacted = sorted({item_index[r.item] for r in rows})
    cold = set(rng.sample(interacted, int(round(opts.cold_item_fraction * len(interacted)))))

    sequences: dict[int, list[tuple[float, int, int]]] = defaultdict(list)
    for r in rows:
        sequences[user_index[r.user]].append((r.timestamp, r.line, item_index[r.item]))

    samples: dict[str, list[tuple[int, int, list[int]]]] = {s: [] for s in ("train", "valid", "test", "cold")}
    seen_indptr, seen_items = [0], []
    for user in range(len(user_ids)):
        sequence = [item for _, _, item in sorted(sequences[user])]  # by time, ties by file line
        by_split, warm = _split_user(sequence, cold)
        for split, entries in by_split.items():
            for position, item in entries:
                samples[split].append((user, item, warm[max(0, position - opts.max_history) : position]))
        seen_items.extend(sorted(set(warm[: max(len(warm) - 2, 0)])))
        seen_indptr.append(len(seen_items))
    # Train samples are written in a seeded random order so each shard mixes many users.
    random.Random(opts.seed + 1).shuffle(samples["train"])

    dataset = _Dataset(user_ids, item_ids, texts, images, cold, samples, seen_indptr, seen_items,
                       {"raw": raw_counts, "kept": {"users": len(user_ids), "items": len(item_ids), "interactions": len(rows)}})
    try:
        manifest = _write(staging, out_dir, dataset, ledger, opts, raw_dir)
    except OSError as e:
        free = shutil.disk_usage(staging.parent).free / 2**20
        raise BuildError(f"writing {out_dir} failed: {e} ({free:.0f} MiB free there); {out_dir} is unchanged") from e
    manifest["bad_input_report"] = ledger.report()
    return manifest


@dataclass
class _Dataset:
    """Everything a build writes, held in memory."""

    user_ids: list[str]
    item_ids: list[str]
    texts: list[str]
    images: dict[str, tuple[bytes, str]]
    cold: set[int]
    samples: dict[str, list[tuple[int, int, list[int]]]]
    seen_indptr: list[int]
    seen_items: list[int]
    counts: dict


def _write(staging: Path, out_dir: Path, data: _Dataset, ledger: Ledger, opts: BuildOptions, raw_dir: Path) -> dict:
    """Writes the folder into `staging`, then swaps it in for `out_dir`."""
    shutil.rmtree(staging, ignore_errors=True)  # a crashed build's leftovers (the caller holds the lock)
    staging.mkdir(parents=True)
    max_bytes = int(opts.shard_size_mb * 2**20)
    user_ids, item_ids, texts, images, cold, samples = data.user_ids, data.item_ids, data.texts, data.images, data.cold, data.samples

    shard_lists = {"items": _write_items(staging, texts, item_ids, images, max_bytes, opts)}
    for split, split_samples in samples.items():
        shard_lists[split] = _write_interactions(staging, split, split_samples, texts, item_ids, images, max_bytes, opts)

    np.savez(staging / "seen.npz", indptr=np.asarray(data.seen_indptr, np.int64), items=np.asarray(data.seen_items, np.int64))
    (staging / "user_ids.json").write_text(json.dumps(user_ids))
    (staging / "item_ids.json").write_text(json.dumps(item_ids))

    manifest = {
        "format": FORMAT_VERSION,
        "num_users": len(user_ids),
        "num_items": len(item_ids),
        "max_history": opts.max_history,
        "cold_items": sorted(cold),
        "counts": {
            **data.counts,
            "samples": {split: len(s) for split, s in samples.items()},
            "images_present": len(images),
            "images_missing": len(item_ids) - len(images),
            "items_without_text": sum(1 for t in texts if not t),
            "cold_items": len(cold),
        },
        "bad_input": ledger.as_dict(),
        "shards": shard_lists,
        "options": _options_dict(opts, raw_dir),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

    # Swap the finished folder in; the old one is removed only after the new one is in place.
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _options_dict(opts: BuildOptions, raw_dir: Path) -> dict:
    options = asdict(opts)
    for transient in ("workers", "progress"):  # they do not change the output
        options.pop(transient)
    options["raw_format"]["text_fields"] = list(opts.raw_format.text_fields)
    options["raw_format"]["rating_range"] = list(opts.raw_format.rating_range)
    options["raw_dir"] = raw_dir.name
    return options


def _item_members(item: int, texts: list[str], item_ids: list[str], images: dict, header: dict) -> dict[str, bytes]:
    members = {"json": json.dumps(header, sort_keys=True).encode(), "txt": texts[item].encode()}
    image = images.get(item_ids[item])
    if image is not None:
        data, ext = image
        members[ext] = data
    return members


def _write_items(staging: Path, texts, item_ids, images, max_bytes: int, opts: BuildOptions) -> list[dict]:
    writer = ShardWriter(staging / "items", "items", max_bytes)
    n = len(item_ids)
    shard = np.zeros(n, np.int32)
    image_offset, image_size = np.zeros(n, np.int64), np.zeros(n, np.int64)
    text_offset, text_size = np.zeros(n, np.int64), np.zeros(n, np.int64)
    image_ext = np.zeros(n, np.uint8)
    for item in tqdm(range(n), desc="items", disable=not opts.progress):
        header = {"item": item, "raw_id": item_ids[item], "has_image": item_ids[item] in images}
        members = _item_members(item, texts, item_ids, images, header)
        shard[item], offsets = writer.write(f"{item:09d}", members)
        text_offset[item], text_size[item] = offsets["txt"]
        for ext, code in IMAGE_EXT_CODES.items():
            if ext in offsets:
                image_offset[item], image_size[item] = offsets[ext]
                image_ext[item] = code
    shards = writer.close()
    np.savez(
        staging / "items" / "index.npz",
        shard=shard, image_offset=image_offset, image_size=image_size, image_ext=image_ext,
        text_offset=text_offset, text_size=text_size,
    )
    return shards


def _write_interactions(staging: Path, split: str, split_samples, texts, item_ids, images, max_bytes: int, opts: BuildOptions) -> list[dict]:
    writer = ShardWriter(staging / split, split, max_bytes)
    for n, (user, item, history) in enumerate(tqdm(split_samples, desc=split, disable=not opts.progress)):
        header = {"user": user, "history": history, "target": item, "split": split}
        if opts.embed_target_content:
            members = _item_members(item, texts, item_ids, images, header)
        else:
            members = {"json": json.dumps(header, sort_keys=True).encode()}
        writer.write(f"{split}{n:010d}", members)
    return writer.close()


__all__ = ["BuildOptions", "BuildError", "ShardWriter", "build_shards", "BadInputError"]
