"""The scale planner: ZeRO memory formulas on hand-checked cases, its arithmetic, counting on the meta
device against a real CPU run, and its predictions for 2 CPU ranks against a measured run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmscale.config import load_config
from mmscale.engine.scale_plan import Hardware, ModelProfile, gradient_communication_bytes, model_state_bytes, plan, profile_model
from mmscale.data.shard_set import ShardSet
from mmscale.tasks.two_tower import RecommendationTask

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = str(REPO / "configs/models/clip-tiny.json")
G = 1e9


@pytest.mark.parametrize("precision, stage, expected", [
    # Ψ = 1e9 parameters on N = 8 ranks, bytes per rank (parameters, gradients, optimizer states), worked by hand.
    ("bf16", 0, (2 * G, 2 * G, 12 * G)),  # 16Ψ
    ("bf16", 1, (2 * G, 2 * G, 1.5 * G)),  # 4Ψ + 12Ψ/8
    ("bf16", 2, (2 * G, 0.25 * G, 1.5 * G)),  # 2Ψ + 14Ψ/8
    ("bf16", 3, (0.25 * G, 0.25 * G, 1.5 * G)),  # 16Ψ/8
    ("fp32", 0, (4 * G, 4 * G, 8 * G)),  # 16Ψ: torch's Adam steps the parameters themselves
    ("fp32", 1, (4 * G, 4 * G, 1.5 * G)),  # 8Ψ + (8 + 4 fp32 partition copy)Ψ/8
    ("fp32", 2, (4 * G, 0.5 * G, 1.5 * G)),  # 4Ψ + 16Ψ/8
    ("fp32", 3, (0.5 * G, 0.5 * G, 1.0 * G)),  # 16Ψ/8
])
def test_model_states_follow_the_zero_formulas(precision, stage, expected):
    states = model_state_bytes(10**9, 8, stage, precision)
    assert (states["parameters"], states["gradients"], states["optimizer"]) == pytest.approx(expected)


def test_communication_volume_per_rank():
    # Ring collectives move (N-1)/N of each volume: 2Ψ for an all-reduce, 3Ψ under ZeRO-3.
    assert gradient_communication_bytes(10**9, 1, 2, "bf16") == 0
    assert gradient_communication_bytes(10**9, 4, 2, "bf16") == pytest.approx(2 * 0.75 * 2 * G)
    assert gradient_communication_bytes(10**9, 4, 3, "bf16") == pytest.approx(3 * 0.75 * 2 * G)
    assert gradient_communication_bytes(10**9, 4, 0, "fp32") == pytest.approx(2 * 0.75 * 4 * G)


def test_plan_arithmetic_on_a_hand_made_profile():
    profile = ModelProfile("hand", "bf16", parameters=10**9, encoder_parameters=10**9, flops_per_sample=1e12,
                           saved_bytes_per_sample=100 * 2**20, attention_bytes_per_sample=20 * 2**20, embed_dim=0)
    gpu = Hardware(memory_gib=80, flops=100e12, intra_node_gbps=100, inter_node_gbps=10, ranks_per_node=8, runtime_gib=2,
                   activation_factor=1.5)
    inside = plan(profile, gpu, 8, 3, 16)
    assert inside.compute_s == pytest.approx(16 * 1e12 / 100e12)  # 0.16 s
    assert inside.communication == pytest.approx(3 * 7 / 8 * 2 * G)
    assert inside.communication_s == pytest.approx(3 * 7 / 8 * 2 * G / 100e9)  # NVLink-class link inside a node
    assert inside.step_s == pytest.approx(0.16 + 0.0525)
    assert inside.samples_per_s == pytest.approx(8 * 16 / (0.16 + 0.0525))
    assert inside.activations == pytest.approx(1.5 * 80 * 2**20 * 16)  # flash attention keeps no attention matrices
    assert inside.optimizer_step == pytest.approx(4 * G / 8)  # one fp32 temporary of the rank's partition
    assert inside.memory == pytest.approx(2 * G + 1.5 * 80 * 2**20 * 16 + 2 * 2**30)  # activations outweigh it
    few = plan(profile, gpu, 8, 3, 1)
    assert few.memory == pytest.approx(2 * G + 4 * G / 8 + 2 * 2**30)  # the optimizer's step is the peak
    assert inside.fits
    across = plan(profile, gpu, 16, 3, 16)
    assert across.communication_s == pytest.approx(3 * 15 / 16 * 2 * G / 10e9)  # beyond one node: the slower link
    hidden = plan(profile, Hardware(**{**gpu.__dict__, "comm_overlap": 1.0}), 16, 3, 16)
    assert hidden.step_s == pytest.approx(0.16 + across.communication_s - 0.16 * 2 / 3)  # backward hides what it can
    no_flash = plan(profile, Hardware(**{**gpu.__dict__, "flash_attention": False}), 8, 3, 16)
    assert no_flash.activations == pytest.approx(1.5 * 100 * 2**20 * 16)
    assert not plan(profile, Hardware(**{**gpu.__dict__, "memory_gib": 8}), 8, 0, 16).fits  # 16 GB of states alone


def _real_counts(task: RecommendationTask, batch: int) -> tuple[float, int]:
    """FLOPs and distinct saved-for-backward bytes of a real CPU forward and backward of the encoder."""
    spec = task.encoder.preprocess()
    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
    tokens = spec.tokenize(["a small red circle"] * batch)
    weights = {p.data_ptr() for p in task.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with FlopCounterMode(display=False) as flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            image, text = task.encoder(images, tokens)
        (image.sum() + text.sum()).backward()
    return flops.get_total_flops(), sum(saved.values())


def test_meta_device_counts_equal_a_real_cpu_run():
    """On the meta device attention runs torch's math path; so does the real run here, and every count
    matches exactly. CPU training itself runs a fused attention kernel that keeps no attention matrices:
    what it keeps lies near the count without them (the rest is fitted, see tools/plan_scale.py --validate)."""
    config = load_config(None, [f"encoder.model={TINY_CLIP}"])
    profile = profile_model(config, num_users=50, num_items=70, precision="fp32")
    torch.manual_seed(0)
    real = RecommendationTask(config, ShardSet.planned(50, 70)).train()
    assert profile.parameters == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert profile.encoder_parameters == sum(p.numel() for p in real.encoder.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        (flops_1, saved_1), (flops_2, saved_2) = _real_counts(real, 1), _real_counts(real, 2)
    assert profile.flops_per_sample == flops_2 - flops_1 > 0
    assert profile.saved_bytes_per_sample == saved_2 - saved_1 > profile.attention_bytes_per_sample > 0
    fused = _real_counts(real, 2)[1] - _real_counts(real, 1)[1]
    assert fused < profile.saved_bytes_per_sample
    assert fused == pytest.approx(profile.saved_bytes_per_sample - profile.attention_bytes_per_sample, rel=0.15)
    bf16 = profile_model(config, num_users=50, num_items=70, precision="bf16")
    # About half: norm statistics and softmax results stay fp32.
    assert bf16.saved_bytes_per_sample == pytest.approx(profile.saved_bytes_per_sample / 2, rel=0.15)


def test_the_pretrained_dual_encoder_is_counted_as_a_real_cpu_run_counts_it():
    """MiniLM's attention mask reads its values (a failure on the meta device before): counted on fake inputs, the
    FLOPs per item are a real forward and backward's."""
    config = load_config("configs/ml100k-two-tower-minilm-effnet.yaml", ["encoder.pretrained=null", "data.shards=unused"])
    profile = profile_model(config, num_users=50, num_items=70, precision="fp32")
    real = RecommendationTask(config, ShardSet.planned(50, 70)).train()
    with sdpa_kernel(SDPBackend.MATH):
        (flops_1, _), (flops_2, _) = _real_counts(real, 1), _real_counts(real, 2)
    assert profile.flops_per_sample == flops_2 - flops_1 > 1e9


def test_the_planner_prints_every_gpu_count():
    out = subprocess.run([sys.executable, str(REPO / "tools/plan_scale.py"), "--model", TINY_CLIP, "--gpus", "8,16",
                          "--items", "1000", "--users", "1000"], capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["8"], ["16"])]
    assert [r[0] for r in rows] == ["8", "16"] and all(r[6] == "yes" for r in rows)


@pytest.mark.distributed
def test_predictions_for_two_cpu_ranks_are_within_tolerance(world_shards, tmp_path):
    """Fitted on one rank, the planner predicts the 2-rank run's per-rank memory within 10% and its samples/s
    within a factor of 2. Memory came out within 3% in every run here; speed does not hold still on this shared
    2-core virtual machine: the same 2-rank run measured 1.5 to 2.1 samples/s, and predictions were -11% to +70%
    off (the larger errors at micro-batch 4, where the optimizer's step outweighs the FLOPs). The README's table
    (tools/plan_scale.py --validate, 1, 2 and 4 ranks) is the benchmark; this test keeps the planner honest."""
    out = tmp_path / "validation.json"
    done = subprocess.run([sys.executable, str(REPO / "tools/plan_scale.py"), "--validate", "--shards", str(world_shards),
                           "--model", "ViT-B-32", "--ranks", "1,2", "--micro-batch", "8", "--steps", "3", "--warmup", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=1200,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    print(done.stdout[-2500:])
    two = next(row for row in json.loads(out.read_text()) if row["ranks"] == 2)
    assert two["predicted_memory"] == pytest.approx(two["measured_memory"], rel=0.10)
    assert 0.5 <= two["predicted_samples_per_s"] / two["measured_samples_per_s"] <= 2.0
