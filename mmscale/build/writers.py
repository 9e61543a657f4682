"""Tar shards written in parallel: each shard is planned before any is written, so the output is the same bytes
whatever the number of writers and wherever they run (a process pool here, Ray tasks on a cluster).

A plan fixes each shard's samples from their exact sizes (tar headers and padding included), with the rule a
single sequential writer would follow: a shard is closed before the sample that would take it over the size
limit. A writer then needs only its shard's rows, which it reads from the relational stage's files.
"""

from __future__ import annotations

import gzip
import io
import json
import mmap
import os
import stat
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import duckdb
import numpy as np
from tqdm import tqdm

from ..data.format import IMAGE_KEYS
from .raw import ImagePaths

_IMAGE_EXTS = tuple(key.encode() for key in IMAGE_KEYS)
BLOCK = 512  # a tar header, and the unit member data is padded to


def _template() -> tuple[bytes, int]:
    """tarfile's USTAR header for a regular file with an empty name, size 0, mode 0644 and no time, owner or group
    (what makes shards reproducible), with its checksum field as spaces; and the sum of its bytes so."""
    info = tarfile.TarInfo("")
    info.mode, info.mtime, info.size = 0o644, 0, 0
    head = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    head[124:136] = bytes(12)  # the size field is filled per member
    head[148:156] = b" " * 8  # as tar sums it
    return bytes(head), sum(head)


_TEMPLATE, _TEMPLATE_SUM = _template()
_RECORD = 20 * BLOCK  # tar archives end on whole 10 KiB records, as tarfile writes them
_ZEROS = bytes(BLOCK)


def ustar_header(name: bytes, size: int) -> bytes:
    """The header tarfile writes for a member with this name (ASCII, at most 100 bytes) and size; built here because
    tarfile's generic path costs ~100 us per member, most of a writer's time. Checked against tarfile in the tests."""
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(name) + sum(size_field)
    return name.ljust(100, b"\0") + _TEMPLATE[100:124] + size_field + _TEMPLATE[136:148] + b"%06o\0 " % checksum + _TEMPLATE[156:]


class ShardWriter:
    """Writes samples into one tar shard, deterministically: headers carry no time, owner or mode of the build
    machine, so the same samples give the same bytes. The shard is written as NAME.tmp and renamed when complete.

    A compressed shard (NAME.tar.gz) is the same tar through gzip at level 1 with no name or time in its header:
    an ids-only sample is a few hundred bytes of JSON, and a tar member takes at least 1 KiB (a header and a padded
    block), which gzip takes back 8-10x for about 3 ms of one core per MB of tar. Offsets stay the tar's."""

    def __init__(self, path: Path, compressed: bool = False):
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._file = open(self._tmp, "wb", buffering=1 << 20)
        self._out = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, compresslevel=1, mtime=0) if compressed else self._file
        self._pending = bytearray()  # gzip is fed ~1 MiB at a time: a call per 512-byte block costs more than it compresses
        self.offset = 0
        self.samples = 0

    def write(self, key: bytes, members: dict[bytes, bytes]) -> dict[bytes, tuple[int, int]]:
        """Adds one sample (its members by extension); returns extension -> (data offset, size) in the tar."""
        offsets, out = {}, self._pending.extend
        for ext, data in members.items():
            name = b"%s.%s" % (key, ext)
            if len(name) > 100 or not name.isascii():
                raise ValueError(f"tar member name {name!r}: more than 100 bytes or not ASCII")
            size = len(data)
            offsets[ext] = (self.offset + BLOCK, size)
            pad = -size % BLOCK
            out(ustar_header(name, size))
            out(data)
            out(_ZEROS[:pad])
            self.offset += BLOCK + size + pad
        self.samples += 1
        if len(self._pending) >= 1 << 20:
            self._flush()
        return offsets

    def _flush(self) -> None:
        self._out.write(self._pending)
        self._pending.clear()

    def close(self, task: "ShardTask") -> int:
        """Finishes the shard, which must hold what its task planned; returns its size in bytes on disk."""
        if (self.samples, self.offset) != (task.count, task.size):
            raise RuntimeError(f"{self.path}: {self.samples} samples in {self.offset} bytes, the plan said {task.count} in "
                               f"{task.size}: the shard plan does not match the writer (a bug)")
        self._pending.extend(bytes(tar_bytes(self.offset) - self.offset))
        self._flush()
        self._out.close()
        self._file.close()
        size = self._tmp.stat().st_size
        os.replace(self._tmp, self.path)
        return size


def tar_bytes(members: int) -> int:
    """The size of a tar whose members take these bytes: two zero blocks end it, padded to whole records."""
    end = members + 2 * BLOCK
    return end + -end % _RECORD


def padded(sizes: np.ndarray) -> np.ndarray:
    """Bytes a member of each size takes in a tar: its header and its data padded to whole blocks."""
    return BLOCK + (sizes + BLOCK - 1) // BLOCK * BLOCK


def plan_shards(chunks: Iterable[tuple[np.ndarray, np.ndarray]], max_bytes: int) -> list[tuple[int, int, int]]:
    """Cuts a sequence of samples into shards; returns (first sample, count, bytes of members) of each.

    chunks: (member sizes summed with a worst-case block each, member sizes as padded in the tar) per sample. A
    shard is closed when its tar offset plus the next sample's worst case would exceed `max_bytes` (a shard of one
    sample may); the rule a writer that fills shards one after another applies.
    """
    shards, first, index, offset, samples = [], 0, 0, 0, 0
    for worst, exact in chunks:
        for w, e in zip(worst.tolist(), exact.tolist()):
            if samples and offset + w > max_bytes:
                shards.append((first, samples, offset))
                first, offset, samples = index, 0, 0
            offset += e
            samples += 1
            index += 1
    if samples:
        shards.append((first, samples, offset))
    return shards


def member_sizes(*lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(worst case, exact) tar bytes of samples whose members have these lengths (a length < 0: no such member)."""
    worst = sum(np.where(n >= 0, BLOCK + n + BLOCK - 1, 0) for n in lengths)
    exact = sum(np.where(n >= 0, padded(np.maximum(n, 0)), 0) for n in lengths)
    return np.asarray(worst, np.int64), np.asarray(exact, np.int64)


# -- what a writer needs, and the two kinds of shard -----------------------------------------------------------------
@dataclass(frozen=True)
class WriteContext:
    """Everything a shard writer reads, by path: picklable, and valid on any node that sees these folders."""

    raw_dir: Path
    work: Path
    staging: Path
    max_history: int
    embed_target_content: bool
    item_shards: tuple[str, ...] = ()  # the item shards' paths in staging, once written


@dataclass(frozen=True)
class ShardTask:
    split: str  # "items", or a sample split
    number: int
    first: int
    count: int
    size: int  # the planned bytes of its members: what the writer must reach, or the plan and the writer disagree
    compressed: bool = False  # written through gzip (ShardWriter)

    @property
    def path(self) -> str:
        folder = self.split
        return f"{folder}/{folder}-{self.number:06d}.tar" + (".gz" if self.compressed else "")

    def planned(self) -> dict:
        """The manifest entry the shard will have once written: a compressed shard's size on disk is known only then,
        so it has its tar's size ("tar_bytes") and gets "bytes" when written."""
        return {"path": self.path, "samples": self.count, "tar_bytes" if self.compressed else "bytes": tar_bytes(self.size)}

    def written(self, writer: ShardWriter) -> dict:
        """The manifest entry of the shard `writer` wrote for this task."""
        return self.planned() | {"bytes": writer.close(self)}


def item_header(item: int, raw_id: str, has_image: bool) -> bytes:
    return json.dumps({"item": item, "raw_id": raw_id, "has_image": has_image}, sort_keys=True).encode()


def _rows(parquet: Path, key: str, columns: tuple[str, ...], first: int, count: int, arrays: bool = False):
    """Rows first..first+count-1 of a file the relational stage exported, ordered by `key`: tuples, or a numpy array
    per column."""
    with duckdb.connect(config={"threads": 1}) as db:
        result = db.execute(f"SELECT {', '.join(columns)} FROM read_parquet($1) WHERE {key} >= $2 AND {key} < $3 ORDER BY {key}",
                            [str(parquet), first, first + count])
        return result.fetchnumpy() if arrays else result.fetchall()


def read_image(paths: ImagePaths, image: str, size: int) -> bytes:
    """The image file checked earlier in the build, read again without decoding; refused if it left the dataset
    folder or changed size since."""
    resolved = paths.resolve(image)
    if paths.inside(resolved) and stat.S_ISREG(os.stat(resolved).st_mode):
        with open(resolved, "rb") as f:
            data = f.read()
        if len(data) == size:
            return data
    raise OSError(f"{os.path.join(paths.root, image)} changed while the build was running; build again")


ITEM_INDEX_COLUMNS = ("text_offset", "text_size", "image_offset", "image_size")  # (offset, size) of the text, then the image


def item_index_piece(work: Path, task: ShardTask) -> Path:
    """Where an item shard's writer leaves its items' offsets (ITEM_INDEX_COLUMNS) for the item index."""
    return work / f"item-index-{task.number:06d}.npy"


def write_item_shard(task: ShardTask, ctx: WriteContext) -> dict:
    """Writes one item shard and, for the item index, the offsets of each item's text and image; returns its manifest
    entry."""
    images = np.load(ctx.work / "image_ext.npy", mmap_mode="r"), np.load(ctx.work / "image_size.npy", mmap_mode="r")
    writer, paths = ShardWriter(ctx.staging / task.path), ImagePaths(ctx.raw_dir)
    index = np.zeros((len(ITEM_INDEX_COLUMNS), task.count), np.int64)
    rows = _rows(ctx.work / "items.parquet", "i", ("i", "id", "text", "image"), task.first, task.count)
    for k, (item, raw_id, text, image) in enumerate(rows):
        code = int(images[0][item])
        members = {b"json": item_header(item, raw_id, bool(code)), b"txt": text.encode()}
        if code:
            members[_IMAGE_EXTS[code - 1]] = read_image(paths, image, int(images[1][item]))
        offsets = writer.write(b"%09d" % item, members)
        index[0:2, k] = offsets[b"txt"]
        if code:
            index[2:4, k] = offsets[_IMAGE_EXTS[code - 1]]
    np.save(item_index_piece(ctx.work, task), index)
    return task.written(writer)


class _ItemContent:
    """Text and image bytes of any item, read from the item shards this build wrote with pread (mapped pages would
    count in the writer's RSS, up to the whole catalogue); the item index is read through a map released with the
    sequence files'."""

    COLUMNS = ("shard", "text_offset", "text_size", "image_ext", "image_offset", "image_size")

    def __init__(self, ctx: WriteContext):
        path = ctx.staging / "items" / "index.npz"
        self.index = SharedMap(path)
        self.columns = [self.index.npy(offset) for offset in (npz_offsets(path)[name] for name in self.COLUMNS)]
        self.files = [os.open(ctx.staging / path, os.O_RDONLY) for path in ctx.item_shards]

    def members(self, items: np.ndarray) -> Iterator[dict[str, bytes]]:
        """The content members of each of these items, in order (an item's text and image are adjacent in its shard:
        one read for both)."""
        for shard, text, text_size, ext, image, image_size in zip(*(column[items].tolist() for column in self.columns)):
            end = image + image_size if ext else text + text_size
            data = os.pread(self.files[shard], end - text, text)
            out = {b"txt": data[:text_size]}
            if ext:
                out[_IMAGE_EXTS[ext - 1]] = data[image - text :]
            yield out

    def close(self) -> None:
        for fd in self.files:
            os.close(fd)


def npz_offsets(path: Path) -> dict[str, int]:
    """Where each array of an uncompressed .npz file (np.savez's) starts in it: the offset of its .npy bytes."""
    offsets = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: {info.filename} is compressed")
            f.seek(info.header_offset + 26)  # a local file header: 30 bytes, then the name and an extra field
            name_length, extra_length = struct.unpack("<HH", f.read(4))
            offsets[info.filename.removesuffix(".npy")] = info.header_offset + 30 + name_length + extra_length
    return offsets


_SAMPLE_HEADER = b'{"history": [%s], "split": "%s", "target": %d, "user": %d}'


def sample_header(user: int, target: int, split: bytes, history: bytes) -> bytes:
    """json.dumps({"history", "split", "target", "user"}, sort_keys=True) from the history's JSON text (items joined
    by ", "), written out: the lengths the plan counts on (header_lengths) follow from it."""
    return _SAMPLE_HEADER % (history, split, target, user)


def history_text_ranges(begin: np.ndarray, end: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the histories made of warm items [begin, end) lie in warm_text.bin (item k's text starts at
    digits[k] + 2k, each followed by ", ", which the last item of a history leaves out)."""
    return digits[begin] + 2 * begin, digits[end] + 2 * end - 2 * (end > begin)


def header_lengths(split: str, users: np.ndarray, targets: np.ndarray, history_bytes: np.ndarray) -> np.ndarray:
    """Byte length of each sample's sample_header, from the JSON length of its history."""
    from .relational import decimal_digits

    fixed = len(sample_header(0, 0, split.encode(), b"")) - 2
    return fixed + history_bytes + decimal_digits(targets) + decimal_digits(users)


def write_sample_shard(task: ShardTask, ctx: WriteContext) -> dict:
    """Writes one shard of a split's samples: a header with the user's history, and the target's content when the
    samples embed it. The shard's users and targets are anywhere in the sequence files and the item index, so these
    are read through maps whose pages are dropped every RELEASE_EVERY samples (they stay in the page cache, shared by
    every writer): a writer's memory grows with neither the log nor the catalogue."""
    maps = [SharedMap(ctx.work / name) for name in ("warm_indptr.npy", "warm_digits.npy", "warm_text.bin")]
    indptr, digits, text = maps[0].npy(), maps[1].npy(), maps[2].data
    rows = _rows(ctx.work / f"{task.split}.parquet", "n", ("n", "u", "pos", "i"), task.first, task.count, arrays=True)
    content = _ItemContent(ctx) if ctx.embed_target_content else None
    maps += [content.index] if content else []
    writer, split = ShardWriter(ctx.staging / task.path, task.compressed), task.split.encode()
    try:
        for first in range(0, task.count, RELEASE_EVERY):
            part = {name: values[first : first + RELEASE_EVERY] for name, values in rows.items()}
            start = indptr[part["u"]]
            text_begin, text_end = history_text_ranges(start + np.maximum(0, part["pos"] - ctx.max_history), start + part["pos"], digits)
            members = content.members(part["i"]) if content else repeat({})
            for n, user, target, begin, end, target_content in zip(*(a.tolist() for a in (part["n"], part["u"], part["i"], text_begin,
                                                                                              text_end)), members):
                writer.write(b"%s%010d" % (split, n), {b"json": sample_header(user, target, split, text[begin:end])} | target_content)
            for mapped in maps:
                mapped.release()
    finally:
        if content:
            content.close()
    return task.written(writer)


RELEASE_EVERY = 2_048  # samples between drops of a writer's mapped pages (each faults ~2 places of each file in, 64 KiB each)
NPY_HEADER_MAX = 4096  # the .npy headers the build writes (one-dimensional arrays) are far shorter


class SharedMap:
    """A read-only map of a file (b"" if it is empty) whose pages this process can drop (`release`): they leave its
    RSS, not the page cache, so reading anywhere in a large file costs the process only what it read since."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""

    def npy(self, offset: int = 0) -> np.ndarray:
        """The values of the one-dimensional .npy array at `offset` of the file (a .npy file, or a member of an
        uncompressed .npz), read through the map."""
        header = io.BytesIO(self.data[offset : offset + NPY_HEADER_MAX])
        version = np.lib.format.read_magic(header)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(header)
        return np.frombuffer(self.data, dtype, count=shape[0], offset=offset + header.tell())

    def release(self) -> None:
        if self.data:
            self.data.madvise(mmap.MADV_DONTNEED)


# -- where the work runs ---------------------------------------------------------------------------------------------
class Executor:
    """Runs a function over tasks and returns the results in task order, with a progress bar."""

    workers: int = 1
    nodes: set[str]  # the machines that ran a task

    def map(self, fn: Callable, tasks: Sequence, desc: str, progress: bool, total: int | None = None,
            weight: Callable = lambda task: 1) -> list:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _progress(results: Iterator, tasks: Sequence, desc: str, progress: bool, total: int | None, weight: Callable) -> list:
    out = []
    with tqdm(total=total if total is not None else len(tasks), desc=desc, disable=not progress, unit_scale=True) as bar:
        for task, result in zip(tasks, results):
            out.append(result)
            bar.update(weight(task))
    return out


class LocalExecutor(Executor):
    """A pool of `workers` processes on this machine, forked before the build opens DuckDB (a fork copies no
    database threads); one worker runs everything in this process."""

    def __init__(self, workers: int):
        import multiprocessing

        self.workers, self.nodes = workers, {"this machine"}
        self.pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None

    def map(self, fn, tasks, desc, progress, total=None, weight=lambda task: 1):
        results = self.pool.imap(fn, tasks) if self.pool else map(fn, tasks)
        return _progress(results, tasks, desc, progress, total, weight)

    def close(self) -> None:
        if self.pool:
            self.pool.close()
            self.pool.join()


def _apply(fn: Callable, task) -> tuple[str, object]:
    import ray

    return ray.get_runtime_context().get_node_id(), fn(task)


class RayExecutor(Executor):
    """Ray tasks on a running cluster (`ray start` on each node, the raw data, the output and the work folder on a
    file system every node sees). Ray rather than Spark: a Python function per shard is all a writer is, and Ray
    runs one without a JVM or a serialised dataframe in between."""

    def __init__(self, address: str):
        import ray

        self.ray = ray
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.nodes = set()

    def map(self, fn, tasks, desc, progress, total=None, weight=lambda task: 1):
        # SPREAD: writers go to every node (under the default strategy the 2-node test once saw all of them on one node)
        remote = self.ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_apply)
        refs = [remote.remote(fn, task) for task in tasks]
        return _progress((self._on_node(*self.ray.get(ref)) for ref in refs), tasks, desc, progress, total, weight)

    def _on_node(self, node: str, result):
        self.nodes.add(node)
        return result

    def close(self) -> None:
        self.ray.shutdown()
