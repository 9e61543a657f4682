"""What a run reports, from rank 0 only: scalars to metrics.jsonl (always: studies and tools/plot_runs.py read it)
and to the trackers of `train.report_to` (TensorBoard, Weights & Biases, MLflow, through their own libraries),
and a text log, RUN/out.log, through Python's logging.

A resumed run continues its tracker runs: their ids are kept in RUN/trackers.json. Weights & Biases follows its
environment (WANDB_MODE=offline, WANDB_PROJECT, default project "mmscale"); MLflow its tracking URI
(MLFLOW_TRACKING_URI) and experiment (MLFLOW_EXPERIMENT_NAME, default "mmscale"). MLflow names allow no "@":
there, eval/valid/ndcg@10 is logged as eval/valid/ndcg_at_10.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from pathlib import Path

from ..config import dotted_items

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> the package it needs
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"
logger = logging.getLogger("mmscale")


def run_log(run_dir: Path, is_main: bool) -> logging.Logger:
    """The 'mmscale' logger writing INFO and above to stdout and to RUN/out.log (appended), on rank 0 only."""
    if is_main and not any(getattr(h, "mmscale_run_log", None) == run_dir for h in logger.handlers):
        for handler in list(logger.handlers):  # a previous run of this process
            if getattr(handler, "mmscale_run_log", None) is not None:
                logger.removeHandler(handler)
                handler.close()
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "out.log")):
            handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d,%H:%M:%S"))
            handler.mmscale_run_log = run_dir
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, report_to: tuple[str, ...] = ("tensorboard",), config: dict | None = None):
        self.enabled = enabled
        self.tb = self.wandb = self.mlflow = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        ids_file = run_dir / "trackers.json"
        ids = _tracker_ids(ids_file)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            ids.setdefault("wandb", secrets.token_hex(4))
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mmscale"), name=run_dir.name, id=ids["wandb"],
                                    resume="allow", dir=str(run_dir), config=config)
        if "mlflow" in report_to:
            import mlflow

            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "mmscale"))
            self.mlflow = mlflow.start_run(run_id=ids.get("mlflow"), run_name=None if "mlflow" in ids else run_dir.name)
            if "mlflow" not in ids:
                mlflow.log_params({k: str(v)[:6000] for k, v in dotted_items(config or {})})  # MLflow caps values at 6000
            ids["mlflow"] = self.mlflow.info.run_id
        if ids:
            ids_file.write_text(json.dumps(ids, indent=2))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics({name.replace("@", "_at_"): float(value) for name, value in scalars.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()



def _tracker_ids(path: Path) -> dict[str, str]:
    """RUN/trackers.json's run ids; an unreadable file starts new tracker runs rather than stopping training."""
    try:
        ids = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}
