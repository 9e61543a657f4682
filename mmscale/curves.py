"""Training curves of several runs overlaid: losses, learning rates, samples/s and evaluation metrics against step.

Read from each run's metrics.jsonl (what the trainer logs; TensorBoard shows the same scalars one run at a time).
A Recall@K panel carries the random ranking's Recall@K of the same split as a dashed line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

DEFAULT_METRICS = ("valid/ndcg@10", "valid/recall@20", "cold/recall@20")
PANEL_INCHES = (4.2, 3.0)
COLUMNS = 3


class RunsError(ValueError):
    """A run folder without readable metrics, or a metric no run logged."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl; a half-written last line (a run still training) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunsError(f"{path}: missing (is {run_dir} a run folder?)")
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise RunsError(f"{path}:{number}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise RunsError(f"{path}:{number}: a row without an integer step")
        rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def panels(runs: dict[str, list[dict]], metrics: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(title, metrics.jsonl keys) per panel: each loss, the learning rates, samples/s, then each evaluation metric
    some run logged."""
    keys = {k for rows in runs.values() for r in rows for k in r}
    losses = sorted(k for k in keys if k.startswith("loss/"))
    out = [(k, [k]) for k in (["loss/total"] if "loss/total" in losses else []) + [k for k in losses if k != "loss/total"]]
    rates = sorted(k for k in keys if k.startswith("lr/"))
    if rates:
        out.append(("learning rate", rates))
    if "perf/samples_per_s" in keys:
        out.append(("samples/s", ["perf/samples_per_s"]))
    out += [(m, [f"eval/{m}"]) for m in metrics if f"eval/{m}" in keys]
    return out


def plot_runs(run_dirs: list[str | Path], out: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS,
              labels: list[str] | None = None) -> list[str]:
    """Writes the PNG; returns the panel titles. Metrics named explicitly (not the defaults) must exist in some run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(d).name for d in run_dirs]
    runs = {label: read_metrics(d) for label, d in zip(labels, run_dirs)}
    if metrics != DEFAULT_METRICS:
        logged = {k for rows in runs.values() for r in rows for k in r}
        absent = [m for m in metrics if f"eval/{m}" not in logged]
        if absent:
            raise RunsError(f"--metrics: no run logged eval/{absent[0]} (e.g. valid/ndcg@10; the splits and K of eval.*)")
    layout = panels(runs, metrics)
    if not layout:
        raise RunsError("nothing to plot: the runs have logged no scalars yet")
    rows = math.ceil(len(layout) / COLUMNS)
    columns = min(COLUMNS, len(layout))
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, layout):
        for n, (label, run_rows) in enumerate(runs.items()):
            colour = colours[n % len(colours)]
            for style, key in zip(["-", "--", ":", "-."] * len(keys), keys):
                steps, values = _series(run_rows, key)
                if steps:
                    name = label if len(keys) == 1 else f"{label} {key.split('/', 1)[1]}"
                    ax.plot(steps, values, style, color=colour, label=name, marker="o" if key.startswith("eval/") else None,
                            markersize=3)
        split, _, metric = title.partition("/")
        random = [v for run_rows in runs.values() for v in _series(run_rows, f"eval/{split}/random_{metric}")[1]]
        if metric.startswith("recall@") and random:  # the same for every run on the same shards and protocol
            ax.axhline(sum(random) / len(random), linestyle="--", color="grey", label="random")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(layout):]:
        ax.set_visible(False)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [title for title, _ in layout]
