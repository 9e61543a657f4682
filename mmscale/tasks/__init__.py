"""Tasks: what is trained. The contract the engine and evaluation use is `Task` (mmscale/tasks/base.py);
`build_task` picks the task from the config, and nothing else in the engine depends on which it is."""

from __future__ import annotations

from ..config import Config
from ..data.shard_set import ShardSet
from .base import Ranking, Task, decays

__all__ = ["Ranking", "Task", "build_task", "decays"]


def build_task(config: Config, shards: ShardSet) -> Task:
    if config.task == "two_tower":
        from .two_tower import RecommendationTask

        return RecommendationTask(config, shards)
    if config.sequence.model == "sasrec":
        from .sequential import SASRecTask

        return SASRecTask(config, shards)
    from .sequential import MP4SRTask

    return MP4SRTask(config, shards)
