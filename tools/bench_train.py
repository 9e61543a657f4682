#!/usr/bin/env python
"""Training throughput against open_clip_train, the joint objective's cost, per-rank memory by ZeRO stage.

    python tools/bench_train.py --shards SHARD_DIR [--model configs/models/clip-tiny.json | ViT-B-32]
        [--batch-size 64] [--steps 30] [--warmup 10] [--window 5] [--ranks 1] [--repeats 1]
        [--skip-peer] [--skip-memory] [--memory-model ViT-B-32]
    python tools/bench_train.py --setup-peer        (only create the open_clip_train environment)
    python tools/bench_train.py --shards SHARD_DIR --vlmo [--ranks 2]   (only VLMo-tiny against CLIP-tiny)

1. CLIP contrastive alone: mmscale (`objectives.weights={rec: 0, itc: 1}`) and open_clip_train on
   the same train shards, model, per-rank batch, ranks, workers and precision (fp32), no pretrained
   weights, the same AdamW settings, run back to back (alternating when --repeats > 1).
2. The joint objective ({rec: 1, itc: 1}) against CLIP alone, mmscale only: the step cost ratio.
3. Resident memory per rank for ZeRO stages 0-3 on 2 ranks (or --ranks), joint objective, batch 8,
   next to the ZeRO paper's model-state formulas for mixed-precision Adam (16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N,
   16Ψ/N bytes) and their fp32 equivalent under DeepSpeed; --memory-model ViT-B-32 (151M parameters)
   makes the model states stand out from the runtime's ~1 GB.

Throughput is measured in logging windows of --window steps after --warmup steps: mmscale's
`perf/samples_per_s` from RUN/metrics.jsonl, open_clip_train's `Batch (t)` window averages from its
out.log. Windows are pooled over --repeats; the median and the best window are reported (the best
is the least disturbed by other processes on a shared machine). The headline ratio mmscale /
open_clip_train is printed last.

open_clip_train runs in its own virtual environment (default build/openclip-venv): torch and
torchvision at the project's pins (constraints.txt), open_clip_torch, webdataset 0.2.86, pandas,
braceexpand, fsspec. It is created on first use (about a minute from the local package index).
An architecture JSON is handed to open_clip_train as a `local-dir:` model folder; it runs through
tools/_bench_common.py, which lets its DistributedDataParallel wrap a CPU model (see there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mmscale.bench import (
    CLIP_ALONE, JOINT, REPO, Run, Throughput, after_warmup, rank_env, run_logged, run_mmscale, throughput_header,
    throughput_row,
)

OPEN_CLIP_TRAIN = REPO / "tools" / "_bench_common.py"  # open_clip_train.main, able to run on several CPU ranks
MEMORY_STEPS = 3  # measured after a first step (Adam's state exists from then on)
MEMORY_BATCH = 8  # per rank: small activations, so model states dominate what differs between stages
PEER_PACKAGES = ["open_clip_torch", "webdataset==0.2.86", "pandas", "braceexpand", "fsspec"]
OPEN_CLIP_LOG_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\s*\d+ .*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


# -- open_clip_train ------------------------------------------------------------------------------------
def peer_ready(python: Path) -> bool:
    return python.is_file() and subprocess.run([str(python), "-c", "import open_clip_train.main, webdataset"],
                                               capture_output=True).returncode == 0


def setup_peer(venv: Path) -> Path:
    """open_clip_train's own environment: the project's torch pins, webdataset 0.2.86 (not the project's)."""
    python = venv / "bin" / "python"
    if peer_ready(python):
        return python
    print(f"creating {venv} for open_clip_train (torch, open_clip_torch, webdataset 0.2.86)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if not line.lower().startswith("webdataset==")]
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--constraint", str(constraints)]
    subprocess.run(pip + ["torch", "torchvision"], check=True)
    subprocess.run(pip + PEER_PACKAGES, check=True)
    if not peer_ready(python):
        raise SystemExit(f"bench_train: {python} cannot import open_clip_train.main after the install")
    return python


def torch_device() -> str:
    """Where open_clip_train runs: where mmscale does (CUDA when there is one)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_clip_model(model: str, work: Path) -> str:
    """A model name as is; an architecture JSON as a `local-dir:` folder holding open_clip_config.json."""
    path = Path(model)
    if path.suffix != ".json":
        return model
    folder = work / f"open_clip-{path.stem}"
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(path.read_text()), "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


def run_open_clip(args, python: Path, work: Path, name: str) -> Run:
    manifest = json.loads((Path(args.shards) / "manifest.json").read_text())
    shards = "::".join(str(Path(args.shards) / s["path"]) for s in manifest["shards"]["train"])
    # Its logs go to ./logs/NAME: run in `work`, as torchrun's parser takes --logs for an ambiguous --logs-specs.
    logs = work / "logs" / name
    shutil.rmtree(logs, ignore_errors=True)  # open_clip_train refuses an existing experiment, exiting 0
    global_batch = args.batch_size * args.ranks
    # Its first log line covers batch 1 alone, the next batches 2..window+1, and so on. The epoch runs one
    # window past the measured ones: in its last batches the dataloader workers have stopped decoding
    # ahead, which frees the cores and would flatter the final window.
    measured_end = args.warmup + 1 + args.steps
    train = [
        "--train-data", shards, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str((measured_end + args.window) * global_batch), "--epochs", "1",
        "--model", open_clip_model(args.model, work), "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--precision", "fp32", "--device", torch_device(),
        "--lr", str(args.lr), "--warmup", str(args.warmup), "--wd", "0.05", "--beta1", "0.9", "--beta2", "0.98",
        "--eps", "1e-6", "--grad-clip-norm", "1.0", "--gather-with-grad", "--seed", "0",
        "--log-every-n-steps", str(args.window), "--name", name,
    ]
    if args.ranks == 1:
        launcher = [str(python), str(OPEN_CLIP_TRAIN)]
    else:
        from mmscale.engine.distributed import free_port

        launcher = [str(python), "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                    "--master_port", str(free_port()), str(OPEN_CLIP_TRAIN)]
    load = os.getloadavg()[0]
    run_logged(launcher + train, rank_env(args.ranks), work / f"{name}.stdout", cwd=work)
    windows, previous = [], 0
    for match in OPEN_CLIP_LOG_LINE.finditer((logs / "out.log").read_text()):
        done = int(match[1]) // global_batch  # batches finished when the line was written
        data_avg, batch_avg = float(match[2]), float(match[3])  # window averages, s per batch
        windows.append((previous + 1, done, batch_avg * (done - previous), data_avg * (done - previous)))
        previous = done
    shutil.rmtree(logs / "checkpoints", ignore_errors=True)
    return Run(after_warmup([w for w in windows if w[1] <= measured_end], args.warmup), global_batch, load)


# -- sections -----------------------------------------------------------------------------------------
def compare(args, work: Path, peer: Path | None) -> tuple[Throughput, Throughput | None, Throughput]:
    """CLIP alone (mmscale, then open_clip_train), then the joint objective, alternating per repeat."""
    clip, peer_runs, joint = [], [], []
    setting = dict(shards=args.shards, workers=args.workers, lr=args.lr, stage=args.zero_stage, ranks=args.ranks,
                   model=args.model, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, window=args.window)
    for i in range(args.repeats):
        clip.append(run_mmscale(work, f"mmscale-itc-{i}", weights=CLIP_ALONE, **setting))
        if peer is not None:
            peer_runs.append(run_open_clip(args, peer, work, f"open_clip-{i}"))
        joint.append(run_mmscale(work, f"mmscale-joint-{i}", weights=JOINT, **setting))
    return Throughput.of(clip), Throughput.of(peer_runs) if peer_runs else None, Throughput.of(joint)


def print_throughput(args, clip: Throughput, peer: Throughput | None, joint: Throughput) -> None:
    setting = (f"model {args.model}, batch {args.batch_size}/rank x {args.ranks} rank(s), fp32, workers {args.workers}, "
               f"{args.steps} steps after {args.warmup} in windows of {args.window}, x {args.repeats}, "
               f"mmscale {zero_label(args.zero_stage, args.ranks)}, OMP_NUM_THREADS {rank_env(args.ranks)['OMP_NUM_THREADS']}")
    print(f"\n== CLIP contrastive alone, same shards: {setting}")
    print(throughput_header())
    print(throughput_row("mmscale {rec:0, itc:1}", clip))
    if peer is not None:
        print(throughput_row("open_clip_train", peer))
    print("\n== Joint objective against CLIP alone (mmscale)")
    print(throughput_header())
    print(throughput_row("itc alone", clip))
    print(throughput_row("rec + itc", joint))
    print(f"step cost, joint / CLIP alone: {clip.median / joint.median:.2f}x (medians), {clip.best / joint.best:.2f}x (best windows)")


def zero_label(stage: int, ranks: int) -> str:
    from mmscale.engine.deepspeed_config import runs_as_stage

    runs = runs_as_stage(stage, ranks)
    return f"ZeRO-{stage}" if runs == stage else f"ZeRO-{stage} config (run as stage {runs}: one rank)"


def model_states(precision: str, stage: int, psi: int, ranks: int) -> float:
    from mmscale.engine.scale_plan import model_state_bytes

    return sum(model_state_bytes(psi, ranks, stage, precision).values())


def memory_section(args, work: Path) -> None:
    """ZeRO stages 0-3 on the joint objective: per-rank RSS next to the model-state formulas."""
    from mmscale.engine.scale_plan import FORMULAS

    ranks, model = max(args.ranks, 2), args.memory_model or args.model
    runs = {stage: run_mmscale(work, f"memory-zero{stage}", shards=args.shards, workers=args.workers, lr=args.lr,
                               weights=JOINT, stage=stage, ranks=ranks, model=model,
                               batch_size=MEMORY_BATCH, warmup=1, steps=MEMORY_STEPS, window=1, watch_memory=True)
            for stage in range(4)}
    psi = runs[0].parameters  # counted before partitioning (run_info.json says "partitioned" under ZeRO-3)
    mib = 2**20
    base = max(runs[0].memory.training.values())
    print(f"\n== Memory per rank by ZeRO stage: {model}, {ranks} ranks, batch {MEMORY_BATCH}/rank, joint objective, fp32, "
          f"Ψ = {psi:,} parameters; MiB")
    print(f"{'stage':>5} {'mixed-precision Adam':>22} {'fp32 under DeepSpeed':>22} {'RSS training':>13} {'Δ stage 0':>10} "
          f"{'Δ predicted':>12} {'peak RSS':>10} {'ms/step':>8} {'load(1m)':>9}")
    for stage, run in runs.items():
        training, speed = max(run.memory.training.values()), Throughput.of([run])
        mixed = f"{FORMULAS['bf16'][stage]} = {model_states('bf16', stage, psi, ranks) / mib:.0f}"
        fp32 = f"{FORMULAS['fp32'][stage]} = {model_states('fp32', stage, psi, ranks) / mib:.0f}"
        predicted = (model_states('fp32', stage, psi, ranks) - model_states('fp32', 0, psi, ranks)) / mib
        print(f"{stage:5d} {mixed:>22} {fp32:>22} {training / mib:13.0f} {(training - base) / mib:10.0f} {predicted:12.0f} "
              f"{max(run.memory.peak.values()) / mib:10.0f} {speed.ms_per_step(speed.median):8.0f} {run.load:9.2f}")
    print("RSS training: the largest rank's resident set during steps 2-4 (after Adam's state exists, before the final\n"
          "checkpoint); peak RSS: VmHWM of the whole run (start-up, checkpoint included). The formulas count model states\n"
          "only; RSS adds the Python/torch/DeepSpeed runtime, activations, batches, communication buckets and\n"
          "allocator caching, which the Δ against stage 0 cancels in part.")


def vlmo_section(args, work: Path) -> None:
    """VLMo against CLIP at equal width and depth: each side the tiny CLIP's 2 blocks of width 64 (2 heads, MLP x4,
    32 px, patch 8, 32 text positions), the joint objective, --ranks ranks, one step's memory watched."""
    from mmscale.data.item_store import ItemStore
    from mmscale.models.vlmo import build_wordpiece_tokenizer

    store = ItemStore(args.shards)
    tokenizer = build_wordpiece_tokenizer((store.text(i) for i in range(len(store))), 1000, work / "wordpiece")
    vlmo = json.loads((REPO / "configs/models/vlmo-tiny.json").read_text()) | {"depth": 2, "vl_layers": 2}
    (work / "vlmo-tiny-d2.json").write_text(json.dumps(vlmo))
    sides = {"CLIP-tiny": (args.model, None),
             "VLMo-tiny (depth 2)": (str(work / "vlmo-tiny-d2.json"), {"kind": "vlmo", "tokenizer": tokenizer})}
    runs: dict[str, list[Run]] = {name: [] for name in sides}
    for i in range(args.repeats):
        for name, (model, encoder) in sides.items():
            runs[name].append(run_mmscale(work, f"{name.split()[0]}-{i}", shards=args.shards, workers=args.workers, lr=args.lr,
                                          weights=JOINT, stage=args.zero_stage, ranks=args.ranks,
                                          model=model, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                                          window=args.window, watch_memory=True, encoder=encoder))
    print(f"\n== VLMo against CLIP at equal width and depth: joint objective (rec + itc), batch {args.batch_size}/rank x "
          f"{args.ranks} rank(s), fp32, {zero_label(args.zero_stage, args.ranks)}")
    print(throughput_header() + f" {'params':>9} {'RSS MiB':>8}")
    speed = {name: Throughput.of(r) for name, r in runs.items()}
    for name, r in runs.items():
        rss = max(max(run.memory.training.values()) for run in r) / 2**20
        print(throughput_row(name, speed[name]) + f" {r[0].parameters or 0:9,d} {rss:8.0f}")
    clip, vlmo = speed["CLIP-tiny"], speed["VLMo-tiny (depth 2)"]
    print(f"step time, VLMo / CLIP: {clip.median / vlmo.median:.2f}x (medians), {clip.best / vlmo.best:.2f}x (best windows)")
    print("Parameters differ mostly by the text embedding tables: CLIP's BPE vocabulary has 49,408 tokens, the VLMo run\n"
          "a WordPiece vocabulary trained on the catalogue's texts; VLMo also keeps both modality experts in every block.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="a shard folder written by tools/build_shards.py")
    p.add_argument("--model", default=str(REPO / "configs/models/clip-tiny.json"), help="open_clip model name or architecture JSON")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--steps", type=int, default=30, help="measured steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the measurement (also the learning-rate warmup)")
    p.add_argument("--window", type=int, default=5, help="steps per logging window, the unit of the median and best figures")
    p.add_argument("--ranks", type=int, default=1, help="deepspeed --num_gpus N for mmscale, torchrun --nproc_per_node N for open_clip_train")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers per rank")
    p.add_argument("--lr", type=float, default=1e-4, help="encoder learning rate (mmscale optim.lr_encoder, open_clip_train --lr)")
    p.add_argument("--zero-stage", type=int, default=2, choices=range(4), help="mmscale's ZeRO stage for the throughput runs")
    p.add_argument("--repeats", type=int, default=1, help="alternate the throughput runs this many times, pooling their windows")
    p.add_argument("--peer-venv", default=str(REPO / "build/openclip-venv"), help="open_clip_train's virtual environment (created if missing)")
    p.add_argument("--setup-peer", action="store_true", help="only create the open_clip_train environment")
    p.add_argument("--skip-peer", action="store_true", help="no open_clip_train run")
    p.add_argument("--skip-memory", action="store_true", help="no ZeRO memory section")
    p.add_argument("--memory-model", help="model of the memory section (default: --model); ViT-B-32 makes the model states visible")
    p.add_argument("--work-dir", help="keep run folders and logs here (default: a temporary folder, removed)")
    p.add_argument("--vlmo", action="store_true", help="only VLMo-tiny against CLIP-tiny at equal width and depth (step time, RSS)")
    args = p.parse_args(argv)
    if not args.setup_peer and not args.shards:
        p.error("--shards is required (unless --setup-peer)")
    if args.shards and not (Path(args.shards) / "manifest.json").is_file():
        p.error(f"--shards {args.shards}: no manifest.json (build it with tools/build_shards.py)")
    for key in ("model", "memory_model"):
        if getattr(args, key) and Path(getattr(args, key)).suffix == ".json":
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    args.shards = args.shards and str(Path(args.shards).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup_peer:
        print(f"open_clip_train environment: {setup_peer(Path(args.peer_venv))}")
        return 0
    peer = None if args.skip_peer or args.vlmo else setup_peer(Path(args.peer_venv))
    with contextlib.nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory(prefix="bench_train-") as folder:
        work = Path(folder).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if args.vlmo:
            vlmo_section(args, work)
            return 0
        clip, peer_throughput, joint = compare(args, work, peer)
        print_throughput(args, clip, peer_throughput, joint)
        if not args.skip_memory:
            memory_section(args, work)
    if peer_throughput is not None:
        print(f"\nmmscale / open_clip_train samples/s, CLIP contrastive alone ({args.ranks} rank(s) x batch {args.batch_size}): "
              f"{clip.median / peer_throughput.median:.2f} (medians), {clip.best / peer_throughput.best:.2f} (best windows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
