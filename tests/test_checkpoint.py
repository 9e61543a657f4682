"""Checkpoint folder rules: only complete tags count, `latest` moves atomically, old tags are pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmscale.engine import checkpoint


def write_states(path: Path) -> None:
    torch.save({"module": {"w": torch.zeros(2)}, "global_steps": 1}, path)


def make_tag(root: Path, step: int, complete: bool) -> str:
    tag = checkpoint.tag_for(step)
    (root / tag).mkdir(parents=True)
    write_states(root / tag / "mp_rank_00_model_states.pt")
    if complete:
        checkpoint.mark_complete(root, tag, keep_last=10)
    return tag


def test_half_written_tag_is_never_latest(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    make_tag(checkpoints, 100, complete=True)
    make_tag(checkpoints, 200, complete=False)  # the run died while saving this one
    assert checkpoint.latest_complete(checkpoints) == "step00000100"
    assert (checkpoints / "latest").read_text() == "step00000100"
    assert checkpoint.resolve_resume("latest", tmp_path / "run") == (checkpoints, "step00000100")
    assert checkpoint.resolve_resume("latest", tmp_path / "other-run") is None  # nothing saved there: fresh start


def test_keep_last_prunes_old_complete_tags_and_crash_debris(tmp_path):
    for step in (1, 2, 3):
        make_tag(tmp_path, step, complete=True)
    make_tag(tmp_path, 4, complete=False)  # debris older than the next complete tag
    make_tag(tmp_path, 5, complete=False)
    removed = checkpoint.mark_complete(tmp_path, "step00000005", keep_last=2)
    assert sorted(removed) == ["step00000001", "step00000002", "step00000004"]
    assert checkpoint.complete_tags(tmp_path) == ["step00000003", "step00000005"]
    assert not (tmp_path / "step00000004").exists()
    assert (tmp_path / "latest").read_text() == "step00000005"
    assert not (tmp_path / "latest.tmp").exists()


def test_resume_from_explicit_folder_requires_complete_marker(tmp_path):
    make_tag(tmp_path, 7, complete=False)
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        checkpoint.resolve_resume(str(tmp_path / "step00000007"), tmp_path)
    checkpoint.mark_complete(tmp_path, "step00000007", keep_last=1)
    assert checkpoint.resolve_resume(str(tmp_path / "step00000007"), tmp_path) == (tmp_path, "step00000007")
    assert checkpoint.resolve_resume(None, tmp_path) is None


def test_resume_latest_skips_an_interrupted_save_and_says_so(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for tag in ("step00000002", "step00000004"):
        (checkpoints / tag).mkdir(parents=True)
        write_states(checkpoints / tag / "mp_rank_00_model_states.pt")
    checkpoint.mark_complete(checkpoints, "step00000002", keep_last=2)
    (checkpoints / "step00000006").mkdir()  # killed while writing: no COMPLETE marker
    messages = []
    found = checkpoint.resolve_resume("latest", tmp_path, messages.append)
    assert found == (checkpoints, "step00000002")
    assert len(messages) == 2  # one line per incomplete tag
    assert "step00000006 is incomplete" in messages[-1] and "taking step00000002" in messages[-1]
    assert "step00000004 is incomplete" in messages[-2]


def test_resume_latest_skips_a_damaged_tag_but_never_a_planted_payload(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        make_tag(checkpoints, step, complete=True)
    newest = checkpoints / "step00000003" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:50])
    messages = []
    assert checkpoint.resolve_resume("latest", tmp_path, messages.append) == (checkpoints, "step00000002")
    assert messages == [f"--resume latest: skipping {checkpoints / 'step00000003'}: {newest}: unreadable "
                        f"{messages[0].split(': unreadable ')[1]}"] and "truncated or damaged" in messages[0]
    # code planted in the tag that would be taken is refused outright, not skipped for an older one
    torch.save({"module": {}, "evil": print}, checkpoints / "step00000002" / "mp_rank_00_model_states.pt")
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="builtins.print"):
        checkpoint.resolve_resume("latest", tmp_path, messages.append)
    # every tag damaged: an error, not a fresh start over them
    (checkpoints / "step00000001" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (checkpoints / "step00000002" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(checkpoint.DamagedCheckpointError, match="none of the complete checkpoints"):
        checkpoint.resolve_resume("latest", tmp_path, messages.append)


def test_a_tags_training_state_is_read_or_refused_by_name(tmp_path):
    from mmscale.engine.checkpoint import CheckpointError, read_train_state, write_train_state

    assert read_train_state(tmp_path) is None  # a tag written before the record existed
    state = {"world_size": 2, "batch_size": 8, "grad_accum": 1, "streams": 2, "zero_stage": 3, "precision": "bf16"}
    write_train_state(tmp_path, state)
    assert read_train_state(tmp_path) == state
    for bad in ("{not json", json.dumps({**state, "streams": 0}), json.dumps({**state, "world_size": "2"}),
                json.dumps({**state, "precision": "fp8"}), json.dumps({**state, "precision": ["bf16"]}),
                json.dumps({k: v for k, v in state.items() if k != "grad_accum"}), "[]"):
        (tmp_path / "train_state.json").write_text(bad)
        with pytest.raises(CheckpointError, match=f"{tmp_path / 'train_state.json'}: not a training-state record"):
            read_train_state(tmp_path)


def test_a_zero3_conversion_gets_every_stages_layout_and_refuses_a_tensor_of_no_parameter(tmp_path):
    """DeepSpeed's ZeRO-3 conversion writes flat tensors without a step, which its ZeRO-1/2 loader cannot read: they
    become whole-shaped {param, cat_dim} files with the run's step (the resumes themselves: test_resume_world_size).
    A flat tensor that no parameter of the tag's shapes fits stops the conversion, naming the file."""
    out = tmp_path / "step00000003" / checkpoint.UNIVERSAL
    (out / "zero" / "proj").mkdir(parents=True)
    (out / checkpoint.COMPLETE).write_text("universal\n")
    torch.save({"param_shapes": [{"proj": torch.Size([2, 3])}]}, out / checkpoint.MODEL_STATES[1])
    groups = [{"lr": 0.1, "weight_decay": 0.0}]
    torch.save({"param_groups": groups, "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": groups}},
               out / "zero" / "optimizer_state.pt")
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        torch.save(torch.arange(6.0), out / "zero" / "proj" / f"{key}.pt")
    assert checkpoint.universal_checkpoint(out.parent, [], log=lambda *a: None) == out
    assert (out / checkpoint.MODEL_STATES[0]).is_file()
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        saved = torch.load(out / "zero" / "proj" / f"{key}.pt", weights_only=True)
        assert saved["cat_dim"] == 0 and torch.equal(saved["param"], torch.arange(6.0).view(2, 3))
    assert torch.load(out / "zero" / "proj" / "step.pt", weights_only=True) == 3
    assert torch.load(out / "zero" / "optimizer_state.pt", weights_only=True)["ds_version"]

    (out / "zero" / "optimizer_state.pt").unlink()
    torch.save({"param_groups": groups, "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": groups}},
               out / "zero" / "optimizer_state.pt")
    (out / "zero" / "planted").mkdir()
    torch.save(torch.zeros(5), out / "zero" / "planted" / "fp32.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"planted/fp32.pt: 5 values, and .* gives no parameter 'planted'"):
        checkpoint.universal_checkpoint(out.parent, [], log=lambda *a: None)


def test_a_stage0_conversion_gives_a_parameter_without_gradient_zero_moments_and_the_runs_step(tmp_path):
    """torch's Adam keeps no state for a parameter that never had a gradient (VLMo's MLM head under ITC alone, the
    recommender of fine_tuned before the freeze); DeepSpeed's loaders read moments for every parameter. Zeros are
    what ZeRO's flat groups hold for it. The run's step is the largest: a part that stopped training keeps an
    older one."""
    tag = tmp_path / "step00000005"
    tag.mkdir()
    moments = {"exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}
    optimizer = {"state": {0: {"step": torch.tensor(2.0), **moments}, 1: {"step": torch.tensor(5.0), **moments}},
                 "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.2, "params": [1, 2]}]}
    module = {"frozen_early": torch.zeros(2), "trained": torch.zeros(2), "unused": torch.full((3, 2), 7.0)}
    torch.save({"module": module, "optimizer": optimizer}, tag / checkpoint.MODEL_STATES[0])
    out = checkpoint.universal_checkpoint(tag, ["frozen_early", "trained", "unused"], log=lambda *a: None)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(torch.load(out / "zero" / "unused" / f"{key}.pt", weights_only=True)["param"], torch.zeros(3, 2))
    assert torch.load(out / "zero" / "unused" / "step.pt", weights_only=True) == 5
    assert torch.load(out / "zero" / "frozen_early" / "step.pt", weights_only=True) == 2  # its own, kept
    global_state = torch.load(out / "zero" / "optimizer_state.pt", weights_only=True)
    assert global_state["optimizer_state_dict"]["state"][0]["step"] == 5 and global_state["ds_version"]


def test_a_checkpoint_holding_a_link_is_refused(tmp_path):
    """A resume writes into the tag (its universal conversion): a link planted there would take the writes, with
    bytes from the checkpoint, to a file elsewhere (a .pth that Python runs at start)."""
    tag = tmp_path / "step00000005"
    (tag / checkpoint.UNIVERSAL / "zero" / "w").mkdir(parents=True)
    torch.save({"module": {}}, tag / checkpoint.MODEL_STATES[0])
    checkpoint.verify_tag(tag)
    (tag / checkpoint.UNIVERSAL / "zero" / "w" / "fp32.pt.tmp").symlink_to(tmp_path / "elsewhere.pth")
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"fp32.pt.tmp: refused: .* \(this is a symbolic link\)"):
        checkpoint.verify_tag(tag)
    (tag / checkpoint.UNIVERSAL / "zero" / "w" / "fp32.pt.tmp").unlink()
    (tag / checkpoint.UNIVERSAL / "zero" / "x").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"zero/x: refused"):
        checkpoint.verify_tag(tag)
