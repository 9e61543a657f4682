"""Checkpoint folders: a tag is complete only once every rank has written it.

run_dir/checkpoints/step00000100/   DeepSpeed's files (any ZeRO stage) + client state
                    step00000100/COMPLETE   written by rank 0 after a barrier
run_dir/checkpoints/latest          the newest complete tag, replaced atomically

A run killed mid-save leaves a tag without COMPLETE; it is never taken as the latest.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, folder not writable); the previous one is kept."""
TAG = re.compile(r"^step(\d{8})$")


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


def mark_complete(checkpoint_dir: Path, tag: str, keep_last: int) -> list[str]:
    """Rank 0, after all ranks saved: marks the tag, points `latest` at it, prunes old tags.

    Returns the tags removed.
    """
    (checkpoint_dir / tag / COMPLETE).write_text(tag + "\n")
    tmp = checkpoint_dir / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, checkpoint_dir / "latest")
    removed = []
    for old in complete_tags(checkpoint_dir)[:-keep_last]:
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


def resolve_resume(resume: str | None, run_dir: Path, log=print) -> tuple[Path, str] | None:
    """`--resume latest` or a checkpoint folder path -> (checkpoint dir, tag), or None to start fresh.

    `latest` skips (and says so) any newer tag whose save was interrupted."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoint_dir = run_dir / "checkpoints"
        tag = latest_complete(checkpoint_dir)
        for skipped in interrupted_tags(checkpoint_dir):
            log(f"--resume latest: {checkpoint_dir / skipped} is incomplete (no {COMPLETE} marker: its save was "
                f"interrupted); {'resuming from ' + tag if tag else 'no complete checkpoint before it'}")
        return (checkpoint_dir, tag) if tag else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return path.parent, path.name
