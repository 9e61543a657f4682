"""Several CPU ranks under DeepSpeed against one process; resume against an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from helpers.dual_encoder import needs_dual_encoder
from helpers.parity import assert_parity
from helpers.train_worker import CASES

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "helpers" / "train_worker.py"
pytestmark = pytest.mark.distributed


def clean_env(threads: int) -> dict:
    """No launcher variables leak in from the test process; each rank gets its share of cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO)
    return env


def run(cmd: list[str], threads: int, timeout: int = 600) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(threads), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def deepspeed_cmd(ranks: int) -> list[str]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(29500 + os.getpid() % 1000)]


@pytest.fixture(scope="module")
def two_ranks(world_shards, vlmo_tokenizer, tmp_path_factory) -> Path:
    """Every parity case under stage 0 (gradients averaged during the backward) and ZeRO-1, 2 and 3 on 2 ranks, in one
    launch: each rank reads its own production stream."""
    out = tmp_path_factory.mktemp("two-ranks")
    runs = [f"{case}:{stage}" for stage in (0, 1, 2, 3) for case in CASES]
    run(deepspeed_cmd(2) + [str(WORKER), "--shards", str(world_shards), "--out", str(out), "--runs", ",".join(runs),
                            "--vlmo-tokenizer", str(vlmo_tokenizer)], threads=1, timeout=2400)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(case, stage, two_ranks, parity_reference):
    """Two-tower (end to end, fine_tuned, frozen), MP4SR (pretrain, finetune, joint) and VLMo (ITC+ITM+MLM): two ranks,
    each fed only its own rows and its own items' content, give one process's losses and gradients on the same global batch."""
    assert_parity(parity_reference(2), case, two_ranks, f"{case}-zero{stage}")


# Models whose training draws random numbers: a restart is exact only if every random state (and joint mode's
# feature cache, as old as its last refresh) comes back with the checkpoint.
MP4SR_JOINT_DROPOUT = ["task=sequential", "sequence.mode=joint", "sequence.dropout=0.2", "sequence.adaptor_dropout=0.2",
                       "sequence.cache_refresh_steps=2", "objectives.weights={rec: 1.0, seq_item: 1.0, seq_seq: 0.1, itc: 0.1}"]


@pytest.fixture(scope="module")
def vlmo_drop_path(vlmo_tokenizer, tmp_path_factory) -> list[str]:
    arch = json.loads((REPO / "configs/models/vlmo-tiny.json").read_text()) | {"drop_path": 0.1}
    path = tmp_path_factory.mktemp("vlmo-drop-path") / "vlmo-tiny-drop-path.json"
    path.write_text(json.dumps(arch))
    return ["encoder.kind=vlmo", f"encoder.model={path}", f"encoder.tokenizer={vlmo_tokenizer}",
            "objectives.weights={rec: 1.0, itc: 0.5, itm: 0.5, mlm: 0.5}"]


@pytest.mark.parametrize("model", ["clip", "mp4sr_joint_dropout", "vlmo_drop_path"])
def test_resume_continues_the_same_run(model, world_shards, request, tmp_path):
    """Stop at step 3, resume: every later loss equals an uninterrupted run's (two data workers, dropout on)."""
    overrides = {"clip": [], "mp4sr_joint_dropout": MP4SR_JOINT_DROPOUT}[model] if model != "vlmo_drop_path" else request.getfixturevalue(model)
    common = [sys.executable, str(REPO / "launch/train.py"),
              "--set", f"encoder.model={REPO / 'configs/models/clip-tiny.json'}", "--set", f"data.shards={world_shards}",
              "--set", "data.batch_size=8", "--set", "data.num_workers=2", "--set", "train.max_steps=6",
              "--set", "train.log_every=1", "--set", "eval.splits=[]", "--set", "optim.lr_recommender=1e-2",
              *[a for o in overrides for a in ("--set", o)]]
    run(common + ["--set", f"train.run_dir={tmp_path / 'straight'}"], threads=2)
    run(common + ["--set", f"train.run_dir={tmp_path / 'resumed'}", "--stop-at", "3"], threads=2)
    run(common + ["--set", f"train.run_dir={tmp_path / 'resumed'}", "--resume", "latest"], threads=2)

    def logged(run_dir: Path) -> dict[int, float]:
        entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {e["step"]: e["loss/total"] for e in entries if "loss/total" in e}

    straight, resumed = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == straight[step], (model, step)
    tags = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step*"))
    assert tags == ["step00000003", "step00000006"]


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)

    def forward(self, x, use_b: bool):
        return {"loss": self.a(x).sum() + (self.b(x).sum() if use_b else 0.0)}


def _accumulate(rank: int, port: int, out: Path) -> None:
    """Two micro-batches as the Trainer runs them at stage 0: no sync, then sync at the boundary; `b` is unused by
    rank 0's second micro-batch; a third step uses `b` nowhere."""
    import torch.distributed as dist

    from mmscale.engine.distributed import average_gradients_in_backward

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = _TwoLayers()
    average_gradients_in_backward(model)
    x = [torch.full((1, 2), float(rank + 1)), torch.full((1, 2), 10.0 * (rank + 1))]
    for micro, use_b in enumerate([True, rank == 1]):
        model.set_requires_gradient_sync(micro == 1)
        model(x[micro], use_b)["loss"].backward()
    grads = {"a": model.a.weight.grad.clone(), "b": model.b.weight.grad.clone()}
    model.a.weight.grad = model.b.weight.grad = None
    model(x[0], False)["loss"].backward()
    grads["b_unused_everywhere"] = torch.tensor(float(model.b.weight.grad is None))
    torch.save(grads, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _host_side_collectives(rank: int, port: int, out: Path) -> None:
    """A default group with a backend for CUDA tensors only, as NCCL's is on GPUs, and the gloo host group that
    init_distributed makes beside it there."""
    import torch.distributed as dist

    from mmscale.engine import distributed as D

    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    refused = False
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError:
        refused = True
    D._host_group = dist.new_group(backend="gloo")
    # the logging window's reduction (Trainer._log_scalars) and the per-step flags
    torch.save({"refused": refused, "sum": D.all_reduce_sum(torch.tensor([1.0, rank + 1.0], dtype=torch.float64)),
                "any": D.any_rank(rank == 1)}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_host_side_collectives_run_where_the_default_group_refuses_cpu_tensors(tmp_path):
    """On GPUs the default group is NCCL, which refuses CPU tensors: the logging window's sums of losses and counts
    (CPU tensors) failed at the first log step of every run on two or more GPUs; they travel over the host group."""
    import torch.multiprocessing as mp

    from mmscale.engine.distributed import free_port

    mp.spawn(_host_side_collectives, args=(free_port(), tmp_path), nprocs=2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["refused"]  # the stand-in for NCCL refuses a CPU tensor, as NCCL does
        assert result["sum"].tolist() == [2.0, 3.0] and result["any"] is True


def test_stage_0_averages_accumulated_gradients_once_during_the_backward(tmp_path):
    """Stage 0 on several ranks averages gradients in the backward (torch's DDP reducer, not DeepSpeed): accumulated
    micro-batches are averaged once, at the boundary, a parameter one rank did not use in that micro-batch still
    carries the gradient both ranks accumulated, and a parameter no rank used keeps no gradient."""
    import torch.multiprocessing as mp

    from mmscale.engine.distributed import free_port

    mp.spawn(_accumulate, args=(free_port(), tmp_path), nprocs=2)
    # local sums of x over the micro-batches using the layer: a: rank 0 1 + 10, rank 1 2 + 20; b: rank 0 1, rank 1 22
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads["a"].tolist() == [[16.5, 16.5]]
        assert grads["b"].tolist() == [[11.5, 11.5]]
        assert grads["b_unused_everywhere"].item() == 1.0


def _fetch_rank(rank: int, port: int, world_size: int, n: int, out: Path) -> None:
    import torch.distributed as dist

    from mmscale.engine.distributed import all_reduce_sum, all_to_all, gather
    from mmscale.eval.evaluate import Collectives, fetch_across_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    coll = Collectives(rank, world_size, gather, all_reduce_sum, all_to_all)
    whole = (torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16), torch.arange(n * 2).view(n, 2),
             torch.arange(n) % 3 == 0)
    mine = list(range(n)[coll.contiguous_share(n)])
    mine += mine[-1:] * (-(-n // world_size) - len(mine))  # padded to every rank's length as the cache is
    held = tuple(state[mine] for state in whole)
    fetch = fetch_across_ranks(held, n, coll)
    edges = [i for r in range(world_size) for i in (coll.contiguous_share(n, r).start, coll.contiguous_share(n, r).stop - 1)]
    batches = [torch.randint(0, n, (5 + 3 * rank,), generator=torch.Generator().manual_seed(rank)),
               torch.tensor(edges[::-1] + [edges[0]] * 3),  # every share's first and last item, one of them repeated
               torch.zeros(0, dtype=torch.long) if rank == 1 else torch.tensor([n - 1, 0])]  # rank 1 asks for nothing
    torch.save([[torch.equal(rows, state[ids]) for rows, state in zip(fetch(ids, None), whole)] for ids in batches],
               out / f"fetch-{world_size}-rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size, n", [(3, 80), (4, 10)])
def test_a_fetch_across_ranks_returns_the_rows_one_process_would_read(tmp_path, world_size, n):
    """The frozen-block cache split across ranks: any items' rows, fetched from the ranks that hold them, are the rows
    of the whole table bit for bit (bf16, int64 and bool states; shares of unequal length, padded; every share's first
    and last item; a repeated item; a rank asking for none)."""
    import torch.multiprocessing as mp

    from mmscale.engine.distributed import free_port

    mp.spawn(_fetch_rank, args=(free_port(), world_size, n, tmp_path), nprocs=world_size)
    for rank in range(world_size):
        assert torch.load(tmp_path / f"fetch-{world_size}-rank{rank}.pt") == [[True] * 3] * 3, f"rank {rank}"


FROZEN_BLOCK_CASES = {  # training on encoder.cache_frozen_blocks, each rank holding its share of the catalogue's
    "every_step": ["task=sequential", "sequence.mode=joint", "sequence.item_table=every_step", "sequence.dropout=0.0",
                   "sequence.adaptor_dropout=0.0", "objectives.weights={rec: 1.0, seq_item: 1.0, seq_seq: 0.1, itc: 0.1}"],
    "cached_table": ["task=sequential", "sequence.mode=joint", "sequence.dropout=0.0", "sequence.adaptor_dropout=0.0",
                     "objectives.weights={rec: 1.0, seq_item: 1.0, seq_seq: 0.1, itc: 0.1}"],
    "two_tower": ["task=two_tower", "objectives.weights={rec: 1.0, itc: 0.1}"],
}


def _frozen_block_gradients(world_shards: Path, rank: int, world_size: int, out: Path, case: str, chunk: int) -> None:
    """A step on the frozen-block cache on the batch production gives this rank (one process: the union of two ranks'
    batches): the losses, and every gradient averaged over the ranks as the engine does, then the evaluation's metrics.
    MP4SR: seven items no batch holds are held out cold, the ranks share the other 73 (uneven shares)."""
    from dataclasses import replace

    from mmscale.config import load_config
    from mmscale.data.item_store import ItemStore
    from mmscale.data.shard_set import ShardSet
    from mmscale.data.stream import InteractionStream
    from mmscale.engine.distributed import all_reduce_sum, all_to_all, gather
    from mmscale.eval.evaluate import Collectives, cache_frozen_blocks, encode_catalogue, evaluate
    from mmscale.models import build_preprocess
    from mmscale.tasks import build_task, sequential

    config = load_config(None, [
        f"data.shards={world_shards}", *FROZEN_BLOCK_CASES[case], f"encoder.model={REPO / 'configs/models/minilm-effnet.json'}",
        "encoder.image_size=64", "encoder.context_length=16", "encoder.trainable_blocks=1", "encoder.cache_frozen_blocks=true",
        "data.history_content=false"])
    store, preprocess = ItemStore(world_shards), build_preprocess(config.encoder)
    per_rank = [InteractionStream(world_shards, "train", 8, preprocess, rank=r, world_size=2, resampled=True, shuffle_buffer=0,
                                  history_content=False, content=False) for r in range(2)]
    raw = [next(stream.raw_batches()) for stream in per_rank]
    union = per_rank[0].decode(raw[0] + raw[1])
    batch = per_rank[rank].decode(raw[rank]) if world_size == 2 else union
    shards = ShardSet.open(world_shards)
    if config.task == "sequential":
        cold = sorted(set(range(len(store))) - set(union.history.flatten().tolist()) - set(union.targets.tolist()))[:7]
        assert len(cold) == 7
        shards = replace(shards, manifest=shards.manifest | {"cold_items": cold})
    torch.manual_seed(0)
    task = build_task(config, shards).eval()  # eval: the trained text layer's dropout draws differ by rank
    coll = Collectives(rank, world_size, gather, all_reduce_sum, all_to_all)
    with mock.patch.object(sequential, "EVERY_ITEM_CHUNK", chunk):  # read when the cache is set
        items, mib = cache_frozen_blocks(task, store, preprocess, coll, "cpu", 64, 0)  # as the trainer does: each rank its share
    whole = sum(state[0].numel() * state.element_size() for state in task.frozen_block_states) * len(store) / 2**20
    assert items == 80 // world_size and mib == pytest.approx(whole / world_size) and len(task.frozen_block_has_image) == 80
    if case == "cached_table":  # the trainer's first refresh
        task.set_content_cache(*encode_catalogue(task, store, preprocess, coll, "cpu", 64, 0))
    result = {}
    if case == "every_step":
        encoded = task.items_encoded(batch)
        assert encoded == 73 if world_size == 1 else 30 <= encoded <= 43
        result = {"encoded": torch.tensor(encoded), "passes": torch.tensor(len(task.every_item_passes))}
    else:  # the batch's items are read from both ranks' shares
        assert world_size == 1 or len({int(i) * world_size // 80 for i in batch.item_ids}) == 2
    losses = task(batch, gather)
    sum(config.objectives.weights[name] * loss for name, loss in losses.items()).backward()
    result.update({f"loss/{name}": loss.detach() for name, loss in losses.items()})
    for name, p in task.named_parameters():
        if p.grad is not None:
            result[name] = all_reduce_sum(p.grad) / world_size
    # evaluation encodes the catalogue from each rank's share of the cache
    metrics = evaluate(task, shards, config.eval, preprocess, coll, "cpu")
    result.update({f"{split}/{name}": torch.tensor(value, dtype=torch.float64)
                   for split, values in metrics.items() for name, value in values.items()})
    torch.save(result, out / f"{case}-{world_size}-rank{rank}.pt")


def _frozen_block_rank(rank: int, port: int, world_shards: Path, out: Path, case: str, chunk: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    _frozen_block_gradients(world_shards, rank, 2, out, case, chunk)
    dist.destroy_process_group()


@needs_dual_encoder
@pytest.mark.parametrize("case, chunk", [("every_step", 128), ("every_step", 6), ("cached_table", 128), ("two_tower", 128)])
def test_frozen_block_cache_on_two_ranks_equals_one_process(world_shards, tmp_path, case, chunk):
    """Training on the frozen-block cache on two ranks, each fed its own rows and holding its half of the catalogue's
    frozen-block outputs: the losses, every parameter's gradient and the evaluation's metrics (the catalogue encoded
    from those shares) are one process's. MP4SR joint's every_step table: each rank encodes its half, the encoder's
    gradient flows through every item of the table; in passes of 6 items rank 0, which holds the cold items, has fewer
    warm ones to encode, and makes as many passes as rank 1 all the same (ZeRO-3 gathers the parameters for each pass
    of every rank). Joint's cached table and the two-tower: a batch's items are read from both ranks' halves."""
    import torch.multiprocessing as mp

    from mmscale.engine.distributed import free_port

    mp.spawn(_frozen_block_rank, args=(free_port(), world_shards, tmp_path, case, chunk), nprocs=2)
    _frozen_block_gradients(world_shards, 0, 1, tmp_path, case, chunk)
    reference = torch.load(tmp_path / f"{case}-1-rank0.pt")
    assert sum(name.startswith("encoder.") for name in reference) > 4 and float(reference["valid/samples"]) > 0
    ranks = [torch.load(tmp_path / f"{case}-2-rank{rank}.pt") for rank in (0, 1)]
    if case == "every_step":
        assert int(ranks[0].pop("encoded")) + int(ranks[1].pop("encoded")) == int(reference.pop("encoded"))
        assert int(ranks[0].pop("passes")) == int(ranks[1].pop("passes")) == -(-40 // chunk) and reference.pop("passes")
    for rank, ranked in enumerate(ranks):
        assert sorted(ranked) == sorted(reference)
        for name, value in reference.items():
            torch.testing.assert_close(ranked[name], value, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
