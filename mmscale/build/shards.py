"""Raw data -> WebDataset shards, out of core: scan the raw files in parallel, run the relational stage in DuckDB,
then write the shards in parallel (a process pool, or Ray tasks on a cluster).

    scan       items.jsonl and interactions.csv cut into line ranges, checked line by line (the bad-input ledger)
    relate     DuckDB: unknown items, duplicates, rating filter, k-core, id maps, cold items, leave-one-out, order
    images     every kept item's image read and fully decoded once, in parallel
    write      item shards, then the samples of each split; every shard planned first, so the bytes do not depend
               on the number of writers or where they run

The build runs in a sibling staging folder and replaces the output folder only when everything (shards, item
index, id maps, manifest) is written, so a reader never sees a half-built dataset and a crash leaves the previous
one intact.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
from tqdm import tqdm

from ..locks import try_lock
from ..data.format import FORMAT_VERSION, IMAGE_EXT_CODES, MANIFEST, ShardFormatError
from .raw import BadInputError, Ledger, RawFormat, check_images, interaction_columns, line_ranges, scan_interactions, scan_items
from .relational import Relations, npy_writer, zip_member
from .writers import (
    ITEM_INDEX_COLUMNS, Executor, LocalExecutor, RayExecutor, SharedMap, ShardTask, WriteContext, header_lengths, item_header,
    item_index_piece, member_sizes, plan_shards, write_item_shard, write_sample_shard,
)

SPLITS = ("train", "valid", "test", "cold")
IMAGE_BATCH = 1024  # images per checking task
IMAGE_ROUND = 64 * IMAGE_BATCH  # images whose paths and results are in memory at once
DISK_SAMPLE_SECONDS = 1.0  # how often the work folder's size is summed (a few hundred files at 100M interactions)
SCAN_BYTES = 64 << 20  # a scan range is at most this long, so progress moves and ranges balance across workers


@dataclass(frozen=True)
class BuildOptions:
    raw_format: RawFormat = field(default_factory=RawFormat)
    min_user_interactions: int = 3  # leave-one-out needs train, valid and test
    min_item_interactions: int = 0
    min_rating: float | None = None  # keep interactions rated at least this
    cold_item_fraction: float = 0.0  # items held out of training entirely
    max_history: int = 50  # most recent items kept in each sample's history
    shard_size_mb: float = 256.0  # a shard's tar bytes (an ids-only sample shard, gzip-compressed, takes ~10x less)
    embed_target_content: bool = True  # put the target's image and text in each interaction sample
    seed: int = 0
    max_image_mb: float = 64.0  # a larger image file is bad input, never read
    max_image_pixels: int = 50_000_000  # a larger image (from its header) is bad input, never decoded
    workers: int = max(1, min(2, os.cpu_count() or 1))
    memory_limit_mb: int = 1024  # the relational stage's memory; beyond it DuckDB spills to the work folder
    work_dir: str | None = None  # the relational stage's files and spill (default: inside the staging folder)
    ray_address: str | None = None  # write on a Ray cluster ("auto", or host:port) instead of a local process pool
    strict: bool = False
    progress: bool = True
    plan_only: bool = False  # every stage but the shard writes: the ledger, the counts and the shards each split would get

    def __post_init__(self) -> None:
        checks = {
            "cold_item_fraction": 0 <= self.cold_item_fraction < 1, "max_history": self.max_history >= 1,
            "shard_size_mb": self.shard_size_mb > 0, "workers": self.workers >= 1, "max_image_mb": self.max_image_mb > 0,
            "max_image_pixels": self.max_image_pixels > 0, "min_user_interactions": self.min_user_interactions >= 0,
            "min_item_interactions": self.min_item_interactions >= 0, "memory_limit_mb": self.memory_limit_mb >= 128,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]}: {getattr(self, bad[0])!r} is out of range (cold_item_fraction in [0, 1); max_history, "
                             f"workers >= 1; shard_size_mb, max_image_mb, max_image_pixels > 0; minimum counts >= 0; "
                             f"memory_limit_mb >= 128)")


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
    removes the staging folder and leaves OUT as it was. A plan-only build runs every stage but the shard writes and
    leaves OUT as it was; its manifest lists the shards the build would write, with their exact sizes."""
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
    for name in (fmt.items_file, fmt.interactions_file):
        if not (raw_dir / name).is_file():
            raise FileNotFoundError(f"{raw_dir / name} does not exist (the raw layout: docs/data-format.md)")
    started = time.monotonic()
    shutil.rmtree(staging, ignore_errors=True)  # a crashed build's leftovers (the caller holds the lock)
    # The pool is forked before DuckDB starts its threads.
    executor = RayExecutor(opts.ray_address) if opts.ray_address else LocalExecutor(opts.workers)
    memory = _StageMemory()  # its thread starts after the fork
    work = Path(opts.work_dir) / f"{out_dir.name}.work" if opts.work_dir else staging / ".work"
    disk = _DiskPeak(work)
    try:
        staging.mkdir(parents=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        manifest = _stages(raw_dir, staging, work, opts, executor, disk, memory, stage_seconds := {})
    except duckdb.OutOfMemoryException as e:
        raise BuildError(f"the relational stage needs more memory than memory_limit_mb={opts.memory_limit_mb} (--memory-limit) "
                         f"allows: {_describe(e)}; {out_dir} is unchanged") from e
    except (OSError, duckdb.IOException) as e:
        free = shutil.disk_usage(staging.parent).free / 2**20
        raise BuildError(f"writing {out_dir} failed: {_describe(e)} ({free:.0f} MiB free there); {out_dir} is unchanged") from e
    finally:
        memory.stop()
        disk.stop()
        executor.close()
        shutil.rmtree(work, ignore_errors=True)
    own, children = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    manifest["build"] = {"seconds": round(time.monotonic() - started, 1), "peak_rss_mb": round(max(own, children)),
                         "temp_disk_mb": round(disk.peak / 2**20), "writers": executor.workers, "nodes": len(executor.nodes),
                         "executor": "ray" if opts.ray_address else "local", "stage_seconds": stage_seconds}
    if memory.peaks:
        manifest["build"]["stage_peak_rss_mb"] = memory.peaks
    if opts.plan_only:
        return manifest
    report = manifest.pop("bad_input_report")
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    manifest["bad_input_report"] = report

    # Swap the finished folder in; the old one is removed only after the new one is in place.
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _describe(error: Exception) -> str:
    """An OSError as it prints; DuckDB's own I/O errors with the errno a disk-full OSError would give."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, duckdb.Error) and "No space left on device" in text:
        return f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} (DuckDB: {text})"
    return text


class _DiskPeak:
    """The largest size the work folder reached (DuckDB's spill included): summed by a thread every
    DISK_SAMPLE_SECONDS and at the end of each stage, since a stage's files can come and go within it (at 100M the
    scanned rows and DuckDB's copy of them took 15.8 GiB, 2 more than any stage's end)."""

    def __init__(self, work: Path):
        self.work, self.peak = work, 0
        self._lock, self._done = threading.Lock(), threading.Event()
        threading.Thread(target=self._watch, name="work-disk", daemon=True).start()

    def _watch(self) -> None:
        while not self._done.wait(DISK_SAMPLE_SECONDS):
            self.sample()

    def sample(self) -> None:
        try:
            used = sum(p.stat().st_blocks * 512 for p in self.work.rglob("*") if p.is_file())
        except OSError:  # a file removed while summed: the next sample counts
            return
        with self._lock:
            self.peak = max(self.peak, used)

    def stop(self) -> None:
        self._done.set()


class _StageMemory:
    """The build process's peak RSS in each stage (where DuckDB and the planning run; the writers are other
    processes), from /proc/self/status sampled every 0.1 s by a thread: the kernel's own high-water mark covers the
    whole run, and resetting it would corrupt the build's and its parent's getrusage peak. Absent off Linux."""

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self._peak, self._done = 0, threading.Event()
        if self._rss_kib() is not None:
            threading.Thread(target=self._watch, name="stage-memory", daemon=True).start()

    @staticmethod
    def _rss_kib() -> int | None:
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return None

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            self._peak = max(self._peak, self._rss_kib() or 0)

    def finished(self, stage: str) -> None:
        current = self._rss_kib()
        if current is not None:
            self.peaks[stage], self._peak = round(max(self._peak, current) / 1024), current

    def stop(self) -> None:
        self._done.set()


def _scan(scanner, path: Path, fmt: RawFormat, strict: bool, job) -> Ledger:
    (start, end, first_line), out = job
    return scanner(path, fmt, start, end, first_line, out, strict)


def _scan_file(scanner, path: Path, skip_lines: int, work: Path, opts: BuildOptions, executor: Executor, ledger: Ledger) -> list[Path]:
    """Scans a raw file in line ranges across the workers; returns the files of readable records, in file order."""
    ranges = line_ranges(path, max(executor.workers * 4, path.stat().st_size // SCAN_BYTES + 1), skip_lines)
    jobs = [(r, work / f"{path.stem}-{k:05d}.scan") for k, r in enumerate(ranges)]
    ledgers = executor.map(partial(_scan, scanner, path, opts.raw_format, opts.strict), jobs, f"scan {path.name}",
                           opts.progress, total=path.stat().st_size, weight=lambda job: job[0][1] - job[0][0])
    for part in ledgers:
        ledger.merge(part)
    return [out for _, out in jobs]


def _stages(raw_dir: Path, staging: Path, work: Path, opts: BuildOptions, executor: Executor, disk: _DiskPeak,
            memory: _StageMemory, stage_seconds: dict[str, float]) -> dict:
    """Runs the build's stages, recording each one's wall time in `stage_seconds` and its peak RSS in `memory`."""
    fmt, progress = opts.raw_format, opts.progress
    clock = time.monotonic()

    def finished(stage: str) -> None:
        nonlocal clock
        stage_seconds[stage], clock = round(time.monotonic() - clock, 1), time.monotonic()
        memory.finished(stage)
    ledger = Ledger(strict=opts.strict)
    max_bytes = int(opts.shard_size_mb * 2**20)

    # -- scan and relate ------------------------------------------------------------------------------------------
    relations = Relations(work, fmt, raw_dir, ledger, opts.memory_limit_mb, opts.workers)
    try:
        relations.load_items(_scan_file(scan_items, raw_dir / fmt.items_file, 0, work, opts, executor, ledger))
        interaction_columns(raw_dir / fmt.interactions_file, fmt)  # a bad header is named before any row is read
        raw_counts = relations.load_interactions(
            _scan_file(scan_interactions, raw_dir / fmt.interactions_file, 1, work, opts, executor, ledger))
        disk.sample()
        finished("scan")
        for part in work.glob("*.scan"):
            part.unlink()
        steps = tqdm(total=4, desc="relate", disable=not progress)
        relations.filter(opts.min_rating, opts.min_user_interactions, opts.min_item_interactions)
        steps.update()
        num_users, num_items = relations.number(opts.min_item_interactions)
        kept_interactions = relations.kept_interactions()
        steps.update()
        for name, table in (("user_ids.json", "user_map"), ("item_ids.json", "item_map")):
            _write_json_list(staging / name, relations.ids(table))

        finished("relate")

        # -- images: checked once per item, in parallel ------------------------------------------------------------
        # each item's image extension code (0: none) and size, written as checked: the build holds a round of them
        check = partial(check_images, root=raw_dir, max_bytes=int(opts.max_image_mb * 2**20), max_pixels=opts.max_image_pixels)
        present = 0
        with (tqdm(total=relations.image_count(), desc="images", disable=not progress, unit_scale=True) as bar,
              npy_writer(work / "image_ext.npy", num_items, "|u1") as write_ext, npy_writer(work / "image_size.npy", num_items) as write_size):
            done = 0  # items written so far (a round covers the items up to its last one with an image name)
            for named in relations.images(IMAGE_ROUND):  # in rounds: memory bounded by a round, not the catalogue
                batches = [[image for _, _, image in named[k : k + IMAGE_BATCH]] for k in range(0, len(named), IMAGE_BATCH)]
                checked = executor.map(check, batches, "images", False)
                ext, size = np.zeros(named[-1][0] + 1 - done, np.uint8), np.zeros(named[-1][0] + 1 - done, np.int64)
                for (item, line, path), (found, length, error) in zip(named, (r for batch in checked for r in batch)):
                    if not error:
                        ext[item - done], size[item - done] = IMAGE_EXT_CODES[found], length
                        continue
                    kind, _, detail = error.partition(":")
                    ledger.record(kind, fmt.items_file, line, fmt.image_field, f"{raw_dir / path} {detail or 'does not exist'}".strip())
                write_ext(ext), write_size(size)
                present, done = present + int((ext > 0).sum()), done + len(ext)
                bar.update(len(named))
            write_ext(np.zeros(num_items - done, np.uint8)), write_size(np.zeros(num_items - done, np.int64))
        finished("images")

        cold = relations.split(opts.cold_item_fraction, opts.seed, opts.max_history)
        steps.update()
        relations.write_sequences(num_users)
        relations.write_seen(staging / "seen.npz")
        items_without_text = relations.write_text_bytes(work / "text_bytes.npy", num_items)
        steps.update()
        steps.close()
        disk.sample()
        finished("split")

        # -- write: item shards, then each split's samples ---------------------------------------------------------
        for folder in ("items",) + SPLITS:
            (staging / folder).mkdir()  # empty in a plan-only build, which never swaps its staging folder in
        ctx = WriteContext(raw_dir, work, staging, opts.max_history, opts.embed_target_content)
        content = _ContentSizes(work)

        def item_sizes():
            first = 0
            for ids in relations.ids("item_map"):
                text_bytes, image_bytes = content(np.arange(first, first + len(ids)))
                header = np.array([len(item_header(first + k, raw_id, bool(image_bytes[k] >= 0))) for k, raw_id in enumerate(ids)], np.int64)
                yield member_sizes(header, text_bytes, image_bytes)
                first += len(ids)

        item_tasks = [ShardTask("items", k, first, count, size) for k, (first, count, size) in enumerate(plan_shards(item_sizes(), max_bytes))]
        if opts.plan_only:
            shard_lists = {"items": [task.planned() for task in item_tasks]}
        else:
            written = executor.map(partial(write_item_shard, ctx=ctx), item_tasks, "items", progress, total=num_items,
                                   weight=lambda task: task.count)
            shard_lists = {"items": [{k: w[k] for k in ("path", "samples", "bytes")} for w in written]}
            _write_item_index(staging / "items" / "index.npz", work, item_tasks, num_items)
        finished("items")

        ctx = WriteContext(raw_dir, work, staging, opts.max_history, opts.embed_target_content, tuple(s["path"] for s in shard_lists["items"]))
        samples = {}
        for split in SPLITS:
            def sample_sizes(split=split):
                for chunk in relations.sample_chunks(split):
                    header = header_lengths(split, chunk["u"], chunk["i"], chunk["history_bytes"])
                    if not opts.embed_target_content:
                        yield member_sizes(header)
                    else:
                        yield member_sizes(header, *content(chunk["i"]))

            samples[split] = relations.sample_count(split)
            tasks = [ShardTask(split, k, first, count, size, compressed=not opts.embed_target_content)
                     for k, (first, count, size) in enumerate(plan_shards(sample_sizes(), max_bytes))]
            shard_lists[split] = [task.planned() for task in tasks] if opts.plan_only else executor.map(
                partial(write_sample_shard, ctx=ctx), tasks, split, progress, total=samples[split], weight=lambda task: task.count)
        disk.sample()
        finished("samples")
    finally:
        relations.close()

    return {
        "format": FORMAT_VERSION,
        "num_users": num_users,
        "num_items": num_items,
        "max_history": opts.max_history,
        "cold_items": cold,
        "counts": {
            "raw": raw_counts,
            "kept": {"users": num_users, "items": num_items, "interactions": kept_interactions},
            "samples": samples,
            "images_present": present,
            "images_missing": num_items - present,
            "items_without_text": items_without_text,
            "cold_items": len(cold),
        },
        "bad_input": ledger.as_dict(),
        "bad_input_report": ledger.report(),
        "shards": shard_lists,
        "options": _options_dict(opts, raw_dir),
    }


def _write_json_list(path: Path, chunks: Iterator[list[str]]) -> None:
    """json.dumps(list) written chunk by chunk."""
    with open(path, "w") as f:
        f.write("[")
        first = True
        for chunk in chunks:
            if chunk:
                f.write(("" if first else ", ") + json.dumps(chunk)[1:-1])
                first = False
        f.write("]")


class _ContentSizes:
    """Items' text bytes and image bytes (-1: no image), read from the work folder's files through maps released after
    each use: planning holds the items of a chunk, not the catalogue's."""

    def __init__(self, work: Path):
        self.maps = [SharedMap(work / name) for name in ("text_bytes.npy", "image_ext.npy", "image_size.npy")]

    def __call__(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        text, ext, size = (mapped.npy()[items] for mapped in self.maps)
        for mapped in self.maps:
            mapped.release()
        return text, np.where(ext > 0, size, -1)


def _write_item_index(path: Path, work: Path, tasks: list[ShardTask], num_items: int) -> None:
    """items/index.npz (the bytes np.savez writes): where each item's text and image lie in the item shards, streamed
    from the writers' per-shard pieces."""
    image_ext = SharedMap(work / "image_ext.npy")
    with zipfile.ZipFile(path, "w") as archive:
        for name, dtype in (("shard", "<i4"), ("image_offset", "<i8"), ("image_size", "<i8"), ("image_ext", "|u1"),
                            ("text_offset", "<i8"), ("text_size", "<i8")):
            with npy_writer(archive.open(zip_member(f"{name}.npy"), "w", force_zip64=True), num_items, dtype) as write:
                for task in tasks:
                    if name == "shard":
                        write(np.full(task.count, task.number))
                    elif name == "image_ext":
                        write(image_ext.npy()[task.first : task.first + task.count])
                        image_ext.release()
                    else:
                        write(np.load(item_index_piece(work, task))[ITEM_INDEX_COLUMNS.index(name)])


def _options_dict(opts: BuildOptions, raw_dir: Path) -> dict:
    options = asdict(opts)
    for transient in ("workers", "progress", "memory_limit_mb", "work_dir", "ray_address", "plan_only"):  # they do not change the output
        options.pop(transient)
    options["raw_format"]["text_fields"] = list(opts.raw_format.text_fields)
    options["raw_format"]["rating_range"] = list(opts.raw_format.rating_range)
    options["raw_dir"] = raw_dir.name
    return options


__all__ = ["BuildOptions", "BuildError", "build_shards", "BadInputError"]
