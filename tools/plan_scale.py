#!/usr/bin/env python
"""Plan a run at a scale this machine cannot run: per-rank memory, communication, step time, fit.

    python tools/plan_scale.py --model clip-vit-l-14 --gpus 8,64,1024 [--zero-stage 3] [--micro-batch 64]
        [--gpu-memory-gib 80] [--peak-tflops 989] [--mfu 0.35] [--intra-node-gbps 360] [--inter-node-gbps 40]
        [--gpus-per-node 8] [--runtime-gib 3] [--activation-factor 1.0] [--items 1000000] [--users 1000000]
    python tools/plan_scale.py --config configs/ml100k-vlmo.yaml --gpus 16 ...   (the config's encoder and towers)
    python tools/plan_scale.py --validate --shards build/world-shards [--model ViT-B-32] [--ranks 1,2,4]

Models: clip-vit-b-16, clip-vit-l-14, vlmo-base, vlmo-large (two-tower recommender on top, towers of
width --embed-dim with id embeddings for --items and --users), or --config. Parameters, FLOPs per
sample and the activations kept for backward are counted on mmscale's own model code, built on the
meta device (mmscale/engine/scale_plan.py); model states follow the ZeRO formulas. The defaults
describe H100 SXM nodes of 8 GPUs in bf16: 989 dense TFLOP/s at 35% utilisation, ring collectives
at 360 GB/s per GPU over NVLink and 40 GB/s per GPU across nodes (8 x 400 Gb/s NICs per node),
3 GiB per GPU of runtime (CUDA context, NCCL and DeepSpeed buffers, allocator slack), flash
attention (attention matrices not kept), and no overlap of communication with compute.

--validate checks the planner on this machine's CPU ranks, one thread each (a rank stands for a
GPU): on a one-rank run it fits the fraction of the bare forward-and-backward FLOP rate a training
step achieves and the runtime memory; for each --ranks it measures what the "devices" give when that
many run at once (each rank's forward-and-backward FLOP/s, gloo's all-reduce bandwidth), predicts
samples/s and per-rank memory, runs launch/train.py there (ZeRO --zero-stage, fp32, no loader
workers) and prints predicted, measured and the error.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the library imports torch: imported where used, after the arguments are parsed
    from mmscale.engine.scale_plan import ModelProfile

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "clip-vit-b-16": ("clip", "ViT-B-16"),
    "clip-vit-l-14": ("clip", "ViT-L-14"),
    "vlmo-base": ("vlmo", "vlmo-base"),
    "vlmo-large": ("vlmo", "vlmo-large"),
}
GIB = 2**30


def model_profile(args, precision: str) -> ModelProfile:
    from mmscale.config import load_config
    from mmscale.engine.scale_plan import profile_model
    from mmscale.models.vlmo import build_wordpiece_tokenizer

    if args.config:
        config = load_config(args.config, args.set)
        name = Path(args.config).stem
    else:
        kind, model = MODELS.get(args.model, ("clip", args.model))
        overrides = [f"encoder.kind={kind}", f"encoder.model={model}", f"recommender.embed_dim={args.embed_dim}", *args.set]
        config = load_config(None, overrides)
        name = args.model
    with tempfile.TemporaryDirectory(prefix="plan_scale-") as folder:
        if config.encoder.kind == "vlmo" and config.encoder.tokenizer is None:
            # Any WordPiece tokenizer does: the model's vocabulary size is its JSON's; inputs are padded to full length.
            config.encoder.tokenizer = str(build_wordpiece_tokenizer(["an item"], 100, folder))
        return profile_model(config, args.users, args.items, precision, name)


def describe(profile: ModelProfile) -> str:
    return (f"{profile.name}: {profile.parameters / 1e6:,.1f}M trainable parameters ({profile.encoder_parameters / 1e6:,.1f}M in the "
            f"encoder), {profile.flops_per_sample / 1e9:,.1f} GFLOP per sample (forward + backward), activations kept "
            f"{profile.saved_bytes_per_sample / 2**20:,.1f} MiB per sample in {profile.precision} "
            f"({profile.attention_bytes_per_sample / 2**20:,.1f} MiB of them attention matrices)")


PLAN_COLUMNS = ("GPUs", "params GiB", "grads GiB", "optim GiB", "activ GiB", "peak GiB", "fits", "comm GB/step", "compute ms",
                "comm ms", "step ms", "samples/s", "scaling")


def plan_row(p, scaling: float) -> list[str]:
    return [f"{p.ranks}", f"{p.states['parameters'] / GIB:.2f}", f"{p.states['gradients'] / GIB:.2f}", f"{p.states['optimizer'] / GIB:.2f}",
            f"{p.activations / GIB:.2f}", f"{p.memory / GIB:.2f}", "yes" if p.fits else "NO", f"{p.communication / 1e9:.2f}",
            f"{p.compute_s * 1e3:.0f}", f"{p.communication_s * 1e3:.0f}", f"{p.step_s * 1e3:.0f}", f"{p.samples_per_s:,.0f}", f"{scaling:.0%}"]


def print_plans(args) -> None:
    from mmscale.engine.scale_plan import FORMULAS, Hardware, plan

    profile = model_profile(args, args.precision)
    hardware = Hardware(memory_gib=args.gpu_memory_gib, flops=args.peak_tflops * 1e12 * args.mfu,
                        intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                        ranks_per_node=args.gpus_per_node, runtime_gib=args.runtime_gib,
                        activation_factor=args.activation_factor, flash_attention=not args.no_flash_attention,
                        comm_overlap=args.comm_overlap)
    print(describe(profile))
    for stage in args.zero_stage:
        print(f"\nZeRO-{stage} ({FORMULAS[args.precision][stage]} of model states), micro-batch {args.micro_batch} per GPU, "
              f"{args.gpu_memory_gib:g} GiB per GPU, {args.peak_tflops:g} TFLOP/s x {args.mfu:g}, links {args.intra_node_gbps:g} / "
              f"{args.inter_node_gbps:g} GB/s, {args.gpus_per_node} GPUs per node")
        plans = [plan(profile, hardware, gpus, stage, args.micro_batch) for gpus in args.gpus]
        base = plans[0].samples_per_s / plans[0].ranks
        rows = [plan_row(p, p.samples_per_s / p.ranks / base) for p in plans]
        if args.markdown:
            print("| " + " | ".join(PLAN_COLUMNS) + " |\n|" + " --- |" * len(PLAN_COLUMNS))
            print("\n".join("| " + " | ".join(row) + " |" for row in rows))
        else:
            widths = [max(len(c), 6) for c in PLAN_COLUMNS]
            print(" ".join(c.rjust(w) for c, w in zip(PLAN_COLUMNS, widths)))
            print("\n".join(" ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows))
    print("peak: model states + runtime + the larger of activations and the optimizer's temporary. "
          "scaling: samples/s per GPU against the first row.")


# -- validation on CPU ranks -----------------------------------------------------------------------------
def _device_worker(rank: int, ranks: int, port: int, model: str, batch: int, repeats: int, mib: int, out: str) -> None:
    """One thread per rank, as in the training runs: all ranks run the encoder's forward and backward on
    random inputs at once, then time gloo all-reduces of `mib` MiB."""
    import torch
    import torch.distributed as dist

    from mmscale.config import EncoderConfig
    from mmscale.models import build_encoder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    encoder = build_encoder(EncoderConfig(model=model)).train()
    spec = encoder.preprocess()
    images, tokens = torch.randn(batch, 3, spec.image_size, spec.image_size), spec.tokenize(["an item"] * batch)

    def step() -> None:
        image, text = encoder(images, tokens)
        (image.sum() + text.sum()).backward()

    step()  # first-call allocations
    dist.barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = [0.0] * ranks
    dist.all_gather_object(seconds, (time.perf_counter() - started) / repeats)
    tensor, times = torch.ones(mib * 2**20 // 4), []
    if ranks > 1:
        dist.all_reduce(tensor)  # connections and buffers
        for _ in range(repeats):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - started)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": statistics.mean(seconds), "all_reduce_s": times}))
    dist.destroy_process_group()


def measure_devices(profile: ModelProfile, model: str, batch: int, ranks: int, repeats: int = 3, mib: int = 128) -> tuple[float, float]:
    """What each of `ranks` local one-thread processes gets when all run at once: the FLOP/s of the
    encoder's forward and backward (cores of a virtual machine share caches and memory bandwidth), and
    gloo's all-reduce as ring bus bandwidth, GB/s per rank: the bytes each rank sends, 2(N-1)/N of the
    tensor, over the median time (inf for one rank)."""
    import torch.multiprocessing as mp

    from mmscale.engine.distributed import free_port

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        mp.spawn(_device_worker, args=(ranks, free_port(), model, batch, repeats, mib, out.name), nprocs=ranks)
        found = json.loads(Path(out.name).read_text())
    flops = profile.flops_per_sample * batch / found["step_s"]
    if ranks == 1:
        return flops, float("inf")
    return flops, 2 * (ranks - 1) / ranks * mib * 2**20 / statistics.median(found["all_reduce_s"]) / 1e9


def zero_buckets(stage: int) -> float:
    """Bytes of ZeRO-1/2's fp32 gradient buckets under ds_configs/zeroK.json: two of reduce_bucket_size with
    overlap_comm (DeepSpeed's double buffer), one without."""
    if stage not in (1, 2):
        return 0.0
    zero = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())["zero_optimization"]
    return (2 if zero.get("overlap_comm") else 1) * float(zero.get("reduce_bucket_size", 5e8)) * 4


def validate(args) -> None:
    from mmscale.bench import JOINT, Throughput, run_mmscale
    from mmscale.config import load_config
    from mmscale.data.shard_set import ShardSet
    from mmscale.engine.scale_plan import Hardware, plan, profile_model

    shards = ShardSet.open(args.shards)
    config = load_config(REPO / "configs/demo.yaml", [f"encoder.model={args.model}"])
    profile = profile_model(config, shards.num_users, shards.num_items, "fp32", args.model)
    print(describe(profile), flush=True)
    # No loader workers: each rank decodes its own batches in series, as its share of the step (on GPU
    # nodes the loaders run on host cores beside the devices; here they would take the ranks' cores).
    work = Path(tempfile.mkdtemp(prefix="plan_scale-"))  # run folders and logs; removed at exit
    atexit.register(shutil.rmtree, work, ignore_errors=True)

    def measure(ranks: int, batch: int) -> tuple[float, float]:
        """Median samples/s and the largest rank's RSS during training steps (glibc keeps what is freed:
        the high-water mark of the steps)."""
        run = run_mmscale(work, f"r{ranks}-b{batch}", shards=args.shards, workers=0, weights=JOINT, stage=args.zero_stage,
                          ranks=ranks, model=args.model, batch_size=batch, warmup=args.warmup, steps=args.steps,
                          window=1, watch_memory=True, threads=1, return_freed_memory=False)
        return Throughput.of([run]).median, max(run.memory.training.values())

    batch, cores = args.micro_batch, os.cpu_count() or 1
    # A CPU rank with one thread stands for one device; what it achieves with others running beside it is
    # measured, like a GPU's FLOP rate and link bandwidth would be.
    print(f"fitting on 1 rank with 1 thread, micro-batch {batch} (ZeRO-{args.zero_stage}, fp32) ...", flush=True)
    device_alone, _ = measure_devices(profile, args.model, batch, 1)
    rate, memory = measure(1, batch)
    training_flops = profile.flops_per_sample * rate
    utilisation = training_flops / device_alone
    one_rank = Hardware(memory_gib=0, flops=training_flops, intra_node_gbps=1, inter_node_gbps=1, ranks_per_node=cores, runtime_gib=0,
                        optimizer_temporary_bytes=8, optimizer_per_tensor=True, zero_bucket_bytes=zero_buckets(args.zero_stage))
    runtime_gib = (memory - plan(profile, one_rank, 1, args.zero_stage, batch).memory) / GIB
    print(f"fitted: training achieves {training_flops / 1e9:.1f} GFLOP/s ({rate:.2f} samples/s), {utilisation:.0%} of the rate of a "
          f"lone rank's bare forward and backward ({device_alone / 1e9:.1f} GFLOP/s); runtime {runtime_gib:.2f} GiB", flush=True)
    rows = [(1, device_alone, 0.0, plan(profile, replace(one_rank, runtime_gib=runtime_gib), 1, args.zero_stage, batch), rate, memory,
             os.getloadavg()[0])]
    for ranks in [r for r in args.ranks if r > 1]:
        device, bandwidth = measure_devices(profile, args.model, batch, ranks)
        hardware = replace(one_rank, flops=utilisation * device, intra_node_gbps=bandwidth, inter_node_gbps=bandwidth, runtime_gib=runtime_gib)
        predicted = plan(profile, hardware, ranks, args.zero_stage, batch)
        load = os.getloadavg()[0]
        measured_rate, measured_memory = measure(ranks, batch)
        rows.append((ranks, device, bandwidth, predicted, measured_rate, measured_memory, load))
        print(f"  {ranks} ranks: forward and backward {device / 1e9:.1f} GFLOP/s per rank, gloo all-reduce {bandwidth:.2f} GB/s; predicted "
              f"{predicted.samples_per_s:.2f} samples/s, {predicted.memory / GIB:.2f} GiB; measured {measured_rate:.2f}, "
              f"{measured_memory / GIB:.2f} GiB", flush=True)

    print(f"\n== Planner against measured runs: {args.model}, ZeRO-{args.zero_stage}, fp32, micro-batch {batch} per rank, "
          f"1 thread per rank on {cores} cores, {args.steps} steps after {args.warmup}")
    print(f"{'ranks':>5} {'fwd+bwd GFLOP/s':>15} {'gloo GB/s':>9} {'samples/s pred':>14} {'meas':>7} {'error':>7} {'step ms pred':>12} {'comm ms':>8} "
          f"{'GiB/rank pred':>13} {'meas':>6} {'error':>7} {'load(1m)':>8}")
    for ranks, device, bandwidth, p, rate, memory, load in rows:
        print(f"{ranks:5d} {device / 1e9:15.1f} {bandwidth:9.2f} {p.samples_per_s:14.2f} {rate:7.2f} {p.samples_per_s / rate - 1:+7.1%} "
              f"{p.step_s * 1e3:12.0f} {p.communication_s * 1e3:8.0f} {p.memory / GIB:13.2f} {memory / GIB:6.2f} "
              f"{p.memory / memory - 1:+7.1%} {load:8.2f}")
    print("The one-rank row is fitted (error 0 by construction); the others are predictions.")
    if args.json:
        Path(args.json).write_text(json.dumps([{"ranks": r, "predicted_samples_per_s": p.samples_per_s, "measured_samples_per_s": rate,
                                                "predicted_memory": p.memory, "measured_memory": m} for r, _, _, p, rate, m, _ in rows]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    p.add_argument("--model", help=f"{', '.join(MODELS)} or an open_clip model name (default clip-vit-l-14; --validate: ViT-B-32)")
    p.add_argument("--config", help="an mmscale config (YAML/JSON): plan its encoder and towers instead of --model")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--gpus", type=ints, default=[8, 16, 32, 64, 128, 256, 512, 1024], help="comma-separated GPU counts")
    p.add_argument("--zero-stage", type=ints, default=None, help="ZeRO stage(s), comma-separated: a table each (default 3; --validate: one stage, 2)")
    p.add_argument("--markdown", action="store_true", help="tables in Markdown")
    p.add_argument("--micro-batch", type=int, default=None, help="per GPU (default 64; --validate: 8)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak at --precision, per GPU")
    p.add_argument("--mfu", type=float, default=0.35, help="fraction of the peak a training step achieves")
    p.add_argument("--intra-node-gbps", type=float, default=360.0, help="ring collective bandwidth per GPU within a node, GB/s")
    p.add_argument("--inter-node-gbps", type=float, default=40.0, help="ring collective bandwidth per GPU across nodes, GB/s")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--runtime-gib", type=float, default=3.0, help="per-GPU memory besides model states and activations")
    p.add_argument("--activation-factor", type=float, default=1.0, help="peak activation memory / activations saved for backward")
    p.add_argument("--no-flash-attention", action="store_true", help="attention matrices are kept for backward")
    p.add_argument("--comm-overlap", type=float, default=0.0, help="fraction of the backward pass that hides communication")
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size (item id embeddings)")
    p.add_argument("--users", type=int, default=1_000_000, help="users (user id embeddings)")
    p.add_argument("--embed-dim", type=int, default=128, help="width of the item and user towers")
    g = p.add_argument_group("validation on this machine")
    g.add_argument("--validate", action="store_true")
    g.add_argument("--shards", help="shards to train on (tools/build_shards.py)")
    g.add_argument("--ranks", type=ints, default=[1, 2, 4])
    g.add_argument("--steps", type=int, default=4, help="measured steps per run, after --warmup")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--json", help="also write the validation rows here")
    args = p.parse_args(argv)
    if any(stage not in range(4) for stage in args.zero_stage or []):
        p.error(f"--zero-stage: stages are 0-3, got {args.zero_stage}")
    if args.validate:
        if not args.shards or not (Path(args.shards) / "manifest.json").is_file():
            p.error(f"--validate needs --shards with a manifest.json (got {args.shards}); build one with tools/build_shards.py")
        args.shards = str(Path(args.shards).resolve())
        args.model = args.model or "ViT-B-32"
        if args.zero_stage and len(args.zero_stage) > 1:
            p.error("--validate takes one --zero-stage")
        args.zero_stage = 2 if args.zero_stage is None else args.zero_stage[0]
        args.micro_batch = args.micro_batch or 8
    else:
        args.model = args.model or "clip-vit-l-14"
        args.zero_stage = args.zero_stage or [3]
        args.micro_batch = args.micro_batch or 64
    if args.model and Path(args.model).suffix == ".json":
        args.model = str(Path(args.model).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    validate(args) if args.validate else print_plans(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
