"""tools/study.py: a two-row, few-step study on the generated world (MostPop and the pretrained dual encoder trained
end-to-end with early stopping): the files it writes, the choice on validation, rows skipped and resumed."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from helpers.programs import load_program

from mmscale.models import pretrained as P
from mmscale.study import StudyError, done_results, load_study, run_study, write_chart

REPO = Path(__file__).resolve().parents[1]
END_TO_END = "two-tower end_to_end (MiniLM + EfficientNet)"


def write_study(path: Path, shards: Path, out: Path, rows: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"title": "smoke", "out": str(out), "shards": str(shards), "metric": "valid/ndcg@10",
                                    "set": ["data.num_workers=0", "train.log_every=1"], "rows": rows}))
    return path


@pytest.fixture(scope="module")
def study(world_shards, tmp_path_factory):
    if not all(importlib.util.find_spec(m) for m in (P.MINILM_MODULE, P.EFFNET_WEIGHTS_MODULE, P.EFFNET_CODE_MODULE)):
        pytest.skip(f"needs {P.MINILM_PACKAGE} and {P.EFFNET_WEIGHTS_PACKAGE} (make setup installs them)")
    root = tmp_path_factory.mktemp("study")
    path = write_study(root / "study.yaml", world_shards, root / "out", [
        {"name": "MostPop", "family": "baselines", "baseline": "mostpop"},
        {"name": END_TO_END, "family": "two-tower", "config": str(REPO / "configs" / "demo.yaml"),
         "set": ["encoder.model=configs/models/minilm-effnet.json", "encoder.image_size=64", "encoder.context_length=16",
                 "encoder.trainable_blocks=1", "data.batch_size=16", "train.max_steps=12", "train.eval_every=2",
                 "train.patience=2", "train.save_every=1", "train.keep_last=1", "optim.lr_encoder=1e-3"]},
    ])
    log: list[str] = []
    results = run_study(load_study(path), log=log.append)
    return path, results, log


def test_rows_report_their_best_validation_evaluation(study):
    path, results, _ = study
    assert [r["row"] for r in results] == ["MostPop", END_TO_END]
    run_dir = load_study(path).run_dir(load_study(path).rows[1], 0)
    evaluations = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "eval/valid/ndcg@10" in entry:
            evaluations[entry["step"]] = entry
    assert len(evaluations) >= 2
    best_step = max(evaluations, key=lambda s: (evaluations[s]["eval/valid/ndcg@10"], -s))  # the first of equal ones
    trained = results[1]
    assert trained["best_step"] == best_step
    assert trained["eval"]["test"]["ndcg@10"] == pytest.approx(evaluations[best_step]["eval/test/ndcg@10"])
    # the best checkpoint survives pruning (keep_last=1, a save every step) and is complete
    assert (run_dir / "checkpoints" / trained["best_tag"] / "COMPLETE").is_file()
    # early stopping: either the run ran out of steps, or `patience` evaluations after the best ended it
    assert trained["last_step"] == 12 or trained["last_step"] == best_step + 2 * 2
    assert results[0]["best_step"] is None and 0 < results[0]["eval"]["test"]["recall@20"] <= 1


def test_table_and_chart(study):
    path, _, _ = study
    out = load_study(path).out
    assert load_program("tools/study.py").main([str(path), "--report"]) == 0
    table = (out / "study.md").read_text()
    assert "| baselines | MostPop | 1 |" in table and f"| two-tower | {END_TO_END} | 1 |" in table
    assert "test NDCG@10" in table and "valid/ndcg@10" in table
    assert "Every row seed is done." in table
    wall = sum(r["wall_s"] for r in done_results(load_study(path))) / 60
    assert f"Wall time of the row seeds done, summed (each as run, rows that only feed others included): {wall:.1f} min." in table
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_partial_study_says_what_is_not_done(study, tmp_path):
    path, _, _ = study
    rows = yaml.safe_load(path.read_text())["rows"]
    rows[1]["seeds"] = [0, 1, 2]  # seed 0 done, 1 and 2 not
    more = tmp_path / "more-seeds.yaml"  # sharing the study's out and rows, with its own table and chart
    more.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "rows": rows, "report_name": "more-seeds"}))
    out = load_study(more).out
    assert load_program("tools/study.py").main([str(path), "--report"]) == 0
    first_table = (out / "study.md").read_text()
    assert load_program("tools/study.py").main([str(more), "--report"]) == 0
    table = (out / "more-seeds.md").read_text()
    assert f"| two-tower | {END_TO_END} | 1 of 3 |" in table and "| baselines | MostPop | 1 |" in table
    assert table.rstrip().endswith(f"Not done yet: {END_TO_END} (seeds 1, 2).")
    assert (out / "more-seeds.png").is_file() and (out / "study.md").read_text() == first_table


def test_done_rows_are_skipped_and_a_cut_row_resumes(study):
    path, results, _ = study
    loaded = load_study(path)
    run_dir = loaded.run_dir(loaded.rows[1], 0)
    log: list[str] = []
    assert run_study(loaded, log=log.append) == results
    assert log == ["MostPop (seed 0): done before, skipped", f"{END_TO_END} (seed 0): done before, skipped"]
    # a row whose run has checkpoints but no result (killed before it finished) continues from its latest checkpoint
    (run_dir / "result.json").unlink()
    again = run_study(loaded, log=log.append)
    assert "--resume latest" in (run_dir / "train.log").read_text().split("$ ")[-1]  # the last command
    assert again[1]["resumed"] and again[1]["best_step"] == results[1]["best_step"]
    assert again[1]["eval"] == results[1]["eval"]
    assert done_results(loaded) == again


def test_a_study_file_runs_on_other_shards_into_another_folder(world_shards, tmp_path, capsys):
    """--shards, --out and --title replace the file's: the rows run on the other shards, into the other folder, and
    the table says how it was made."""
    path = write_study(tmp_path / "s.yaml", tmp_path / "not-built", tmp_path / "file-out",
                       [{"name": "MostPop", "family": "baselines", "baseline": "mostpop"}])
    out = tmp_path / "other-out"
    assert load_program("tools/study.py").main([str(path), "--shards", str(world_shards), "--out", str(out),
                                                "--title", "the world"]) == 0
    table = (out / "study.md").read_text()
    assert table.startswith("# the world\n") and f"Data: `{world_shards}`." in table
    assert f"Study file: `{path}` with `--title 'the world' --out {out} --shards {world_shards}`." in table
    assert "| baselines | MostPop | 1 |" in table and (out / "rows" / "mostpop" / "seed0" / "result.json").is_file()
    assert not (tmp_path / "file-out").exists()
    # the same folder on other shards: its rows are not taken as done (nor reported) for them
    for args in ([], ["--report"]):
        assert load_program("tools/study.py").main([str(path), "--shards", str(tmp_path), "--out", str(out), *args]) == 2
        assert re.search(r"row 'MostPop': .* holds a run on .*, not on .*--out", capsys.readouterr().err)


@pytest.mark.parametrize("rows, message", [
    ([{"name": "x"}], "give either config"),
    ([{"name": "x", "baseline": "popular"}], "unknown baseline 'popular'"),
    ([{"name": "x", "baseline": "mostpop", "colour": 1}], "unknown key"),
    ([{"name": "x", "config": "configs/demo.yaml", "set": ["sequence.pretrained={export:y}/model.safetensors"]}],
     "names no earlier row"),
    ([{"name": "x", "baseline": "mostpop"}, {"name": "X!", "baseline": "mostpop"}], "another row has the name"),
])
def test_bad_study_files_are_refused(tmp_path, rows, message):
    path = write_study(tmp_path / "s.yaml", tmp_path, tmp_path / "out", rows)
    with pytest.raises(StudyError, match=message):
        load_study(path)


@pytest.mark.parametrize("cold", [False, True])
def test_the_chart_shows_cold_recall_where_the_data_has_cold_items(tmp_path, cold):
    study = load_study(write_study(tmp_path / "s.yaml", tmp_path, tmp_path / "out", [{"name": "x", "baseline": "mostpop"}]))
    evaluation = {"test": {"ndcg@10": 0.05}, **({"cold": {"recall@20": 0.4, "random_recall@20": 0.2}} if cold else {})}
    write_chart(study, [{"row": study.rows[0], "results": [{"eval": evaluation}]}], tmp_path / "chart.png")
    header = (tmp_path / "chart.png").read_bytes()[:24]
    width = int.from_bytes(header[16:20], "big")  # the PNG's IHDR: 4 + 6 inches a panel at 120 dpi
    assert width == (16 if cold else 10) * 120


@pytest.mark.parametrize("name", ["../study", "/tmp/x", "", 3])
def test_a_report_name_outside_the_out_folder_is_refused(tmp_path, name):
    path = write_study(tmp_path / "s.yaml", tmp_path, tmp_path / "out", [{"name": "x", "baseline": "mostpop"}])
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "report_name": name}))
    with pytest.raises(StudyError, match="report_name"):
        load_study(path)


def test_choosing_on_test_is_refused(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"out": "o", "shards": "s", "metric": "test/ndcg@10", "rows": [{"name": "a", "baseline": "mostpop"}]}))
    assert load_program("tools/study.py").main([str(path)]) == 2
    assert "validation only" in capsys.readouterr().err


def test_a_row_stopped_before_its_end_is_not_done(world_shards, tmp_path, monkeypatch):
    """A training stopped on request (SIGTERM to it alone; here --stop-at) saves and exits 0: the study must not take
    its best-so-far for the row's result. Run again, the row continues from its checkpoint and finishes."""
    import subprocess

    from mmscale import study as study_module
    from mmscale.study import RowFailedError

    path = write_study(tmp_path / "study.yaml", world_shards, tmp_path / "out", [
        {"name": "tiny", "family": "two-tower", "config": str(REPO / "configs" / "demo.yaml"),
         "set": ["data.batch_size=16", "train.max_steps=6", "train.eval_every=2", "train.save_every=1", "eval.splits=[valid]"]}])
    loaded = load_study(path)
    run = subprocess.run
    monkeypatch.setattr(study_module.subprocess, "run", lambda command, **kw: run([*command, "--stop-at", "3"], **kw))
    with pytest.raises(RowFailedError, match="'tiny' seed 0 stopped at step 3 before its end"):
        run_study(loaded)
    assert not (loaded.run_dir(loaded.rows[0], 0) / "result.json").exists()
    monkeypatch.undo()
    (result,) = run_study(loaded)
    assert result["resumed"] and result["last_step"] == 6
