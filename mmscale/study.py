"""A study: training variants (rows) run one after another into one folder, each early-stopped on a validation
metric and reported at its best validation evaluation (never chosen on test), summarised as a table (study.md)
and a bar chart (study.png). One seed of a row is done when its result.json exists, so a study stopped at any
point continues with what is not done; a row cut short resumes from its latest checkpoint.

STUDY.yaml (paths relative to the working directory):
    title: ml100k-mm paradigms
    out: runs/study-ml100k                # rows/<row>/seed<N>/ (each a run folder), study.md, study.png
    report_name: study                    # optional: NAME.md and NAME.png in out, for studies that share one out
    shards: build/ml100k-seq              # data.shards of every row
    metric: valid/ndcg@10                 # early stopping and the choice of evaluation
    set: [train.patience=3]               # --set overrides of every trained row
    seeds: [0]                            # a row's seeds unless it names its own
    rows:
      - {name: MostPop, family: baselines, baseline: mostpop}
      - {name: SASRec (ids), family: baselines, config: configs/mp4sr/ml100k-sasrec.yaml, seeds: [0, 1, 2]}
      - {name: MP4SR pretrain, config: configs/mp4sr/ml100k-pretrain.yaml, report: false}
      - name: MP4SR finetune
        family: MP4SR
        config: configs/mp4sr/ml100k-finetune.yaml
        set: ["sequence.pretrained={export:MP4SR pretrain}/model.safetensors"]

`{export:ROW}` is the consolidated export (tools/consolidate_checkpoint.py's folder) of ROW's best checkpoint, of
the same seed where ROW has it, else of its first; ROW must come earlier in the list. A row with `report: false`
is a step other rows build on (a pre-training, an alignment): it trains its config as it is, without evaluation
or early stopping, its export is its last checkpoint, and it is not in the table.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("mostpop",)
RESULT = "result.json"
# What a row reports: (split, metric) as evaluation names them, and the table's heading.
COLUMNS = (("valid", "ndcg@10", "valid NDCG@10"), ("test", "ndcg@10", "test NDCG@10"), ("test", "recall@20", "test Recall@20"),
           ("cold", "recall@20", "cold Recall@20"))
_EXPORT = re.compile(r"\{export:([^}]+)\}")


class StudyError(ValueError):
    """A study file that cannot be run."""


class RowFailedError(RuntimeError):
    """A row's training failed; the message names the row and its log."""


@dataclass
class Row:
    name: str
    family: str = ""
    config: str | None = None
    baseline: str | None = None
    set: list[str] = field(default_factory=list)
    seeds: list[int] | None = None
    report: bool = True

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-").lower()


@dataclass
class Study:
    path: Path
    title: str
    out: Path
    shards: Path
    metric: str
    set: list[str]
    seeds: list[int]
    rows: list[Row]
    report_name: str = "study"
    overrides: str = ""  # the command line's replacements of the file's title, out and shards, as the table states them

    def seeds_of(self, row: Row) -> list[int]:
        return row.seeds if row.seeds is not None else self.seeds

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.out / "rows" / row.slug / f"seed{seed}"


def _strings(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where}: a list of KEY=VALUE strings")
    return value


def _seeds(value, where: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise StudyError(f"{where}: a non-empty list of integer seeds")
    return value


def load_study(path: str | Path, title: str | None = None, out: str | Path | None = None,
               shards: str | Path | None = None) -> Study:
    """The study file at `path`; `title`, `out` and `shards` replace the file's (its rows run on other data as they are)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file")
    try:
        spec = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not YAML ({e})") from None
    if not isinstance(spec, dict):
        raise StudyError(f"{path}: a mapping with out, shards and rows")
    unknown = set(spec) - {"title", "out", "shards", "metric", "set", "seeds", "rows", "report_name"}
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("out", "shards", "rows"):
        if key not in spec:
            raise StudyError(f"{path}: '{key}' is missing")
    if not isinstance(spec["rows"], list) or not spec["rows"]:
        raise StudyError(f"{path}: rows: a non-empty list")
    rows, names = [], set()
    for i, entry in enumerate(spec["rows"]):
        where = f"{path}: rows[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise StudyError(f"{where}: a mapping with a name")
        unknown = set(entry) - {"name", "family", "config", "baseline", "set", "seeds", "report"}
        if unknown:
            raise StudyError(f"{where} ({entry['name']}): unknown key(s) {', '.join(sorted(unknown))}")
        row = Row(entry["name"], str(entry.get("family", "")), entry.get("config"), entry.get("baseline"),
                  _strings(entry.get("set"), f"{where}.set"), _seeds(entry.get("seeds"), f"{where}.seeds"),
                  entry.get("report", True))
        if not isinstance(row.report, bool) or (row.baseline and not row.report):
            raise StudyError(f"{where} ({row.name}): report: true or false (a baseline is always reported)")
        if (row.config is None) == (row.baseline is None):
            raise StudyError(f"{where} ({row.name}): give either config (a training config) or baseline ({', '.join(BASELINES)})")
        if row.baseline is not None and row.baseline not in BASELINES:
            raise StudyError(f"{where} ({row.name}): unknown baseline {row.baseline!r} (known: {', '.join(BASELINES)})")
        if row.config is not None and not Path(row.config).is_file():
            raise StudyError(f"{where} ({row.name}): config {row.config} does not exist")
        if row.slug in names:
            raise StudyError(f"{where}: another row has the name {row.name!r} (or one that differs only in punctuation)")
        for needed in (m.group(1) for text in row.set for m in _EXPORT.finditer(text)):
            if needed not in [r.name for r in rows]:
                raise StudyError(f"{where} ({row.name}): {{export:{needed}}} names no earlier row")
        names.add(row.slug)
        rows.append(row)
    metric = spec.get("metric", "valid/ndcg@10")
    if not isinstance(metric, str) or not metric.startswith("valid/"):
        raise StudyError(f"{path}: metric {metric!r}: rows are chosen on validation only (e.g. valid/ndcg@10)")
    report_name = spec.get("report_name", "study")
    if not isinstance(report_name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", report_name):
        raise StudyError(f"{path}: report_name {report_name!r}: a file name without a folder (letters, digits, . _ -)")
    replaced = {key: value for key, value in (("title", title), ("out", out), ("shards", shards)) if value is not None}
    spec.update(replaced)
    overrides = " ".join(f"--{key} {value!r}" if key == "title" else f"--{key} {value}" for key, value in replaced.items())
    return Study(path, str(spec.get("title", path.stem)), Path(spec["out"]), Path(spec["shards"]), metric,
                 _strings(spec.get("set"), f"{path}: set"), _seeds(spec.get("seeds"), f"{path}: seeds") or [0], rows,
                 report_name, overrides)


# -- running ----------------------------------------------------------------------------------------
def _splits(shards: Path) -> list[str]:
    from .data.shard_set import ShardSet

    return ["valid", "test"] + (["cold"] if ShardSet.open(shards).has_split("cold") else [])


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _run_baseline(study: Study) -> dict:
    """MostPop (the one baseline) on the study's shards."""
    from .config import EvalConfig
    from .data.shard_set import ShardSet
    from .eval.evaluate import evaluate, single_process
    from .eval.popularity import MostPopular

    start = time.perf_counter()
    shards = ShardSet.open(study.shards)
    results = evaluate(MostPopular(shards), shards, EvalConfig(splits=tuple(_splits(study.shards))), None,
                       single_process(), "cpu")
    return {"eval": results, "best_step": None, "wall_s": time.perf_counter() - start, "samples_per_s": None}


def _export_of(study: Study, name: str, seed: int, log: Callable[[str], None]) -> Path:
    """The consolidated export of a done row's best checkpoint (made once)."""
    from .engine.export import consolidate

    row = next(r for r in study.rows if r.name == name)
    seeds = study.seeds_of(row)
    run_dir = study.run_dir(row, seed if seed in seeds else seeds[0])
    result = json.loads((run_dir / RESULT).read_text())
    export = run_dir / "export"
    if not (export / "consolidated.json").is_file():
        log(f"  consolidating {run_dir} (best: {result['best_tag']}) into {export}")
        consolidate(run_dir / "checkpoints" / result["best_tag"], export, log=log)
    return export


def _run_training(study: Study, row: Row, seed: int, run_dir: Path, log: Callable[[str], None]) -> dict:
    overrides = [f"data.shards={study.shards}", f"train.run_dir={run_dir}", f"train.seed={seed}", *study.set]
    if row.report:
        overrides[3:3] = [f"train.best_metric={study.metric}", f"eval.splits=[{','.join(_splits(study.shards))}]"]
    else:
        overrides += ["train.best_metric=", "train.patience=0", "train.eval_every=0", "eval.splits=[]"]
    for text in row.set:
        overrides.append(_EXPORT.sub(lambda m: str(_export_of(study, m.group(1), seed, log)), text))
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--config", row.config]
    for override in overrides:
        command += ["--set", override]
    resuming = any((run_dir / "checkpoints").glob("step*/COMPLETE"))
    if resuming:
        command += ["--resume", "latest"]
    run_dir.mkdir(parents=True, exist_ok=True)
    timing = run_dir / "study_timing.json"
    before = json.loads(timing.read_text())["wall_s"] if timing.is_file() else 0.0
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=Path.cwd())
    wall = before + time.perf_counter() - start
    _write_json(timing, {"wall_s": wall})
    if proc.returncode != 0:
        raise RowFailedError(f"row {row.name!r} seed {seed} failed (exit {proc.returncode}); see {run_dir / 'train.log'}; "
                         f"run the study again to continue from its latest checkpoint")
    outcome = json.loads((run_dir / "outcome.json").read_text()) if (run_dir / "outcome.json").is_file() else {}
    if not outcome.get("finished"):  # e.g. a SIGTERM to the training alone: it saves, exits 0 and is not done
        raise RowFailedError(f"row {row.name!r} seed {seed} stopped at step {outcome.get('step', '?')} before its end; "
                             f"run the study again to continue from its latest checkpoint")
    if not row.report:
        return {"eval": {}, "best_step": None, "best_tag": (run_dir / "checkpoints" / "latest").read_text().strip(),
                "wall_s": wall, "resumed": resuming}
    best_file = run_dir / "best.json"
    if not best_file.is_file():
        raise RowFailedError(f"row {row.name!r} seed {seed}: the run wrote no best.json (was {study.metric} evaluated?); "
                         f"see {run_dir / 'train.log'}")
    best = json.loads(best_file.read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = sorted(m["perf/samples_per_s"] for m in metrics if "perf/samples_per_s" in m)
    return {"eval": best["eval"], "best_step": best["step"], "best_tag": best["tag"],
            "last_step": max(m["step"] for m in metrics), "wall_s": wall, "resumed": resuming,
            "samples_per_s": speeds[len(speeds) // 2] if speeds else None}  # the median logging window


def _check_data(study: Study, row: Row, run_dir: Path) -> None:
    """A run folder begun on other shards (say, the same out folder with another --shards) is never reused or reported."""
    for recorded in (run_dir / RESULT, run_dir / "config.json"):
        if recorded.is_file():
            spec = json.loads(recorded.read_text())
            shards = spec.get("shards", spec.get("data", {}).get("shards"))
            if shards is not None and Path(shards) != study.shards:
                raise StudyError(f"row {row.name!r}: {run_dir} holds a run on {shards}, not on {study.shards}: give the "
                                 f"study another out folder (--out) for other shards")


def run_study(study: Study, log: Callable[[str], None] = print) -> list[dict]:
    """Runs every row seed not yet done; returns all results (done before or now), in the study's order."""
    study.out.mkdir(parents=True, exist_ok=True)
    results = []
    for row in study.rows:
        for seed in study.seeds_of(row):
            run_dir = study.run_dir(row, seed)
            _check_data(study, row, run_dir)
            done = run_dir / RESULT
            if done.is_file():
                log(f"{row.name} (seed {seed}): done before, skipped")
            else:
                log(f"{row.name} (seed {seed}): running into {run_dir}")
                run_dir.mkdir(parents=True, exist_ok=True)
                result = _run_baseline(study) if row.baseline else _run_training(study, row, seed, run_dir, log)
                _write_json(done, {"row": row.name, "family": row.family, "seed": seed, "shards": str(study.shards), **result})
                log(f"{row.name} (seed {seed}): {_headline(result) or 'done (a step for other rows, not reported)'}")
            results.append(json.loads(done.read_text()))
    return results


def done_results(study: Study) -> list[dict]:
    """The results of the row seeds done so far, in the study's order."""
    for row in study.rows:
        for seed in study.seeds_of(row):
            _check_data(study, row, study.run_dir(row, seed))
    files = [study.run_dir(row, seed) / RESULT for row in study.rows for seed in study.seeds_of(row)]
    return [json.loads(f.read_text()) for f in files if f.is_file()]


def _headline(result: dict) -> str:
    return ", ".join(f"{heading} {result['eval'][split][metric]:.4f}" for split, metric, heading in COLUMNS
                     if split in result["eval"])


# -- reporting ----------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(values: list[float], digits: int = 4) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def summarise(study: Study, results: list[dict]) -> list[dict]:
    """One entry per row: its seeds' results gathered."""
    rows = []
    for row in study.rows:
        mine = [r for r in results if r["row"] == row.name]
        if mine and row.report:
            rows.append({"row": row, "results": mine})
    return rows


def _not_done(study: Study, results: list[dict]) -> list[str]:
    """'ROW (seeds ...)' for every row with seeds planned and no result yet."""
    done = {(r["row"], r["seed"]) for r in results}
    missing = []
    for row in study.rows:
        seeds = [seed for seed in study.seeds_of(row) if (row.name, seed) not in done]
        if seeds:
            missing.append(f"{row.name} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})")
    return missing


def write_table(study: Study, rows: list[dict], every_result: list[dict], path: Path) -> None:
    """The table, then the machine time the rows done took (unreported rows included) and the row seeds still to run."""
    has_cold = any("cold" in r["eval"] for entry in rows for r in entry["results"])
    columns = [c for c in COLUMNS if has_cold or c[0] != "cold"]
    head = ["family", "row", "seeds", *(c[2] for c in columns)] + (["cold random Recall@20"] if has_cold else [])
    head += ["best step", "wall (min)", "samples/s"]
    lines = [f"# {study.title}", "",
             f"Data: `{study.shards}`. Every trained row early-stops on {study.metric} and reports the evaluation of its "
             f"best {study.metric} (never chosen on test). Mean ± std over seeds. Study file: `{study.path}`"
             + (f" with `{study.overrides}`." if study.overrides else "."), "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for entry in rows:
        row, results = entry["row"], entry["results"]
        planned = len(study.seeds_of(row))
        cells = [row.family, row.name, str(len(results)) if len(results) == planned else f"{len(results)} of {planned}"]
        for split, metric, _ in columns:
            values = [r["eval"][split][metric] for r in results if split in r["eval"]]
            cells.append(_cell(values) if values else "-")
        if has_cold:
            values = [r["eval"]["cold"]["random_recall@20"] for r in results if "cold" in r["eval"]]
            cells.append(_cell(values) if values else "-")
        steps = [r["best_step"] for r in results if r.get("best_step") is not None]
        cells.append(", ".join(str(s) for s in steps) if steps else "-")
        cells.append(_cell([r["wall_s"] / 60 for r in results], 1))
        speeds = [r["samples_per_s"] for r in results if r.get("samples_per_s")]
        cells.append(_cell(speeds, 0) if speeds else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Wall time of the row seeds done, summed (each as run, rows that only feed others included): "
                  f"{sum(r['wall_s'] for r in every_result) / 60:.1f} min."]
    missing = _not_done(study, every_result)
    lines.append("Not done yet: " + "; ".join(missing) + "." if missing else "Every row seed is done.")
    path.write_text("\n".join(lines) + "\n")


def write_chart(study: Study, rows: list[dict], path: Path) -> None:
    """Test NDCG@10 per row (mean, std error bars), coloured by family; beside it, where the data has cold items, cold
    Recall@20 among the cold items with random's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = [("test", "ndcg@10", "test NDCG@10 at the best validation evaluation")]
    if any(all("cold" in r["eval"] for r in entry["results"]) for entry in rows):
        panels.append(("cold", "recall@20", "cold Recall@20 among the cold items (dashed: random)"))
    families = list(dict.fromkeys(entry["row"].family for entry in rows))
    palette = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 6 * len(panels), 0.45 * len(rows) + 1.6), sharey=True, squeeze=False)
    y = list(range(len(rows)))[::-1]
    for ax, (split, metric, label) in zip(axes[0], panels):
        shown = [(position, entry) for position, entry in zip(y, rows) if all(split in r["eval"] for r in entry["results"])]
        stats = [_mean_std([r["eval"][split][metric] for r in entry["results"]]) for _, entry in shown]
        errors = [s or 0.0 for _, s in stats]
        ax.barh([position for position, _ in shown], [m for m, _ in stats], xerr=errors if any(errors) else None, capsize=3,
                color=[palette(families.index(entry["row"].family) % 10) for _, entry in shown])
        if split == "cold":
            random = [r["eval"]["cold"]["random_recall@20"] for _, entry in shown for r in entry["results"]]
            ax.axvline(_mean_std(random)[0], color="black", linestyle="--", linewidth=1)
        ax.set_xlim(left=0)
        ax.set_xlabel(f"{label}\n(error bars: std over seeds)")
    axes[0][0].set_yticks(y, [entry["row"].name for entry in rows])
    axes[0][0].legend(handles=[Patch(color=palette(i % 10), label=family or "-") for i, family in enumerate(families)],
                      loc="upper right", fontsize="small")
    fig.suptitle("\n".join(textwrap.wrap(study.title, 80)), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(study: Study, results: list[dict]) -> tuple[Path, Path]:
    rows = summarise(study, results)
    table, chart = study.out / f"{study.report_name}.md", study.out / f"{study.report_name}.png"
    write_table(study, rows, results, table)
    write_chart(study, rows, chart)
    return table, chart
