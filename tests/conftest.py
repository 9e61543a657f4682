"""Shared fixtures for the data-layer tests: the real ml100k-mm build (once per session), a tiny
synthetic raw dataset that tests can edit line by line (for planted bad input), a cheap item
preprocess, and an independent reader of shard tar files (a minimal USTAR reader, not webdataset)."""

from __future__ import annotations

import copy
import csv
import gzip
import io
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

# As launch/train.py does, before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Beside a training
# run on 2 cores, tests/test_exactness.py's float64 gradient check (many small ops) took 155 s spinning and 9 s so.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmscale.data.preprocess import ItemPreprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The shared data lives beside the checkout (../shared), so CI clones find it too.
ML100K = REPO.parent / "shared" / "data" / "ml100k-mm"
ML100K_SHARD_MB = 64  # ~1.5 GB of train samples -> a couple of dozen train shards


# -- the real dataset ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ml100k_raw() -> Path:
    if not (ML100K / "interactions.csv").is_file() or not (ML100K / "items.jsonl").is_file():
        pytest.skip(f"real dataset not available: {ML100K} (expected ../shared/data/ml100k-mm beside the repo)")
    return ML100K


@pytest.fixture(scope="session")
def ml100k_shards(ml100k_raw, tmp_path_factory):
    """(shard folder, manifest) of ml100k-mm built with default options, once per session.

    ~25 s and ~1.5 GB; the folder is removed at the end of the session."""
    from mmscale.build.shards import BuildOptions, build_shards

    root = tmp_path_factory.mktemp("ml100k")
    out = root / "shards"
    manifest = build_shards(ml100k_raw, out, BuildOptions(progress=False, shard_size_mb=ML100K_SHARD_MB))
    yield out, manifest
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def session_process_group():
    """A one-rank gloo group for in-process Trainers, one for the whole session: DeepSpeed keeps a clone of the
    first world group it meets for the life of the process, which a later group's Trainer would find unregistered.
    A ready group also means init_distributed skips deepspeed.init_distributed, which on CPU JIT-compiles
    DeepSpeed's shared-memory comm op (minutes) and is not what these tests check."""
    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if made and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_rank_group(session_process_group):
    """For in-process Trainers: the session's group; the process-wide state they set is restored after the module."""
    from helpers.process_state import process_state_restored

    with process_state_restored():
        yield


@pytest.fixture(scope="session")
def world_shards(tmp_path_factory) -> Path:
    """The generated world at a small size (60 users, 80 items), sharded once: for the multi-process tests."""
    from mmscale.build.shards import BuildOptions, build_shards
    from mmscale.build.world import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("tiny-world")
    generate_world(root / "raw", WorldSpec(num_users=60, num_items=80, min_interactions_per_user=8, max_interactions_per_user=20))
    build_shards(root / "raw", root / "shards", BuildOptions(progress=False, workers=1))
    return root / "shards"


@pytest.fixture(scope="session")
def vlmo_tokenizer(world_shards, tmp_path_factory) -> Path:
    """A WordPiece vocabulary of the small world's item texts, for the tiny VLMo."""
    from mmscale.data.item_store import ItemStore
    from mmscale.models.vlmo import build_wordpiece_tokenizer

    store = ItemStore(world_shards)
    return build_wordpiece_tokenizer([store.text(i) for i in range(len(store))], 300, tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="session")
def parity_reference(world_shards, vlmo_tokenizer, tmp_path_factory):
    """reference(N) -> the folder of the parity harness's one-process runs of every case on the global batches of
    N production ranks (tests/helpers/train_worker.py); each N is trained once per session."""
    import os
    import subprocess
    import sys

    from helpers.train_worker import CASES

    folders: dict[int, Path] = {}

    def reference(ranks: int) -> Path:
        if ranks not in folders:
            out = tmp_path_factory.mktemp(f"parity-reference-{ranks}")
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
            proc = subprocess.run([sys.executable, str(REPO / "tests/helpers/train_worker.py"), "--shards", str(world_shards), "--out", str(out),
                                   "--runs", ",".join(CASES), "--reference-ranks", str(ranks), "--vlmo-tokenizer", str(vlmo_tokenizer)],
                                  cwd=REPO, env=env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                                  timeout=1200)
            assert proc.returncode == 0, f"parity reference failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            folders[ranks] = out
        return folders[ranks]

    return reference


# -- a tiny synthetic raw dataset ----------------------------------------------------------------
def solid_jpeg(colour: tuple[int, int, int], size: int = 24) -> bytes:
    """A small JPEG: a colour field with a diagonal stripe (so it is not trivially compressible)."""
    img = Image.new("RGB", (size, size), colour)
    for i in range(size):
        img.putpixel((i, i), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def item_colour(raw_id: int) -> tuple[int, int, int]:
    return ((raw_id * 53) % 256, (raw_id * 97 + 40) % 256, (raw_id * 31 + 90) % 256)


class TinyRaw:
    """A raw dataset (interactions.csv, items.jsonl, images/) held in memory.

    Edit `items` (dicts, or str for a verbatim line), `rows` (lists of cells, or str for a
    verbatim line) and `images` (relative path -> bytes), then `write(root)`. Line numbers:
    items.jsonl line = index in `items` + 1; interactions.csv line = index in `rows` + 2.

    Default content: users "1".."U" (numeric strings, so natural and text order differ once
    U >= 10), items "1".."I"; user u interacts with `lengths[u-1]` distinct items in increasing
    timestamps; items in `no_image` have `"image": null`, the rest a distinct JPEG.
    """

    header = ["user_id", "item_id", "rating", "timestamp"]

    def __init__(self, num_users: int = 6, num_items: int = 8, lengths: list[int] | None = None,
                 no_image: tuple[int, ...] = (), no_description: tuple[int, ...] = ()):
        self.num_users, self.num_items = num_users, num_items
        lengths = lengths or [5] * num_users
        assert len(lengths) == num_users and max(lengths) <= num_items
        self.items: list[dict | str] = []
        self.images: dict[str, bytes] = {}
        for i in range(1, num_items + 1):
            record = {"item_id": str(i), "title": f"Item {i}", "description": f"Description of item {i}."}
            if i in no_description:
                record["description"] = None
            if i in no_image:
                record["image"] = None
            else:
                record["image"] = f"images/{i}.jpg"
                self.images[record["image"]] = solid_jpeg(item_colour(i))
            self.items.append(record)
        self.rows: list[list[str] | str] = []
        for u in range(1, num_users + 1):
            for k in range(lengths[u - 1]):
                item = (u * 5 + k * 3) % num_items + 1
                # k*3 mod num_items must not repeat within a user: num_items not divisible by 3
                rating = (u + k) % 5 + 1
                self.rows.append([str(u), str(item), str(rating), str(1_000_000 + 1000 * u + 10 * k)])
        assert num_items % 3, "pick num_items not divisible by 3 (distinct items per user)"

    def copy(self) -> "TinyRaw":
        return copy.deepcopy(self)

    def item_line(self, raw_id: str) -> int:
        for n, record in enumerate(self.items, start=1):
            if isinstance(record, dict) and record.get("item_id") == raw_id:
                return n
        raise KeyError(raw_id)

    @staticmethod
    def row_line(index: int) -> int:
        return index + 2

    def write(self, root: Path) -> Path:
        root = Path(root)
        if root.exists():
            shutil.rmtree(root)
        (root / "images").mkdir(parents=True)
        with open(root / "items.jsonl", "w", encoding="utf-8") as f:
            for record in self.items:
                f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
        with open(root / "interactions.csv", "w", encoding="utf-8", newline="") as f:
            f.write(",".join(self.header) + "\n")
            for row in self.rows:
                f.write((row if isinstance(row, str) else ",".join(row)) + "\n")
        for rel, data in self.images.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root


@pytest.fixture(scope="session")
def tiny_raw():
    """Factory: tiny_raw(**kwargs) -> a fresh, editable `TinyRaw`."""
    return TinyRaw


# -- a cheap preprocess --------------------------------------------------------------------------
TINY_IMAGE = 8
TOKENS = 48


def tiny_image_transform(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB").resize((TINY_IMAGE, TINY_IMAGE), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def byte_tokenize(texts: list[str]) -> torch.Tensor:
    """Token ids = the first TOKENS utf-8 bytes + 1 (0 pads): invertible, so tests can read texts back."""
    out = torch.zeros(len(texts), TOKENS, dtype=torch.long)
    for row, text in enumerate(texts):
        data = text.encode()[:TOKENS]
        if data:
            out[row, : len(data)] = torch.tensor(list(data)) + 1
    return out


def untokenize(tokens: torch.Tensor) -> str:
    return bytes(int(t) - 1 for t in tokens if int(t) > 0).decode(errors="replace")


@pytest.fixture(scope="session")
def tiny_preprocess() -> ItemPreprocess:
    return ItemPreprocess(image_transform=tiny_image_transform, tokenize=byte_tokenize, image_size=TINY_IMAGE)


@pytest.fixture(scope="session")
def detokenize():
    """Token ids of `tiny_preprocess` -> the text prefix they encode (TOKENS bytes at most)."""
    return untokenize


# -- independent shard reading -------------------------------------------------------------------
def read_tar(path: Path, only: tuple[str, ...] | None = None) -> list[dict]:
    """Samples of one shard in file order: {"__key__": key, ext: bytes, ...}.

    A minimal reader of the builder's USTAR output (5x faster than `tarfile` on the ~1.5 GB
    ml100k train split): members not in `only` are skipped with a seek; a .tar.gz through gzip."""
    samples: dict[str, dict] = {}
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        while True:
            header = f.read(512)
            if len(header) < 512 or header.count(0) == 512:
                break
            assert header[257:262] == b"ustar", f"{path}: not a USTAR member header"
            name = header[:100].rstrip(b"\0").decode()
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            key, _, ext = name.partition(".")
            sample = samples.setdefault(key, {"__key__": key})
            if only is None or ext in only:
                sample[ext] = f.read(size)
                assert len(sample[ext]) == size, f"{path}: {name} truncated"
                f.seek(-size % 512, 1)
            else:
                f.seek(size + (-size % 512), 1)
    return list(samples.values())


def read_split(shard_dir: Path, manifest: dict, split: str, only: tuple[str, ...] | None = None) -> list[dict]:
    out = []
    for shard in manifest["shards"][split]:
        out.extend(read_tar(Path(shard_dir) / shard["path"], only))
    return out


def sample_tuples(samples: list[dict]) -> list[tuple[int, int, tuple[int, ...]]]:
    """(user, target, history) of each interaction sample, from its json header."""
    out = []
    for s in samples:
        h = json.loads(s["json"])
        out.append((h["user"], h["target"], tuple(h["history"])))
    return out


@pytest.fixture(scope="session")
def shard_reader():
    """Namespace of the independent readers above."""

    class Reader:
        tar = staticmethod(read_tar)
        split = staticmethod(read_split)
        tuples = staticmethod(sample_tuples)

    return Reader


# -- the raw files, parsed independently of mmscale.build.raw -------------------------------------
def parse_raw(root: Path) -> tuple[list[tuple[int, str, str, float, float]], dict[str, dict]]:
    """(rows as (line, user, item, timestamp, rating) in file order, items by raw id)."""
    rows = []
    with open(root / "interactions.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for n, row in enumerate(reader, start=2):
            rows.append((n, row["user_id"], row["item_id"], float(row["timestamp"]), float(row["rating"])))
    items = {}
    with open(root / "items.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                items[str(record["item_id"])] = record
    return rows, items


def user_sequences(rows) -> dict[str, list[str]]:
    """Each user's items by time, ties by file order."""
    by_user = defaultdict(list)
    for line, user, item, ts, _ in rows:
        by_user[user].append((ts, line, item))
    return {u: [item for _, _, item in sorted(seq)] for u, seq in by_user.items()}


@pytest.fixture(scope="session")
def raw_parser():
    class Parser:
        parse = staticmethod(parse_raw)
        sequences = staticmethod(user_sequences)

    return Parser
