"""Faults on 2 CPU ranks under the DeepSpeed launcher: preemption (SIGTERM) and a full disk at save time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed
EXIT_BOUND_S = 120  # from the signal to every process gone, tiny model on a loaded 2-core machine


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return clean | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# MP4SR joint with the tiny CLIP and dropout 0.2: a restart equals an uninterrupted run only when every rank's random
# state and the feature cache (refreshed every 3 steps, so older than a checkpoint saved between refreshes) come back.
MODEL = [f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", "task=sequential", "sequence.mode=joint",
         "sequence.dropout=0.2", "sequence.adaptor_dropout=0.2", "sequence.cache_refresh_steps=3",
         "objectives.weights={rec: 1.0, seq_item: 1.0, seq_seq: 0.1, itc: 0.1}"]


def command(world_shards: Path, run_dir: Path, *extra: str) -> list[str]:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    sets = [*MODEL, f"data.shards={world_shards}", f"train.run_dir={run_dir}",
            "data.batch_size=8", "data.num_workers=0", "train.max_steps=400", "train.log_every=1", "eval.splits=[]"]
    return [launcher, "--num_gpus", "2", "--master_port", str(29000 + os.getpid() % 1000), str(REPO / "launch/train.py"),
            *[a for s in sets for a in ("--set", s)], *extra]


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def stop_job(launcher: subprocess.Popen) -> None:
    """Kills whatever of the job is left (a failed check must not leave ranks training beside the next test)."""
    if launcher.poll() is None:
        for process in psutil.Process(launcher.pid).children(recursive=True):
            process.kill()
        launcher.kill()


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "launch/train.py" in " ".join(p.cmdline())
            and "--local_rank" in " ".join(p.cmdline())]


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(world_shards, tmp_path):
    """What SLURM does before preemption: SIGTERM to every process of the job, each rank's loader worker included (a
    worker it ended stopped its rank mid-step, nothing saved). The ranks agree on the next step boundary, save a
    complete checkpoint there and exit 0; --resume latest continues from it."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(world_shards, run_dir, "--set", "data.num_workers=1"), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not [s for s in logged_steps(run_dir) if s >= 2]:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 2"
            time.sleep(0.5)
        job = ranks_of(proc)  # the ranks and their loader workers (forked: the same command line; an epoch's end may
        workers = [p for p in job if p.ppid() in {q.pid for q in job}]  # overlap two generations of them)
        assert len(job) - len(workers) == 2 and workers
        sent = time.monotonic()
        for process in job:
            process.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=EXIT_BOUND_S)
        took = time.monotonic() - sent
    finally:
        stop_job(proc)
    assert proc.returncode == 0, out[-3000:]
    assert took < EXIT_BOUND_S
    assert "received SIGTERM" in out and "stopped at step" in out
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert 2 <= stopped < 400
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == f"step{stopped:08d}" and (run_dir / "checkpoints" / latest / "COMPLETE").is_file()
    resumed = subprocess.run(command(world_shards, run_dir, "--resume", "latest", "--stop-at", str(stopped + 1)), cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / latest} at step {stopped}" in resumed.stdout + resumed.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{stopped + 1:08d}"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs at run/checkpoints (root only): a real ENOSPC, not a mock."""
    mount_point = tmp_path / "run" / "checkpoints"
    mount_point.mkdir(parents=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or 'mount failed'}); the disk-full test needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_full_disk_fails_the_save_loudly_and_keeps_the_previous_checkpoint(world_shards, small_disk):
    run_dir = small_disk.parent
    first = subprocess.run(command(world_shards, run_dir, "--stop-at", "2"), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (small_disk / "latest").read_text() == "step00000002"
    used = int(subprocess.run(["du", "-sk", str(small_disk)], capture_output=True, text=True).stdout.split()[0])
    # shrink the filesystem to what it holds plus 64 KiB: the next save cannot fit
    shrink = subprocess.run(["mount", "-o", f"remount,size={used + 64}k", str(small_disk)], capture_output=True, text=True)
    assert shrink.returncode == 0, shrink.stderr
    second = subprocess.run(command(world_shards, run_dir, "--resume", "latest", "--stop-at", "4"), cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=EXIT_BOUND_S + 300)
    out = second.stdout + second.stderr
    assert second.returncode != 0
    assert "could not save step 4" in out and "MiB free on" in out
    assert "the previous checkpoint step00000002 is kept as latest" in out
    assert (small_disk / "latest").read_text() == "step00000002"
    assert sorted(p.name for p in small_disk.iterdir() if p.name.startswith("step")) == ["step00000002"]
    assert (small_disk / "step00000002" / "COMPLETE").is_file()


def test_a_rank_still_exiting_when_the_collective_fails_is_named(monkeypatch):
    """A killed rank's sockets close before it is a zombie: its peer's collective can fail while it still runs (seen
    in a suite run beside a study, where the error went out unnamed). The peer waits a moment for it to exit."""
    import socket

    from mmscale.engine import distributed

    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    monkeypatch.setattr(distributed, "_ranks", [(socket.gethostname(), os.getpid()), (socket.gethostname(), exiting.pid)])
    try:
        assert distributed.lost_ranks() == f"lost rank 1 (pid {exiting.pid} on {socket.gethostname()}): it exited while the others waited for it"
    finally:
        exiting.wait()
    monkeypatch.setattr(distributed, "_ranks", [(socket.gethostname(), os.getpid())])
    assert distributed.lost_ranks(grace_s=0.2) is None  # nobody exited: not ours to name


def test_a_killed_rank_takes_the_job_down_and_resume_continues_exactly(world_shards, tmp_path):
    """SIGKILL one rank mid-run: the launcher ends the other within the bound; --resume latest then gives the
    same losses as a run that was never interrupted."""
    saving = ["--set", "train.save_every=2"]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(command(world_shards, killed_dir, *saving), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (killed_dir / "checkpoints" / "latest").is_file() or max(logged_steps(killed_dir), default=0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 3"
            time.sleep(0.2)
        victim = next(r for r in ranks_of(proc) if "--local_rank=1" in " ".join(r.cmdline()))
        killed = time.monotonic()
        victim.kill()
        out, _ = proc.communicate(timeout=EXIT_BOUND_S)
        took = time.monotonic() - killed
    finally:
        stop_job(proc)
    assert proc.returncode != 0 and took < EXIT_BOUND_S, out[-3000:]
    assert f"rank 0: lost rank 1 (pid {victim.pid} on " in out, out[-3000:]
    survivors = [p for p in psutil.process_iter(["cmdline"]) if f"train.run_dir={killed_dir}" in (p.info["cmdline"] or [])]
    assert not survivors, "a rank outlived the job"
    print(f"job down {took:.1f} s after SIGKILL of rank 1")
    port = command(world_shards, killed_dir)[4]
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")]
    assert not left, f"DeepSpeed's shared-memory buffers outlived the job: {left}"
    resume_from = int((killed_dir / "checkpoints" / "latest").read_text()[4:])
    stop = resume_from + 2
    resumed = subprocess.run(command(world_shards, killed_dir, *saving, "--resume", "latest", "--stop-at", str(stop)), cwd=REPO,
                             env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight_dir = tmp_path / "straight"
    straight = subprocess.run(command(world_shards, straight_dir, *saving, "--stop-at", str(stop)), cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    def losses(run_dir: Path) -> dict[int, float]:  # the last value logged for each step (a resumed run logs it again)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}

    after, expected = losses(killed_dir), losses(straight_dir)
    for step in range(resume_from + 1, stop + 1):
        assert after[step] == pytest.approx(expected[step], rel=1e-5), step


def test_torchrun_restarts_a_killed_rank_from_the_latest_checkpoint(world_shards, tmp_path):
    """torchrun --max-restarts 2 with --resume latest: a killed rank brings an automatic restart from the newest
    complete checkpoint, no person involved; the run completes with the losses of an uninterrupted one. (The
    restarted round once met the dead round's gloo addresses in torchrun's store; see init_distributed.)"""
    torchrun = str(Path(sys.executable).parent / "torchrun")

    def cmd(run_dir: Path) -> list[str]:
        sets = [*MODEL, f"data.shards={world_shards}", f"train.run_dir={run_dir}",
                "data.batch_size=8", "data.num_workers=0", "train.max_steps=14", "train.save_every=2", "train.log_every=1",
                "eval.splits=[]"]
        return [torchrun, "--nproc_per_node", "2", "--max-restarts", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{29000 + (os.getpid() + 7) % 1000}", str(REPO / "launch/train.py"),
                *[a for s in sets for a in ("--set", s)], "--resume", "latest"]

    restarted = tmp_path / "restarted"
    proc = subprocess.Popen(cmd(restarted), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (restarted / "checkpoints" / "latest").is_file() or max(logged_steps(restarted), default=0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 3"
            time.sleep(0.1)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "launch/train.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].kill()
        out, _ = proc.communicate(timeout=900)
    finally:
        stop_job(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    straight = tmp_path / "straight"
    done = subprocess.run(cmd(straight), cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]

    def losses(run_dir: Path) -> dict[int, float]:  # the last value logged for each step
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}

    after, expected = losses(restarted), losses(straight)
    assert sorted(after) == sorted(expected) == list(range(1, 15))
    for step in range(1, 15):
        assert after[step] == pytest.approx(expected[step], rel=1e-5), step
