"""Compares a multi-rank run of the parity harness (train_worker.py) with its one-process reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

LOSS_TOLERANCE = dict(rel=1e-5, abs=1e-6)  # step 1: the same weights
# Steps 2 and 3 follow Adam updates (see the gradients below): VLMo's image-text loss at step 2 was 2.7e-5 off on
# 2 nodes x 2 ranks in one suite run (every ZeRO stage alike, step 1 within 1e-6), and within 1e-5 in the runs before.
LOSS_TOLERANCE_AFTER_UPDATES = dict(rel=1e-4, abs=1e-6)
# Relative L2 error of a parameter group's gradient: fp32 sums in another order. Step 1 compares the same weights.
# Later steps compare weights after Adam updates, and Adam moves a weight by about lr wherever its gradient is
# near zero, whatever the rounding there: measured on 2 nodes x 2 ranks, VLMo's recommender group is up to 9e-6
# off at step 1 and 6e-5 to 1.1e-4 at steps 2-3 (the WordPiece vocabulary, which differs between builds, moves it);
# every other case stays under 4e-5. A real fault (a wrong feature table, a gradient scaled by the rank count) is
# 1e-2 or more at step 1.
GRADIENT_TOLERANCE = 1e-4  # step 1
GRADIENT_TOLERANCE_AFTER_UPDATES = 5e-4  # steps 2 and 3


def load_run(folder: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((folder / f"{name}.json").read_text()), load_file(str(folder / f"{name}.grads.safetensors"))


def group_gradient_errors(reference: dict, ref_grads: dict, grads: dict) -> dict[str, float]:
    """{"STEP/GROUP": relative L2 error} over every step recorded and every parameter group."""
    errors = {}
    steps = sorted({key.split("/", 1)[0] for key in ref_grads}, key=int)
    for step in steps:
        for group, names in reference["groups"].items():
            a = torch.cat([ref_grads[f"{step}/{n}"].flatten() for n in names])
            b = torch.cat([grads[f"{step}/{n}"].flatten() for n in names])
            errors[f"{step}/{group}"] = float((a - b).norm() / a.norm().clamp(min=1e-12))
    return errors


def assert_parity(reference_dir: Path, case: str, run_dir: Path, name: str) -> None:
    """Losses of every step and every parameter group's gradient after every step's backward agree."""
    reference, ref_grads = load_run(reference_dir, case)
    run, grads = load_run(run_dir, name)
    assert [e["step"] for e in run["losses"]] == [e["step"] for e in reference["losses"]] == [1, 2, 3]
    assert run["groups"] == reference["groups"]
    assert sorted(grads) == sorted(ref_grads)
    for a, b in zip(reference["losses"], run["losses"]):
        assert sorted(a) == sorted(b)
        for key in a:
            tolerance = LOSS_TOLERANCE if a["step"] == 1 else LOSS_TOLERANCE_AFTER_UPDATES
            assert b[key] == pytest.approx(a[key], **tolerance), (name, a["step"], key)
    errors = group_gradient_errors(reference, ref_grads, grads)
    over = {key: error for key, error in errors.items()
            if error > (GRADIENT_TOLERANCE if key.startswith("1/") else GRADIENT_TOLERANCE_AFTER_UPDATES)}
    assert not over, f"{name}: gradients off beyond the tolerance (step/group: error): {over}; all: {errors}"
    # the comparison is not vacuous: every group learns something in some step, and the loss moves
    for group in reference["groups"]:
        assert any(ref_grads[f"{s}/{n}"].abs().sum() > 0 for s in (1, 2, 3) for n in reference["groups"][group]), (case, group)
    assert abs(reference["losses"][-1]["loss/total"] - reference["losses"][0]["loss/total"]) > 1e-4
