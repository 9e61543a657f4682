"""Checkpoint folders: a tag is complete only once every rank has written it.

run_dir/checkpoints/step00000100/   DeepSpeed's files (any ZeRO stage) + client state
                    step00000100/rng_rank00000.safetensors   each rank's random states (torch, CUDA, numpy, Python)
                    step00000100/content_cache.safetensors   the catalogue content the task had cached, if any
                    step00000100/train_state.json   world size, batch, data streams and ZeRO stage it was saved with
                    step00000100/universal/   DeepSpeed's universal checkpoint of the tag, written when it resumes on
                                              another world size or ZeRO stage
                    step00000100/COMPLETE   written by rank 0 after a barrier
run_dir/checkpoints/latest          the newest complete tag, replaced atomically

A run killed mid-save leaves a tag without COMPLETE; it is never taken as the latest.

Checkpoints may come from someone else (a shared filesystem, a downloaded run): nothing in them is
unpickled. Every DeepSpeed file of a tag is checked before it is loaded (`verify_tag`: a readable
archive whose pickle names tensors, plain containers and DeepSpeed's three checkpoint types only),
and every torch.load while loading, DeepSpeed's included, runs weights-only (`safe_loading`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

COMPLETE = "COMPLETE"


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, folder not writable); the previous one is kept."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and why."""


class DamagedCheckpointError(CheckpointError):
    """A file of the tag is truncated or not an archive torch can read (`--resume latest` falls back)."""


class UnsafeCheckpointError(CheckpointError):
    """A file of the tag holds pickled objects that loading would run: refused, never skipped quietly."""


TAG = re.compile(r"^step(\d{8})$")
# What DeepSpeed's own checkpoint files hold besides tensors and plain containers (its ZeRO optimizer states).
DEEPSPEED_CHECKPOINT_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                              "deepspeed.utils.tensor_fragment.fragment_address")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Complete tags, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_complete(checkpoint_dir: Path) -> str | None:
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None


def mark_complete(checkpoint_dir: Path, tag: str, keep_last: int, keep: tuple[str, ...] = ()) -> list[str]:
    """Rank 0, after all ranks saved: marks the tag, points `latest` at it, prunes old tags but those in `keep`
    (the best checkpoint).

    Returns the tags removed.
    """
    (checkpoint_dir / tag / COMPLETE).write_text(tag + "\n")
    tmp = checkpoint_dir / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, checkpoint_dir / "latest")
    removed = []
    for old in [t for t in complete_tags(checkpoint_dir)[:-keep_last] if t not in keep]:
        shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
        removed.append(old)
    # Incomplete tags older than the newest complete one are debris of a crashed save.
    for path in checkpoint_dir.iterdir():
        if TAG.match(path.name) and not (path / COMPLETE).exists() and path.name < tag:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def interrupted_tags(checkpoint_dir: Path) -> list[str]:
    """Tags newer than the newest complete one that lack COMPLETE: saves cut short by a crash or kill."""
    if not checkpoint_dir.is_dir():
        return []
    newest = latest_complete(checkpoint_dir) or ""
    return sorted(p.name for p in checkpoint_dir.iterdir() if TAG.match(p.name) and not (p / COMPLETE).exists() and p.name > newest)


def space_report(folder: Path) -> str:
    """Free space and writability of a folder, for the message of a failed save."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as e:
        return f"{folder}: {e}"
    return f"{free / 2**20:.1f} MiB free on {folder}'s filesystem, {'writable' if os.access(folder, os.W_OK) else 'NOT writable'}"


def discard(checkpoint_dir: Path, tag: str) -> None:
    """Removes a tag whose save failed, so that it is never mistaken for a checkpoint."""
    shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)


def verify_tag(tag_dir: Path) -> None:
    """Checks every DeepSpeed file of a tag without unpickling anything: each must be a readable torch archive
    whose pickle names only tensors, plain containers and DeepSpeed's checkpoint types. And the tag, its universal
    conversion included, holds plain files and folders only: a resume writes there, and a link would take reads and
    writes outside it."""
    for root, folders, names in os.walk(tag_dir):  # a linked folder is listed, not entered
        for name in folders + names:
            path = Path(root) / name
            kind = os.lstat(path).st_mode
            if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
                raise UnsafeCheckpointError(f"{path}: refused: a checkpoint holds plain files and folders only (this is "
                                            f"{'a symbolic link' if stat.S_ISLNK(kind) else 'no plain file'})")
    files = sorted(Path(tag_dir).glob("*.pt"))
    if not files:
        raise DamagedCheckpointError(f"{tag_dir}: no DeepSpeed state files (*.pt)")
    verify_files(files)


def verify_files(files) -> None:
    for path in files:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:  # torch's archive reader raises RuntimeError and others for a cut or foreign file
            raise DamagedCheckpointError(f"{path}: unreadable ({str(e).strip().splitlines()[0][:200]}): the file is truncated or "
                                         f"damaged") from None
        unsafe = sorted(set(found) - set(DEEPSPEED_CHECKPOINT_TYPES))
        if unsafe:
            raise UnsafeCheckpointError(f"{path}: refused: it holds pickled object(s) of {unsafe}, which are neither tensors nor "
                                        f"DeepSpeed's checkpoint types; loading it would run code from the file")


def _deepspeed_checkpoint_types() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def safe_loading() -> Iterator[None]:
    """Every torch.load inside, DeepSpeed's own (which ask for weights_only=False) included, is weights-only,
    with DeepSpeed's checkpoint types allowed."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def newest_usable(checkpoint_dir: Path, log=print) -> str | None:
    """The newest complete tag whose files verify; newer tags that are incomplete (an interrupted save) or damaged
    are skipped, and said so. None when there is no complete tag at all; an error when none of them is readable.
    A tag holding pickled code is an error, never skipped for an older one."""
    tags = complete_tags(checkpoint_dir)
    for skipped in interrupted_tags(checkpoint_dir):
        log(f"{checkpoint_dir / skipped} is incomplete (no {COMPLETE} marker: its save was interrupted); "
            f"{'taking ' + tags[-1] if tags else 'no complete checkpoint before it'}")
    for tag in reversed(tags):
        try:
            verify_tag(checkpoint_dir / tag)
        except DamagedCheckpointError as e:
            log(f"skipping {checkpoint_dir / tag}: {e}")
            continue
        return tag
    if tags:
        raise DamagedCheckpointError(f"none of the complete checkpoints in {checkpoint_dir} is readable ({', '.join(tags)})")
    return None


def resolve_resume(resume: str | None, run_dir: Path, log=print) -> tuple[Path, str] | None:
    """`--resume latest` (the run's newest usable tag) or a checkpoint folder path -> (checkpoint dir, tag), verified,
    or None to start fresh."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoint_dir = run_dir / "checkpoints"
        tag = newest_usable(checkpoint_dir, lambda message: log(f"--resume latest: {message}"))
        return (checkpoint_dir, tag) if tag else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    verify_tag(path)
    return path.parent, path.name


@dataclass(frozen=True)
class CheckpointRef:
    run_dir: Path  # the run folder (holds config.json); may lack one for a copied tag folder
    checkpoint_dir: Path  # run_dir/checkpoints
    tag: str  # stepNNNNNNNN

    @property
    def path(self) -> Path:
        return self.checkpoint_dir / self.tag


def resolve_source(source: str | Path, log=print) -> CheckpointRef:
    """What the tools take: a run folder or its checkpoints/ folder (the newest usable tag), RUN/latest (the same),
    RUN/best (the tag RUN/best.json names: train.best_metric's best evaluation), or one tag folder (which must be
    complete and verify)."""
    path = Path(source)
    if path.name in ("best", "latest") and not path.is_dir() and (path.parent / "checkpoints").is_dir():
        if path.name == "latest":
            return resolve_source(path.parent, log)
        record = path.parent / "best.json"
        try:
            tag = json.loads(record.read_text())["tag"]
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {record} is missing (the run had no train.best_metric, or no evaluation yet)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{record}: not a best-checkpoint record ({e})") from None
        if not isinstance(tag, str) or not TAG.fullmatch(tag):
            raise CheckpointError(f"{record}: tag {tag!r} is not a checkpoint tag (stepNNNNNNNN)")
        return resolve_source(path.parent / "checkpoints" / tag, log)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint tag folder)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (expected a run folder or a checkpoint tag folder)")
    if TAG.match(path.name) or any(path.glob("*_model_states.pt")):
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE} marker: its save did not finish on every "
                                  f"rank); complete tags here: {complete_tags(path.parent) or 'none'}")
        verify_tag(path)
        return CheckpointRef(path.parent.parent, path.parent, path.name)
    if (path / "checkpoints").is_dir():
        run_dir, checkpoint_dir = path, path / "checkpoints"
    elif path.name == "checkpoints" or any(TAG.match(p.name) for p in path.iterdir()):
        run_dir, checkpoint_dir = path.parent, path
    else:
        raise CheckpointError(f"{path}: not a run folder (no checkpoints/ folder) nor a checkpoint tag folder")
    tag = newest_usable(checkpoint_dir, log)
    if tag is None:
        incomplete = sorted(p.name for p in checkpoint_dir.iterdir() if TAG.match(p.name))
        detail = f" (incomplete tags without {COMPLETE}: {', '.join(incomplete)})" if incomplete else ""
        raise CheckpointError(f"{checkpoint_dir}: no complete checkpoint{detail}")
    return CheckpointRef(run_dir, checkpoint_dir, tag)


MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-0/1/2, ZeRO-3


def model_states_file(tag_dir: Path) -> Path:
    for name in MODEL_STATES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file (*_model_states.pt)")


# -- what a restart needs beyond DeepSpeed's files ---------------------------------------------------------
CONTENT_CACHE = "content_cache.safetensors"


def rng_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank:05d}.safetensors"


def save_rng_state(tag_dir: Path, rank: int) -> None:
    """Every random state a rank draws from: dropout and drop-path (torch, CUDA), numpy and Python's `random`.

    The data stream needs none: its order is a function of (seed, epoch, rank, worker) and the position saved
    in the client state, and its loaders draw worker seeds from their own generators."""
    from safetensors.torch import save_file

    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(python_state, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    metadata = {"python": json.dumps([version, gauss]), "numpy": json.dumps([kind, int(position), int(has_gauss), float(cached)])}
    save_file(tensors, str(rng_file(tag_dir, rank)), metadata=metadata)


def load_rng_state(tag_dir: Path, rank: int) -> bool:
    """Restores what save_rng_state wrote for this rank; False when the tag has no file for it."""
    from safetensors import safe_open

    path = rng_file(tag_dir, rank)
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, position, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    return True


def save_content_cache(tag_dir: Path, content: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """The (image, text, has_image) content the task holds: joint mode's cache is as old as its last refresh, which
    re-encoding at resume would not reproduce."""
    from safetensors.torch import save_file

    image, text, has_image = (t.detach().cpu().contiguous() for t in content)
    save_file({"image": image, "text": text, "has_image": has_image}, str(Path(tag_dir) / CONTENT_CACHE))


def load_content_cache(tag_dir: Path, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = Path(tag_dir) / CONTENT_CACHE
    if not path.is_file():
        return None
    tensors = load_file(str(path), device=str(device))
    return tensors["image"], tensors["text"], tensors["has_image"]


# -- resuming on another world size or ZeRO stage ------------------------------------------------------------
TRAIN_STATE = "train_state.json"
UNIVERSAL = "universal"
OPTIMIZER_PARAMETERS = "optimizer_parameters"  # client state: the trained parameters' names in the optimizer's order


def write_train_state(tag_dir: Path, state: dict) -> None:
    (Path(tag_dir) / TRAIN_STATE).write_text(json.dumps(state, indent=2) + "\n")


def read_train_state(tag_dir: Path) -> dict | None:
    """What the tag was saved with ({world_size, batch_size, grad_accum, streams, zero_stage}, and precision since
    2026-12-06); None for a tag written before it was recorded."""
    path = Path(tag_dir) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        keys = ("world_size", "batch_size", "grad_accum", "streams", "zero_stage")
        if not all(isinstance(state[k], int) and state[k] >= 0 for k in keys) or min(state[k] for k in keys[:4]) < 1:
            raise ValueError(f"{', '.join(keys)} must be positive integers")
        if state.get("precision", "fp32") not in ("fp32", "bf16"):
            raise ValueError(f"precision {state['precision']!r} is not fp32 or bf16")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a training-state record ({e})") from None
    return state


def universal_checkpoint(tag_dir: Path, param_names: list[str], log=print) -> Path:
    """The tag as DeepSpeed's universal checkpoint (every parameter's fp32 value and optimizer moments whole, in
    tag_dir/universal), converted once and reused; its files are checked as the tag's. A ZeRO tag converts with
    DeepSpeed's ds_to_universal; a stage-0 tag (one rank) is written from its whole module and Adam state, whose
    parameters are `param_names` in the optimizer's order."""
    tag_dir = Path(tag_dir)
    out = tag_dir / UNIVERSAL
    if not (out / COMPLETE).is_file():
        import argparse
        import contextlib
        import io

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = tag_dir / (UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"converting {tag_dir} to a universal checkpoint ({out})")
        with safe_loading():
            if any(tag_dir.glob("*_optim_states.pt")):
                args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                          num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
                with contextlib.redirect_stdout(io.StringIO()):  # its step-by-step prints; ours says it once
                    ds_to_universal(args)
            else:
                _universal_from_stage0(tag_dir, param_names, tmp)
        (tmp / COMPLETE).write_text("universal\n")
        shutil.rmtree(out, ignore_errors=True)  # a conversion cut short before
        os.replace(tmp, out)
    verify_files(sorted(out.rglob("*.pt")))
    _readable_under_every_stage(out, param_names)
    return out


def _readable_under_every_stage(out: Path, param_names: list[str]) -> None:
    """DeepSpeed's universal loaders (0.19.8) read a conversion in their own stage's layout only: the model states
    (client state, scheduler) under the name their stage saves them; the optimizer's global state with a DeepSpeed
    version and the groups at the top (ZeRO-1/2) or with the groups and the step under "optimizer_state_dict"
    (ZeRO-3); each parameter's tensors as {param: whole shape, cat_dim} with a step.pt (ZeRO-1/2; ZeRO-3 reads
    either, and writes flat tensors without a step). Add what the other stages need, so that a tag resumes under any."""
    import deepspeed

    states = model_states_file(out)
    for name in MODEL_STATES:
        if not (out / name).exists():
            try:
                os.link(states, out / name)
            except OSError:  # a file system without hard links
                shutil.copy2(states, out / name)
    zero = out / "zero"
    with safe_loading():
        global_state = torch.load(zero / "optimizer_state.pt", map_location="cpu")
        if "ds_version" in global_state and "optimizer_state_dict" in global_state:
            return
        param_shapes = torch.load(states, map_location="cpu").get("param_shapes") or []
    shapes = {name: shape for group in param_shapes for name, shape in group.items()}
    # the run's Adam step: ZeRO's is one for all; a stage-0 one keeps each parameter's, which stops growing where a
    # part stops training (fine_tuned's encoder after the freeze): the largest is the trained parts'
    steps = [torch.load(f, map_location="cpu", weights_only=True) for f in zero.glob("*/step.pt")]
    zero3_step = global_state.get("optimizer_state_dict", {}).get("state", {}).get(0, {}).get("step")
    step = max(steps) if steps else zero3_step
    step = torch.tensor(0.0) if step is None else torch.as_tensor(step, dtype=torch.float32)
    for folder in (f for f in zero.iterdir() if f.is_dir()):
        for file in folder.glob("*.pt"):
            tensor = torch.load(file, map_location="cpu", weights_only=True)
            if torch.is_tensor(tensor) and file.name != "step.pt":  # ZeRO-3's flat tensor
                if folder.name not in shapes or shapes[folder.name].numel() != tensor.numel():
                    raise CheckpointError(f"{file}: {tensor.numel()} values, and {states} gives no parameter "
                                          f"{folder.name!r} of that size")
                _save_replacing({"param": tensor.view(shapes[folder.name]), "cat_dim": 0}, file)
    for name in param_names:  # a trained parameter that never had a gradient has no moments: ZeRO's flat groups hold zeros
        folder = zero / name
        if (folder / "fp32.pt").exists() and not (folder / "exp_avg.pt").exists():
            weight = torch.load(folder / "fp32.pt", map_location="cpu", weights_only=True)["param"]
            for key in ("exp_avg", "exp_avg_sq"):
                _save_replacing({"param": torch.zeros_like(weight), "cat_dim": 0}, folder / f"{key}.pt")
    for folder in (f for f in zero.iterdir() if f.is_dir()):
        if (folder / "exp_avg.pt").exists() and not (folder / "step.pt").exists():
            _save_replacing(step, folder / "step.pt")
    global_state.setdefault("ds_version", deepspeed.__version__)
    global_state.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": global_state["param_groups"]})
    _save_replacing(global_state, zero / "optimizer_state.pt")  # last: its layout says the conversion is done


def _save_replacing(value, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)


def stage0_optimizer(states: dict, model_file: Path) -> dict:
    """A stage-0 tag's optimizer state ({state, param_groups}): under bf16 DeepSpeed wraps the optimizer and saves
    its state under "optimizer_state_dict", beside the fp32 master weights ("fp32_groups")."""
    optimizer = states.get("optimizer")
    if isinstance(optimizer, dict) and "optimizer_state_dict" in optimizer:
        optimizer = optimizer["optimizer_state_dict"]
    if not isinstance(optimizer, dict) or set(optimizer) != {"state", "param_groups"}:
        raise CheckpointError(f"{model_file}: no whole optimizer state (a stage-0 tag keeps it in the model states)")
    return optimizer


def stage0_weights(states: dict, param_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A stage-0 tag's weights by name. Under bf16 the module holds bf16 copies and the optimizer the fp32 masters of
    the trained parameters, in its order (`param_names`; a tag saved since 2026-12-06 names them itself): those
    replace the copies."""
    weights = dict(states["module"])
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    names = param_names or states.get(OPTIMIZER_PARAMETERS)
    if masters is not None and names is not None:
        flat = [tensor for group in masters for tensor in group]
        if len(flat) != len(names):
            raise CheckpointError(f"the optimizer holds {len(flat)} fp32 master weights for {len(names)} parameter names")
        for name, master in zip(names, flat):  # the names come from the tag: each must be a module weight of its shape
            if name not in weights or weights[name].shape != master.shape:
                raise CheckpointError(f"fp32 master weight {name!r}: no module weight of shape {tuple(master.shape)} has that name")
        weights.update(zip(names, flat))
    return weights


def _universal_from_stage0(tag_dir: Path, param_names: list[str], out: Path) -> None:
    """ds_to_universal's layout from a stage-0 tag: zero/NAME/{fp32,exp_avg,exp_avg_sq,step}.pt per parameter (a
    parameter that never had a gradient has no moments, as in DeepSpeed's own conversion), the groups' settings in
    zero/optimizer_state.pt, and the model states beside them (client state, buffers, scheduler)."""
    model_file = model_states_file(tag_dir)
    states = torch.load(model_file, map_location="cpu", weights_only=True)
    optimizer = stage0_optimizer(states, model_file)
    indices = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(indices) != len(param_names):
        raise CheckpointError(f"{model_file}: the optimizer holds {len(indices)} parameters, this model trains {len(param_names)}")
    weights = stage0_weights(states, param_names)
    zero = out / "zero"
    for index, name in zip(indices, param_names):
        folder = zero / name
        folder.mkdir(parents=True)
        torch.save({"param": weights[name].float(), "cat_dim": 0}, folder / "fp32.pt")
        state = optimizer["state"].get(index, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                torch.save({"param": state[key].float(), "cat_dim": 0}, folder / f"{key}.pt")
        if "step" in state:
            torch.save(torch.as_tensor(state["step"], dtype=torch.float32), folder / "step.pt")
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer["param_groups"]]
    torch.save({"param_groups": groups}, zero / "optimizer_state.pt")  # the rest: _readable_under_every_stage
    shutil.copy2(model_file, out / model_file.name)
