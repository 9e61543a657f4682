#!/usr/bin/env python
"""Shard build throughput at scale: build time, interactions/s, peak RSS, temporary disk and output size, on
generated worlds of the sizes asked for, against the physical bounds of this machine.

    python tools/bench_build.py --sizes 1M,10M [--no-target-content] [--cold] [--plan-only] [--workers 2]
                                [--memory-limit 1024] [--worlds /tmp/bench-worlds] [--repo PATH]

Each size N up to 10M is a world of N/37.5 users and N/10 items with 16 px images (generated once into --worlds
and reused); a larger N is the 10M world tiled N/10M times with disjoint user and item ids, each copy's items
naming the same images (hard links into the world's own folder), since generating it would take more memory than
this machine has. The build runs as `tools/build_shards.py` of --repo (default: this checkout; point it at an
older checkout to measure that builder), in its own process; peak RSS is that of the largest process in the
build's tree, temporary disk comes from the manifest's build record. --cold drops the world's files from the
page cache before each build (as a build of data just copied in, or read from a network disk, would find
them); --plan-only runs every stage but the shard writes (for sizes whose shards do not fit the disk).
The bounds printed last: sequential disk write (1 GiB through the page cache, then fsync) and image decode
(the world's images, one core).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> int:
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def disk_write_rate(folder: Path) -> float:
    """MiB/s for 1 GiB written in 16 MiB blocks and fsynced."""
    path, block = folder / "bench-write.tmp", os.urandom(16 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return 1024 / seconds


def decode_rate(world: Path, count: int = 5000) -> float:
    """Images read and fully decoded per second on one core."""
    from PIL import Image

    paths = sorted((world / "images").rglob("*.*"))[:count]
    start = time.perf_counter()
    for path in paths:
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            img.load()
    return len(paths) / (time.perf_counter() - start)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


TILE = 10**7  # larger worlds are tiles of this one


def world_for(size: int, worlds: Path) -> Path:
    world = worlds / f"world-{size}"
    if (world / "interactions.csv").is_file():
        return world
    if size <= TILE:
        subprocess.run([sys.executable, str(REPO / "tools/make_world.py"), str(world), "--users", str(round(size / 37.5)),
                        "--items", str(size // 10), "--image-size", "16", "--quiet"], check=True)
    else:
        tile_world(world_for(TILE, worlds), world, size // TILE)
    return world


def tile_world(base: Path, world: Path, copies: int) -> None:
    """`copies` copies of a generated world's interactions and items, copy k's user and item ids offset by k times the
    base world's counts; the items keep their image paths, and the images are hard links to the base world's."""
    import duckdb

    spec = json.loads((base / "world.json").read_text())["spec"]
    users, items = spec["num_users"], spec["num_items"]
    partial = world.with_name(world.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    for name in os.listdir(base / "images"):
        os.link(base / "images" / name, partial / "images" / name)
    with open(partial / "interactions.csv", "wb") as out, duckdb.connect() as db:
        with open(base / "interactions.csv", "rb") as header:
            out.write(header.readline())
        for k in range(copies):
            part = partial / f"copy-{k}.csv"
            db.execute(f"COPY (SELECT user_id + {k * users}, item_id + {k * items}, rating, timestamp FROM read_csv($1)) TO $2 "
                       "(HEADER false)", [str(base / "interactions.csv"), str(part)])
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            part.unlink()
    prefix = '{"item_id": "'
    with open(partial / "items.jsonl", "w") as out:
        for k in range(copies):
            with open(base / "items.jsonl") as f:
                for line in f:
                    assert line.startswith(prefix), line[:100]
                    end = line.index('"', len(prefix))
                    out.write(f"{prefix}{int(line[len(prefix):end]) + k * items}{line[end:]}")
    os.replace(partial, world)


def evict(world: Path) -> None:
    """Drops the world's files from the page cache (their directory entries and inodes stay cached)."""
    for root, _, files in os.walk(world):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def build(repo: Path, world: Path, out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(repo / "tools/build_shards.py"), str(world), str(out), "--quiet", "--workers", str(args.workers)]
    if args.no_target_content:
        command.append("--no-target-content")
    if args.plan_only:
        command.append("--plan-only")
    if args.cold:
        evict(world)
    if repo == REPO:
        command += ["--memory-limit", str(args.memory_limit)]
    # The build runs under a wrapper that prints the largest RSS of any process in the build's tree (any builder),
    # then the builder's report.
    wrapper = ("import resource, subprocess, sys; report = subprocess.run(sys.argv[1:], check=True, stdout=subprocess.PIPE).stdout; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stdout.write(report.decode())")
    start = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(repo)}  # that checkout's library, not the one installed in the venv
    peak_kib, report = subprocess.run([sys.executable, "-c", wrapper, *command], check=True, stdout=subprocess.PIPE, text=True,
                                      env=env).stdout.split("\n", 1)
    peak_kib = int(peak_kib)
    seconds = time.perf_counter() - start
    if args.plan_only:  # the figures the tool printed, the shard sizes planned
        printed = dict(line.split(": ", 1) for line in report.splitlines() if ": " in line)
        planned = {split: float(gb) for split, gb in re.findall(r"(\w+) \d+ \(([\d.]+) GB", printed["planned shards"])}
        return {"seconds": seconds, "interactions": int(re.search(r"'interactions': (\d+)", printed["raw"])[1]),
                "peak_rss_mb": round(peak_kib / 1024), "temp_disk_mb": int(re.search(r"temporary disk ([\d,]+) MiB", printed["build"])[1].replace(",", "")),
                "output_gb": sum(planned.values()), "items_gb": planned["items"], "stages": printed["stages"]}
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": seconds, "interactions": manifest["counts"]["raw"]["interactions"], "samples": sum(manifest["counts"]["samples"].values()),
            "peak_rss_mb": round(peak_kib / 1024), "temp_disk_mb": manifest.get("build", {}).get("temp_disk_mb"),
            "output_gb": folder_bytes(out) / 1e9, "items_gb": folder_bytes(out / "items") / 1e9,
            "stage_seconds": manifest.get("build", {}).get("stage_seconds"), "stage_peak_rss_mb": manifest.get("build", {}).get("stage_peak_rss_mb")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M", help="comma-separated interaction counts (1M, 10M, ...)")
    p.add_argument("--no-target-content", action="store_true", help="ids-only interaction samples")
    p.add_argument("--cold", action="store_true", help="drop the world's files from the page cache before each build")
    p.add_argument("--plan-only", action="store_true", help="every stage but the shard writes (output size as planned)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", type=int, default=1024, metavar="MB")
    p.add_argument("--worlds", default="/tmp/bench-worlds", help="where the generated worlds are kept between runs")
    p.add_argument("--out", default=None, help="where the shards go (default: WORLDS/shards, replaced for each size)")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose tools/build_shards.py is measured")
    args = p.parse_args(argv)
    worlds = Path(args.worlds)
    worlds.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else worlds / "shards"
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        world = world_for(size, worlds)
        figures = build(Path(args.repo).resolve(), world, out, args)
        rows.append((size, figures))
        print(f"{size:,}: {figures}", flush=True)
    print(f"\nbounds: disk write {disk_write_rate(out.parent):,.0f} MiB/s; image decode {decode_rate(world_for(sizes[0], worlds)):,.0f} "
          f"images/s on one core; load {os.getloadavg()[0]:.1f}")
    layout = ("ids only" if args.no_target_content else "target content embedded") + (", cold cache" if args.cold else "") + (
        ", plan only" if args.plan_only else "")
    print("\n| interactions | layout | build (s) | interactions/s | peak RSS (MiB) | temporary disk (MiB) | output (GB) | items (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, f in rows:
        print(f"| {f['interactions']:,} | {layout} | {f['seconds']:.1f} | {f['interactions'] / f['seconds']:,.0f} | {f['peak_rss_mb']} | "
              f"{f['temp_disk_mb']} | {f['output_gb']:.2f} | {f['items_gb']:.2f} |")


if __name__ == "__main__":
    main()
