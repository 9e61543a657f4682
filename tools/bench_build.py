#!/usr/bin/env python
"""Shard build throughput at scale: build time, interactions/s, peak RSS, temporary disk and output size, on
generated worlds of the sizes asked for, against the physical bounds of this machine.

    python tools/bench_build.py --sizes 1M,10M [--no-target-content] [--workers 2] [--memory-limit 1024]
                                [--worlds /tmp/bench-worlds] [--repo PATH]

Each size N is a world of N/37.5 users and N/10 items with 16 px images (generated once into --worlds and
reused). The build runs as `tools/build_shards.py` of --repo (default: this checkout; point it at an older
checkout to measure that builder), in its own process; peak RSS is that of the largest process in the build's
tree, temporary disk comes from the manifest's build record.
The bounds printed first: sequential disk write (1 GiB through the page cache, then fsync) and image decode
(the world's images, one core).
"""

from __future__ import annotations

import argparse
import io
import json
import os
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


def world_for(size: int, worlds: Path) -> Path:
    world = worlds / f"world-{size}"
    if not (world / "interactions.csv").is_file():
        subprocess.run([sys.executable, str(REPO / "tools/make_world.py"), str(world), "--users", str(round(size / 37.5)),
                        "--items", str(size // 10), "--image-size", "16", "--quiet"], check=True)
    return world


def build(repo: Path, world: Path, out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(repo / "tools/build_shards.py"), str(world), str(out), "--quiet", "--workers", str(args.workers)]
    if args.no_target_content:
        command.append("--no-target-content")
    if repo == REPO:
        command += ["--memory-limit", str(args.memory_limit)]
    # The build runs under a wrapper that reports the largest RSS of any process in the build's tree (any builder).
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(repo)}  # that checkout's library, not the one installed in the venv
    peak_kib = int(subprocess.run([sys.executable, "-c", wrapper, *command], check=True, stdout=subprocess.PIPE, text=True,
                                  env=env).stdout)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": seconds, "interactions": manifest["counts"]["raw"]["interactions"], "samples": sum(manifest["counts"]["samples"].values()),
            "peak_rss_mb": round(peak_kib / 1024), "temp_disk_mb": manifest.get("build", {}).get("temp_disk_mb"),
            "output_gb": folder_bytes(out) / 1e9, "items_gb": folder_bytes(out / "items") / 1e9,
            "stage_seconds": manifest.get("build", {}).get("stage_seconds")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M", help="comma-separated interaction counts (1M, 10M, ...)")
    p.add_argument("--no-target-content", action="store_true", help="ids-only interaction samples")
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
    layout = "ids only" if args.no_target_content else "target content embedded"
    print("\n| interactions | layout | build (s) | interactions/s | peak RSS (MiB) | temporary disk (MiB) | output (GB) | items (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, f in rows:
        print(f"| {f['interactions']:,} | {layout} | {f['seconds']:.1f} | {f['interactions'] / f['seconds']:,.0f} | {f['peak_rss_mb']} | "
              f"{f['temp_disk_mb']} | {f['output_gb']:.2f} | {f['items_gb']:.2f} |")


if __name__ == "__main__":
    main()
