"""How a run scales: per-rank memory, communication volume and step time for a model on N ranks.

Model states follow the ZeRO paper's accounting (Rajbhandari et al., 2020). Parameters, FLOPs and
the activations kept for backward come from mmscale's own model code run on the meta device (no
memory, no arithmetic), so the plan is of what mmscale trains, not of a textbook transformer. What
code cannot tell (the runtime's own memory, the FLOP rate a step achieves, link bandwidths) are
inputs; tools/plan_scale.py --validate fits the first two on a measured one-rank run and checks the
predictions for more ranks against measured runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config
from .deepspeed_config import runs_as_stage

PRECISIONS = ("bf16", "fp32")
# Bytes per parameter of each model state, replicated or partitioned by ZeRO stage (below).
# bf16 mixed precision (ZeRO paper): 2 params + 2 grads + 12 optimizer (fp32 master copy, Adam m, v).
# fp32 under DeepSpeed: 4 params + 4 grads + 8 Adam m, v; stages 1 and 2 also keep an fp32 clone of
# the rank's parameter partition (+4/N); stage 0 steps torch's optimizer on the parameters and
# stage 3 shares the fp32 partition, so neither has a copy.
STATE_BYTES = {"bf16": {"parameters": 2, "gradients": 2, "optimizer": 12}, "fp32": {"parameters": 4, "gradients": 4, "optimizer": 8}}
FORMULAS = {
    "bf16": {0: "16Ψ", 1: "4Ψ+12Ψ/N", 2: "2Ψ+14Ψ/N", 3: "16Ψ/N"},
    "fp32": {0: "16Ψ", 1: "8Ψ+12Ψ/N", 2: "4Ψ+16Ψ/N", 3: "16Ψ/N"},
}
# The lowest stage at which each state is partitioned over the ranks.
PARTITIONED_FROM = {"optimizer": 1, "gradients": 2, "parameters": 3}


def model_state_bytes(parameters: int, ranks: int, stage: int, precision: str) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and optimizer states (ZeRO stage 0-3)."""
    per_parameter = STATE_BYTES[precision]
    states = {name: per_parameter[name] * parameters / (ranks if stage >= PARTITIONED_FROM[name] else 1) for name in per_parameter}
    if precision == "fp32" and stage in (1, 2):
        states["optimizer"] += 4 * parameters / ranks
    return states


def gradient_communication_bytes(parameters: int, ranks: int, stage: int, precision: str) -> float:
    """Bytes each rank sends per optimizer step in ring collectives: stages 0-2 reduce the gradients
    and gather the parameters once (2Ψ); stage 3 also gathers every parameter twice, for forward and
    backward, and reduce-scatters the gradients (3Ψ); each of these moves (N-1)/N of its volume."""
    if ranks == 1:
        return 0.0
    volume = 3 if stage == 3 else 2
    return volume * (ranks - 1) / ranks * parameters * STATE_BYTES[precision]["parameters"]


@dataclass(frozen=True)
class ModelProfile:
    """What one sample costs the model, counted by running its code on the meta device."""

    name: str
    precision: str
    parameters: int  # trainable: encoder, towers and id embeddings
    encoder_parameters: int
    flops_per_sample: float  # forward and backward through the item encoder (one image, one text)
    saved_bytes_per_sample: float  # activations kept for backward, attention matrices included
    attention_bytes_per_sample: float  # of which the (tokens x tokens) attention matrices: flash attention keeps none
    embed_dim: int


@dataclass(frozen=True)
class Hardware:
    """One rank's device and links. Bandwidths are what one rank achieves in a ring collective."""

    memory_gib: float
    flops: float  # achieved FLOP/s of a training step (peak x utilisation)
    intra_node_gbps: float  # GB/s within a node
    inter_node_gbps: float  # GB/s per rank across nodes
    ranks_per_node: int
    runtime_gib: float  # per-rank memory that is neither model states nor activations
    activation_factor: float = 1.0  # peak activation memory / activations saved for backward
    flash_attention: bool = True  # attention matrices are recomputed, not kept
    comm_overlap: float = 0.0  # fraction of the backward pass that hides communication
    # torch's AdamW step needs temporaries the size of what it steps: on GPUs its foreach path one fp32
    # tensor (sqrt(v), then divided and offset in place); on CPU tensors its per-tensor path two at once.
    # ZeRO-1/2/3 hand it the rank's partition as one flat tensor; stage 0 the model's own tensors, all at once
    # on GPUs (foreach) but one at a time on CPU (`optimizer_per_tensor`: temporaries negligible).
    optimizer_temporary_bytes: int = 4
    optimizer_per_tensor: bool = False
    # ZeRO-1/2's gradient buckets (with overlap_comm, two of reduce_bucket_size elements); one rank runs neither
    # (stage 0). 0: counted in runtime_gib.
    zero_bucket_bytes: float = 0.0


@dataclass(frozen=True)
class Plan:
    ranks: int
    stage: int
    micro_batch: int
    states: dict[str, float]  # bytes per rank
    activations: float
    optimizer_step: float  # the optimizer's temporary while it steps (activations are freed by then)
    runtime: float
    communication: float  # bytes per rank per step
    compute_s: float
    communication_s: float
    step_s: float
    fits: bool

    @property
    def memory(self) -> float:
        """The per-rank peak: model states and runtime, plus activations (end of forward) or the optimizer's
        temporary (its step), whichever is larger."""
        return sum(self.states.values()) + max(self.activations, self.optimizer_step) + self.runtime

    @property
    def samples_per_s(self) -> float:
        return self.micro_batch * self.ranks / self.step_s


def plan(profile: ModelProfile, hardware: Hardware, ranks: int, stage: int, micro_batch: int) -> Plan:
    stage = runs_as_stage(stage, ranks)  # as the engine runs it (the planner models no offload)
    states = model_state_bytes(profile.parameters, ranks, stage, profile.precision)
    kept = profile.saved_bytes_per_sample - (profile.attention_bytes_per_sample if hardware.flash_attention else 0.0)
    activations = hardware.activation_factor * kept * micro_batch
    # ZeRO hands the optimizer the rank's flattened partition (stage >= 1): its temporaries are that size (Hardware).
    stepped_at_once = profile.parameters / ranks if stage >= 1 else (0 if hardware.optimizer_per_tensor else profile.parameters)
    optimizer_step = hardware.optimizer_temporary_bytes * stepped_at_once
    runtime = hardware.runtime_gib * 2**30 + (hardware.zero_bucket_bytes if stage in (1, 2) else 0.0)
    # The losses gather each rank's user, item, image and text vectors (forward) and reduce their gradients.
    embeddings = 2 * 4 * (ranks - 1) * micro_batch * profile.embed_dim * STATE_BYTES[profile.precision]["parameters"]
    communication = gradient_communication_bytes(profile.parameters, ranks, stage, profile.precision) + embeddings
    bandwidth = hardware.intra_node_gbps if ranks <= hardware.ranks_per_node else hardware.inter_node_gbps
    compute_s = profile.flops_per_sample * micro_batch / hardware.flops
    communication_s = communication / (bandwidth * 1e9)
    hidden = min(communication_s, hardware.comm_overlap * compute_s * 2 / 3)  # backward is ~2/3 of the FLOPs
    step_s = compute_s + communication_s - hidden
    result = Plan(ranks, stage, micro_batch, states, activations, optimizer_step, runtime, communication, compute_s,
                  communication_s, step_s, fits=False)
    return replace(result, fits=result.memory <= hardware.memory_gib * 2**30)


# -- counting on the meta device ------------------------------------------------------------------------
@contextmanager
def _saved_tensors(log: list[torch.Tensor]) -> Iterator[None]:
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        log.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def _storage_bytes(tensors: list[torch.Tensor], exclude: set[int]) -> tuple[int, int]:
    """Bytes of distinct storages among `tensors` (each once, however many ops saved it), and of those
    shaped like attention matrices (last two dimensions equal and above 8)."""
    seen, total, attention = set(exclude), 0, 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage._cdata in seen:
            continue
        seen.add(storage._cdata)
        total += storage.nbytes()
        if tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2] > 8:
            attention += storage.nbytes()
    return total, attention


def _encoder_step(encoder, batch: int, exclude: set[int]) -> tuple[float, int, int]:
    """FLOPs of one forward and backward, and the bytes (all, attention) saved for backward, at `batch`."""
    spec = encoder.preprocess()
    saved: list[torch.Tensor] = []
    # fake inputs (meta underneath): code that reads a value, as transformers' attention masks do, sees a tracer
    # and takes its data-independent path instead of failing on the meta device
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        images = torch.empty(batch, 3, spec.image_size, spec.image_size, device="meta", dtype=next(encoder.parameters()).dtype)
        tokens = fake.from_tensor(spec.tokenize(["an item"] * batch).to("meta"))
        with FlopCounterMode(display=False) as flops:
            with _saved_tensors(saved):
                image, text = encoder(images, tokens)
            (image.float().sum() + text.float().sum()).backward()
        return flops.get_total_flops(), *_storage_bytes(saved, exclude)


def profile_model(config: Config, num_users: int, num_items: int, precision: str, name: str | None = None) -> ModelProfile:
    """Builds the two-tower task of `config` on the meta device and counts what a sample costs.

    Per-sample figures are the difference between batches of 2 and 1, so nothing that does not grow
    with the batch (weights saved for backward, positional tables) is counted per sample."""
    from ..data.shard_set import ShardSet
    from ..tasks.two_tower import RecommendationTask

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    with torch.device("meta"):
        task = RecommendationTask(config, ShardSet.planned(num_users, num_items))
    if precision == "bf16":
        task = task.to(torch.bfloat16)
    task.train()
    encoder = task.encoder
    weights = {p.untyped_storage()._cdata for p in task.parameters()}
    one, two = _encoder_step(encoder, 1, weights), _encoder_step(encoder, 2, weights)
    return ModelProfile(
        name=name or config.encoder.model,
        precision=precision,
        parameters=sum(p.numel() for p in task.parameters() if p.requires_grad),
        encoder_parameters=sum(p.numel() for p in encoder.parameters() if p.requires_grad),
        flops_per_sample=two[0] - one[0],
        saved_bytes_per_sample=two[1] - one[1],
        attention_bytes_per_sample=two[2] - one[2],
        embed_dim=config.recommender.embed_dim,
    )
