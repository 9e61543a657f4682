"""The training engine: one DeepSpeed ZeRO loop for any task (encoder + objectives).

    Trainer(config).fit()

The loop only knows `task(batch, gather) -> {name: loss}`, `task.loss_weights` and
`task.parameter_groups()`. Host synchronisation happens at logging intervals only: losses
are accumulated on the device and reduced across ranks every `train.log_every` steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from ..config import Config, ConfigError, dump_config
from ..data.shard_set import ShardSet
from ..data.stream import Batch, InteractionStream, make_loader
from ..eval.evaluate import Collectives, cache_frozen_blocks, encode_catalogue, evaluate
from ..locks import try_lock
from ..models import build_preprocess
from ..tasks import build_task
from . import checkpoint
from .deepspeed_config import build_deepspeed_config, offloads_optimizer, zero_stage
from .distributed import (all_reduce_sum, all_to_all, any_rank, average_gradients_in_backward, barrier, deepspeed, gather,
                          init_distributed, use_deterministic_algorithms)
from .monitor import Monitor, run_log


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops before that step's update; the last checkpoint stays."""


MAX_NONFINITE_IN_A_ROW = 10  # train.on_nonfinite_loss=skip: a model this far gone does not come back


def _git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def warmup_cosine(warmup_steps: int, total_steps: int, start: int = 0, stop: int | None = None):
    """Learning-rate multiplier over the window [start, stop): linear warmup to 1, then cosine to 0.

    Outside the window it is 0, so a part of the model stops (or has not yet started) learning.
    """
    stop = total_steps if stop is None else stop

    def factor(step: int) -> float:
        if step < start or step >= stop:
            return 0.0
        step -= start
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, stop - start - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    def __init__(self, config: Config, resume: str | None = None, log=None):
        """`log`: where progress messages go (default: stdout and RUN/out.log through the 'mmscale' logger)."""
        self.config = config
        self.dist = init_distributed(config.train.collective_timeout_s)
        use_deterministic_algorithms(config.train.deterministic)
        self.run_dir = Path(config.train.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self._lock_run_dir()

        self.shards = ShardSet.open(config.data.shards)  # a missing, foreign or damaged shard folder stops here
        self._check_shards_match()
        if log is None:  # opened once the folder is known to be this run's: a refused start writes nothing there
            log = run_log(self.run_dir, self.dist.is_main).info
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.preprocess = build_preprocess(config.encoder)
        torch.manual_seed(config.train.seed)  # the same initial weights on every rank
        task = build_task(config, self.shards)

        cuda = self.dist.device.type == "cuda"
        self.bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and cuda)
        found = checkpoint.resolve_resume(resume, self.run_dir, self.log)
        saved = checkpoint.read_train_state(found[0] / found[1]) if found else None
        precision = "bf16" if self.bf16 else "fp32"
        if saved is not None and saved.get("precision", precision) != precision:  # its optimizer state has another layout
            raise ConfigError(f"train.precision: {found[0] / found[1]} was trained in {saved['precision']}; this run would train "
                              f"in {precision} (train.precision {config.train.precision} on {self.dist.device.type}): resume it "
                              f"with --set train.precision={saved['precision']}")
        planned = zero_stage(build_deepspeed_config(config, self.dist.world_size, self.bf16))
        self.resharded = saved is not None and (saved["world_size"], saved["zero_stage"]) != (self.dist.world_size, planned)
        if self.resharded:
            self._check_reshard(found[0] / found[1], saved)
        ds_config = build_deepspeed_config(config, self.dist.world_size, self.bf16, load_universal=self.resharded)
        self.global_batch = config.data.batch_size * config.optim.grad_accum * self.dist.world_size
        scale = self.global_batch / config.optim.lr_scaling_batch if config.optim.lr_scaling_batch > 0 else 1.0
        self.lrs = {"encoder": config.optim.lr_encoder * scale, "recommender": config.optim.lr_recommender * scale}

        streams = saved["streams"] if saved else config.data.streams or self.dist.world_size  # a resume keeps its order
        if (self.dist.world_size * config.data.batch_size) % streams:
            raise ConfigError(f"data.streams: the global micro-batch ({self.dist.world_size} ranks x data.batch_size "
                              f"{config.data.batch_size}) must split into whole batches of the run's {streams} streams")
        self.stream = InteractionStream(
            self.shards, "train", config.data.batch_size, self.preprocess,
            rank=self.dist.rank, world_size=self.dist.world_size, resampled=True,
            shuffle_buffer=config.data.shuffle_buffer, seed=config.data.seed,
            history_content=config.data.history_content, content=task.needs_content,
            streams=streams,
        )
        self.steps_per_epoch = self.stream.batches_per_rank() // config.optim.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size x optim.grad_accum x {self.dist.world_size} ranks exceeds the training split of {self.shards.path}")
        self.total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * self.steps_per_epoch))

        self.zero_stage = zero_stage(ds_config)
        # Stage 0 on several ranks: gradients are averaged during the backward, beside it, rather than by DeepSpeed after
        # it. Not under bf16, whose DeepSpeed optimizer reduces its own fp32 copies of the gradients.
        self.reduces_in_backward = self.zero_stage == 0 and self.dist.world_size > 1 and not self.bf16
        if self.reduces_in_backward:
            average_gradients_in_backward(task)
        optimizer = self._optimizer(task, ds_config)
        # the trained parameters' names in the optimizer's order (checkpoints name their moments by them), taken
        # before the engine: ZeRO-3 partitions the parameters, and grouping by shape would no longer see theirs
        self.optimizer_parameter_names = [name for params in task.parameter_groups().values() for name, _ in params]
        windows = task.training_windows()
        schedules = [warmup_cosine(config.optim.warmup_steps, self.total_steps, *windows[g["name"].split("/")[0]]) for g in optimizer.param_groups]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=task, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedules),
        )
        self.task = self.engine.module
        self.engine.enable_backward_allreduce = not self.reduces_in_backward
        self.collectives = Collectives(self.dist.rank, self.dist.world_size, gather, all_reduce_sum, all_to_all)

        self.step, self.samples_seen, self.epoch, self.batch_in_epoch = 0, 0, 0, 0
        self.resumed_from = None
        self.content = None  # the (image, text, has_image) catalogue content the task holds, saved with checkpoints
        self.stop_signal: int | None = None  # set by SIGTERM (preemption): save at the next step boundary, exit
        # train.best_metric's best evaluation so far {"step", "value"} and the evaluations since: saved with checkpoints
        self.best: dict | None = None
        self.evals_since_best = 0
        self.saved_step: int | None = None  # the step of the newest checkpoint this process saved or resumed from
        if found is not None:
            self._load(*found)
        elif resume == "latest":
            self.log(f"--resume latest: no complete checkpoint in {self.checkpoint_dir}; starting from scratch")
        if task.caches_frozen_blocks:
            self.cache_frozen_blocks()
        if self.content is None and task.content_cache_due(self.step, resumed=True):
            self.cache_content()
        self._record_run(ds_config)
        # train.peak_tflops known: the encoder's model FLOPs utilisation, from its forward + backward FLOPs per item
        self.encoder_flops_per_item = self._encoder_flops_per_item() if config.train.peak_tflops > 0 else 0.0
        self.monitor = Monitor(self.run_dir, self.dist.is_main, config.train.report_to, config.to_dict())

    def _encoder_flops_per_item(self) -> float:
        """Forward + backward FLOPs the trained encoder spends per item (counted on the meta device); 0 when the
        encoder does not train (its items cost no backward) or there is none."""
        from .scale_plan import profile_model

        encoder = self.task.encoder
        if encoder is None or not any(p.requires_grad for p in encoder.parameters()):
            return 0.0
        return float(profile_model(self.config, self.shards.num_users, self.shards.num_items,
                                   "bf16" if self.bf16 else "fp32").flops_per_sample)

    # -- setup --------------------------------------------------------------------------------------
    def _lock_run_dir(self) -> None:
        """One training per run folder: rank 0 holds an flock on RUN/.lock for the life of the process; a second
        training into the same folder stops at start instead of interleaving metrics and overwriting checkpoints."""
        holder = None
        if self.dist.is_main:
            self._run_lock, holder = try_lock(self.run_dir / ".lock")
        if any_rank(holder is not None):
            raise ConfigError(f"train.run_dir: {self.run_dir} is in use by another training ({holder or 'seen by rank 0'}); "
                              f"wait for it, or give this run its own train.run_dir")

    def _check_shards_match(self) -> None:
        """A run continued on other shards would silently mix datasets: its manifest must be the one it started on."""
        info = self.run_dir / "run_info.json"
        if not info.is_file():
            return
        try:
            before = json.loads(info.read_text()).get("data", {}).get("manifest_sha256")
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"train.run_dir: {info} is not a run record ({e})") from None
        if before is not None and before != self.shards.manifest_sha256:
            raise ConfigError(f"data.shards: {self.shards.path} is not the dataset run {self.run_dir} was trained on (manifest "
                              f"sha256 {self.shards.manifest_sha256[:12]}..., the run's {before[:12]}...); train on it in a new train.run_dir")

    def _check_reshard(self, tag_dir: Path, saved: dict) -> None:
        """A checkpoint resumes on another world size or ZeRO stage through DeepSpeed's universal checkpoint, with the
        global micro-batch it was saved with: the same data order, in-batch negatives and learning rates."""
        world, cfg = self.dist.world_size, self.config
        if zero_stage(build_deepspeed_config(cfg, world, self.bf16, load_universal=True)) == 0:
            raise ConfigError(f"train.deepspeed_config: {cfg.train.deepspeed_config} is ZeRO stage 0; resuming {tag_dir} (saved on "
                              f"{saved['world_size']} ranks, ZeRO-{saved['zero_stage']}) on {world} needs ZeRO-1, 2 or 3")
        global_micro = saved["world_size"] * saved["batch_size"]
        if world * cfg.data.batch_size != global_micro:
            fits = f"data.batch_size={global_micro // world}" if global_micro % world == 0 else f"a world size dividing {global_micro}"
            raise ConfigError(f"data.batch_size: {tag_dir} was saved by {saved['world_size']} ranks x data.batch_size {saved['batch_size']}; "
                              f"on {world} ranks its global micro-batch of {global_micro} needs {fits}")
        if cfg.optim.grad_accum != saved["grad_accum"]:
            raise ConfigError(f"optim.grad_accum: {tag_dir} was saved with optim.grad_accum={saved['grad_accum']}, not {cfg.optim.grad_accum}")
        self.log(f"resuming {tag_dir} (saved on {saved['world_size']} ranks, ZeRO-{saved['zero_stage']}) on {world} ranks: "
                 f"data.batch_size {cfg.data.batch_size}, the same {global_micro}-sample micro-batches")

    def _optimizer(self, task, ds_config: dict) -> torch.optim.Optimizer:
        groups = []
        for name, params in task.parameter_groups().items():
            part, decay = name.split("/")
            groups.append({
                "params": [p for _, p in params], "name": name, "lr": self.lrs[part],
                "weight_decay": self.config.optim.weight_decay if decay == "decay" else 0.0,
            })
        kwargs = dict(betas=self.config.optim.betas, eps=self.config.optim.eps)
        if offloads_optimizer(ds_config):  # ZeRO-Offload steps on the host with DeepSpeed's CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def _record_run(self, ds_config: dict) -> None:
        derived = {
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "learning_rates": self.lrs,
            "precision": "bf16" if self.bf16 else "fp32",
            "zero_stage": zero_stage(ds_config),
            "parameters": sum(p.numel() for p in self.task.parameters()) if zero_stage(ds_config) < 3 else "partitioned",
        }
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.config, self.run_dir / "config.json")
            info = {
                "git_revision": _git_revision(), "derived": derived, "deepspeed": ds_config,
                "data": {"shards": str(self.shards.path), "num_users": self.shards.num_users, "num_items": self.shards.num_items,
                         "manifest_sha256": self.shards.manifest_sha256},
            }
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
            self.log(json.dumps({"config": self.config.to_dict(), "git_revision": info["git_revision"], **derived}, indent=2))
        barrier()

    # -- data ---------------------------------------------------------------------------------------
    def _stream_batches(self) -> Iterator[Batch]:
        """Training batches forever, tracking (epoch, batch within epoch) for exact resume.

        When the task stops needing content (fine_tuned's freeze) the loader restarts at the same position, so
        prefetched batches stop decoding images at once rather than at the end of the epoch."""
        while True:
            self.stream.set_epoch(self.epoch, self.batch_in_epoch, content=self.task.needs_content)
            for batch in make_loader(self.stream, self.config.data.num_workers, pin_memory=self.dist.device.type == "cuda"):
                self.batch_in_epoch += 1
                yield batch
                if self.stream.content != self.task.needs_content:
                    break
            else:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    @torch.no_grad()
    def cache_content(self) -> None:
        """Encodes every item (in parallel across ranks, in eval mode) and hands the content to the task's cache."""
        store = self.stream.store
        # Under ZeRO-3 a frozen encoder's partitions are not gathered by the training hooks before
        # the first step; gather them explicitly for this one pass over the catalogue.
        gathered = deepspeed.zero.GatheredParameters(self.task.content_parameters()) if self.zero_stage == 3 else nullcontext()
        with gathered:
            content = encode_catalogue(self.task, store, self.preprocess, self.collectives, self.dist.device,
                                       self.config.eval.batch_size, self.config.data.num_workers)
        self._set_content(content)
        self.log(f"step {self.step}: content of {len(content[0])} items cached")

    @torch.no_grad()
    def cache_frozen_blocks(self) -> None:
        """encoder.cache_frozen_blocks: every item's frozen-block outputs (in parallel across ranks, in eval mode), held
        by the task from now on, each rank its share of the catalogue; recomputed at every start, never saved (the
        weights they come from never train)."""
        store = self.stream.store
        gathered = deepspeed.zero.GatheredParameters(list(self.task.encoder.parameters())) if self.zero_stage == 3 else nullcontext()
        with gathered:
            held, size = cache_frozen_blocks(self.task, store, self.preprocess, self.collectives, self.dist.device,
                                             self.config.eval.batch_size, self.config.data.num_workers)
        self.log(f"step {self.step}: frozen blocks of {len(store)} items cached, {held} of them on this rank ({size:.1f} MiB)")

    def _set_content(self, content) -> None:
        self.content = content
        self.task.set_content_cache(*content)
        # DeepSpeed's ZeRO-3 keeps the last gradient partition of a parameter that receives no gradient in later steps
        # (the encoder once fine_tuned freezes it); it would count in the clipping norm. The switch happens between
        # steps, so every partition can be cleared: the next backward writes those that get a gradient.
        stale = getattr(self.optimizer, "grad_partitions_flat_buffer", None) if self.zero_stage == 3 else None
        if stale is not None:
            stale.zero_()

    # -- loop ---------------------------------------------------------------------------------------
    def fit(self, batches: Iterable[Batch] | None = None, stop_at: int | None = None) -> dict:
        """Trains to `total_steps` (or stops early at step `stop_at`, saving a checkpoint to resume
        from); returns the last logged scalars and the final evaluation results.

        `batches` replaces the shard stream (tests feed identical global batches this way).
        """
        cfg = self.config.train
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._request_stop)
        source = iter(batches) if batches is not None else self._stream_batches()
        names = sorted(self.task.loss_weights)
        running = torch.zeros(len(names) + 1, device=self.dist.device)  # per-loss sums and the total
        micro, items_encoded, corrupt, data_wait, window_start = 0, 0, 0, 0.0, time.perf_counter()
        skipped, skipped_in_a_row = 0, 0
        last: dict = {}
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.dist.is_main, dynamic_ncols=True)
        self.engine.train()
        end = min(self.total_steps, stop_at or self.total_steps)
        while self.step < end and not self.patience_spent:
            wait_start = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                break
            data_wait += time.perf_counter() - wait_start
            items_encoded += self.task.items_encoded(batch)
            corrupt += int(batch.corrupt_samples)  # a CPU tensor from the loader: no device sync
            if self.reduces_in_backward:  # accumulated micro-batches: their sum is averaged once, at the boundary
                self.task.set_requires_gradient_sync(self.engine.is_gradient_accumulation_boundary())
            losses = self.engine(batch.to(self.dist.device, torch.bfloat16 if self.bf16 else None), gather)
            total = sum(self.task.loss_weights[n] * losses[n] for n in names)
            # One host sync per step: the only way to keep a NaN out of the weights is to look before the update.
            if any_rank(not bool(torch.isfinite(total))):
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                if cfg.on_nonfinite_loss == "stop" or skipped_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    self._stop_nonfinite(names, losses, skipped_in_a_row)
                continue
            skipped_in_a_row = 0
            self.engine.backward(total)
            self.engine.step()  # DeepSpeed steps the optimizer on accumulation boundaries only
            running += torch.stack([losses[n].detach().float() for n in names] + [total.detach().float()])
            micro += 1
            if micro % self.config.optim.grad_accum:
                continue
            self.step += 1
            self.samples_seen += self.global_batch
            progress.update(1)
            cache_due = self.task.content_cache_due(self.step)
            if self.step % cfg.log_every == 0 or self.step == end or cache_due:
                elapsed = time.perf_counter() - window_start
                last = self._log_scalars(names, running / micro, micro, items_encoded, corrupt, data_wait, elapsed, skipped)
                progress.set_postfix(loss=f"{last['loss/total']:.4f}")
                running.zero_()
                micro, items_encoded, corrupt, data_wait, window_start = 0, 0, 0, 0.0, time.perf_counter()
                skipped = 0
            if cache_due:  # e.g. fine_tuned: adaptation is over, the encoder freezes and its losses change
                self.cache_content()
                names = sorted(self.task.loss_weights)
                running = torch.zeros(len(names) + 1, device=self.dist.device)
            # Evaluation before the save of the same step, so that the checkpoint knows its outcome (early stopping
            # resumes exactly); a better evaluation is saved whatever save_every says.
            improved = False
            # (at a --stop-at step too: the resumed run must not skip an evaluation the unbroken run made)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                improved = self._track_best(self.run_evaluation())
            if improved or (cfg.save_every and self.step % cfg.save_every == 0 and self.step < end):
                self.save()
                if improved:
                    self._record_best()
            if self.patience_spent:
                self.log(f"step {self.step}: early stop: {cfg.best_metric} has not improved on step {self.best['step']}'s "
                         f"{self.best['value']:.4f} in {self.evals_since_best} evaluations (train.patience)")
                break
            # Every rank must leave at the same step; a one-integer CPU all-reduce per step is the price of
            # stopping at the next boundary rather than at the next logging window.
            if any_rank(self.stop_signal is not None):
                self.log(f"step {self.step}: stop requested (SIGTERM on some rank): saving a checkpoint and exiting; "
                         f"continue with --resume latest")
                break
        progress.close()
        if self.saved_step != self.step:
            self.save()
        early = self.patience_spent
        finished = self.step >= self.total_steps or early
        results = self.run_evaluation() if finished and not early and self.config.eval.splits else {}
        if results and self._track_best(results):
            self._record_best()  # the checkpoint just saved
        self._record_outcome(finished)
        self.monitor.close()
        return {"scalars": last, "eval": results, "step": self.step, "stopped": self.stop_signal is not None and not finished,
                "early_stopped": early, "best": self.best}

    @property
    def patience_spent(self) -> bool:
        return bool(self.config.train.patience) and self.evals_since_best >= self.config.train.patience

    def _track_best(self, results: dict) -> bool:
        """Whether this evaluation is the best of train.best_metric so far (the same verdict on every rank)."""
        if not self.config.train.best_metric:
            return False
        split, metric = self.config.train.best_metric.split("/")
        value = results[split][metric]
        if self.best is not None and value <= self.best["value"]:
            self.evals_since_best += 1
            return False
        self.best, self.evals_since_best = {"step": self.step, "value": value, "eval": results}, 0
        return True

    def _record_best(self) -> None:
        """RUN/best.json, after the best checkpoint is complete: its tag, step, metric and the whole evaluation."""
        if self.dist.is_main:
            tag = checkpoint.tag_for(self.best["step"])
            record = {"metric": self.config.train.best_metric, "tag": tag, "checkpoint": str(self.checkpoint_dir / tag), **self.best}
            tmp = self.run_dir / "best.json.tmp"
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, self.run_dir / "best.json")

    def _record_outcome(self, finished: bool) -> None:
        """RUN/outcome.json: how this process's training ended; a stop on request exits 0 like a finished run, and a
        study must not take it for one."""
        if self.dist.is_main:
            tmp = self.run_dir / "outcome.json.tmp"
            tmp.write_text(json.dumps({"step": self.step, "finished": finished, "early_stopped": self.patience_spent}))
            os.replace(tmp, self.run_dir / "outcome.json")

    def _stop_nonfinite(self, names, losses, in_a_row: int) -> None:
        values = ", ".join(f"{n} {float(losses[n]):.4g}" for n in names)
        kept = checkpoint.latest_complete(self.checkpoint_dir)
        raise NonFiniteLossError(
            f"step {self.step + 1}: the loss is not finite ({values}"
            f"{f'; {in_a_row} batches in a row' if in_a_row > 1 else ''}); stopped before this step's update, nothing saved; "
            f"{f'the last checkpoint {self.checkpoint_dir / kept} is kept' if kept else 'no checkpoint was saved before'}. "
            f"Lower the learning rates, check the data, or set train.on_nonfinite_loss=skip")

    def _request_stop(self, signum, frame) -> None:
        self.stop_signal = signum
        print(f"rank {self.dist.rank}: received {signal.Signals(signum).name}; stopping at the next step boundary",
              file=sys.stderr, flush=True)

    def _log_scalars(self, names, mean_losses, micro, items_encoded, corrupt, data_wait, elapsed, skipped) -> dict:
        """The one host synchronisation of a logging window: reduce across ranks, then log."""
        counts = torch.tensor([items_encoded, corrupt, data_wait, elapsed], dtype=torch.float64)
        reduced = all_reduce_sum(torch.cat([mean_losses.double().cpu(), counts]))
        world = self.dist.world_size
        values = (reduced[: len(names) + 1] / world).tolist()
        scalars = {f"loss/{n}": v for n, v in zip(names + ["total"], values)}
        items, corrupt, wait, secs = reduced[len(names) + 1 :].tolist()
        steps = micro / self.config.optim.grad_accum
        scalars.update({
            "perf/samples_per_s": steps * self.global_batch / (secs / world),
            "perf/items_encoded_per_s": items / (secs / world),
            "perf/data_wait_fraction": wait / secs,
            "data/corrupt_samples_skipped": corrupt,
            "train/nonfinite_batches_skipped": skipped,
            **{f"lr/{g['name'].split('/')[0]}": g["lr"] for g in self.optimizer.param_groups},
        })
        scalars["train/epoch"] = self.epoch + self.batch_in_epoch / max(1, self.stream.batches_per_rank())
        encoder = self.task.encoder
        if encoder is not None and isinstance(getattr(encoder, "logit_scale", None), torch.Tensor):
            scalars["train/logit_scale"] = float(encoder.logit_scale.detach().exp().max())  # the contrastive 1/temperature
        if self.encoder_flops_per_item:
            achieved = self.encoder_flops_per_item * scalars["perf/items_encoded_per_s"] / world
            scalars["perf/encoder_mfu"] = achieved / (self.config.train.peak_tflops * 1e12)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if self.dist.device.type == "cuda":
            scalars["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.monitor.log(self.step, scalars)
        return scalars

    # -- checkpoints and evaluation -------------------------------------------------------------------
    def save(self) -> Path:
        tag = checkpoint.tag_for(self.step)
        client = {
            "step": self.step, "samples_seen": self.samples_seen,
            "data": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "config": self.config.to_dict(),
            "best": self.best, "evals_since_best": self.evals_since_best,
            checkpoint.OPTIMIZER_PARAMETERS: self.optimizer_parameter_names,
        }
        failure = None
        try:
            self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client, save_latest=False)
            checkpoint.save_rng_state(self.checkpoint_dir / tag, self.dist.rank)
            if self.dist.is_main:
                checkpoint.write_train_state(self.checkpoint_dir / tag, {
                    "world_size": self.dist.world_size, "batch_size": self.config.data.batch_size,
                    "grad_accum": self.config.optim.grad_accum, "streams": self.stream.streams, "zero_stage": self.zero_stage,
                    "precision": "bf16" if self.bf16 else "fp32"})
                if self.content is not None:
                    checkpoint.save_content_cache(self.checkpoint_dir / tag, self.content)
        except (OSError, RuntimeError) as e:  # disk full (torch's zip writer raises RuntimeError), unwritable, quota...
            failure = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}; {checkpoint.space_report(self.checkpoint_dir)}"
            print(f"rank {self.dist.rank}: saving {self.checkpoint_dir / tag} failed: {failure}", file=sys.stderr, flush=True)
        if any_rank(failure is not None):  # every rank learns it, so none waits for a tag that never completes
            if self.dist.is_main:
                checkpoint.discard(self.checkpoint_dir, tag)
            kept = checkpoint.latest_complete(self.checkpoint_dir)
            raise checkpoint.SaveError(
                f"could not save step {self.step} to {self.checkpoint_dir / tag}"
                f"{f' ({failure})' if failure else ' (failed on another rank)'}; "
                f"{f'the previous checkpoint {kept} is kept as latest' if kept else 'no earlier checkpoint exists'}")
        barrier()  # every rank's shards are on disk before the tag is marked complete
        if self.dist.is_main:
            keep = (checkpoint.tag_for(self.best["step"]),) if self.best else ()
            checkpoint.mark_complete(self.checkpoint_dir, tag, self.config.train.keep_last, keep)
        barrier()
        self.saved_step = self.step
        return self.checkpoint_dir / tag

    def _load(self, checkpoint_dir: Path, tag: str) -> None:
        source = (checkpoint_dir / tag, checkpoint.UNIVERSAL) if self.resharded else (checkpoint_dir, tag)
        if self.resharded:
            self._convert_to_universal(checkpoint_dir / tag)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        with checkpoint.safe_loading():  # verified by resolve_resume; weights-only all the same
            _, client = self.engine.load_checkpoint(str(source[0]), tag=source[1])
        if self.resharded:
            self._complete_universal_load(checkpoint_dir / tag, groups)
        self.step, self.samples_seen = client["step"], client["samples_seen"]
        self.epoch, self.batch_in_epoch = client["data"]["epoch"], client["data"]["batch"]
        self.best, self.evals_since_best = client.get("best"), client.get("evals_since_best", 0)
        self.resumed_from = checkpoint_dir / tag
        self.saved_step = self.step
        if not checkpoint.load_rng_state(checkpoint_dir / tag, self.dist.rank):
            self.log(f"{checkpoint_dir / tag} holds no random state for rank {self.dist.rank}: dropout draws start afresh")
        content = checkpoint.load_content_cache(checkpoint_dir / tag, self.dist.device)
        if content is not None:
            self._set_content(content)
        self.log(f"resumed from {self.resumed_from} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def _convert_to_universal(self, tag_dir: Path) -> None:
        """Rank 0 converts the tag once; every rank then loads its own partitions of the whole tensors."""
        failure = None
        if self.dist.is_main:
            try:
                checkpoint.universal_checkpoint(tag_dir, self.optimizer_parameter_names, self.log)
            except Exception as e:  # every rank must learn it, or the others wait for a conversion that never ends
                failure = e
        if any_rank(failure is not None):
            raise checkpoint.CheckpointError(f"{tag_dir}: the conversion to a universal checkpoint failed"
                                             f"{f' ({type(failure).__name__}: {failure})' if failure else ' on rank 0'}") from failure

    def _complete_universal_load(self, tag_dir: Path, groups: list[dict]) -> None:
        """What DeepSpeed's (0.19.8) universal load leaves out. Under ZeRO-3 every parameter group gets the first group's
        settings (weight decay, learning rate) and one shared step tensor, which each group's Adam update would then
        advance in turn: each group gets its own settings back, its learning rate as the restored schedule left it, and
        its own step. And only parameters are restored: the module's buffers (the task's forward count, which seeds its
        hashed draws) come from the tag's model states."""
        for group, own, lr in zip(self.optimizer.param_groups, groups, self.scheduler.get_last_lr()):
            group.update(own, lr=lr)
        for state in getattr(self.optimizer, "optimizer", self.optimizer).state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        with checkpoint.safe_loading():
            module = torch.load(checkpoint.model_states_file(tag_dir), map_location="cpu", weights_only=True)["module"]
        for name, buffer in self.task.named_buffers():
            if name in module:
                buffer.copy_(module[name])

    def run_evaluation(self) -> dict:
        current = self.content if self.task.content_cache_is_current else None  # else the catalogue is encoded afresh
        results = evaluate(self.task, self.shards, self.config.eval, self.preprocess, self.collectives,
                           self.dist.device, self.config.data.num_workers, content=current)
        flat = {f"eval/{split}/{name}": value for split, metrics in results.items() for name, value in metrics.items()}
        self.monitor.log(self.step, flat)
        self.log(json.dumps({"step": self.step, "eval": results}))
        return results
