"""Benchmark runners shared by tools/bench_train.py, tools/bench_sequential.py and tools/plan_scale.py: a training
run through launch/train.py (one process or the DeepSpeed launcher), its logged throughput windows, and each
rank's memory watched from outside.

Throughput is measured in logging windows of W steps after a warm-up: mmscale's `perf/samples_per_s` from
RUN/metrics.jsonl. Windows are pooled over repeats; the median and the best window are reported (the best is
the least disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
CLIP_ALONE = {"rec": 0, "itc": 1}
JOINT = {"rec": 1, "itc": 1}


@dataclass
class Memory:
    """Bytes per local rank: the largest RSS during training steps, and the peak (VmHWM) of the whole run."""

    training: dict[int, int]
    peak: dict[int, int]


@dataclass
class Run:
    """One training run: its measured logging windows (and its ranks' memory, if watched)."""

    windows: list[tuple[int, int, float, float]]  # (first step, last step, seconds, data-wait seconds)
    global_batch: int
    load: float  # 1-minute load average when the run started
    memory: Memory | None = None
    parameters: int | None = None


@dataclass
class Throughput:
    """Window statistics pooled over runs: on a shared machine the median shows the typical cost and
    the best window the cost with the least interference from other processes."""

    rates: list[float]  # samples/s of each window
    data_wait: float  # fraction of all measured time spent waiting for batches
    global_batch: int
    loads: list[float]

    @classmethod
    def of(cls, runs: list[Run]) -> Throughput:
        windows = [w for run in runs for w in run.windows]
        rates = [(last - first + 1) * runs[0].global_batch / seconds for first, last, seconds, _ in windows]
        wait = sum(w[3] for w in windows) / sum(w[2] for w in windows)
        return cls(rates, wait, runs[0].global_batch, [run.load for run in runs])

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)

    def ms_per_step(self, rate: float) -> float:
        return 1000 * self.global_batch / rate


# -- processes ----------------------------------------------------------------------------------------
def rank_env(ranks: int, threads: int | None = None) -> dict:
    """No launcher variables leak in; each rank gets its share of the cores (or `threads`); mmscale importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // ranks))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def is_rank(cmdline: list[str]) -> bool:
    """A rank runs launch/train.py as the first non-flag argument after the interpreter; the launchers
    (deepspeed, deepspeed.launcher.launch) run something else first and name the script later."""
    args = [a for a in cmdline[1:] if not a.startswith("-")]
    return bool(args) and Path(args[0]) == TRAIN_SCRIPT


def local_rank(cmdline: list[str]) -> int:
    for arg in cmdline:
        if arg.startswith(("--local_rank=", "--local-rank=")):
            return int(arg.split("=", 1)[1])
    return 0


def memory_status(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of one process, in bytes; dataloader workers are separate processes."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


class RankMemoryWatch:
    """Polls the rank processes under a launcher: each local rank's largest RSS while `in_training()`
    (steady state: after the first optimizer steps, before the final checkpoint) and its peak (VmHWM,
    which includes start-up and the final checkpoint)."""

    def __init__(self, root_pid: int, in_training: Callable[[], bool], interval_s: float = 0.05):
        self.root, self.in_training, self.interval_s = psutil.Process(root_pid), in_training, interval_s
        self.training: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(self.interval_s):
            training = self.in_training()
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    cmdline, parent = proc.cmdline(), proc.parent()
                    if not is_rank(cmdline) or (parent is not None and parent.cmdline() == cmdline):
                        continue  # a launcher, or a dataloader worker forked from a rank
                    rank, status = local_rank(cmdline), memory_status(proc.pid)
                except (psutil.Error, OSError):
                    continue  # exited between listing and reading
                if len(status) < 2:
                    continue  # a zombie: its status has no memory lines any more
                self.peak[rank] = max(self.peak.get(rank, 0), status["VmHWM"])
                if training:
                    self.training[rank] = max(self.training.get(rank, 0), status["VmRSS"])

    def stop(self) -> Memory:
        self._done.set()
        self._thread.join()
        return Memory(dict(sorted(self.training.items())), dict(sorted(self.peak.items())))


def run_logged(cmd: list[str], env: dict, log: Path, watch: Callable[[int], RankMemoryWatch] | None = None,
               cwd: Path = REPO) -> Memory | None:
    """Runs a training command to completion (output to `log`); returns its ranks' memory if watched."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        watcher = watch(proc.pid) if watch else None
        code = proc.wait()
        memory = watcher.stop() if watcher else None
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"bench_train: failed ({code}): {' '.join(cmd)}\n{tail}")
    return memory


def after_warmup(windows: list[tuple[int, int, float, float]], warmup: int) -> list[tuple[int, int, float, float]]:
    kept = [w for w in windows if w[0] > warmup]
    if not kept:
        raise SystemExit(f"bench_train: no logging window after the {warmup} warm-up steps; raise --steps")
    return kept


# -- mmscale ------------------------------------------------------------------------------------------
def logged_windows(metrics: Path, global_batch: int) -> list[tuple[int, int, float, float]]:
    """mmscale's logging windows so far: (first step, last step, seconds, data-wait seconds)."""
    windows, previous = [], 0
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    for row in map(json.loads, lines):
        if "perf/samples_per_s" in row:
            seconds = (row["step"] - previous) * global_batch / row["perf/samples_per_s"]
            windows.append((previous + 1, row["step"], seconds, seconds * row["perf/data_wait_fraction"]))
            previous = row["step"]
    return windows


def run_mmscale(work: Path, name: str, *, shards: str, weights: dict, stage: int, ranks: int, model: str,
                batch_size: int, warmup: int, steps: int, window: int, workers: int = 1, lr: float = 1e-4,
                watch_memory: bool = False, encoder: dict | None = None, threads: int | None = None,
                return_freed_memory: bool = True) -> Run:
    """launch/train.py on the demo recipe with these overrides, logging every `window` steps (`workers`: data
    workers per rank; `lr`: the encoder's learning rate; `encoder`: further encoder.* settings, e.g. a VLMo's kind
    and tokenizer; `threads`: per rank; `return_freed_memory`: when watching memory, make RSS fall as tensors are
    freed, at a cost in speed)."""
    run_dir, total = work / name, warmup + steps
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl is appended to
    overrides = {
        "data.shards": shards, "encoder.model": model, "data.batch_size": batch_size,
        "data.num_workers": workers, "objectives.weights": json.dumps(weights),
        "optim.lr_encoder": lr, "optim.warmup_steps": warmup,
        "train.run_dir": run_dir, "train.deepspeed_config": REPO / "ds_configs" / f"zero{stage}.json",
        "train.max_steps": total, "train.log_every": window, "train.precision": "fp32", "eval.splits": "[]",
        **{f"encoder.{key}": value for key, value in (encoder or {}).items()},
    }
    sets = [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    if ranks == 1:
        launcher = [sys.executable]
    else:
        from .engine.distributed import free_port  # torch and DeepSpeed: only when launching

        launcher = [shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed",
                    "--num_gpus", str(ranks), "--master_port", str(free_port())]
    metrics, global_batch = run_dir / "metrics.jsonl", batch_size * ranks

    def in_training() -> bool:  # between the first logged window and the last step (then: checkpoint)
        windows = logged_windows(metrics, global_batch)
        return bool(windows) and windows[-1][1] < total

    load = os.getloadavg()[0]
    env, watch = rank_env(ranks, threads), None
    if watch_memory and return_freed_memory:
        # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so RSS would not drop when
        # DeepSpeed frees the replicated copies; a fixed 64 KiB threshold returns freed tensors to the system.
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    if watch_memory:
        watch = lambda pid: RankMemoryWatch(pid, in_training)  # noqa: E731
    memory = run_logged(launcher + [str(TRAIN_SCRIPT), "--config", str(REPO / "configs/demo.yaml"), *sets],
                        env, work / f"{name}.log", watch)
    if memory is not None and not memory.training:
        raise SystemExit(f"bench_train: {name}: no memory sample fell within the training steps (too quick to catch)")
    parameters = json.loads((run_dir / "run_info.json").read_text())["derived"]["parameters"]
    windows = after_warmup(logged_windows(metrics, global_batch), warmup)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return Run(windows, global_batch, load, memory, parameters if isinstance(parameters, int) else None)


def throughput_header() -> str:
    return (f"{'':22} {'samples/s median':>16} {'best':>7} {'ms/step median':>14} {'best':>7} {'windows':>7} "
            f"{'data wait':>9}  load(1m) at start")


def throughput_row(label: str, t: Throughput) -> str:
    return (f"{label:22} {t.median:16.1f} {t.best:7.1f} {t.ms_per_step(t.median):14.1f} {t.ms_per_step(t.best):7.1f} "
            f"{len(t.rates):7d} {t.data_wait:9.1%}  {', '.join(f'{x:.2f}' for x in t.loads)}")
