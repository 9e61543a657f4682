#!/usr/bin/env python
"""Train a multimodal encoder end-to-end with recommendation objectives.

    deepspeed --num_gpus N launch/train.py --config CONFIG [--set key=value ...] [--resume latest]
    deepspeed --hostfile launch/hostfile.example launch/train.py --config CONFIG
    torchrun --nproc_per_node N launch/train.py --config CONFIG
    accelerate launch --config_file launch/accelerate_deepspeed.yaml launch/train.py --config CONFIG
    python launch/train.py --config CONFIG            (one process)

Without CUDA, DeepSpeed's CPU accelerator and the gloo backend are selected automatically.
SIGTERM (a scheduler's preemption notice) saves a checkpoint at the next step boundary and exits 0.
Exit status: 0 done or stopped on request, 2 bad config/data/resume path, 3 a checkpoint could not be
saved (the previous complete one stays the latest), 4 a rank was lost (the message names it), 5 the loss
became NaN or infinite (stopped before that step's update; the last checkpoint stays).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Before torch loads OpenMP: idle OpenMP threads that spin (the default) starve the gloo, loader and
# Python threads on small CPU machines; measured here on 2 cores, a sequential-model step ran 10-15x
# slower. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file (sections as in mmscale/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set optim.lr_encoder=1e-5 (repeatable)")
    p.add_argument("--resume", help="'latest' (the newest complete checkpoint of train.run_dir) or a checkpoint folder")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="save and exit at this step (resume later with --resume latest)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help is instant
    from mmscale.engine.distributed import shutdown_distributed

    try:
        return train(args)
    finally:
        shutdown_distributed()


def train(args: argparse.Namespace) -> int:
    from mmscale.config import ConfigError, load_config
    from mmscale.data.format import ShardFormatError
    from mmscale.engine.checkpoint import CheckpointError, SaveError
    from mmscale.models.pretrained import MissingWeightsError

    try:
        config = load_config(args.config, args.overrides)
        from mmscale.engine.trainer import NonFiniteLossError, Trainer  # imports deepspeed: after the config is known to be good
        from mmscale.eval.evaluate import NonFiniteModelError

        trainer = Trainer(config, resume=args.resume)
    except (ConfigError, ShardFormatError, CheckpointError, FileNotFoundError, MissingWeightsError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit(stop_at=args.stop_at)
    except SaveError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 3
    except (NonFiniteLossError, NonFiniteModelError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 5
    except ShardFormatError as e:  # e.g. the shards were rebuilt under the running training
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a collective failed: say which rank was lost, if one was
        from mmscale.engine.distributed import lost_ranks

        lost = trainer.dist.world_size > 1 and lost_ranks()
        if not lost:
            raise
        print(f"train: error: rank {trainer.dist.rank}: {lost}; resume with --resume latest ({str(e).splitlines()[0][:200]})",
              file=sys.stderr)
        return 4
    if result["stopped"]:
        if trainer.dist.is_main:
            print(f"stopped at step {result['step']} on request, checkpoint saved; continue with --resume latest")
        return 0
    if trainer.dist.is_main:
        print(json.dumps({"step": result["step"], "eval": result["eval"]}, indent=2))
        for split, metrics in result["eval"].items():
            recall, random = metrics["recall@20"], metrics["random_recall@20"]
            print(f"{split:>5}: Recall@20 {recall:.4f}  random {random:.4f}  ({recall / random:.1f}x random)")
        print(f"run folder: {trainer.run_dir}  (tensorboard --logdir {trainer.run_dir / 'tensorboard'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
