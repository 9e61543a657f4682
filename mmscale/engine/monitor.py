"""Scalars to TensorBoard and to metrics.jsonl in the run folder, from rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
